"""`haina finetune classify`: a text classifier (pooled hidden states → linear head) on the one training loop.

The base's final hidden states are pooled (`haina.model.classifier`: the last real token of a causal
model, the mean for an encoder, or as `classify.pooling` says) into a linear head. All weights train, or
LoRA adapters on the backbone (`--lora.r 8`) with the head always trained and saved in full: every
checkpoint holds the backbone's files (or its adapters) and `classifier.safetensors` + `classifier.json`
(the label map), so `haina classify`, `haina eval classify` and `load_classifier` read a run directly.

Imbalance, as the run chooses (report.json says which): class weights N / (K · n_class) on the loss
(`--class-weights auto`; multi-label: n_neg / n_pos on each label's positives), the focal loss
(`--loss focal`: each example's loss times (1 − p_true)^γ), or class-balanced batches (`--sampling
over|under`). A training step's loss is the mean over its examples of these per-example losses; the
validation loss is the plain cross-entropy (binary for multi-label), comparable between runs.

Validation reports accuracy and macro-F1 beside the loss at every evaluation. Early stopping and the
best checkpoint watch `classify.select_metric`: the loop minimizes one number, so for accuracy or
macro-F1 it is given 1 − the metric (checkpoints/index.json's `val_loss` then holds that). The final
report is computed with the best checkpoint's weights on the test split (or validation when there is
no test split).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from haina.core.config import load_yaml
from haina.core.device import autocast, resolve_device
from haina.core.errors import HainaError
from haina.core.log import info
from haina.core.seed import seed_everything
from haina.finetune.base import (
    FinetuneTrainer,
    check_out,
    finish_report,
    is_main,
    load_base,
    rank_rows,
    run_command,
    run_config,
    start_run,
    training_block,
)
from haina.finetune.classify_data import (
    ClassBatches,
    Targets,
    class_counts,
    class_weights,
    encode_texts,
    hold_out,
    label_map,
    read_splits,
    scores,
    to_targets,
)
from haina.finetune.config import FinetuneConfig
from haina.finetune.sft_data import write_rejects
from haina.model.classifier import Classifier, ClassifierConfig, read_head, save_head
from haina.train import checkpoint as ckpt
from haina.train import distributed

Batch = dict[str, Any]
HEADLINE = ("accuracy", "macro_f1")


def classification_loss(logits: torch.Tensor, y: torch.Tensor, *, multi_label: bool,
                        weights: torch.Tensor | None = None, gamma: float = 0.0) -> torch.Tensor:
    """Mean over the batch of each example's (weighted, focal) loss, in float32.

    Args:
        logits: (B, K).
        y: (B,) class indices, or (B, K) 0/1 floats with `multi_label`.
        weights: (K,) per-class weights (multi-label: on each label's positive term).
        gamma: the focal exponent; 0 is plain cross-entropy.
    """
    logits = logits.float()
    if multi_label:
        pos, neg = -F.logsigmoid(logits) * y, -F.logsigmoid(-logits) * (1 - y)  # (B, K) each
        if gamma:
            p = torch.sigmoid(logits)
            pos, neg = pos * (1 - p).pow(gamma), neg * p.pow(gamma)
        if weights is not None:
            pos = pos * weights
        return (pos + neg).mean(1).mean()
    logp = F.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)  # (B,) log p(true class)
    loss = -logp
    if gamma:
        loss = loss * (1 - logp.exp()).pow(gamma)
    if weights is not None:
        loss = loss * weights[y]
    return loss.mean()


@dataclasses.dataclass
class ClassifyTrainer(FinetuneTrainer):
    """The loop on a `Classifier`: the Trainer's model is its backbone, and the head trains beside it.

    Args (besides `FinetuneTrainer`'s, whose `model` is `classifier.backbone`):
        classifier: the backbone (LoRA applied or not) and the head.
        class_weights: (K,) loss weights, or None.
        gamma: the focal-loss exponent (0: cross-entropy).
        select_metric: val_loss, accuracy or macro_f1: what early stopping and the best checkpoint watch.
    """

    def __init__(self, classifier: Classifier, cfg, run_dir, *, class_weights: torch.Tensor | None = None,
                 gamma: float = 0.0, select_metric: str = "val_loss", **kwargs: Any):
        self.classifier = classifier
        dist = kwargs.get("dist")
        # Before the Trainer builds its optimizer over `trainable_parameters`, which include the head.
        classifier.head.to(resolve_device(cfg.device) if dist is None else dist.device)
        super().__init__(classifier.backbone, cfg, run_dir, **kwargs)
        self.class_weights = None if class_weights is None else class_weights.to(self.device)
        self.gamma, self.select_metric = gamma, select_metric
        if select_metric != "val_loss":
            self.selection_label = f"1 - val {select_metric}"
        if dist is not None:
            self.forward_classifier = self.forward_model  # the classifier's DDP module (compiled with train.compile)
        else:
            self.forward_classifier = torch.compile(classifier) if cfg.compile else classifier

    # ----------------------------------------------------------------- the loop's steps
    def parallelize(self) -> torch.nn.Module:
        """DDP around the whole classifier, not the backbone alone (what the Trainer's model is, and saves).

        The head computes outside the backbone, and the forward calls the backbone's `hidden_states`: DDP around
        the backbone would leave the head's gradients each rank's own and be bypassed by the forward altogether.
        """
        if self.dist.sharded:  # `check_parallel` refuses it before any process starts; a caller of the API meets it here
            raise HainaError("finetune classify trains under DDP only; leave parallel.dp_shard and parallel.tp at 1")
        backbone = self.classifier.backbone
        elsewhere = {id(p) for name, m in backbone.named_children() if name != "lm_head" for p in m.parameters()}
        # The LM head computes nothing here. Trainable and not tied to the embeddings (an untied head, BERT's MLM
        # head), it gets no gradient, which DDP waits for unless told to look for unused parameters.
        unused = any(p.requires_grad and id(p) not in elsewhere for p in backbone.lm_head.parameters())
        return self.dist.ddp(self.classifier, find_unused_parameters=unused)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [*super().trainable_parameters(), *(("head." + n, p) for n, p in self.classifier.head.named_parameters())]

    def next_batch(self) -> Batch:
        return self.to_device(self.train_data.get_batch(self.cfg.batch_size, self.cfg.block_size, self.generator))

    def to_device(self, batch: Batch) -> Batch:
        return {k: self._to_device(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def compute_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = self.forward_classifier(batch["idx"], batch["lengths"])
        return classification_loss(logits, batch["y"], multi_label=self.classifier.cfg.multi_label,
                                   weights=self.class_weights, gamma=self.gamma)

    def loss_weight(self, batch: Batch) -> int:
        return len(batch["lengths"])

    def batch_tokens(self, batch: Batch) -> int:
        return int(batch["lengths"].sum())  # this rank's rows: `tokens` counts the whole batch as drawn

    def write_weights(self, directory: Path) -> None:
        super().write_weights(directory)  # the backbone, or its adapters (FinetuneTrainer); then the whole head
        save_head(directory, self.classifier)

    def read_weights(self, checkpoint: Path) -> None:
        saved = (load_yaml(checkpoint / "config.yaml").get("classify") or {}).get("select_metric", "val_loss")
        if saved != self.select_metric:
            raise HainaError(f"cannot resume: {checkpoint} chose its best checkpoint by {saved}, this run by "
                             f"{self.select_metric}; resume with --classify.select_metric={saved}")
        super().read_weights(checkpoint)
        cfg, weights, _ = read_head(checkpoint)
        if cfg.labels != self.classifier.cfg.labels or cfg.multi_label != self.classifier.cfg.multi_label:
            raise HainaError(f"cannot resume: {checkpoint}'s head predicts {list(cfg.labels)[:6]}, but the training "
                             f"data now gives {list(self.classifier.cfg.labels)[:6]}; resume with the same data")
        self.classifier.head.load_state_dict({k.removeprefix("head."): v for k, v in weights.items()})

    # ----------------------------------------------------------------- validation
    @torch.no_grad()
    def predict(self, data: ClassBatches, max_batches: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """(probabilities (N, K), targets, mean plain cross-entropy) over `data` in order, up to max_batches."""
        training = self.model.training
        self.model.eval()
        probs, ys, total, count = [], [], 0.0, 0
        try:
            for batch in data.eval_batches(self.cfg.batch_size, self.cfg.block_size, max_batches):
                batch = self.to_device(batch)
                with autocast(self.device, self.cfg.precision):
                    logits = self.forward_classifier(batch["idx"], batch["lengths"])
                n = len(batch["lengths"])
                loss = classification_loss(logits, batch["y"], multi_label=self.classifier.cfg.multi_label)
                total, count = total + float(loss) * n, count + n
                probs.append(self.classifier.probabilities(logits).cpu().numpy())
                ys.append(batch["y"].cpu().numpy())
        finally:
            self.model.train(training)
        return np.concatenate(probs), np.concatenate(ys).astype(np.int64), total / max(count, 1)

    def evaluate(self) -> float | None:
        """Mean validation cross-entropy per example, or None without validation data."""
        if self.val_data is None:
            return None
        return self.predict(self.val_data, self.cfg.eval_batches)[2]

    def validation(self) -> dict[str, float] | None:
        """val_loss, accuracy and macro_f1 of the current weights (up to train.eval_batches batches)."""
        if self.val_data is None:
            return None
        proba, y, loss = self.predict(self.val_data, self.cfg.eval_batches)
        rep = scores(y, proba, self.classifier.cfg.labels, self.classifier.cfg.multi_label)
        return {"val_loss": loss, "accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"]}

    def eval_and_log(self, log, say) -> float | None:
        # The Trainer's evaluation step, which feeds early stopping and the best checkpoint with the number it
        # returns: here the selected metric as a number to minimize, while the log gets every metric by its name.
        m = self.validation()
        if m is None:
            return None
        log.log({"step": self.step, "val_loss": m["val_loss"], "val_accuracy": m["accuracy"],
                 "val_macro_f1": m["macro_f1"], "tokens": self.tokens_seen}, "val")
        say(f"step {self.step}: val loss {m['val_loss']:.4f}, accuracy {m['accuracy']:.2%}, "
            f"macro-F1 {m['macro_f1']:.4f}")
        return m["val_loss"] if self.select_metric == "val_loss" else 1.0 - m[self.select_metric]


# ---------------------------------------------------------------------------------------- the run
def _hold_out_missing(parsed: dict, cfg: FinetuneConfig, source: str) -> dict[str, bool]:
    """Hold out test, then validation records from training files where none are given; which were held out.

    A prepare output's splits are used as they are, even an empty one.
    """
    c, seed = cfg.classify, cfg.train.seed
    held = {}
    for split, fraction, salt in (("test", c.test_fraction, 2), ("val", cfg.data.val_fraction, 1)):
        held[split] = False
        if source == "files" and not parsed[split].read and fraction > 0:
            parsed["train"], parsed[split] = hold_out(parsed["train"], fraction, seed + salt, c.multi_label)
            held[split] = bool(parsed[split].texts)
    return held


def _imbalance(counts: dict[str, int], cfg: FinetuneConfig, weights: list[float] | None) -> dict[str, Any]:
    c = cfg.classify
    kept = {k: v for k, v in counts.items() if v}
    ratio = max(kept.values()) / min(kept.values()) if kept else None
    return {"train_counts": counts, "imbalance_ratio": ratio, "class_weights": c.class_weights,
            "weights": None if weights is None else dict(zip(counts, weights, strict=True)),
            "loss": c.loss, "focal_gamma": c.focal_gamma if c.loss == "focal" else None, "sampling": c.sampling}


def _imbalance_line(imb: dict[str, Any]) -> str:
    counts = imb["train_counts"]
    lo, hi = min(counts, key=counts.get), max(counts, key=counts.get)
    loss = f"focal (γ={imb['focal_gamma']:g})" if imb["loss"] == "focal" else "cross-entropy"
    return (f"{len(counts)} classes, {counts[lo]:,} ('{lo}') to {counts[hi]:,} ('{hi}') training examples each "
            f"({imb['imbalance_ratio']:.1f}× imbalance); this run uses class weights {imb['class_weights']}, "
            f"{loss} loss and sampling {imb['sampling']}")


def _history(run: Path) -> list[dict[str, Any]]:
    """The validation records of the run's metrics.jsonl (this run's and, resumed, the earlier part's)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_accuracy" in rec:
            out.append({"step": rec["step"], "val_loss": rec["val_loss"], "accuracy": rec["val_accuracy"],
                        "macro_f1": rec["val_macro_f1"]})
    return out


def run_classify(cfg: FinetuneConfig, *, overwrite: bool = False,
                 dist: distributed.Distributed | None = None) -> dict[str, Any]:
    """Train a classifier on `cfg.base` with the labeled records of `cfg.data`; returns the run report.

    `dist`: this rank's place in a torchrun job (`haina.train.distributed.session`); None for one process.
    """
    with distributed.same_on_every_rank():  # every rank reads the same records and base: rank 0 reports a problem
        c = cfg.classify
        if not cfg.data.train:
            raise HainaError("--data is required: labeled JSONL, CSV, TSV or Parquet files, or a `haina data prepare` "
                             "output directory")
        inputs = [*cfg.data.train, *cfg.data.val, *c.test, cfg.base]
        check_out(cfg, "classify", inputs, overwrite)
        parsed, source = read_splits(cfg.data.train, cfg.data.val, c.test, text_field=c.text_field,
                                     label_field=c.label_field, multi_label=c.multi_label)
        held = _hold_out_missing(parsed, cfg, source)
        labels = label_map(parsed["train"], c.multi_label, c.label_field)
        splits: dict[str, Targets] = {s: to_targets(parsed[s], labels, c.multi_label, s) for s in parsed}

        base = load_base(cfg.base)
        if base.tokenizer is None:
            raise HainaError(f"--base {cfg.base} has no tokenizer, so the texts cannot be encoded; give a checkpoint "
                             "with a tokenizer/ directory")
        model = base.model
        block = training_block(cfg, model.cfg.block_size)
        pooling = c.pooling if c.pooling != "auto" else ("last" if getattr(model.cfg, "causal", True) else "mean")
        seed_everything(cfg.train.seed)  # the head's initialization is part of the run
        clf = Classifier(model, ClassifierConfig(labels=labels, multi_label=c.multi_label, pooling=pooling),
                         base.tokenizer)
        pad = base.tokenizer.eos_id
        data: dict[str, ClassBatches | None] = {}
        truncated: dict[str, int] = {}
        for name, t in splits.items():
            ids, truncated[name] = encode_texts(clf, t.texts, block)
            data[name] = ClassBatches(ids, t.targets, pad, multi_label=c.multi_label,
                                      sampling=c.sampling if name == "train" else "none", seed=cfg.train.seed) \
                if ids else None
    counts = class_counts(splits["train"].targets, labels, c.multi_label)
    weights = class_weights(counts, len(splits["train"].targets), c.multi_label) if c.class_weights == "auto" else None
    imbalance = _imbalance(counts, cfg, weights)
    if data["val"] is None:
        info("no validation records (give --val FILE, or at least 20 training records for a held-out share); "
             "training without evaluation")

    run, base_hash = start_run(cfg, "classify", model, inputs=inputs, overwrite=overwrite, dist=dist)
    info(_imbalance_line(imbalance))
    config = run_config(cfg, model, block, base=base.path, classify={**cfg.to_dict()["classify"], "pooling": pooling})
    trainer = ClassifyTrainer(clf, dataclasses.replace(cfg.train, block_size=block), run,
                              train_data=rank_rows(data["train"], dist), val_data=data["val"], tokenizer=base.tokenizer,
                              config=config, lora=cfg.lora, base_hash=base_hash, base_path=base.path,
                              class_weights=None if weights is None else torch.tensor(weights),
                              gamma=c.focal_gamma if c.loss == "focal" else 0.0, select_metric=c.select_metric,
                              dist=dist)
    rejects = [*parsed["train"].rejects, *parsed["val"].rejects, *parsed["test"].rejects,
               *splits["val"].unseen_rejects, *splits["test"].unseen_rejects]
    unseen = {s: dict(sorted(splits[s].unseen.items(), key=lambda kv: (-kv[1], kv[0]))) for s in ("val", "test")}
    data_report = {
        "source": source,
        "records": {"read": sum(p.read for p in parsed.values()), "rejected": len(rejects),
                    **{f"{s}_examples": len(splits[s].targets) for s in splits}},
        "held_out_from_train": held,
        "rejects_by_reason": dict(Counter(r["reason"] for r in rejects).most_common()),
        "unseen_labels": unseen, "truncated": truncated,
    }
    if rejects and is_main(dist):
        write_rejects(run / "rejects.jsonl", rejects)
        info(f"{len(rejects)} records left out ({_reason_text(data_report['rejects_by_reason'])}); kept with their "
             f"reasons in {run / 'rejects.jsonl'}")
    for s, names in unseen.items():
        if names:
            what = "label names dropped from their records" if c.multi_label else "records left out"
            info(f"{s}: {sum(names.values())} {what}: labels never seen in training ({', '.join(list(names)[:8])})")

    report = trainer.fit()
    return finish_report(run, report, _final(trainer, report, data, run, labels, c.multi_label) | {
        "method": "classify", "base": base.path, "lora": cfg.lora.r > 0, "labels": list(labels),
        "multi_label": c.multi_label, "pooling": pooling, "imbalance": imbalance, "data": data_report}, dist)


def _final(trainer: ClassifyTrainer, report: dict[str, Any], data: dict[str, ClassBatches | None], run: Path,
           labels: tuple[str, ...], multi_label: bool) -> dict[str, Any]:
    """The best checkpoint's metrics on test (else validation), the validation history, and the selection."""
    best = trainer.load_best()
    history = _history(run)
    metric = trainer.select_metric
    picked = None
    if best is not None:
        index = ckpt.read_index(run) or {}
        value = (index.get("val_loss") or {}).get(best.name)
        if isinstance(value, (int, float)):
            picked = value if metric == "val_loss" else 1.0 - value
    losses = [h["val_loss"] for h in history]
    seen = report["supervised_tokens"]  # the loop counts loss weights: examples here
    out: dict[str, Any] = {
        "examples_seen": seen, "examples_per_sec": seen / report["train_seconds"] if report["train_seconds"] else None,
        "supervised_tokens": None, "supervised_tokens_per_sec": None, "val_ppl": None,
        "val_loss": losses[-1] if losses else None, "initial_val_loss": losses[0] if losses else None,
        "best_val_loss": min(losses) if losses else None, "validation": history,
        "selection": {"metric": metric, "value": picked, "checkpoint": None if best is None else str(best)},
    }
    split = "test" if data["test"] is not None else "val" if data["val"] is not None else None
    out["evaluated_on"] = split
    if split is None:
        info("no test or validation records: report.json has no classification metrics")
        return out
    proba, y, loss = trainer.predict(data[split])
    rep = scores(y, proba, labels, multi_label)
    out |= {f"{split}_loss": loss, "evaluated_examples": rep.pop("n"), **rep}
    return out


def _reason_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n}× {reason}" for reason, n in list(counts.items())[:3])


def classify_command(base: str, data: list[str], out: str, config: str | None = None, val: list[str] | None = None,
                     test: list[str] | None = None, text_field: str = "text", label_field: str = "label",
                     multi_label: bool = False, class_weights: Literal["auto", "none"] = "none",
                     loss: Literal["ce", "focal"] = "ce", sampling: Literal["none", "over", "under"] = "none",
                     folds: int = 0, group_field: str | None = None, resume: bool = False, overwrite: bool = False,
                     nproc: int = 1, max_restarts: int = 0, overrides: list[str] = ()) -> int:
    """Train a text classifier: the base's pooled hidden states into a linear head, all weights or LoRA (--lora.r=8).

    Records have a text and a label (a list of labels with --multi-label): JSONL, CSV, TSV or Parquet files, or a
    `haina data prepare` output directory, whose train/val/test splits are used as they are. Without --val or
    --test files, a stratified share of the training records is held out for each (data.val_fraction,
    classify.test_fraction). The label map comes from the training labels and is saved with every checkpoint; a
    validation or test label never seen in training is counted and reported. Bad records are counted and kept
    with their reason in OUT/rejects.jsonl. Validation logs accuracy and macro-F1; the best checkpoint (and early
    stopping, train.early_stopping_patience) follows classify.select_metric (val_loss, accuracy or macro_f1).
    OUT/report.json ends with the best checkpoint's accuracy, macro_f1, per_class and confusion on the test
    split. The run loads with `haina classify` and `haina eval classify`. A flag left at its default keeps the
    recipe's value; any --section.key=value overrides the recipe (--classify.focal_gamma=1 --train.lr=3e-4).

    With --folds K, k-fold cross-validation: the training (and validation) records are split into K stratified
    folds (--group-field keeps each group in one fold), and OUT/fold-1 … fold-K are ordinary runs, each
    validating on its fold and trained on the others, scored on the shared test split (or, without one, on
    its fold). OUT/report.json and report.md give every metric's mean ± std and per-fold values.

    Data parallel (DDP) with --nproc N (or under torchrun), as `haina finetune sft`; one run, not --folds.

    Args:
        base: the model to start from: a haina checkpoint or run directory, or a Hugging Face directory.
        data: labeled .jsonl, .csv, .tsv or .parquet files, or one `haina data prepare` output directory.
        out: the run directory to write.
        config: a recipe file or the name of a bundled one in recipes/finetune (default: classify).
        val: labeled files for validation (default: the prepare output's val split, or a share of --data).
        test: labeled files for the final report (default: the prepare output's test split, or a share of --data).
        text_field: the records' text field.
        label_field: the records' label field.
        multi_label: several labels per record (a list, a JSON list or comma-separated names), one sigmoid each.
        class_weights: auto weights each class's loss by its rarity, N / (K · n_class).
        loss: ce (cross-entropy) or focal (classify.focal_gamma, default 2).
        sampling: over draws class-balanced batches from all examples; under from a class-balanced subset.
        folds: K > 1 trains K models by stratified k-fold cross-validation (0: one run).
        group_field: with --folds, the field whose value groups related records: a group never straddles folds.
        resume: continue the run in --out from its latest checkpoint (with --folds: fold by fold).
        overwrite: start over in an existing --out.
        nproc: processes on this machine, one per GPU (or sharing the CPU cores): launches torchrun.
        max_restarts: with --nproc, how often torchrun restarts the job after a process fails (resuming from the
            last checkpoint).
    """
    args = dict(locals())  # the command's own arguments: --nproc runs them again under torchrun
    from haina.finetune.command import _flags, load_finetune_config

    defaults = {"text_field": "text", "label_field": "label", "multi_label": False, "class_weights": "none",
                "loss": "ce", "sampling": "none"}
    given = {"text_field": text_field, "label_field": label_field, "multi_label": multi_label,
             "class_weights": class_weights, "loss": loss, "sampling": sampling}
    more: dict[str, Any] = {f"classify.{k}": v for k, v in given.items() if v != defaults[k]}
    if test:
        more["classify.test"] = list(test)

    def load(resume: bool) -> FinetuneConfig:
        return load_finetune_config("classify", config, _flags(base, data, out, val, resume, **more), overrides)

    if folds or group_field:
        from haina.finetune.kfold import kfold_summary, run_kfold

        with distributed.same_on_every_rank():
            if nproc > 1 or max_restarts or distributed.env_world_size() > 1:
                raise HainaError("--folds trains its runs one after another in one process; leave out --nproc and "
                                 "torchrun (or train each fold's data as its own run)")
            cfg = load(resume)
            if group_field and not folds:
                raise HainaError(f"--group-field {group_field} keeps groups within folds; it needs --folds K")
        kfold_summary(run_kfold(cfg, folds=folds, group_field=group_field, overwrite=overwrite), cfg.out)
        return 0
    return run_command(classify_command, args, load, run_classify, lambda report, cfg: _summary(report, cfg.out))


def _summary(report: dict[str, Any], out: str | None) -> None:
    split = report.get("evaluated_on")
    scored = "" if split is None else (f", {split} accuracy {report['accuracy']:.2%}, macro-F1 "
                                       f"{report['macro_f1']:.4f} ({report['evaluated_examples']:,} examples)")
    print(f"{report['steps']} steps, {report['examples_seen']:,} examples{scored}, stopped by "
          f"{report['stopped_because']}")
    print(f"run: {out}   checkpoint: {report['selection']['checkpoint']} (by {report['selection']['metric']})")


__all__ = ["ClassifyTrainer", "classification_loss", "classify_command", "run_classify"]
