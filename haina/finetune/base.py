"""What every fine-tuning method shares: the base model, the run directory, LoRA-aware checkpoints.

`FinetuneTrainer` is the one `Trainer` with two of its small steps overridden: with LoRA, a checkpoint
holds the adapters (megabytes) and the hash of the base they belong to instead of every weight, and
resuming reads them back. Each method (sft.py, continued.py, distill.py, dpo.py) subclasses it for its
batches and its loss.

Every method also runs data parallel as pretraining does (`haina.train.distributed`): `run_command` is the
body each `haina finetune METHOD` command shares (alone, as one rank of a torchrun job, or as the launcher of
`--nproc` ranks), and `start_run` claims --out for all the ranks of a job at once.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haina.core.errors import HainaError
from haina.core.io import write_json, write_yaml
from haina.core.log import info
from haina.core.output import read_manifest
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
from haina.train import checkpoint as ckpt
from haina.train import distributed
from haina.train.config import TrainConfig
from haina.train.distributed import Distributed
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


def start_run(cfg: FinetuneConfig, method: str, model: Transformer, *, inputs: list[str], overwrite: bool,
              dist: Distributed | None = None) -> tuple[Path, str | None]:
    """Apply LoRA, then claim --out: (run directory, the base's hash or None without LoRA).

    In this order so that a `--lora.targets` that names no module is refused before anything is written.
    Under torchrun every rank applies the same adapters (seeded) and `claim_for_ranks` claims --out once.
    """
    with distributed.same_on_every_rank():
        base_hash = use_lora(model, cfg.lora, cfg.train.seed)
    return claim_for_ranks(cfg, method, inputs=inputs, overwrite=overwrite, dist=dist), base_hash


def claim_for_ranks(cfg: FinetuneConfig, method: str, *, inputs: list[str], overwrite: bool,
                    dist: Distributed | None) -> Path:
    """`claim_finetune_run` for one process, or for every rank of a torchrun job: checked everywhere, claimed once.

    Every rank checks --out first, so that a refusal is the same one line on each rather than rank 0 failing
    alone while the others wait at a barrier; then rank 0 claims it between two barriers, and the others
    make sure they see what it made.
    """
    claim = {"inputs": inputs, "resume": cfg.train.resume, "overwrite": overwrite}
    if dist is None:
        return claim_finetune_run(cfg.out, method, **claim)
    with distributed.same_on_every_rank():
        out = claim_finetune_run(cfg.out, method, **claim, check_only=True)
    dist.barrier()
    if dist.is_main:
        claim_finetune_run(cfg.out, method, **claim)
    dist.barrier()
    if read_manifest(out) is None:  # another machine's rank 0 claimed it on a disk this one cannot see
        raise HainaError(f"this machine does not see the run directory {out} that rank 0 created; --out must be on "
                         "a filesystem every machine shares, at the same path")
    return out


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

    def load_best(self) -> Path | None:
        """Put the best checkpoint's weights in place (when the run ended on another), the best by what
        `eval_and_log` returned; returns its path (None when no checkpoint was ever evaluated)."""
        index = ckpt.read_index(self.run_dir) or {}
        best = index.get("best")
        if not ckpt.is_step_name(best):
            return None
        path = ckpt.checkpoints_dir(self.run_dir) / best
        if best != index.get("latest"):
            self.read_weights(path)
        return path


def finish_report(run_dir: Path, report: dict[str, Any], extra: dict[str, Any],
                  dist: Distributed | None = None) -> dict[str, Any]:
    """Add a method's own figures (data counts, before/after losses) to the run's report.json (rank 0 writes it)."""
    report = {**report, **extra}
    if is_main(dist):
        write_json(run_dir / "report.json", report)
    return report


def is_main(dist: Distributed | None) -> bool:
    """Whether this process writes the run's files: one process, or rank 0 of a torchrun job."""
    return dist is None or dist.is_main


def rank_rows(data: Any, dist: Distributed | None) -> Any:
    """The training data as this rank draws it: its rows of every global batch (`RankRows`); as is alone."""
    return data if dist is None else distributed.RankRows(data, dist.dp_rank, dist.dp_size)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def snapshot_eval(trainer: Trainer) -> float | None:
    """The validation loss of the trainer's current weights, outside the loop's schedule."""
    return trainer.evaluate()


# ----------------------------------------------------------------- launching: alone, a torchrun rank, or --nproc
RunFunction = Callable[..., dict[str, Any]]  # run_sft and its peers: (cfg, *, overwrite, dist) -> the report


def check_parallel(cfg: FinetuneConfig, world_size: int) -> None:
    """Refuse in one line, before any process starts or any weight loads, a layout this run cannot train on.

    Args:
        cfg: the run's config (its `parallel:` section, LoRA and method).
        world_size: the processes of the job (--nproc, or torchrun's WORLD_SIZE).
    """
    _, shard = cfg.parallel.degrees(world_size)  # a mesh that does not fit the processes
    if cfg.parallel.tp > 1:
        raise HainaError(f"parallel.tp={cfg.parallel.tp}: fine-tuning trains data parallel only (DDP, or FSDP2 with "
                         "--parallel.dp_shard=N); tensor parallelism is for `haina pretrain`")
    sharded = shard > 1 or cfg.parallel.fsdp
    what = f"FSDP2 (parallel.dp_shard={shard})" if shard > 1 else "FSDP2 (parallel.fsdp)"
    if sharded and cfg.lora.r > 0:
        # Adapter checkpoints are written from the live model, whose weights FSDP2 holds as shards.
        raise HainaError(f"LoRA does not train under {what}: its checkpoints are written from the whole model, "
                         "which FSDP2 shards; leave parallel.dp_shard at 1 (DDP: every rank holds the frozen base "
                         "and the small adapters)")
    if sharded and cfg.method == "classify":
        raise HainaError(f"finetune classify does not train under {what}: its head computes outside the sharded "
                         "backbone; leave parallel.dp_shard at 1 (DDP)")
    if (cfg.parallel.checkpoint == "sharded" or cfg.parallel.async_checkpoint) and (
            cfg.lora.r > 0 or cfg.method == "classify"):
        # Sharded checkpoints hold the model's state dict; these hold adapters, or a head beside the backbone.
        what = "LoRA" if cfg.lora.r > 0 else "finetune classify"
        raise HainaError(f"{what} writes whole checkpoints, not sharded ones; leave parallel.checkpoint at auto "
                         "(and parallel.async_checkpoint off)")


def command_argv(command: Callable[..., Any], args: dict[str, Any]) -> list[str]:
    """The command line that gives `command` back `args` (`haina.cli`'s mapping, inverted), less --nproc/--max-restarts.

    What every rank of an `--nproc N` job runs: built from the function's own signature, so that each method's
    options travel without a list of them to keep in step.
    """
    argv: list[str] = []
    for name, param in inspect.signature(command).parameters.items():
        value = args.get(name, param.default)
        if name in ("nproc", "max_restarts") or value is None or value is inspect.Parameter.empty:
            continue
        if name == "overrides":
            argv += [f"--{o}" for o in value]
            continue
        if param.default is not inspect.Parameter.empty and value == param.default:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def run_command(command: Callable[..., Any], args: dict[str, Any], load: Callable[[bool], FinetuneConfig],
                run: RunFunction, summary: Callable[[dict[str, Any], FinetuneConfig], None]) -> int:
    """The body every `haina finetune METHOD` command shares: the run alone, as a torchrun rank, or --nproc ranks.

    As `haina pretrain` runs: under torchrun every rank reads the same config (a problem is rank 0's one line),
    joins the job (`distributed.session`) and runs `run` with its `dist`; rank 0 prints the summary. With `nproc`
    > 1 this process starts torchrun on the command's own arguments instead. When torchrun restarts a failed job
    (`max_restarts`), every rank resumes the run from its last checkpoint.

    Args:
        command: the command function (its signature rebuilds the command line for --nproc).
        args: its arguments as it received them (`dict(locals())` first thing in its body).
        load: the resolved config, given whether to resume.
        run: the method's run function: (cfg, *, overwrite, dist) -> the run report.
        summary: prints the report's lines (rank 0 only).
    """
    nproc, max_restarts = args.get("nproc", 1), args.get("max_restarts", 0)
    resume, overwrite = distributed.launch_options(nproc, max_restarts, bool(args.get("resume")),
                                                   bool(args.get("overwrite")))
    with distributed.same_on_every_rank():  # under torchrun, every rank reads the same recipe
        cfg = load(resume)
        check_parallel(cfg, nproc if nproc > 1 else distributed.env_world_size())
    if nproc > 1:
        if distributed.under_torchrun():
            raise HainaError("--nproc starts torchrun itself; under torchrun leave it out (torchrun's "
                             "--nproc-per-node sets the processes)")
        argv = command_argv(command, {**args, "resume": resume, "overwrite": overwrite})
        return distributed.relaunch(nproc, ["finetune", cfg.method, *argv], max_restarts=max_restarts)
    with distributed.session(cfg.parallel, cfg.train.device) as dist:
        report = run(cfg, overwrite=overwrite, dist=dist)
    if is_main(dist):
        summary(report, cfg)
    return 0


__all__ = [
    "Base",
    "FinetuneTrainer",
    "check_out",
    "check_parallel",
    "claim_finetune_run",
    "claim_for_ranks",
    "command_argv",
    "count_trainable",
    "finish_report",
    "is_main",
    "load_base",
    "rank_rows",
    "run_command",
    "run_config",
    "snapshot_eval",
    "start_run",
    "training_block",
    "use_lora",
]
