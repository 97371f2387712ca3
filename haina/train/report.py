"""What a run leaves behind for people: metrics.jsonl, TensorBoard scalars, the loss curve, report.json."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from haina.core.io import atomic_path, write_json, write_text
from haina.core.log import JsonlLogger, info
from haina.train import checkpoint as ckpt
from haina.train.flops import mfu

if TYPE_CHECKING:
    from haina.train.trainer import Trainer

# What `RunLog`, `plot_losses` and the trainer's report write into a run directory (tb/ holds TensorBoard's events).
OUTPUTS = ("metrics.jsonl", "report.json", "loss.png")


class RunLog:
    """One sink for metrics: `RUN/metrics.jsonl`, TensorBoard (optional) and an in-memory history.

    On resume, records after the resumed step (written after the checkpoint by the run that was
    interrupted) are dropped so that the history reads as if the run had never stopped.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if rec.get("step", 0) <= resume_step:
                    self.history.append(rec)
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        elif self.path.exists():
            self.path.unlink()
        self.jsonl = JsonlLogger(self.path)
        self.tb = None
        if tensorboard:
            try:  # imported lazily: TensorBoard takes a while to import and is optional
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides what the interrupted attempt logged after its checkpoint, as metrics.jsonl drops it.
                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)
            except ImportError:
                info("tensorboard is not installed; skipping RUN/tb")

    def log(self, record: dict[str, Any], prefix: str) -> None:
        self.jsonl.log(record)
        self.history.append(record)
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Train and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no GUI toolkit touched
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", ms=3, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:  # a run that logged no finite loss has nothing to name
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def clear_previous_run(run_dir: Path) -> None:
    """Starting afresh: remove what an earlier run left in `run_dir`, by name, and nothing else.

    The command that owns the run directory has checked and claimed it (`haina.core.output`); this only keeps
    a previous run's checkpoints, metrics and plots (`OUTPUTS`, TensorBoard events) from passing for this run's.
    """
    removed = ckpt.remove_checkpoints(run_dir)
    for name in OUTPUTS:
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed.append(name)
    tb = run_dir / "tb"
    for events in tb.glob("events.out.tfevents.*") if tb.is_dir() else ():
        events.unlink()
        removed.append(f"tb/{events.name}")
    if removed:
        info(f"{run_dir} held a previous run; starting afresh (its {len(removed)} checkpoints and logs are removed)")


@dataclass(frozen=True)
class RunStart:
    """Where this run (not the one it resumed) began, so that its report's throughput is its own."""

    step: int
    tokens: int
    seconds: float
    targets: int

    @classmethod
    def of(cls, trainer: Trainer) -> RunStart:
        return cls(trainer.step, trainer.tokens_seen, trainer.train_seconds, trainer.targets_seen)


def run_report(trainer: Trainer, *, final_val: float | None, stopped: str, wall_start: float, start: RunStart,
               max_steps: int) -> dict[str, Any]:
    """report.json of a finished `fit`: progress, losses, throughput and MFU, and where the checkpoints are."""
    t = trainer
    # This run's tokens over this run's time: train_seconds also holds a resumed run's earlier time.
    tokens_this_run = t.tokens_seen - start.tokens
    seconds_this_run = t.train_seconds - start.seconds
    tps = tokens_this_run / seconds_this_run if seconds_this_run > 0 and tokens_this_run else 0.0
    best = min(t.best_val_loss, final_val if final_val is not None else math.inf)
    index = ckpt.read_index(t.run_dir) or {}
    report = {
        "steps": t.step, "train_tokens": t.tokens_seen, "supervised_tokens": t.targets_seen,
        "supervised_tokens_per_sec": tps * (t.targets_seen - start.targets) / max(tokens_this_run, 1),
        "val_loss": final_val, "val_ppl": None if final_val is None else math.exp(min(final_val, 50.0)),
        "best_val_loss": None if math.isinf(best) else best, "initial_val_loss": t.initial_val_loss,
        "tokens_per_sec": tps, "mfu": mfu(tps, t.flops_per_token, t.peak_flops) if tps else 0.0,
        "wall_seconds": time.perf_counter() - wall_start, "train_seconds": t.train_seconds,
        "params": t.model.num_params(), "vocab_size": t.model.cfg.vocab_size,
        "stopped_because": stopped, "steps_this_run": t.step - start.step, "max_steps": max_steps,
        "skipped_steps": t.guard.skipped, "rollbacks": t.guard.rollbacks, "device": str(t.device),
        "precision": t.cfg.precision, "flops_per_token": t.flops_per_token,
        "tokens_per_step": t.cfg.tokens_per_step * t.world_size, "run_dir": str(t.run_dir),
        "checkpoint": str(ckpt.checkpoints_dir(t.run_dir) / index["latest"]) if index.get("latest") else None,
        "best_checkpoint": str(ckpt.checkpoints_dir(t.run_dir) / index["best"]) if index.get("best") else None,
    }
    if t.dist is not None:
        report["ranks"] = t.dist.describe()
    return report


def log_train(t: Trainer, log: RunLog, bar: Any, lr: float, out: dict[str, Any], loss_sum: float, loss_steps: int,
              skipped: int, mark_time: float, mark_tokens: int, max_steps: int) -> None:
    """One train record: the mean loss of the applied steps since the last one, throughput, MFU."""
    loss = loss_sum / loss_steps if loss_steps else None
    now = time.perf_counter()
    t.train_seconds += now - mark_time
    tps = (t.tokens_seen - mark_tokens) / max(now - mark_time, 1e-9)
    rec = {"step": t.step, "loss": loss, "lr": lr, "tokens": t.tokens_seen, "tokens_per_sec": tps,
           "mfu": mfu(tps, t.flops_per_token, t.peak_flops),
           "grad_norm": out["grad_norm"] if math.isfinite(out["grad_norm"]) else None}
    if skipped:
        rec["skipped"] = skipped
    log.log(rec, "train")
    loss_text = "-" if loss is None else f"{loss:.4f}"
    bar.set_postfix(loss=loss_text, lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
    if bar.disable:
        info(f"step {t.step}/{max_steps}: loss {loss_text}, lr {lr:.2e}, {tps:,.0f} tok/s, mfu {rec['mfu']:.1%}")


def finish_run(t: Trainer, log: RunLog, *, final_val: float | None, stopped: str, wall_start: float,
               start: RunStart, max_steps: int) -> dict[str, Any]:
    """Write report.json (`run_report`) and the loss curve (rank 0); return the report."""
    report = run_report(t, final_val=final_val, stopped=stopped, wall_start=wall_start, start=start,
                        max_steps=max_steps)
    if t.is_main:
        write_json(t.run_dir / "report.json", report)
        plot_losses(log.history, t.run_dir / "loss.png", title=f"{t.model.num_params() / 1e6:.2f}M parameters")
    val_text = f", {t.selection_label} {final_val:.4f}" if final_val is not None else ""
    info(f"done: {t.step} steps ({stopped}){val_text}, {report['tokens_per_sec']:,.0f} tok/s; report "
         f"{t.run_dir / 'report.json'}")
    return report


__all__ = ["OUTPUTS", "RunLog", "RunStart", "clear_previous_run", "finish_run", "log_train", "plot_losses", "run_report"]
