"""What every fine-tuning method shares: the base model, the run directory, LoRA-aware checkpoints.

`FinetuneTrainer` is the one `Trainer` with two of its small steps overridden: with LoRA, a checkpoint
holds the adapters (megabytes) and the hash of the base they belong to instead of every weight, and
resuming reads them back. Each method (sft.py, continued.py, distill.py, dpo.py) subclasses it for its
batches and its loss.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haina.core.errors import HainaError
from haina.core.io import write_json, write_yaml
from haina.core.log import info
from haina.core.seed import seed_everything
from haina.finetune.config import FinetuneConfig
from haina.model.checkpoint import load_model, read_weights, resolve_checkpoint
from haina.model.config import require_causal
from haina.model.hf_import import import_hf, is_hf_dir
from haina.model.lora import (
    ADAPTER_WEIGHTS,
    LoRAConfig,
    apply_lora,
    base_weights_hash,
    is_adapter_dir,
    load_adapter_state_dict,
    save_adapter,
)
from haina.model.quant import refuse_quantized
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer
from haina.train.config import TrainConfig
from haina.train.pretrain import claim_run_dir
from haina.train.trainer import Trainer


@dataclasses.dataclass
class Base:
    """A loaded base model and where it came from."""

    model: Transformer
    tokenizer: Tokenizer | None
    path: str  # resolved: the checkpoint directory or the Hugging Face directory
    kind: str  # "haina" or "hugging_face"


def load_base(path: str | None, *, what: str = "--base", command: str | None = None) -> Base:
    """The model to fine-tune (fp32, train mode): a haina checkpoint or run, or a Hugging Face directory.

    With `command` (a method that predicts next tokens: "finetune sft"), an encoder is a one-line error.
    """
    if not path:
        raise HainaError(f"{what} is required: a haina checkpoint or run directory, or a Hugging Face model directory")
    p = Path(path)
    if not p.exists():
        raise HainaError(f"{what} {path} not found")
    if is_hf_dir(p):
        model, tokenizer = import_hf(p)
        resolved, kind = p.resolve(), "hugging_face"
    else:
        if is_adapter_dir(p) or (p.is_dir() and _adapter_run(p)):
            raise HainaError(f"{what} {path} holds LoRA adapters, not a whole model; fold them into their base first "
                             f"(haina finetune merge --checkpoint {path} --out DIR) and pass DIR as {what}")
        ckpt = resolve_checkpoint(p)
        model, tokenizer = load_model(ckpt)
        resolved, kind = ckpt.resolve(), "haina"
    refuse_quantized(model, f"haina {command or 'finetune'}", f"{what} {path}")
    if command is not None:
        require_causal(model.cfg, f"haina {command}", f"{what} {path}")
    model.float().train()
    return Base(model=model, tokenizer=tokenizer, path=str(resolved), kind=kind)


def _adapter_run(run: Path) -> bool:
    try:
        ckpt = resolve_checkpoint(run)
    except HainaError:
        index = run / "checkpoints" / "index.json"
        return index.is_file() and any(is_adapter_dir(d) for d in (run / "checkpoints").glob("step-*"))
    return is_adapter_dir(ckpt) and not (ckpt / "model.safetensors").is_file()


def use_lora(model: Transformer, lora: LoRAConfig, seed: int) -> str | None:
    """Apply `lora` (when lora.r > 0) to `model`: adapters trainable, base frozen. Returns the base's hash."""
    if lora.r <= 0:
        return None
    seed_everything(seed)  # the adapters' initialization is part of the run
    base_hash = base_weights_hash(model)  # before the adapters exist: the hash is the base's alone
    names = apply_lora(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info(f"LoRA r={lora.r} on {len(names)} modules: {trainable:,} trainable parameters "
         f"({trainable / max(1, model.num_params()):.2%} of {model.num_params():,})")
    return base_hash


def training_block(cfg: FinetuneConfig, *contexts: int) -> int:
    """train.block_size (default: the smallest context given), refused when it exceeds any of them."""
    block = cfg.train.block_size or min(contexts)
    if block > min(contexts):
        raise HainaError(f"train.block_size {block} exceeds the model's context of {min(contexts)} tokens; "
                         f"lower it (e.g. --train.block_size={min(contexts)})")
    return block


def start_run(cfg: FinetuneConfig, method: str, model: Transformer, *, inputs: list[str],
              overwrite: bool) -> tuple[Path, str | None]:
    """Apply LoRA, then claim --out: (run directory, the base's hash or None without LoRA).

    In this order so that a `--lora.targets` that names no module is refused before anything is written.
    """
    base_hash = use_lora(model, cfg.lora, cfg.train.seed)
    return claim_finetune_run(cfg.out, method, inputs=inputs, resume=cfg.train.resume, overwrite=overwrite), base_hash


def run_config(cfg: FinetuneConfig, model: Transformer, block: int, **sections: Any) -> dict[str, Any]:
    """The resolved config a run writes: the model's, the recipe's, the settled block size, and `sections`."""
    raw = cfg.to_dict()
    return {"model": model.cfg.to_dict(), **raw, "train": {**raw["train"], "block_size": block}, **sections}


def claim_finetune_run(out: str | None, method: str, *, inputs: list[str], resume: bool, overwrite: bool,
                       check_only: bool = False) -> Path:
    """The run directory for `haina finetune METHOD`, checked and claimed as `haina pretrain` does its own.

    With `check_only` nothing is claimed: every method calls it first, so that a bad --out is refused in one
    line before the base and the data are loaded.
    """
    if not out:
        raise HainaError("--out is required: the run directory to write")
    return claim_run_dir(Path(out), f"finetune {method}", inputs=[i for i in inputs if i], resume=resume,
                         overwrite=overwrite, check_only=check_only)


def check_out(cfg: FinetuneConfig, method: str, inputs: list[str | None], overwrite: bool) -> None:
    """Refuse a --out this run may not write, before anything is loaded (see `claim_finetune_run`)."""
    claim_finetune_run(cfg.out, method, inputs=[str(i) for i in inputs if i], resume=cfg.train.resume,
                       overwrite=overwrite, check_only=True)


class FinetuneTrainer(Trainer):
    """The one loop, with checkpoints that hold only the adapters when training LoRA.

    Args (besides `Trainer`'s):
        lora: the adapters' config; None (or r = 0) for full fine-tuning.
        base_hash: the base weights' hash, recorded in every adapter checkpoint.
        base_path: the base's path, recorded so that `generate --checkpoint RUN` can find it.
    """

    def __init__(self, model: Transformer, cfg: TrainConfig, run_dir: str | Path, *, lora: LoRAConfig | None = None,
                 base_hash: str | None = None, base_path: str | None = None, **kwargs: Any):
        self.lora = lora if lora is not None and lora.r > 0 else None
        self.base_hash, self.base_path = base_hash, base_path
        super().__init__(model, cfg, run_dir, **kwargs)

    def write_weights(self, directory: Path) -> None:
        if self.lora is None:
            return super().write_weights(directory)
        save_adapter(directory, self.model, self.lora, base_hash=self.base_hash, base=self.base_path)
        write_yaml(directory / "config.yaml", {"model": self.model.cfg.to_dict(),
                                               **{k: v for k, v in self.config.items() if k != "model"}})
        if self.tokenizer is not None:
            self.tokenizer.save(directory / "tokenizer")

    def read_weights(self, checkpoint: Path) -> None:
        if self.lora is None:
            return super().read_weights(checkpoint)
        if not (checkpoint / ADAPTER_WEIGHTS).is_file():
            raise HainaError(f"cannot resume: {checkpoint} holds no LoRA adapters ({ADAPTER_WEIGHTS}); it was a full "
                             "fine-tuning run, so resume it without --lora.r")
        load_adapter_state_dict(self.model, {k: v.to(self.device) for k, v in
                                             read_weights(checkpoint / ADAPTER_WEIGHTS).items()})


def finish_report(run_dir: Path, report: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Add a method's own figures (data counts, before/after losses) to the run's report.json."""
    report = {**report, **extra}
    write_json(run_dir / "report.json", report)
    return report


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def snapshot_eval(trainer: Trainer) -> float | None:
    """The validation loss of the trainer's current weights, outside the loop's schedule."""
    return trainer.evaluate()


__all__ = [
    "Base",
    "FinetuneTrainer",
    "check_out",
    "claim_finetune_run",
    "count_trainable",
    "finish_report",
    "load_base",
    "run_config",
    "snapshot_eval",
    "start_run",
    "training_block",
    "use_lora",
]
