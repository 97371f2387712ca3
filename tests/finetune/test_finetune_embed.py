"""`haina finetune embed`: a tiny base learns to match "What does NAME do?" to the passage about NAME.

The loss is checked against InfoNCE computed by hand; the records' aliases, rejects and one-line refusals are
checked on their own; a run on synthetic pairs retrieves held-out passages better than its base did, and its
run directory is an embedder as it stands (`Embedder.load`, `haina embed`), LoRA runs included.
"""

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from haina.cli import main
from haina.core.errors import HainaError
from haina.finetune.embed import info_nce
from haina.finetune.embed_data import (
    EncodedPairs,
    PairBatches,
    RetrievalSet,
    hold_out,
    read_pairs,
    record_to_pair,
    retrieval_metrics,
)
from haina.finetune.sft_data import RecordError
from haina.generate.embed import Embedder
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.tokenizer.train import train_bpe

ACTS = ["reads the config file", "sorts a list of numbers", "opens a socket", "parses a date string",
        "writes a log line", "joins two paths", "hashes a password", "counts the words"]
FAST = ["--train.device=cpu", "--train.tensorboard=false", "--train.warmup_steps=5", "--train.batch_size=16"]


def _names(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))] = None
    return list(out)


NAMES = _names(0, 100)
TRAIN, UNSEEN = NAMES[:80], NAMES[80:]  # UNSEEN: never in any file the runs read


def _pair(name: str, i: int, shape: tuple[str, str] = ("prompt", "response")) -> dict:
    return {shape[0]: f"What does {name} do?", shape[1]: f"{name} {ACTS[i % len(ACTS)]} and returns the result."}


def _jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


BAD = [({"prompt": "What does zz do?"}, "'prompt' without 'response'"),
       ({"query": 5, "passage": "a passage"}, "query is a number, not a string"),
       ({"question": "What?", "answer": "It.", "negative": "It."},
        "'negative' is the passage itself: a hard negative must be another text"),
       ("{not json\n", "invalid JSON (Expecting property name enclosed in double quotes)")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Models this small gain nothing from more threads, and on a busy machine torch's threads wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    shapes = [("prompt", "response"), ("query", "passage"), ("question", "answer"), ("anchor", "positive")]
    rows = [_pair(n, i, shapes[i % 4]) for i, n in enumerate(TRAIN)]
    rows[0]["negative"] = _pair(TRAIN[1], 1)["response"]  # a hard negative that is another row's passage
    texts = [" ".join(_pair(n, i).values()) for i, n in enumerate(NAMES)] * 5
    tok = train_bpe(texts, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, block_size=48, n_layer=2, n_head=2, n_embd=64, pos="rope", norm="rmsnorm",
                      mlp="swiglu", bias=False)
    save_model(root / "base", Transformer(cfg), tok)
    _jsonl(root / "train.jsonl", rows + [r for r, _ in BAD])
    return root


def _args(files, out, *extra):
    return ["finetune", "embed", "--base", str(files / "base"), "--data", str(files / "train.jsonl"), "--out", str(out),
            "--data.val_fraction=0.25", *FAST, *extra]


def _run(files, out, *extra):
    assert main(_args(files, out, *extra)) == 0
    return json.loads((out / "report.json").read_text())


def _refused(capsys, args, text):
    """The CLI answers 2 with one line holding `text` (after what was logged before it)."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and text in err[-1], err


def _top1(embedder: Embedder, names: list[str]) -> float:
    """How often a query's own passage is the nearest of all the names' passages."""
    q = embedder.embed([_pair(n, i)["prompt"] for i, n in enumerate(names)])
    p = embedder.embed([_pair(n, i)["response"] for i, n in enumerate(names)])
    return float(((q @ p.T).argmax(1) == np.arange(len(names))).mean())


# ---------------------------------------------------------------------------------------------- the loss
def _hand_nce(q, cands, target, tau, skip=()):
    """-log softmax(cos / tau)[target] for one row, leaving out the candidates in `skip`, by hand."""
    def unit(v):
        return [x / math.sqrt(sum(y * y for y in v)) for x in v]

    logits = [sum(a * b for a, b in zip(unit(q), unit(c), strict=True)) / tau for c in cands]
    kept = [z for j, z in enumerate(logits) if j not in skip]
    return -(logits[target] - math.log(sum(math.exp(z) for z in kept)))


def test_info_nce_is_the_hand_computed_loss():
    g = torch.Generator().manual_seed(0)
    q, p, n = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g)
    Q, P, N = q.tolist(), p.tolist(), n.tolist()
    tau = 0.5
    plain = sum(_hand_nce(Q[i], P, i, tau) for i in range(3)) / 3
    torch.testing.assert_close(info_nce(q, p, temperature=tau), torch.tensor(plain))
    with_neg = sum(_hand_nce(Q[i], P + N, i, tau) for i in range(3)) / 3
    torch.testing.assert_close(info_nce(q, p, temperature=tau, negatives=n), torch.tensor(with_neg))
    back = sum(_hand_nce(P[i], Q, i, tau) for i in range(3)) / 3
    torch.testing.assert_close(info_nce(q, p, temperature=tau, symmetric=True), torch.tensor((plain + back) / 2))

    # Hard negative 0 is row 1's passage (text id 11): for row 1 that column is its own answer, so it is left out
    # (for the others it stays a negative); rows 0 and 2 ask the same question, so the passage → query term
    # leaves each out of the other's candidates.
    qid, pid, nid = torch.tensor([7, 8, 7]), torch.tensor([10, 11, 12]), torch.tensor([11, 13])
    masked = (_hand_nce(Q[0], P + N, 0, tau) + _hand_nce(Q[1], P + N, 1, tau, skip={3})
              + _hand_nce(Q[2], P + N, 2, tau)) / 3
    back = (_hand_nce(P[0], Q, 0, tau, skip={2}) + _hand_nce(P[1], Q, 1, tau) + _hand_nce(P[2], Q, 2, tau, skip={0})) / 3
    got = info_nce(q, p, temperature=tau, negatives=n, symmetric=True, qid=qid, pid=pid, nid=nid)
    torch.testing.assert_close(got, torch.tensor((masked + back) / 2))
    # A negative with id -1 is a placeholder (a row without a hard negative): no row counts it.
    got = info_nce(q, p, temperature=tau, negatives=n, qid=qid, pid=pid, nid=torch.tensor([-1, 13]))
    hand = sum(_hand_nce(Q[i], P + N, i, tau, skip={3}) for i in range(3)) / 3
    torch.testing.assert_close(got, torch.tensor(hand))


def test_retrieval_metrics_count_ties_against_the_query():
    p = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0]])  # passages 1 and 2 are alike: queries 1 and 2 tie
    q = p.clone()
    m = retrieval_metrics(q, p, torch.tensor([0, 1, 2]), temperature=1.0)
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 0.5 + 0.5) / 3)


# ---------------------------------------------------------------------------------------------- the data
def test_records_by_any_alias_and_rejects_with_reasons(files, tmp_path):
    assert record_to_pair({"anchor": "a", "positive": "b", "negative": "c"}) == ("a", "b", "c")
    assert record_to_pair({"q": "a", "doc": "b"}, fields=("q", "doc")) == ("a", "b", None)
    with pytest.raises(RecordError, match="no query/passage pair"):
        record_to_pair({"text": "a"})
    got = read_pairs([files / "train.jsonl"])
    assert len(got.pairs) == 80 and got.read == 80 + len(BAD)
    assert [r["reason"] for r in got.rejects] == [reason for _, reason in BAD]
    assert got.pairs[0].negative == got.pairs[1].passage

    bad = _jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD])
    with pytest.raises(HainaError) as e:
        read_pairs([bad])
    assert "no usable pair" in str(e.value) and "\n" not in str(e.value)


def test_batches_never_hold_a_passage_twice():
    # 12 pairs, 5 distinct passages: the stdlib's docstrings repeat like this.
    pid = [0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 4]
    data = EncodedPairs(queries=[[i + 1] for i in range(12)], passages=[[p + 1] for p in pid], negatives=[None] * 12,
                        qid=list(range(12)), pid=pid, nid=[-1] * 12)
    batches = PairBatches(data, pad_id=0)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        b = batches.get_batch(5, 8, g)
        assert sorted(b["pid"].tolist()) == [0, 1, 2, 3, 4]
        seen.update(b["qid"].tolist())
    assert seen == set(range(12))  # every query of a shared passage gets its turn
    with pytest.raises(HainaError, match="distinct passages"):
        batches.get_batch(6, 8, g)
    val = RetrievalSet.of(data)
    assert len(val.passages) == 5 and val.gold.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 4]


def test_hold_out_keeps_every_query_of_a_passage_together(tmp_path):
    pairs = read_pairs([_jsonl(tmp_path / "p.jsonl", [_pair(n, 0) for n in TRAIN[:30]] * 2)]).pairs
    train, val = hold_out(pairs, 0.2, seed=1)
    assert len(val) == 12 and {p.passage for p in train}.isdisjoint({p.passage for p in val})


# ---------------------------------------------------------------------------------------------- runs
def test_a_run_learns_to_retrieve_and_is_an_embedder(files, tmp_path):
    out = tmp_path / "run"
    report = _run(files, out, "--train.max_steps=60", "--train.lr=3e-3", "--train.eval_every=20",
                  "--train.save_every=20")
    before, after = report["retrieval_before"], report["retrieval_after"]
    assert after["recall@1"] > before["recall@1"] and after["mrr"] > before["mrr"], (before, after)
    assert after["recall@1"] >= 0.8 and report["pooling"] == "last" and report["dim"] == 64
    assert [h["step"] for h in report["validation"]] == [0, 20, 40, 60]
    records = report["data"]["records"]
    assert records["train_pairs"] + records["val_pairs"] == 80 and records["val_pairs"] == 20
    assert records["rejected"] == len(BAD) and records["hard_negatives"] in (0, 1)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == [reason for _, reason in BAD]
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_mrr" in line]
    assert {"val_loss", "val_recall@1", "val_recall@5", "val_mrr"} <= set(val[0])

    # The run directory as `haina embed` and `rag index --embedder` read it: no flag, the pooling it trained with,
    # and names it never saw retrieved better than by the base.
    tuned, base = Embedder.load(str(out), device="cpu"), Embedder.load(str(files / "base"), device="cpu")
    assert tuned.dim == 64 and tuned.pooling == "last" and tuned.describe()["kind"] == "haina"
    assert _top1(tuned, UNSEEN) > _top1(base, UNSEEN)


def test_resume_continues_exactly(files, tmp_path, capsys):
    def run(out, steps, *extra):
        return _run(files, out, f"--train.max_steps={steps}", "--train.decay_steps=6", "--train.lr=1e-3",
                    "--train.eval_every=3", *extra)

    run(tmp_path / "a", 3)
    resumed = run(tmp_path / "a", 6, "--resume")
    straight = run(tmp_path / "b", 6)
    assert resumed["steps"] == 6 and resumed["steps_this_run"] == 3
    assert resumed["val_loss"] == straight["val_loss"]
    assert resumed["retrieval_before"] == straight["retrieval_before"]  # step 0's, from the first part's log
    assert resumed["retrieval_after"] == straight["retrieval_after"]
    _refused(capsys, _args(files, tmp_path / "a", "--train.max_steps=9", "--resume", "--pooling", "mean"),
             "resume with --embed.pooling=last")
    assert json.loads((tmp_path / "a" / "report.json").read_text())["steps"] == 6


def test_lora_run_records_its_pooling_and_embeds_from_the_command_line(files, tmp_path):
    out = tmp_path / "lora"
    report = _run(files, out, "--lora.r=4", "--pooling", "mean", "--symmetric", "--train.max_steps=4",
                  "--train.lr=1e-2", "--train.eval_every=4")
    assert report["lora"] and report["pooling"] == "mean" and report["symmetric"]
    best = out / "checkpoints" / json.loads((out / "checkpoints" / "index.json").read_text())["best"]
    assert (best / "adapter.safetensors").is_file() and not (best / "model.safetensors").is_file()
    tuned = Embedder.load(str(out), device="cpu")  # the base it records, then its adapters; mean, as trained
    assert tuned.pooling == "mean"
    texts = [_pair(n, 0)["prompt"] for n in UNSEEN[:3]]
    assert main(["embed", "--checkpoint", str(out), "--input", str(_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])),
                 "--out", str(tmp_path / "v.npy"), "--device", "cpu"]) in (0, None)
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), tuned.embed(texts), atol=1e-5)
    base = Embedder.load(str(files / "base"), device="cpu", pooling="mean")
    assert not np.allclose(base.embed(texts), tuned.embed(texts), atol=1e-4)  # the adapters moved it
    # Merged, it is a plain checkpoint that still embeds as trained (mean pooling), with the same vectors.
    assert main(["finetune", "merge", "--checkpoint", str(out), "--out", str(tmp_path / "merged")]) in (0, None)
    merged = Embedder.load(str(tmp_path / "merged"), device="cpu")
    assert merged.pooling == "mean"
    np.testing.assert_allclose(merged.embed(texts), tuned.embed(texts), atol=1e-4)


def test_ddp_gathers_the_global_batch_and_matches_one_process(files, tmp_path):
    """`--nproc 2` × 4 pairs: every query meets all 8 passages, as one process with a batch of 8 does."""
    common = ["--train.max_steps=4", "--train.log_every=1", "--train.lr=3e-3", "--train.eval_every=4",
              "--train.save_every=0", "--train.seed=3"]
    args = _args(files, tmp_path / "ddp", *common, "--train.batch_size=4", "--nproc", "2")
    r = subprocess.run([sys.executable, "-m", "haina", *args], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert r.returncode == 0, r.stderr
    one = _run(files, tmp_path / "one", *common, "--train.batch_size=8")
    ddp = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert ddp["ranks"] == "2 ranks, DDP (cpu)" and ddp["examples_seen"] == one["examples_seen"] == 4 * 8

    def losses(run):
        return [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    # Without the gathering, each query would meet 3 negatives instead of 7 and step 1 would differ already.
    np.testing.assert_allclose(losses(tmp_path / "ddp"), losses(tmp_path / "one"), rtol=1e-4, atol=1e-5)
    assert ddp["val_loss"] == pytest.approx(one["val_loss"], rel=1e-3)


def test_refusals_are_one_line(files, tmp_path, capsys):
    _refused(capsys, _args(files, tmp_path / "x", "--parallel.dp_shard=2"), "does not train under FSDP2")
    _refused(capsys, _args(files, tmp_path / "y", "--train.batch_size=70"), "the training data has 60")
    _refused(capsys, _args(files, tmp_path / "z", "--temperature", "0"), "embed.temperature must be positive")
    assert not any((tmp_path / d).exists() for d in "xyz")  # refused before anything was written
