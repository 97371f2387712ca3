"""Reading a Hugging Face `transformers` directory (Llama family, GPT-2, BERT) as a haina model and tokenizer.

It lives in the model stage, not beside `haina export hf`, because stages above the model (fine-tuning's
`--base`) load Hugging Face directories too. Nothing here downloads: the mapping is plain tensors and JSON
(`haina.model.hf`); only a tokenizer stored as slow-tokenizer files needs `transformers` to convert it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from haina.core.errors import HainaError
from haina.core.log import info
from haina.model.bert import as_stored, bert_names
from haina.model.hf import from_hf_config, from_hf_state_dict, load_hf_weights, read_hf_config
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer
from haina.tokenizer.tokenizer import EOT, read_tokenizer_config, read_tokenizer_file


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` looks like a `transformers` model directory (config.json, no haina config.yaml)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def import_hf(path: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """Load a local `transformers` Llama-family, GPT-2 or BERT directory as a haina model (fp32) and tokenizer.

    A BERT keeps its masked-LM head when its weights hold one (BertForMaskedLM), and is an encoder
    (causal: false) either way; what of it is left behind is in `haina.model.bert`.
    """
    path = Path(path)
    if not path.is_dir():
        raise HainaError(f"Hugging Face model directory not found: {path}")
    hf = read_hf_config(path)
    cfg = from_hf_config(hf)  # a config.json haina cannot read is refused before the weights are
    sd = load_hf_weights(path)
    if hf.get("model_type") == "bert":  # which BERT it is, the weights say: `architectures` may be absent or wrong
        _left_behind(sd)
        cfg = from_hf_config(as_stored(hf, sd))
    weights = from_hf_state_dict(cfg, sd)
    _check_shapes(cfg, weights, path)
    model = Transformer(cfg)
    model.load_weights(weights)
    model.eval()
    tokenizer = load_hf_tokenizer(path, eos_token_id=hf.get("eos_token_id"))
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HainaError(f"the tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}; they do not belong together")
    return model, tokenizer


def _left_behind(sd: dict[str, torch.Tensor]) -> None:
    """Say which of a BERT's heads are not imported (`haina.model.bert` says why)."""
    names = bert_names(sd)
    left = [what for what, prefix in (("the pooler", "pooler."), ("the next-sentence head", "cls.seq_relationship."),
                                      ("the task head", "classifier.")) if any(k.startswith(prefix) for k in names)]
    if left:
        info(f"not imported: {', '.join(left)} (haina classify trains its own head on the hidden states)")


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
    merges.txt, tokenizer.model, BERT's vocab.txt) is converted through `transformers`. A BERT tokenizer has no
    end-of-sequence token: its [SEP], which ends every sequence it encodes, is taken as one; its [CLS] and
    [MASK] are kept among the special tokens (the mask is the one MLM training uses).
    """
    path = Path(path)
    cfg = read_tokenizer_config(path / "tokenizer_config.json")
    if (path / "tokenizer.json").exists():
        tok = read_tokenizer_file(path / "tokenizer.json")
    elif any((path / f).is_file() for f in ("vocab.json", "tokenizer.model", "vocab.txt")):
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
    # haina pads and cuts batches itself; a tokenizer.json that pads every text to a fixed length or truncates it
    # (sentence-transformers' do, to 128 tokens) would turn padding into text and cut texts without a word.
    tok.no_padding()
    tok.no_truncation()

    def name(v) -> str | None:  # tokens may be stored as {"content": ...} dicts
        v = v.get("content") if isinstance(v, dict) else v
        return v if isinstance(v, str) and tok.token_to_id(v) is not None else None

    eos = name(cfg.get("eos_token"))
    if eos is None:
        first = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
        eos = tok.id_to_token(first) if isinstance(first, int) else None
    if eos is None:
        eos = name(cfg.get("sep_token"))
    if eos is None and tok.token_to_id(EOT) is not None:
        eos = EOT
    if eos is None:
        info(f"tokenizer in {path} names no end-of-sequence token; imported without a tokenizer")
        return None
    listed = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
    extra = [t for t in map(name, listed) if t]
    bos, pad = name(cfg.get("bos_token")), name(cfg.get("pad_token"))
    for role in ("cls_token", "sep_token", "mask_token"):  # BERT's roles; Llama and GPT-2 tokenizers have none
        token = name(cfg.get(role))
        if token is not None and token not in (*extra, eos, bos, pad):
            extra.append(token)
    return Tokenizer(tok, eos_token=eos, bos_token=bos, pad_token=pad, chat_template=_chat_template(path, cfg),
                     extra_special=tuple(extra))


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


__all__ = ["import_hf", "is_hf_dir", "load_hf_tokenizer"]
