"""`haina export hf` and `haina import hf`: checkpoints to and from Hugging Face `transformers` directories.

An exported directory is what `save_pretrained` would write: `config.json`,
`generation_config.json`, `model.safetensors`, and the tokenizer as `PreTrainedTokenizerFast`
files (`tokenizer.json`, `tokenizer_config.json` with the special tokens and the chat template,
`special_tokens_map.json`). Neither direction imports `transformers` or touches the network:
the mapping is plain tensors and JSON (`haina.model.hf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from haina.core.errors import HainaError
from haina.core.io import write_json, write_text
from haina.core.log import info
from haina.core.output import check_output, output_dir
from haina.model.checkpoint import load_model, save_model
from haina.model.hf import (
    DTYPES,
    from_hf_config,
    from_hf_state_dict,
    load_hf_weights,
    read_hf_config,
    to_hf_config,
    to_hf_state_dict,
)
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer
from haina.tokenizer.tokenizer import EOT, read_tokenizer_config, read_tokenizer_file

EXPORT, IMPORT = "export hf", "import hf"  # the names in the manifests of their outputs


# ---------------------------------------------------------------------------------------- export
def export_hf(model: Transformer, tokenizer: Tokenizer | None, out: str | Path,
              dtype: Literal["float32", "bfloat16", "float16"] = "float32", *, overwrite: bool = False,
              inputs: tuple[str | Path, ...] = ()) -> Path:
    """Write `model` (and `tokenizer`) as a `transformers` model directory, atomically; returns the path.

    Args:
        model: the haina model.
        tokenizer: its tokenizer, written as PreTrainedTokenizerFast files; None to write weights only.
        out: the directory to create (an existing one is replaced only if it is an earlier `export hf` output).
        dtype: element type of the written weights.
        overwrite: replace an existing `out` of any other kind (never one overlapping `inputs`).
        inputs: where the model came from; `out` may never be, hold or lie inside them.
    """
    if dtype not in DTYPES:
        raise HainaError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    cfg = model.cfg
    ids = _special_ids(tokenizer)
    hf_config = to_hf_config(cfg, dtype=dtype, **ids)  # raises first if the architecture has no equivalent
    weights = {k: v.to(device="cpu", dtype=DTYPES[dtype]) if v.is_floating_point() else v.cpu()
               for k, v in to_hf_state_dict(cfg, model.weights()).items()}
    out = Path(out)
    with output_dir(out, EXPORT, inputs=inputs, overwrite=overwrite) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "haina"})
        write_json(tmp / "config.json", hf_config)
        write_json(tmp / "generation_config.json", {k: v for k, v in ids.items() if v is not None})
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp, model_max_length=cfg.block_size)
    return out


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int | None = None) -> None:
    """Write `tokenizer` as the files `transformers.AutoTokenizer` loads as a `PreTrainedTokenizerFast`."""
    out = Path(out_dir)
    write_text(out / "tokenizer.json", tokenizer.to_json())
    specials = {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token}
    specials = {k: v for k, v in specials.items() if v is not None}
    extra = [t for t in tokenizer.extra_special if tokenizer.token_to_id(t) is not None]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "additional_special_tokens": extra,
              "model_max_length": model_max_length or 1_000_000, "clean_up_tokenization_spaces": False,
              # Byte-level BPE has no unknown token; transformers must not invent one.
              "unk_token": None}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", {**specials, "additional_special_tokens": extra})


def _special_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


# ---------------------------------------------------------------------------------------- import
def import_hf(path: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """Load a local `transformers` Llama-family or GPT-2 directory as a haina model (fp32) and tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise HainaError(f"Hugging Face model directory not found: {path}")
    hf = read_hf_config(path)
    cfg = from_hf_config(hf)
    weights = from_hf_state_dict(cfg, load_hf_weights(path))
    _check_shapes(cfg, weights, path)
    model = Transformer(cfg)
    model.load_weights(weights)
    model.eval()
    tokenizer = load_hf_tokenizer(path, eos_token_id=hf.get("eos_token_id"))
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HainaError(f"the tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}; they do not belong together")
    return model, tokenizer


def _check_shapes(cfg, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Compare the weights with the model config.json describes, built on the meta device (no memory): a damaged
    size in config.json (a width of 10^12) is refused before a model that large is allocated."""
    try:
        with torch.device("meta"):
            expected = Transformer(cfg).weights()
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:  # sizes the config accepts but torch refuses
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HainaError(f"{path / 'config.json'} describes a model that cannot be built ({reason})") from None
    for name, want in expected.items():
        if name in weights and tuple(weights[name].shape) != tuple(want.shape):
            raise HainaError(f"{path / 'config.json'} does not describe the weights beside it: {name} is "
                             f"{tuple(weights[name].shape)} in the weights but {tuple(want.shape)} by config.json")


def load_hf_tokenizer(path: str | Path, eos_token_id: int | list[int] | None = None) -> Tokenizer | None:
    """The tokenizer of a `transformers` directory as a haina Tokenizer, or None when there is none.

    Reads tokenizer.json directly; a directory with only slow-tokenizer files (vocab.json +
    merges.txt, tokenizer.model) is converted through `transformers`.
    """
    path = Path(path)
    cfg = read_tokenizer_config(path / "tokenizer_config.json")
    if (path / "tokenizer.json").exists():
        tok = read_tokenizer_file(path / "tokenizer.json")
    elif any((path / f).is_file() for f in ("vocab.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        try:
            fast = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # damaged vocab/merges/model
            raise HainaError(f"cannot read the tokenizer files in {path} ({str(e).splitlines()[0] if str(e) else e!r})"
                             ) from None
        if not getattr(fast, "is_fast", False):
            info(f"tokenizer in {path} has no fast version; imported without a tokenizer")
            return None
        tok = fast.backend_tokenizer
    else:
        return None

    def name(v) -> str | None:  # tokens may be stored as {"content": ...} dicts
        v = v.get("content") if isinstance(v, dict) else v
        return v if isinstance(v, str) and tok.token_to_id(v) is not None else None

    eos = name(cfg.get("eos_token"))
    if eos is None:
        first = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
        eos = tok.id_to_token(first) if isinstance(first, int) else None
    if eos is None and tok.token_to_id(EOT) is not None:
        eos = EOT
    if eos is None:
        info(f"tokenizer in {path} names no end-of-sequence token; imported without a tokenizer")
        return None
    extra = [name(t) for t in (cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or [])]
    return Tokenizer(tok, eos_token=eos, bos_token=name(cfg.get("bos_token")), pad_token=name(cfg.get("pad_token")),
                     chat_template=_chat_template(path, cfg), extra_special=tuple(t for t in extra if t))


def _chat_template(path: Path, cfg: dict) -> str | None:
    template = cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (path / "chat_template.jinja").is_file():  # where transformers >= 4.51 saves it
        try:
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise HainaError(f"cannot read {path / 'chat_template.jinja'}: not UTF-8 text") from None
    if template is not None and not isinstance(template, str):
        raise HainaError(f"the chat template in {path / 'tokenizer_config.json'} is not a string")
    return template


# ---------------------------------------------------------------------------------------- commands
def export_hf_command(checkpoint: str, out: str, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                      overwrite: bool = False) -> None:
    """Export a checkpoint as a Hugging Face transformers model directory.

    Llama layout for rmsnorm + rope + swiglu models, GPT-2 layout for layernorm + learned
    positions + gelu models; the result loads offline with AutoModelForCausalLM.from_pretrained
    and AutoTokenizer.from_pretrained.

    Args:
        checkpoint: a checkpoint directory or a training run directory (its best checkpoint).
        out: the directory to write (an earlier `export hf` output there is replaced whole; anything else needs
            --overwrite).
        dtype: element type of the exported weights.
        overwrite: replace an existing OUT that is not an `export hf` output (never one that is, holds or lies
            inside the checkpoint).
    """
    check_output(out, EXPORT, inputs=[checkpoint], overwrite=overwrite)  # before loading the model
    model, tokenizer = load_model(checkpoint)
    if tokenizer is None:
        info("the checkpoint has no tokenizer: exporting the model only")
    export_hf(model, tokenizer, out, dtype=dtype, overwrite=overwrite, inputs=(checkpoint,))
    kind = to_hf_config(model.cfg)["architectures"][0]
    info(f"exported {model.num_params():,} parameters as {kind} ({dtype}) to {out}")


def import_hf_command(path: str, out: str, overwrite: bool = False) -> None:
    """Import a Hugging Face Llama-family or GPT-2 model from a local directory as a haina checkpoint.

    Reads config.json and model.safetensors (also sharded, or pytorch_model.bin) plus the
    tokenizer and its chat template when present; never downloads anything.

    Args:
        path: the transformers model directory (as written by save_pretrained).
        out: the haina checkpoint directory to write (an earlier `import hf` output there is replaced whole;
            anything else needs --overwrite).
        overwrite: replace an existing OUT that is not an `import hf` output (never one that is, holds or lies
            inside PATH).
    """
    target = Path(out)
    check_output(target, IMPORT, inputs=[path], overwrite=overwrite)  # before reading the model
    model, tokenizer = import_hf(path)
    with torch.no_grad(), output_dir(target, IMPORT, inputs=[path], overwrite=overwrite) as tmp:
        save_model(tmp, model, tokenizer, extra_config={"source": {"hugging_face": str(Path(path).resolve())}})
    what = "with its tokenizer" if tokenizer is not None else "without a tokenizer"
    info(f"imported {model.num_params():,} parameters ({read_hf_config(path)['model_type']}) {what} to {out}")
