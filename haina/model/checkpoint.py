"""Model checkpoints on disk: weights in safetensors, config in YAML, tokenizer beside them.

A checkpoint directory:

    model.safetensors   weights (a tied LM head stored once)
    config.yaml         {"model": {...}} and, for training runs, the rest of the resolved config
    tokenizer/          tokenizer.json + tokenizer_config.json (optional)
    checksums.json      size and sha256 of each file above (`haina.core.checksums`), verified at load

A training run directory holds `checkpoints/step-NNNNNNN/` directories and
`checkpoints/index.json` naming the latest and the best; `resolve_checkpoint` accepts a run
directory or a checkpoint directory, so every command can be pointed at either.

Loading checks before it trusts: the checksums when the checkpoint has them (older checkpoints and
imports from elsewhere have none and still load), then the config, then the weights' safetensors
header; each failure is one line naming the file and what is wrong with it.
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
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def save_model(out_dir: str | Path, model: Transformer, tokenizer: Tokenizer | None = None,
               extra_config: dict | None = None, checksums: bool = True) -> None:
    """Write weights, config, tokenizer and their checksums into `out_dir` (each file atomically).

    Args:
        out_dir: the checkpoint directory (created if needed).
        model: the model whose weights and config are written.
        tokenizer: written into `out_dir/tokenizer`; None for none.
        extra_config: more sections for config.yaml (a training run's resolved config).
        checksums: write checksums.json; a caller that adds files afterwards (a training checkpoint's trainer
            state) passes False and calls `write_checksums(out_dir)` itself once everything is written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.weights().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "producer": "haina"})
    write_yaml(out / CONFIG, {"model": model.cfg.to_dict(), **(extra_config or {})})
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer")
    if checksums:
        write_checksums(out)


def resolve_checkpoint(path: str | Path, which: Literal["best", "latest"] = "best") -> Path:
    """A checkpoint directory from a checkpoint or run directory, with a clear error if there is none."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    index = path / "checkpoints" / "index.json"
    if index.is_file():
        entry = read_json(index, "a checkpoint index is an object naming 'latest' and 'best'", expect=dict)
        name = entry.get(which) or entry.get("latest")
        if isinstance(name, str) and (path / "checkpoints" / name / WEIGHTS).is_file():
            return path / "checkpoints" / name
    if not path.exists():
        raise HainaError(f"checkpoint not found: {path}")
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
    check_weights(ckpt / WEIGHTS)
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
               dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Load a checkpoint for inference: (model in eval mode, tokenizer or None)."""
    ckpt = resolve_checkpoint(path, which)
    # Checksums first: a damaged config.yaml must not get to size the model it would build. The weights' size is
    # checked now too, but their hash is computed in a thread while the model is built, which hides its cost.
    verify_checksums(ckpt, sizes_only=(WEIGHTS,))
    cfg = load_config(ckpt)
    with ThreadPoolExecutor(max_workers=1) as pool:
        weights_ok = pool.submit(verify_checksums, ckpt, only=(WEIGHTS,))
        model = Transformer(cfg)
        weights_ok.result()  # raises the HainaError naming a damaged file
    model.load_weights(read_weights(ckpt / WEIGHTS))
    model.to(device=device, dtype=dtype).eval()
    return model, _load_tokenizer(ckpt, cfg)


__all__ = ["CONFIG", "WEIGHTS", "check_weights", "load_config", "load_model", "read_weights", "resolve_checkpoint",
           "save_model", "verify_checkpoint", "verify_checksums", "write_checksums"]
