"""The one training loop, its optimizer, schedules, checkpoints and the `haina pretrain` command.

SFT, LoRA and distillation (haina.finetune) subclass `Trainer` and change data, loss and the
trainable parameters; they never copy the loop.
"""

from haina.train.config import DataConfig, PretrainConfig, TrainConfig
from haina.train.pretrain import run_pretrain
from haina.train.trainer import Trainer

__all__ = ["DataConfig", "PretrainConfig", "TrainConfig", "Trainer", "run_pretrain"]
