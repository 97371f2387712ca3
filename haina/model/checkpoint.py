"""Model checkpoints on disk: weights in safetensors, config in YAML, tokenizer beside them.

A checkpoint directory:

    model.safetensors   weights (a tied LM head stored once)
    config.yaml         {"model": {...}} and, for training runs, the rest of the resolved config
    tokenizer/          tokenizer.json + tokenizer_config.json (optional)
    checksums.json      size and sha256 of each file above (`haina.core.checksums`), verified at load

A training run directory holds `checkpoints/step-NNNNNNN/` directories and
`checkpoints/index.json` naming the latest and the best; `resolve_checkpoint` accepts a run
directory or a checkpoint directory, so every command can be pointed at either. A LoRA run's
checkpoints hold adapters (`adapter.safetensors`, `haina.model.lora`) instead of weights; loading
one loads the base it records first, so such a run works wherever a checkpoint does.

Loading checks before it trusts: the checksums when the checkpoint has them (older checkpoints and
imports from elsewhere have none and still load), then the config, then the weights' safetensors
header; each failure is one line naming the file and what is wrong with it.

A quantized checkpoint (`haina compress quantize`) records its method in config.yaml's `quantization`
section; loading builds the model's integer layers (`haina.model.quant`) before reading the weights into
them, so such a checkpoint works wherever a float one does.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from haina.core.checksums import verify_checksums, write_checksums
from haina.core.config import load_yaml
from haina.core.errors import HainaError
from haina.core.io import atomic_path, read_json, write_yaml
from haina.model.config import ModelConfig
from haina.model.quant import QuantConfig, build_quantized, is_quantized, recorded_quantization
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
ADAPTER = "adapter.safetensors"  # a LoRA checkpoint's tensors (haina.model.lora, which imports this module)
SHARDS = "shards"  # a sharded training checkpoint's weights, one file per rank (haina.train.sharded)


def _holds_model(path: Path) -> bool:
    return (path / WEIGHTS).is_file() or (path / ADAPTER).is_file()


def save_model(out_dir: str | Path, model: Transformer, tokenizer: Tokenizer | None = None,
               extra_config: dict | None = None, checksums: bool = True, weights: bool = True) -> None:
    """Write weights, config, tokenizer and their checksums into `out_dir` (each file atomically).

    Args:
        out_dir: the checkpoint directory (created if needed).
        model: the model whose weights and config are written.
        tokenizer: written into `out_dir/tokenizer`; None for none.
        extra_config: more sections for config.yaml (a training run's resolved config).
        checksums: write checksums.json; a caller that adds files afterwards (a training checkpoint's trainer
            state) passes False and calls `write_checksums(out_dir)` itself once everything is written.
        weights: False writes config and tokenizer only (a sharded checkpoint's ranks write the weights).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if weights:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.weights().items()}
        with atomic_path(out / WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "haina"})
    write_yaml(out / CONFIG, {"model": model.cfg.to_dict(), **(extra_config or {})})
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer")
    if checksums:
        write_checksums(out)


def resolve_checkpoint(path: str | Path, which: Literal["best", "latest"] = "best") -> Path:
    """A checkpoint directory from a checkpoint or run directory, with a clear error if there is none."""
    path = Path(path)
    if _holds_model(path):
        return path
    index = path / "checkpoints" / "index.json"
    if index.is_file():
        entry = read_json(index, "a checkpoint index is an object naming 'latest' and 'best'", expect=dict)
        name = entry.get(which) or entry.get("latest")
        if isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and \
                _holds_model(path / "checkpoints" / name):
            return path / "checkpoints" / name
    if not path.exists():
        raise HainaError(f"checkpoint not found: {path}")
    sharded = path if (path / SHARDS).is_dir() else None
    if sharded is None and index.is_file():
        name = read_json(index, "a checkpoint index is an object naming 'latest' and 'best'", expect=dict).get(which)
        if isinstance(name, str) and "/" not in name and (path / "checkpoints" / name / SHARDS).is_dir():
            sharded = path / "checkpoints" / name
    if sharded is not None:
        raise HainaError(f"{sharded} is a sharded training checkpoint (one file per rank, for resuming); make a "
                         f"plain one first: haina export checkpoint --checkpoint {path} --out DIR")
    if not path.is_dir():
        raise HainaError(f"{path} is a file; point --checkpoint at a run directory or a checkpoint directory")
    raise HainaError(f"{path} holds no checkpoint ({WEIGHTS} or checkpoints/index.json); "
                     "point --checkpoint at a run directory or a checkpoint directory")


def load_config(ckpt: str | Path) -> ModelConfig:
    """The `ModelConfig` saved in a checkpoint's config.yaml."""
    ckpt = resolve_checkpoint(ckpt)
    data = load_yaml(ckpt / CONFIG)
    if not isinstance(data.get("model"), dict):
        raise HainaError(f"{ckpt / CONFIG} has no 'model' mapping; is it a haina checkpoint's config?")
    try:
        return ModelConfig.from_dict(data["model"])
    except HainaError as e:
        raise HainaError(f"{ckpt / CONFIG}: {e}") from None


def load_quantization(ckpt: str | Path) -> QuantConfig | None:
    """How a checkpoint's weights are quantized (its config.yaml's `quantization` section); None for float."""
    ckpt = resolve_checkpoint(ckpt)
    if not (ckpt / WEIGHTS).is_file():  # a LoRA checkpoint holds float adapters (loading refuses a quantized base)
        return None
    return recorded_quantization(load_yaml(ckpt / CONFIG), str(ckpt / CONFIG))


def read_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with a one-line error naming a truncated or foreign file."""
    _check_readable(file)
    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise HainaError(f"cannot read weights {file}: truncated or not a safetensors file ({_reason(e)})") from None


def check_weights(file: str | Path) -> None:
    """Check a safetensors file's header and that the file covers it, without reading the tensors."""
    _check_readable(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except SafetensorError as e:
        raise HainaError(f"cannot read weights {file}: truncated or not a safetensors file ({_reason(e)})") from None


def _check_readable(file: str | Path) -> None:
    """Open `file` once in Python: the safetensors library reports a file it may not read as 'not found'."""
    with open(file, "rb"):
        pass


def _reason(e: Exception) -> str:
    return str(e).removeprefix("Error while deserializing header: ")


def verify_checkpoint(path: str | Path, which: Literal["best", "latest"] = "best") -> Path:
    """Check a checkpoint as loading would, without building the model; returns its directory.

    Verifies the checksums (when recorded), the config, the weights' header and the tokenizer, so a
    command that loads later (serve loads in the background) can refuse a broken checkpoint at once.
    Digests are remembered, so a `load_model` that follows does not hash the files again.
    """
    ckpt = resolve_checkpoint(path, which)
    verify_checksums(ckpt)
    cfg = load_config(ckpt)
    load_quantization(ckpt)
    check_weights(ckpt / (WEIGHTS if (ckpt / WEIGHTS).is_file() else ADAPTER))
    _load_tokenizer(ckpt, cfg)
    return ckpt


def _load_tokenizer(ckpt: Path, cfg: ModelConfig) -> Tokenizer | None:
    tok_dir = ckpt / "tokenizer"
    if not tok_dir.exists():
        return None
    tokenizer = Tokenizer.load(tok_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise HainaError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    return tokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu", which: Literal["best", "latest"] = "best",
               dtype: torch.dtype | None = None, adapter: str | Path | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Load a checkpoint for inference: (model in eval mode, tokenizer or None).

    Args:
        path: a checkpoint or run directory; a LoRA one loads the base it records, then its adapters.
        device: where to put the model.
        which: a run directory's best or latest checkpoint.
        dtype: the element type to cast the weights to (None: as stored).
        adapter: LoRA adapters (a LoRA run or checkpoint directory) to apply on top; they must have been
            trained on this very base (checked by a hash of its weights).
    """
    from haina.model.hf_import import import_hf, is_hf_dir
    from haina.model.lora import resolve_adapter  # lora.py builds on this module

    ckpt = resolve_checkpoint(path, which)
    if not (ckpt / WEIGHTS).is_file():  # a LoRA checkpoint: its base first
        if adapter is not None:
            raise HainaError(f"{path} is itself a LoRA checkpoint; pass its base as --checkpoint and it as --adapter")
        base = _recorded_base(ckpt)
        if is_hf_dir(base):
            return _with_adapter(*import_hf(base), ckpt, device, dtype)
        return load_model(base, device=device, dtype=dtype, adapter=ckpt)
    if adapter is not None:
        return _with_adapter(*load_model(ckpt), resolve_adapter(adapter, which), device, dtype)
    # Checksums first: a damaged config.yaml must not get to size the model it would build. The weights' size is
    # checked now too, but their hash is computed in a thread while the model is built, which hides its cost.
    verify_checksums(ckpt, sizes_only=(WEIGHTS,))
    cfg = load_config(ckpt)
    quantization = load_quantization(ckpt)
    with ThreadPoolExecutor(max_workers=1) as pool:
        weights_ok = pool.submit(verify_checksums, ckpt, only=(WEIGHTS,))
        # A quantized checkpoint's integer layers are built as such, never as the float model first.
        model = Transformer(cfg) if quantization is None else build_quantized(cfg, quantization)
        weights_ok.result()  # raises the HainaError naming a damaged file
    weights = read_weights(ckpt / WEIGHTS)
    model.load_weights(weights)
    if dtype is None:  # "as stored": a checkpoint saved in bfloat16 (`import hf --dtype`) loads in bfloat16
        stored = {t.dtype for t in weights.values() if t.is_floating_point()}
        dtype = stored.pop() if len(stored) == 1 else None
    model.to(device=device, dtype=dtype).eval()
    return model, _load_tokenizer(ckpt, cfg)


def _with_adapter(model: Transformer, tokenizer: Tokenizer | None, adapter_dir: Path, device, dtype) \
        -> tuple[Transformer, Tokenizer | None]:
    from haina.model.lora import load_adapter

    if is_quantized(model):
        raise HainaError(f"LoRA adapters ({adapter_dir}) cannot be applied to a quantized checkpoint; quantize the "
                         "float base with them instead: haina compress quantize --checkpoint BASE --adapter ADAPTER")
    load_adapter(model, adapter_dir)  # before any cast: the base's hash is checked on the values as stored
    tokenizer = _load_tokenizer(adapter_dir, model.cfg) or tokenizer  # fine-tuning may have added chat tokens
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


def _recorded_base(adapter_ckpt: Path) -> Path:
    """The base model a LoRA checkpoint records: a haina checkpoint or a Hugging Face directory."""
    from haina.model.lora import read_adapter_config

    base = read_adapter_config(adapter_ckpt).get("base")
    if not base or not Path(base).exists():
        raise HainaError(f"{adapter_ckpt} holds LoRA adapters whose base ({base or 'not recorded'}) is not there; "
                         "pass the base model as --checkpoint and this run as --adapter")
    return Path(base)


__all__ = ["ADAPTER", "CONFIG", "SHARDS", "WEIGHTS", "check_weights", "load_config", "load_model", "load_quantization",
           "read_weights", "resolve_checkpoint", "save_model", "verify_checkpoint", "verify_checksums", "write_checksums"]
