"""`haina export checkpoint`: a plain checkpoint (one model.safetensors) from a sharded training checkpoint.

A distributed run whose parameters are sharded writes each rank's part of the weights and optimizer state
(`haina.train.sharded`), which only resuming reads. `generate`, `chat`, `serve`, `eval`, `export hf` and the
rest read a plain checkpoint; this command makes one, in one process and without the optimizer state: the
whole weights are assembled from the shards' pieces, whatever world size wrote them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from haina.core.config import load_yaml
from haina.core.errors import HainaError
from haina.core.log import info
from haina.core.output import check_output, output_dir
from haina.model.checkpoint import CONFIG, SHARDS, save_model
from haina.model.config import ModelConfig
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer
from haina.train import checkpoint as ckpt
from haina.train.sharded import full_weights, holds_shards

COMMAND = "export checkpoint"


def sharded_checkpoint(path: str | Path, which: Literal["best", "latest"] = "latest") -> Path:
    """The sharded checkpoint directory that `path` (a checkpoint or a run directory) names, or a one-line error."""
    path = Path(path)
    if holds_shards(path):
        return path
    index = ckpt.read_index(path)
    if index is not None:
        name = index.get(which) or index.get("latest")
        if ckpt.is_step_name(name) and holds_shards(ckpt.checkpoints_dir(path) / name):
            return ckpt.checkpoints_dir(path) / name
        if ckpt.is_step_name(name):
            raise HainaError(f"{ckpt.checkpoints_dir(path) / name} is already a plain checkpoint (model.safetensors); "
                             "every command reads it as it is")
    if not path.exists():
        raise HainaError(f"checkpoint not found: {path}")
    raise HainaError(f"{path} is neither a sharded checkpoint (a {SHARDS}/ directory) nor a run directory with "
                     "checkpoints/index.json")


def consolidate(checkpoint: Path) -> tuple[Transformer, Tokenizer | None, dict]:
    """The model of a sharded checkpoint, whole, with its tokenizer and the rest of its config.yaml."""
    config = load_yaml(checkpoint / CONFIG)
    if not isinstance(config.get("model"), dict):
        raise HainaError(f"{checkpoint / CONFIG} has no 'model' mapping; is it a haina checkpoint?")
    cfg = ModelConfig.from_dict(config["model"])
    weights = full_weights(checkpoint)
    if cfg.tie_embeddings:  # the head is the embedding's tensor: saved once, under either name
        head = weights.pop("lm_head.weight", None)
        if "tok_emb.weight" not in weights and head is not None:
            weights["tok_emb.weight"] = head
    model = Transformer(cfg)
    model.load_weights(weights)  # names and shapes checked: one line if the shards hold another model
    tok_dir = checkpoint / "tokenizer"
    tokenizer = Tokenizer.load(tok_dir) if tok_dir.exists() else None
    return model, tokenizer, {k: v for k, v in config.items() if k != "model"}


def export_checkpoint_command(checkpoint: str, out: str, which: Literal["best", "latest"] = "latest",
                              overwrite: bool = False) -> None:
    """Write a plain checkpoint (model.safetensors, config.yaml, tokenizer) from a sharded training checkpoint.

    Distributed runs with sharded parameters (FSDP2, `--parallel.dp_shard N`) write checkpoints as one file per
    rank, for resuming at any world size; every other command reads the plain checkpoint this makes.

    Args:
        checkpoint: a sharded checkpoint directory (RUN/checkpoints/step-N) or a run directory.
        out: the plain checkpoint directory to write (an earlier `export checkpoint` output there is replaced whole;
            anything else needs --overwrite).
        which: of a run directory, the latest or the best checkpoint.
        overwrite: replace an existing OUT that is not an `export checkpoint` output (never one that is, holds or
            lies inside the checkpoint).
    """
    check_output(out, COMMAND, inputs=[checkpoint], overwrite=overwrite)  # before reading anything
    source = sharded_checkpoint(checkpoint, which)
    model, tokenizer, extra = consolidate(source)
    with output_dir(out, COMMAND, inputs=[checkpoint], overwrite=overwrite, extra={"source": str(source)}) as tmp:
        save_model(tmp, model, tokenizer, extra_config=extra)
    n = sum(t.numel() for t in model.weights().values())
    info(f"wrote {out}: the {n:,} weights of {source}, assembled from its shards")


__all__ = ["consolidate", "export_checkpoint_command", "sharded_checkpoint"]
