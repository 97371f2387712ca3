"""What a run leaves behind for people: metrics.jsonl, TensorBoard scalars, the loss curve, report.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from haina.core.io import atomic_path, write_text
from haina.core.log import JsonlLogger, info


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
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


__all__ = ["RunLog", "plot_losses"]
