"""`haina finetune embed`: a retriever trained contrastively on query/passage pairs, on the one training loop.

The base's final hidden states are pooled exactly as `haina.generate.embed.Embedder` pools a haina checkpoint
(`haina.model.classifier.Classifier`'s `encode` and `pool`: the last real token, the appended end-of-text, of a
causal model; the mean for an encoder; or as `embed.pooling` says), so that the run directory is an embedder as
it stands: `Embedder.load(RUN)`, `haina embed --checkpoint RUN` and `haina rag index --embedder RUN` read it
with no flag. Every checkpoint's config.yaml records the pooling (`embed.pooling`), which the Embedder reads.

The loss is InfoNCE with in-batch negatives (`info_nce`): queries and passages go through the same backbone in
one forward, both are L2-normalized, and each query must pick its own passage among the batch's passages and
hard negatives, logits = q·pᵀ / temperature; `embed.symmetric` adds the passage → query direction. Batches hold
distinct passages (`embed_data.PairBatches`) and whatever still coincides is masked, so no row is taught to push
away its own answer.

Validation is retrieval on held-out pairs (whole passages held out): at each evaluation the validation queries
and passages are embedded once, and recall@1, recall@5 and MRR of each query's own passage among every
validation passage are logged beside the InfoNCE loss over that same set, on which early stopping and the best
checkpoint are chosen. report.json holds these figures for the base (`retrieval_before`) and for the best
checkpoint (`retrieval_after`).

All weights train, or LoRA adapters (`--lora.r=8`): a LoRA run's checkpoints hold the adapters and the base's
path, as every method's do, which `Embedder.load` reads through `load_model`; `haina finetune merge` makes a
plain checkpoint of one. Data parallel under DDP (`--nproc N`): the ranks' embeddings are gathered, so every
query meets the whole global batch's passages as negatives, as one process with that batch would (more processes,
more negatives); FSDP2 (parallel.dp_shard) and sharded checkpoints are refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from haina.core.config import load_yaml
from haina.core.device import autocast, resolve_device
from haina.core.errors import HainaError
from haina.core.log import info
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
from haina.finetune.classify_data import encode_texts
from haina.finetune.config import FinetuneConfig
from haina.finetune.embed_data import (
    EncodedPairs,
    PairBatches,
    RetrievalSet,
    encode_pairs,
    hold_out,
    read_pairs,
    retrieval_metrics,
    stack_padded,
)
from haina.finetune.sft_data import write_rejects
from haina.model.classifier import Classifier, ClassifierConfig, pad_batch
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer
from haina.train import distributed

Batch = dict[str, Any]
METRICS = ("recall@1", "recall@5", "mrr")


def info_nce(q: torch.Tensor, p: torch.Tensor, *, temperature: float, negatives: torch.Tensor | None = None,
             symmetric: bool = False, qid: torch.Tensor | None = None, pid: torch.Tensor | None = None,
             nid: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with in-batch negatives, in float32: the mean cross-entropy of each query picking its own passage.

    Args:
        q: (B, C) query embeddings; row i's passage is `p[i]`.
        p: (B, C) passage embeddings.
        temperature: logits are cos(q, ·) / temperature.
        negatives: (M, C) hard negatives, extra candidates for every query.
        symmetric: average with the passage → query loss (each passage picking its query among the batch's).
        qid, pid, nid: (B,), (B,), (M,) text ids (`embed_data.EncodedPairs`): a candidate with the same text as a
            row's own passage (or, for the passage → query term, its own query) is masked out for that row rather
            than counted as a negative. A negative whose id is -1 is a placeholder (a row without one), masked
            out for every row.
    """
    q, p = F.normalize(q.float(), dim=-1), F.normalize(p.float(), dim=-1)
    B = q.shape[0]
    target = torch.arange(B, device=q.device)
    cand = p if negatives is None else torch.cat([p, F.normalize(negatives.float(), dim=-1)])
    logits = q @ cand.T / temperature  # (B, B + M)
    if pid is not None:
        ids = pid if negatives is None else torch.cat([pid, nid])
        logits = _mask_duplicates(logits, pid, ids)
        if negatives is not None:
            logits = logits.masked_fill(torch.cat([torch.zeros_like(pid, dtype=torch.bool), nid < 0]), float("-inf"))
    loss = F.cross_entropy(logits, target)
    if not symmetric:
        return loss
    back = p @ q.T / temperature  # (B, B): passage i picks query i
    if qid is not None:
        back = _mask_duplicates(back, qid, qid)
    return (loss + F.cross_entropy(back, target)) / 2


def _mask_duplicates(logits: torch.Tensor, own: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """`logits` (B, N) with -inf where candidate j has row i's own text but is not its target (j != i)."""
    same = own[:, None] == cand[None, :]  # (B, N)
    same[torch.arange(len(own), device=own.device), torch.arange(len(own), device=own.device)] = False
    return logits.masked_fill(same, float("-inf"))


class Pooler(nn.Module):
    """A backbone's pooled final hidden states (B, C), read as `Embedder.load` reads a checkpoint.

    It is a `Classifier` whose head is never computed nor trained (as the Embedder builds one), so that training
    and embedding share one `encode` (end-of-text appended, truncation) and one `pool` (packing included).
    """

    def __init__(self, backbone: Transformer, pooling: str, tokenizer: Tokenizer):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the unused head's initialization must not move the run's RNG
            self.reader = Classifier(backbone, ClassifierConfig(labels=("_", "__"), pooling=pooling), tokenizer)
        self.reader.head.requires_grad_(False)

    @property
    def backbone(self) -> Transformer:
        return self.reader.backbone

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded ids (B, T) and real lengths (B,) -> pooled hidden states (B, C)."""
        return self.reader.pool(idx, lengths)


class EmbedTrainer(FinetuneTrainer):
    """The loop on a `Pooler`: the Trainer's model is its backbone, which is what every checkpoint holds.

    Args (besides `FinetuneTrainer`'s, whose `model` is `pooler.backbone`):
        pooler: the backbone (LoRA applied or not) read as the Embedder reads it.
        temperature: the InfoNCE temperature.
        symmetric: add the passage → query term.
        pooling: the pooling the run trains with (a resumed run must keep it).
    """

    def __init__(self, pooler: Pooler, cfg, run_dir, *, temperature: float = 0.05, symmetric: bool = False,
                 pooling: str = "last", **kwargs: Any):
        self.pooler = pooler
        dist = kwargs.get("dist")
        pooler.to(resolve_device(cfg.device) if dist is None else dist.device)  # the idle head too: DDP wants one device
        super().__init__(pooler.backbone, cfg, run_dir, **kwargs)
        self.temperature, self.symmetric, self.pooling = temperature, symmetric, pooling
        self.pad_id = self.tokenizer.eos_id if self.tokenizer is not None else 0
        if dist is not None:
            self.forward_pooler = self.forward_model  # the pooler's DDP module (compiled with train.compile)
        else:
            self.forward_pooler = torch.compile(pooler) if cfg.compile else pooler

    # ----------------------------------------------------------------- the loop's steps
    def parallelize(self) -> nn.Module:
        """DDP around the pooler: its forward calls the backbone's `hidden_states`, which DDP around the backbone
        (the Trainer's model) would never see."""
        if self.dist.sharded:  # refused before any process starts (`embed_command`); a caller of the API meets it here
            raise HainaError("finetune embed trains under DDP only; leave parallel.dp_shard and parallel.tp at 1")
        backbone = self.pooler.backbone
        elsewhere = {id(p) for name, m in backbone.named_children() if name != "lm_head" for p in m.parameters()}
        # The LM head computes nothing here: trainable and untied, it would get no gradient, which DDP waits for.
        unused = any(p.requires_grad and id(p) not in elsewhere for p in backbone.lm_head.parameters())
        return self.dist.ddp(self.pooler, find_unused_parameters=unused)

    def next_batch(self) -> Batch:
        return self.to_device(self.assemble(self.train_data.get_batch(self.cfg.batch_size, self.cfg.block_size,
                                                                      self.generator)))

    def assemble(self, b: Batch) -> Batch:
        """A drawn batch (this rank's rows) as one forward's input: queries, then passages, then the hard negatives
        there are (`n_rows`: the rows they belong to).

        Done on the CPU, before the batch moves, so that nothing in the step waits on the device for a count.
        """
        has = b["n_len"] > 0
        idx = stack_padded([b["q_idx"], b["p_idx"], b["n_idx"][has]], self.pad_id)
        lengths = torch.cat([b["q_len"], b["p_len"], b["n_len"][has]])
        return {"idx": idx, "lengths": lengths, "queries": len(b["q_len"]), "n_rows": torch.nonzero(has).flatten(),
                "qid": b["qid"], "pid": b["pid"], "nid": b["nid"], "rank_tokens": int(lengths.sum())}

    def to_device(self, batch: Batch) -> Batch:
        return {k: self._to_device(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def compute_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """InfoNCE over the global batch: under DDP every rank's queries, passages and negatives.

        Each rank computes the same loss from the gathered embeddings, and the gathering's backward sums every
        rank's gradient into each rank's own rows; the Trainer's scaling (its rows' share × ranks) and DDP's
        average then give the gradient of one process with the whole batch, with its in-batch negatives.
        """
        emb = self.forward_pooler(batch["idx"], batch["lengths"])  # (2B + M, C)
        B = batch["queries"]
        # A slot per row, placeholders (nid -1) where a row has no negative: every rank's share is B rows.
        n = emb.new_zeros(B, emb.shape[1]).index_copy(0, batch["n_rows"], emb[2 * B:])
        parts = [emb[:B], emb[B:2 * B], n, batch["qid"], batch["pid"], batch["nid"]]
        if self.world_size > 1:
            parts = [self._gather(t) for t in parts]
        q, p, n, qid, pid, nid = parts
        return info_nce(q, p, negatives=n, temperature=self.temperature, symmetric=self.symmetric, qid=qid, pid=pid,
                        nid=nid)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every data-parallel rank's rows of `t`, in rank order; gradients flow back to each rank's own rows."""
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t.contiguous(), group=self.dist.mesh["dp_replicate"].get_group()))

    def loss_weight(self, batch: Batch) -> int:
        return batch["queries"]

    def batch_tokens(self, batch: Batch) -> int:
        return batch["rank_tokens"]  # this rank's rows: `tokens` of a drawn batch counts every rank's

    def read_weights(self, checkpoint: Path) -> None:
        saved = (load_yaml(checkpoint / "config.yaml").get("embed") or {}).get("pooling")
        if saved is not None and saved != self.pooling:
            raise HainaError(f"cannot resume: {checkpoint} was trained with {saved} pooling, this run asks for "
                             f"{self.pooling}; resume with --embed.pooling={saved}")
        super().read_weights(checkpoint)

    # ----------------------------------------------------------------- validation
    @torch.no_grad()
    def embed_ids(self, seqs: list[list[int]]) -> torch.Tensor:
        """(N, C) unit-length embeddings of encoded texts in their order, batched by length (eval mode)."""
        training = self.model.training
        self.model.eval()
        out = torch.zeros(len(seqs), self.model.cfg.n_embd, device=self.device)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths pad little
        size = max(self.cfg.batch_size, 1) * 2  # no gradients kept: twice the training batch fits
        try:
            for start in range(0, len(order), size):
                rows = order[start:start + size]
                idx, lengths = pad_batch([seqs[i] for i in rows], self.pad_id, self.device)
                with autocast(self.device, self.cfg.precision):
                    out[rows] = F.normalize(self.pooler(idx, lengths).float(), dim=-1)
        finally:
            self.model.train(training)
        return out

    def validation(self) -> dict[str, float] | None:
        """val_loss, recall@1, recall@5 and mrr of the current weights on the validation set, or None."""
        if self.val_data is None:
            return None
        data: RetrievalSet = self.val_data
        return retrieval_metrics(self.embed_ids(data.queries), self.embed_ids(data.passages), data.gold.to(self.device),
                                 self.temperature)

    def evaluate(self) -> float | None:
        """The validation InfoNCE loss (each query against every validation passage), or None without one."""
        m = self.validation()
        return None if m is None else m["val_loss"]

    def eval_and_log(self, log, say) -> float | None:
        # The Trainer's evaluation step: the loss it returns picks the best checkpoint; the log gets the retrieval.
        m = self.validation()
        if m is None:
            return None
        log.log({"step": self.step, "val_loss": m["val_loss"], **{f"val_{k}": m[k] for k in METRICS},
                 "tokens": self.tokens_seen}, "val")
        say(f"step {self.step}: val loss {m['val_loss']:.4f}, recall@1 {m['recall@1']:.2%}, "
            f"recall@5 {m['recall@5']:.2%}, MRR {m['mrr']:.4f}")
        return m["val_loss"]


# ---------------------------------------------------------------------------------------- the run
def resolve_pooling(pooling: str, model: Transformer) -> str:
    """`embed.pooling` with auto settled as `Embedder.load` settles it: last for a causal model, mean for an encoder."""
    return pooling if pooling != "auto" else ("last" if getattr(model.cfg, "causal", True) else "mean")


def refuse_sharding(cfg: FinetuneConfig) -> None:
    """One line, before any process starts, for a layout this method cannot train on (`check_parallel` does tp)."""
    par = cfg.parallel
    if par.dp_shard != 1 or par.fsdp:
        raise HainaError("finetune embed does not train under FSDP2 (parallel.dp_shard, parallel.fsdp): its pooling "
                         "computes outside the sharded backbone; leave parallel.dp_shard at 1 (DDP)")
    if par.checkpoint == "sharded" or par.async_checkpoint:
        raise HainaError("finetune embed writes whole checkpoints (an embedder reads model.safetensors); leave "
                         "parallel.checkpoint at auto and parallel.async_checkpoint off")


def _history(run: Path) -> list[dict[str, Any]]:
    """The validation records of the run's metrics.jsonl (this run's and, resumed, the earlier part's)."""
    path = run / "metrics.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_mrr" in rec:
            out.append({"step": rec["step"], "val_loss": rec["val_loss"], **{k: rec[f"val_{k}"] for k in METRICS}})
    return out


def _read(cfg: FinetuneConfig) -> tuple[dict[str, list], list[dict], dict[str, int], bool]:
    """(train and val pairs, rejects, records read per split, whether val was held out of --data)."""
    e = cfg.embed
    fields = None if e.query_field is None else (e.query_field, e.passage_field)
    train = read_pairs(cfg.data.train, fields=fields, negative_field=e.negative_field, what="--data")
    val = read_pairs(cfg.data.val, fields=fields, negative_field=e.negative_field, what="--val") \
        if cfg.data.val else None
    pairs = {"train": train.pairs, "val": [] if val is None else val.pairs}
    held = False
    if val is None:
        pairs["train"], pairs["val"] = hold_out(train.pairs, cfg.data.val_fraction, cfg.train.seed + 1)
        held = bool(pairs["val"])
    rejects = [*train.rejects, *([] if val is None else val.rejects)]
    return pairs, rejects, {"train": train.read, "val": 0 if val is None else val.read}, held


def run_embed(cfg: FinetuneConfig, *, overwrite: bool = False,
              dist: distributed.Distributed | None = None) -> dict[str, Any]:
    """Train a retriever on `cfg.base` with the query/passage pairs of `cfg.data`; returns the run report.

    `dist`: this rank's place in a torchrun job (`haina.train.distributed.session`); None for one process.
    """
    with distributed.same_on_every_rank():  # every rank reads the same records and base: rank 0 reports a problem
        if not cfg.data.train:
            raise HainaError("--data is required: JSONL files of query/passage pairs")
        refuse_sharding(cfg)
        inputs = [*cfg.data.train, *cfg.data.val, cfg.base]
        check_out(cfg, "embed", inputs, overwrite)
        pairs, rejects, read, held = _read(cfg)
        base = load_base(cfg.base)
        if base.tokenizer is None:
            raise HainaError(f"--base {cfg.base} has no tokenizer, so the texts cannot be encoded; give a checkpoint "
                             "with a tokenizer/ directory")
        model = base.model
        block = training_block(cfg, model.cfg.block_size)
        pooling = resolve_pooling(cfg.embed.pooling, model)
        pooler = Pooler(model, pooling, base.tokenizer)
        encoded: dict[str, EncodedPairs] = {
            s: encode_pairs(pairs[s], lambda texts: encode_texts(pooler.reader, texts, block)) for s in pairs if pairs[s]}
        train = PairBatches(encoded["train"], base.tokenizer.eos_id)
        world = 1 if dist is None else dist.dp_size
        if cfg.train.batch_size * world > train.passages:
            raise HainaError(f"a batch of {cfg.train.batch_size * world} pairs needs as many distinct passages, and "
                             f"the training data has {train.passages}; lower train.batch_size or give more pairs")
        limit = cfg.train.eval_batches * cfg.train.batch_size if cfg.train.eval_batches else None
        val = RetrievalSet.of(encoded["val"], limit) if "val" in encoded else None
    if val is None:
        info("no validation pairs (give --val FILE, or at least 20 training pairs for a held-out share); training "
             "without evaluation")

    run, base_hash = start_run(cfg, "embed", model, inputs=inputs, overwrite=overwrite, dist=dist)
    config = run_config(cfg, model, block, base=base.path, embed={**cfg.to_dict()["embed"], "pooling": pooling})
    trainer = EmbedTrainer(pooler, dataclasses.replace(cfg.train, block_size=block), run,
                           train_data=rank_rows(train, dist), val_data=val, tokenizer=base.tokenizer, config=config,
                           lora=cfg.lora, base_hash=base_hash, base_path=base.path,
                           temperature=cfg.embed.temperature, symmetric=cfg.embed.symmetric, pooling=pooling,
                           dist=dist)
    by_reason = dict(Counter(r["reason"] for r in rejects).most_common())
    data_report = {
        "records": {"read": sum(read.values()), "rejected": len(rejects), "train_pairs": len(pairs["train"]),
                    "val_pairs": len(pairs["val"]), "train_passages": train.passages,
                    "hard_negatives": sum(p.negative is not None for p in pairs["train"])},
        "held_out_from_train": held, "rejects_by_reason": by_reason,
        "truncated": {s: e.truncated for s, e in encoded.items()},
    }
    if rejects and is_main(dist):
        write_rejects(run / "rejects.jsonl", rejects)
        top = ", ".join(f"{n}× {reason}" for reason, n in list(by_reason.items())[:3])
        info(f"{len(rejects)} records left out ({top}); kept with their reasons in {run / 'rejects.jsonl'}")

    report = trainer.fit()
    return finish_report(run, report, _final(trainer, report, run) | {
        "method": "embed", "base": base.path, "lora": cfg.lora.r > 0, "pooling": pooling,
        "temperature": cfg.embed.temperature, "symmetric": cfg.embed.symmetric, "dim": model.cfg.n_embd,
        "data": data_report}, dist)


def _final(trainer: EmbedTrainer, report: dict[str, Any], run: Path) -> dict[str, Any]:
    """Retrieval before (the base, step 0) and after (the best checkpoint), and the validation history."""
    history = _history(run)
    seen = report["supervised_tokens"]  # the loop counts loss weights: queries here
    out: dict[str, Any] = {
        "examples_seen": seen, "examples_per_sec": seen / report["train_seconds"] if report["train_seconds"] else None,
        "supervised_tokens": None, "supervised_tokens_per_sec": None, "val_ppl": None, "validation": history,
        "retrieval_before": None, "retrieval_after": None,
    }
    best = trainer.load_best()
    out["selection"] = {"metric": "val_loss", "checkpoint": None if best is None else str(best)}
    if trainer.val_data is None:
        return out
    before = next((h for h in history if h["step"] == 0), None)
    out["retrieval_before"] = None if before is None else {k: v for k, v in before.items() if k != "step"}
    out["retrieval_after"] = trainer.validation()
    return out


def embed_command(base: str, data: list[str], out: str, config: str | None = None, val: list[str] | None = None,
                  pooling: Literal["auto", "last", "mean", "first"] = "auto", temperature: float = 0.05,
                  symmetric: bool = False, resume: bool = False, overwrite: bool = False, nproc: int = 1,
                  max_restarts: int = 0, overrides: list[str] = ()) -> int:
    """Train a retriever: contrastive fine-tuning (InfoNCE, in-batch negatives) on query/passage pairs.

    Records are JSONL pairs: {"query", "passage"}, {"question", "answer"}, {"prompt", "response"} (what `haina data
    instruct --from-stdlib` writes) or {"anchor", "positive"}, with an optional hard negative in "negative"
    (--embed.query_field/--embed.passage_field name another pair). Bad records are counted and kept with their
    reason in OUT/rejects.jsonl. Queries and passages go through the same model, pooled as `haina embed` pools it
    (the last token for a causal base, the mean for an encoder); each query learns to pick its own passage among
    the batch's (distinct) passages and hard negatives. Without --val, a seeded share of the passages is held out
    (data.val_fraction) and every evaluation logs recall@1, recall@5 and MRR of each validation query's passage
    among all validation passages; the best checkpoint (and early stopping) follows the validation loss.
    OUT/report.json compares the retrieval of the base and of the best checkpoint. The run directory is an
    embedder as it is: `haina embed --checkpoint OUT`, `haina rag index --embedder OUT`. All weights, or LoRA
    adapters with --lora.r=8; any --section.key=value overrides the recipe (--train.lr=3e-5).

    Data parallel (DDP) with --nproc N (or under torchrun), as `haina finetune sft`; the in-batch negatives are the
    whole global batch's (processes × train.batch_size), as for one process with that batch.

    Args:
        base: the model to start from: a haina checkpoint or run directory, or a Hugging Face directory.
        data: JSONL files of query/passage pairs.
        out: the run directory to write.
        config: a recipe file or the name of a bundled one in recipes/finetune (default: embed).
        val: held-out pair files for validation (default: a share of --data's passages, data.val_fraction).
        pooling: auto (last token for a causal base, mean for an encoder), last, mean or first.
        temperature: the InfoNCE temperature: logits are cosine similarities divided by it.
        symmetric: add the passage → query loss.
        resume: continue the run in --out from its latest checkpoint.
        overwrite: start over in an existing --out.
        nproc: processes on this machine, one per GPU (or sharing the CPU cores): launches torchrun.
        max_restarts: with --nproc, how often torchrun restarts the job after a process fails (resuming from the
            last checkpoint).
    """
    args = dict(locals())  # the command's own arguments: --nproc runs them again under torchrun
    from haina.finetune.command import _flags, load_finetune_config

    defaults = {"pooling": "auto", "temperature": 0.05, "symmetric": False}
    given = {"pooling": pooling, "temperature": temperature, "symmetric": symmetric}
    more = {f"embed.{k}": v for k, v in given.items() if v != defaults[k]}  # a flag at its default keeps the recipe's

    def load(resume: bool) -> FinetuneConfig:
        cfg = load_finetune_config("embed", config, _flags(base, data, out, val, resume, **more), overrides)
        refuse_sharding(cfg)
        return cfg

    return run_command(embed_command, args, load, run_embed, lambda report, cfg: _summary(report, cfg.out))


def _summary(report: dict[str, Any], out: str | None) -> None:
    before, after = report.get("retrieval_before"), report.get("retrieval_after")
    scored = ""
    if after is not None:
        was = "" if before is None else f"{before['recall@1']:.2%} → "
        scored = f", val recall@1 {was}{after['recall@1']:.2%}, MRR {after['mrr']:.4f}"
    print(f"{report['steps']} steps, {report['examples_seen']:,} pairs{scored}, stopped by {report['stopped_because']}")
    print(f"run: {out}   checkpoint: {report['selection']['checkpoint']} ({report['pooling']} pooling; "
          f"haina embed --checkpoint {out})")


__all__ = ["EmbedTrainer", "Pooler", "embed_command", "info_nce", "run_embed"]
