"""Model checkpoints on disk: weights in safetensors, config in YAML, tokenizer beside them.

A checkpoint directory:

    model.safetensors   weights (a tied LM head stored once)
    config.yaml         {"model": {...}} and, for training runs, the rest of the resolved config
    tokenizer/          tokenizer.json + tokenizer_config.json (optional)

A training run directory holds `checkpoints/step-NNNNNNN/` directories and
`checkpoints/index.json` naming the latest and the best; `resolve_checkpoint` accepts a run
directory or a checkpoint directory, so every command can be pointed at either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from haina.core.config import load_yaml
from haina.core.errors import HainaError
from haina.core.io import atomic_path, write_yaml
from haina.model.config import ModelConfig
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def save_model(out_dir: str | Path, model: Transformer, tokenizer: Tokenizer | None = None,
               extra_config: dict | None = None) -> None:
    """Write weights, config and tokenizer into `out_dir` (each file atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.weights().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "producer": "haina"})
    write_yaml(out / CONFIG, {"model": model.cfg.to_dict(), **(extra_config or {})})
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer")


def resolve_checkpoint(path: str | Path, which: Literal["best", "latest"] = "best") -> Path:
    """A checkpoint directory from a checkpoint or run directory, with a clear error if there is none."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    index = path / "checkpoints" / "index.json"
    if index.is_file():
        try:
            entry = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HainaError(f"cannot parse {index}: {e}") from None
        name = entry.get(which) or entry.get("latest")
        if name and (path / "checkpoints" / name / WEIGHTS).is_file():
            return path / "checkpoints" / name
    if not path.exists():
        raise HainaError(f"checkpoint not found: {path}")
    raise HainaError(f"{path} holds no checkpoint ({WEIGHTS} or checkpoints/index.json); "
                     "point --checkpoint at a run directory or a checkpoint directory")


def load_config(ckpt: str | Path) -> ModelConfig:
    ckpt = resolve_checkpoint(ckpt)
    data = load_yaml(ckpt / CONFIG)
    if "model" not in data:
        raise HainaError(f"{ckpt / CONFIG} has no 'model' section")
    return ModelConfig.from_dict(data["model"])


def load_model(path: str | Path, device: str | torch.device = "cpu", which: Literal["best", "latest"] = "best",
               dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Load a checkpoint for inference: (model in eval mode, tokenizer or None)."""
    ckpt = resolve_checkpoint(path, which)
    cfg = load_config(ckpt)
    model = Transformer(cfg)
    try:
        sd = load_file(str(ckpt / WEIGHTS))
    except Exception as e:  # noqa: BLE001 — safetensors raises its own error types for corrupt files
        raise HainaError(f"cannot read weights {ckpt / WEIGHTS}: {e}") from None
    model.load_weights(sd)
    model.to(device=device, dtype=dtype).eval()
    tok_dir = ckpt / "tokenizer"
    tokenizer = Tokenizer.load(tok_dir) if (tok_dir / "tokenizer.json").is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HainaError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    return model, tokenizer
