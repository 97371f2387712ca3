"""`haina export hf` and `haina import hf`: checkpoints to and from Hugging Face `transformers` directories.

An exported directory is what `save_pretrained` would write: `config.json`,
`generation_config.json` (not for an encoder, which generates nothing), `model.safetensors`, and the tokenizer
as `PreTrainedTokenizerFast` files (`tokenizer.json`, `tokenizer_config.json` with the special tokens and the
chat template, or a BERT's [CLS]/[SEP]/[MASK]/[UNK], `special_tokens_map.json`). Neither direction imports
`transformers` or touches the network: the mapping is plain tensors and JSON (`haina.model.hf`).
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
from haina.model.hf import DTYPES, read_hf_config, to_hf_config, to_hf_state_dict
from haina.model.hf_import import import_hf, load_hf_tokenizer  # noqa: F401 (re-exported: the import half lives in model)
from haina.model.lora import has_lora, merge_lora
from haina.model.quant import refuse_quantized
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer

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
    encoder = hf_config["model_type"] == "bert"
    weights = {k: v.to(device="cpu", dtype=DTYPES[dtype]) if v.is_floating_point() else v.cpu()
               for k, v in to_hf_state_dict(cfg, model.weights()).items()}
    out = Path(out)
    with output_dir(out, EXPORT, inputs=inputs, overwrite=overwrite) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "haina"})
        write_json(tmp / "config.json", hf_config)
        if not encoder:
            write_json(tmp / "generation_config.json", {k: v for k, v in ids.items() if v is not None})
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp, model_max_length=cfg.block_size,
                              roles=bert_token_roles(tokenizer) if encoder else None)
    return out


def bert_token_roles(tokenizer: Tokenizer) -> dict[str, str]:
    """The tokens a BERT tokenizer_config names (cls, sep, mask, unk) that `tokenizer` has.

    haina's tokenizer keeps no role names beyond eos/bos/pad, so they are found by what they are: the
    end-of-sequence token is BERT's [SEP] (`load_hf_tokenizer` took [SEP] as it), the others by their usual text,
    and the unknown token from the WordPiece model itself.
    """
    specials = tokenizer.special_strings
    roles = {"sep_token": tokenizer.eos_token,
             "cls_token": next((t for t in ("[CLS]", "<s>") if t in specials), None),
             "mask_token": next((t for t in ("[MASK]", "<mask>", "<|mask|>") if t in specials), None),
             "unk_token": getattr(tokenizer.tok.model, "unk_token", None)}
    return {k: v for k, v in roles.items() if isinstance(v, str) and tokenizer.token_to_id(v) is not None}


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int | None = None,
                      roles: dict[str, str] | None = None) -> None:
    """Write `tokenizer` as the files `transformers.AutoTokenizer` loads as a `PreTrainedTokenizerFast`.

    `roles` adds named tokens to tokenizer_config.json (a BERT's `bert_token_roles`: cls_token, mask_token, ...).
    """
    out = Path(out_dir)
    write_text(out / "tokenizer.json", tokenizer.to_json())
    specials = {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token}
    specials = {k: v for k, v in specials.items() if v is not None}
    extra = [t for t in tokenizer.extra_special if tokenizer.token_to_id(t) is not None]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "additional_special_tokens": extra,
              "model_max_length": model_max_length or 1_000_000, "clean_up_tokenization_spaces": False,
              # Byte-level BPE has no unknown token; transformers must not invent one.
              "unk_token": None}
    config.update(roles or {})
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", {**specials, **(roles or {}), "additional_special_tokens": extra})


def _special_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


# ---------------------------------------------------------------------------------------- commands
def export_hf_command(checkpoint: str, out: str, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                      overwrite: bool = False) -> None:
    """Export a checkpoint as a Hugging Face transformers model directory.

    Llama layout for rmsnorm + rope + swiglu models, GPT-2 layout for layernorm + learned
    positions + gelu models; the result loads offline with AutoModelForCausalLM.from_pretrained
    and AutoTokenizer.from_pretrained. An encoder with BERT's options (an imported BERT) is written as
    BertForMaskedLM (with its MLM head) or BertModel, for AutoModel / AutoModelForMaskedLM.

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
    refuse_quantized(model, "haina export hf", f"--checkpoint {checkpoint}")
    if has_lora(model):  # a LoRA run: transformers gets one plain model, the adapters folded in
        merge_lora(model)
        info("the checkpoint is a LoRA run: its adapters are merged into the exported weights "
             "(haina export peft writes them apart)")
    if tokenizer is None:
        info("the checkpoint has no tokenizer: exporting the model only")
    export_hf(model, tokenizer, out, dtype=dtype, overwrite=overwrite, inputs=(checkpoint,))
    kind = to_hf_config(model.cfg)["architectures"][0]
    info(f"exported {model.num_params():,} parameters as {kind} ({dtype}) to {out}")


def import_hf_command(path: str, out: str, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                      overwrite: bool = False) -> None:
    """Import a Hugging Face Llama-family, GPT-2 or BERT model from a local directory as a haina checkpoint.

    Reads config.json and model.safetensors (also sharded, or pytorch_model.bin) plus the
    tokenizer and its chat template when present; never downloads anything. A BERT (BertModel,
    BertForMaskedLM, or the encoder of any Bert* model) becomes an encoder for `haina finetune classify`:
    every token is token type 0, and the pooler and task heads are left behind.

    Args:
        path: the transformers model directory (as written by save_pretrained).
        out: the haina checkpoint directory to write (an earlier `import hf` output there is replaced whole;
            anything else needs --overwrite).
        dtype: element type of the stored weights (bfloat16 halves the checkpoint; inference and fine-tuning
            read it as stored unless told otherwise).
        overwrite: replace an existing OUT that is not an `import hf` output (never one that is, holds or lies
            inside PATH).
    """
    target = Path(out)
    if dtype not in DTYPES:
        raise HainaError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    check_output(target, IMPORT, inputs=[path], overwrite=overwrite)  # before reading the model
    model, tokenizer = import_hf(path)
    model.to(dtype=DTYPES[dtype])
    with torch.no_grad(), output_dir(target, IMPORT, inputs=[path], overwrite=overwrite) as tmp:
        save_model(tmp, model, tokenizer, extra_config={"source": {"hugging_face": str(Path(path).resolve())}})
    what = "with its tokenizer" if tokenizer is not None else "without a tokenizer"
    info(f"imported {model.num_params():,} parameters ({read_hf_config(path)['model_type']}, {dtype}) {what} to {out}")
