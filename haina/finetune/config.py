"""Fine-tuning configs: frozen, keyword-only dataclasses read from a YAML recipe (`recipes/finetune/`).

A recipe has the sections of a pretraining recipe, less `model` (the base fixes the architecture):

    base:     the model to start from: a haina checkpoint or run directory, or a Hugging Face directory
    data:     what to train on (JSONL records for sft and dpo, token shards for continue and distill)
    train:    the one loop's settings (`TrainConfig`), with fine-tuning's defaults in the recipe
    lora:     low-rank adapters instead of all weights (`lora.r > 0`)
    distill:  the teacher and the mix of its soft targets with the labels
    dpo:      the preference loss
    classify: the text and label fields, the head, and the class-imbalance options
    embed:    the query/passage fields, the pooling and the contrastive loss of a retriever
    parallel: how the processes torchrun starts share the work (`ParallelConfig`: DDP, or FSDP2 with dp_shard)
    out:      the run directory
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from haina.core.config import from_dict, load_yaml, to_dict
from haina.core.errors import HainaError
from haina.model.lora import LoRAConfig
from haina.train.config import ParallelConfig, TrainConfig

Method = Literal["sft", "continue", "distill", "dpo", "classify", "embed"]
METHODS: tuple[str, ...] = ("sft", "continue", "distill", "dpo", "classify", "embed")


@dataclass(frozen=True, kw_only=True)
class FinetuneDataConfig:
    train: tuple[str, ...] = ()  # JSONL files (sft, dpo) or a token-shard directory (continue, distill)
    val: tuple[str, ...] = ()  # held-out files; empty: val_fraction of the training records
    val_fraction: float = 0.05  # of the records, held out for validation when no val files are given
    train_on_prompt: bool = False  # sft: the loss covers prompts too, not only the assistant's tokens
    # sft: pad length-bucketed batches (no attention mask) or pack examples into full windows (with one);
    # benchmarks/finetune.py measured both on CPU and padding won (BENCHMARKS.md).
    batching: Literal["pad", "pack"] = "pad"
    replay: str | None = None  # continue: token shards of the original data, mixed in against forgetting
    replay_fraction: float = 0.0  # continue: the share of each batch's rows drawn from `replay`

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise HainaError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise HainaError(f"data.replay_fraction must be in [0, 1), got {self.replay_fraction}")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    teacher: str | None = None  # a checkpoint, run or Hugging Face directory sharing the student's tokenizer
    alpha: float = 0.5  # loss = (1 - alpha)·CE(labels) + alpha·T²·KL(teacher ‖ student)
    temperature: float = 2.0
    top_k: int = 0  # > 0: the teacher's top-k logits per token, computed once before training (memory for speed)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise HainaError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise HainaError(f"distill.temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise HainaError(f"distill.top_k must not be negative, got {self.top_k}")


@dataclass(frozen=True, kw_only=True)
class DPOConfig:
    beta: float = 0.1  # how far the policy may move from the reference: larger keeps it closer

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise HainaError(f"dpo.beta must be positive, got {self.beta}")


@dataclass(frozen=True, kw_only=True)
class ClassifyConfig:
    text_field: str = "text"
    label_field: str = "label"
    multi_label: bool = False  # a list of labels per record, one sigmoid each, instead of one class per text
    # auto: last token for a causal base (the end-of-text, which has read the whole text), mean for an encoder
    pooling: Literal["auto", "last", "mean", "first"] = "auto"
    # Imbalance. auto weights each class's loss by N / (K · n_class) (multi-label: positives by n_neg / n_pos);
    # focal scales each example's loss by (1 - p_true)^gamma, so easy examples count less; over/under draw
    # class-balanced batches from every example / from a class-balanced subset of them (single-label only).
    class_weights: Literal["auto", "none"] = "none"
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = 2.0
    sampling: Literal["none", "over", "under"] = "none"
    # What early stopping and the best checkpoint watch on the validation set (train.early_stopping_patience).
    select_metric: Literal["val_loss", "accuracy", "macro_f1"] = "val_loss"
    test: tuple[str, ...] = ()  # held-out files for the final report; empty: test_fraction of the training records
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.focal_gamma < 0:
            raise HainaError(f"classify.focal_gamma must not be negative, got {self.focal_gamma}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise HainaError(f"classify.test_fraction must be in [0, 1), got {self.test_fraction}")
        if not self.text_field or not self.label_field:
            raise HainaError("classify.text_field and classify.label_field must name a field")
        if self.multi_label and self.sampling != "none":
            raise HainaError(f"--sampling {self.sampling} balances one class per text; multi-label data has several "
                             "(use --class-weights auto instead)")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    # None: each record's pair is found by name: query/passage, question/answer, prompt/response or anchor/positive
    query_field: str | None = None
    passage_field: str | None = None
    negative_field: str = "negative"  # an optional hard negative: a passage that looks right and is not
    # auto: last token for a causal base (the end-of-text, which has read the whole text), mean for an encoder:
    # what `Embedder.load` reads a checkpoint with, which records the pooling chosen here
    pooling: Literal["auto", "last", "mean", "first"] = "auto"
    temperature: float = 0.05  # logits = cos(q, p) / temperature
    symmetric: bool = False  # add the passage → query loss (each passage picking its query among the batch's)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise HainaError(f"embed.temperature must be positive, got {self.temperature}")
        if (self.query_field is None) != (self.passage_field is None):
            raise HainaError("embed.query_field and embed.passage_field go together: give both, or neither to find "
                             "query/passage, question/answer, prompt/response or anchor/positive in each record")
        if "" in (self.query_field, self.passage_field) or not self.negative_field:
            raise HainaError("embed.query_field, embed.passage_field and embed.negative_field must name a field")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    method: Method = "sft"
    base: str | None = None
    preset: str | None = None  # distill: a fresh student of this model preset instead of a base
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    out: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """From a recipe mapping; unknown keys anywhere are an error with a did-you-mean."""
        data = dict(data or {})
        if "model" in data:
            raise HainaError("a fine-tuning recipe has no 'model' section: the base model fixes the architecture")
        return from_dict(cls, data)

    @classmethod
    def from_file(cls, path: str | Path) -> FinetuneConfig:
        return cls.from_dict(load_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


__all__ = ["METHODS", "ClassifyConfig", "DPOConfig", "DistillConfig", "EmbedConfig", "FinetuneConfig", "FinetuneDataConfig",
           "Method"]
