"""`haina eval lm`: sliding windows, bits per byte, MC-dropout uncertainty, noise, reports and their comparison."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from haina.cli import main
from haina.data.shards import TokenShards
from haina.data.tokenize import tokenize_to_shards
from haina.eval.lm import decode_documents, encode_documents, sliding_windows, token_byte_lengths
from haina.eval.uncertainty import (
    MCPasses,
    auroc,
    error_correlation,
    expected_entropy,
    mc_dropout,
    mutual_information,
    point_biserial,
    predictive_entropy,
)
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.model.transformer import lm_loss
from haina.tokenizer.train import train_bpe, train_char

DOCS = ["the cat sat on the mat and the dog ran to the park. " * 6,
        "héllo wörld, café — 日本語 😀 naïve façade. " * 4,
        "To be, or not to be, that is the question. " * 6,
        "the dog sat on the cat; the park ran to the mat. " * 5]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(DOCS, vocab_size=300)


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    """A 2-layer model trained for a few steps on DOCS (so it is right on some tokens and wrong on others)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    model = Transformer(cfg)
    ids = torch.from_numpy(encode_documents(DOCS, tok))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 33] for s in starts.tolist()])
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("eval-lm") / "ckpt"
    save_model(out, model.eval(), tok)
    return out


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-lm-text")
    (d / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in DOCS[1:]:
            f.write(json.dumps({"text": doc}) + "\n")
    return [str(d / "a.txt"), str(d / "b.jsonl.gz")]


@pytest.fixture(scope="module")
def shards(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-lm-shards") / "shards"
    tokenize_to_shards(DOCS * 3, tok, out, val_fraction=0.5)
    return out


def _run(*args) -> int:
    return main(["eval", "lm", "--device", "cpu", *map(str, args)])


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


# ---------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("n", [2, 5, 31, 32, 33, 100])
@pytest.mark.parametrize("context, stride", [(8, 8), (8, 3), (8, 1), (8, 7), (2, 1), (2, 2)])
def test_sliding_windows_score_every_token_once(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert len(scored) == len(set(scored))
    for w in windows:
        assert w.end - w.begin <= context and w.begin < w.first < w.end <= n
    if stride < context:
        assert sorted(scored) == list(range(1, n))  # every token but the first
        # Every window after the first gives its tokens at least context - stride tokens of history.
        assert all(w.first - w.begin >= context - stride for w in windows[1:])
    else:
        # Non-overlapping windows: the first token of each has no history and is not scored.
        assert sorted(scored) == [t for t in range(1, n) if t % context]


def test_single_window_equals_plain_forward(ckpt, text_files, tok, tmp_path):
    """A stream that fits one window is scored exactly as the model's own next-token loss on it."""
    assert _run("--checkpoint", ckpt, "--data", *text_files, "--out", tmp_path / "r", "--limit-tokens", 50) == 0
    rep = _report(tmp_path / "r")
    ids = torch.from_numpy(encode_documents(DOCS, tok)[:50])[None]
    model, _ = load_model(ckpt)
    with torch.no_grad():
        want = float(lm_loss(model(ids[:, :-1]), ids[:, 1:]))
    assert rep["tokens"] == 49 and rep["windows"] == 1
    assert rep["loss"] == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------- the command
def test_raw_text_report(ckpt, text_files, tok, tmp_path):
    out = tmp_path / "r"
    assert _run("--checkpoint", ckpt, "--data", *text_files, "--out", out, "--context", 32, "--stride", 16) == 0
    rep = _report(out)
    for key in ("ppl", "loss", "bits_per_byte", "tokens", "bytes", "windows", "tokens_per_sec", "kind", "command",
                "data_sha256", "details"):
        assert key in rep, key
    stream = encode_documents(DOCS, tok)  # every document followed by end-of-text, as the shards hold them
    assert rep["kind"] == "lm" and rep["details"]["source"] == "text"
    assert rep["tokens"] == len(stream) - 1 and rep["windows"] == len(sliding_windows(len(stream), 32, 16))
    assert rep["ppl"] == pytest.approx(math.exp(rep["loss"]))
    assert 0 < rep["loss"] < math.log(tok.vocab_size)  # it learned something
    # Bits per byte: the total loss in bits over the UTF-8 bytes of the scored tokens' text.
    first = len(tok.decode([int(stream[0])]).encode("utf-8"))
    assert rep["bytes"] == sum(len(d.encode("utf-8")) for d in DOCS) - first
    assert rep["bits_per_byte"] == pytest.approx(rep["loss"] * rep["tokens"] / math.log(2) / rep["bytes"])
    md = (out / "report.md").read_text()
    assert "windows of 32 tokens every 16 tokens" in md and "| bits_per_byte |" in md


def test_smaller_stride_changes_what_is_scored(ckpt, text_files, tmp_path):
    assert _run("--checkpoint", ckpt, "--data", *text_files, "--out", tmp_path / "a", "--context", 32) == 0
    assert _run("--checkpoint", ckpt, "--data", *text_files, "--out", tmp_path / "b", "--context", 32,
                "--stride", 8) == 0
    a, b = _report(tmp_path / "a"), _report(tmp_path / "b")
    n = a["details"]["stream_tokens"]
    assert a["details"]["stride"] == 32 and a["tokens"] == n - a["windows"]  # each window's first token unscored
    assert b["tokens"] == n - 1 and b["windows"] > a["windows"]
    assert b["loss"] != a["loss"]


def test_token_shards_fall_back_to_val_and_equal_the_same_text(ckpt, shards, tok, tmp_path):
    assert _run("--checkpoint", ckpt, "--data", shards, "--out", tmp_path / "s", "--context", 32, "--stride",
                16, "--noise", "word", "--rates", 0.2) == 0
    rep = _report(tmp_path / "s")
    assert rep["details"]["split"] == "val" and "no test split" in rep["details"]["split_note"]
    val = TokenShards(shards, "val")
    assert rep["tokens"] == len(val) - 1
    # The same documents as text give the same tokens and numbers (byte-level BPE round-trips exactly).
    docs = decode_documents(val.window(0, len(val)), tok)
    text = tmp_path / "val.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    assert _run("--checkpoint", ckpt, "--data", text, "--out", tmp_path / "t", "--context", 32, "--stride", 16) == 0
    same = _report(tmp_path / "t")
    for key in ("tokens", "bytes", "windows"):
        assert same[key] == rep[key], key
    assert same["loss"] == pytest.approx(rep["loss"], rel=1e-6)
    assert [r["noise"] for r in rep["details"]["noise"]] == ["clean", "word"]  # shards decoded, perturbed


def test_shards_of_another_tokenizer_are_refused(ckpt, tmp_path, capsys):
    other = train_char(DOCS)
    tokenize_to_shards(DOCS, other, tmp_path / "shards", val_fraction=0.5)
    capsys.readouterr()
    assert _run("--checkpoint", ckpt, "--data", tmp_path / "shards", "--out", tmp_path / "r") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another tokenizer" in errors[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--context", 16, "--stride", 17], "--stride 17 is larger than --context 16"),
    (["--context", 65], "larger than the model's context of 64"),
    (["--stride", 65], "--stride 65 is larger than the context of 64"),
    (["--mc-dropout", 2, "--dropout", 1.5], "--dropout 1.5"),
    (["--noise", "emoji"], "--noise emoji"),
])
def test_bad_options_are_one_line_errors_and_write_nothing(ckpt, text_files, tmp_path, capsys, args, message):
    assert _run("--checkpoint", ckpt, "--data", *text_files, "--out", tmp_path / "r", *args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "r").exists()


def test_mc_dropout_metrics_are_seeded(ckpt, text_files, tmp_path):
    args = ["--checkpoint", ckpt, "--data", *text_files, "--context", 32, "--stride", 16, "--mc-dropout", 3,
            "--dropout", 0.2]
    assert _run(*args, "--out", tmp_path / "a", "--seed", 1) == 0
    assert _run(*args, "--out", tmp_path / "b", "--seed", 1) == 0
    assert _run(*args, "--out", tmp_path / "c", "--seed", 2) == 0
    a, b, c = (_report(tmp_path / x) for x in "abc")
    mc = [k for k in a if k.startswith("mc_")]
    assert {"mc_entropy", "mc_mutual_info", "mc_entropy_auroc", "mc_mutual_info_auroc", "mc_entropy_pb_corr",
            "mc_ppl", "mc_error_rate"} <= set(mc)
    assert a["mc_entropy"] >= a["mc_mutual_info"] > 0
    assert 0 < a["mc_error_rate"] < 1 and 0 <= a["mc_entropy_auroc"] <= 1 and 0 <= a["mc_mutual_info_auroc"] <= 1
    assert a["mc_entropy_auroc"] > 0.5  # a trained model is less sure where it errs
    assert {k: a[k] for k in mc} == {k: b[k] for k in mc}
    assert a["mc_mutual_info"] != c["mc_mutual_info"]
    assert a["loss"] == c["loss"]  # the headline numbers come from the deterministic pass
    assert "## MC dropout" in (tmp_path / "a" / "report.md").read_text()


def test_noise_table_and_picture(ckpt, text_files, tmp_path):
    out = tmp_path / "r"
    assert _run("--checkpoint", ckpt, "--data", *text_files, "--out", out, "--context", 32, "--noise", "char,word",
                "--rates", 0, 0.1, 0.3) == 0
    rep = _report(out)
    rows = rep["details"]["noise"]
    assert [(r["noise"], r["rate"]) for r in rows] == [("clean", 0.0), ("char", 0.1), ("char", 0.3), ("word", 0.1),
                                                       ("word", 0.3)]
    assert rows[0]["ppl"] == rep["ppl"]
    assert rows[2]["bits_per_byte"] > rep["bits_per_byte"]  # typos make trained text harder to predict
    md = (out / "report.md").read_text()
    assert "## Robustness to noise" in md and "| char | 0.3 |" in md and "ppl_vs_noise.png" in md
    assert (out / "ppl_vs_noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_two_lm_reports(ckpt, text_files, tmp_path, capsys):
    for name, ctx in (("short", 16), ("long", 64)):
        assert _run("--checkpoint", ckpt, "--data", *text_files, "--out", tmp_path / name, "--context", ctx) == 0
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "short"), str(tmp_path / "long")]) == 0
    table = (tmp_path / "compare.md").read_text()
    assert table.startswith("| metric | short | long |")
    assert "| ppl |" in table and "| bits_per_byte |" in table
    assert "different data" not in table  # same text, same hash
    assert "| ppl |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- bytes
def test_token_byte_lengths_add_up_to_the_text(tok):
    text = "".join(DOCS)
    ids = tok.encode(text)
    assert token_byte_lengths(tok, tok.vocab_size + 5)[ids].sum() == len(text.encode("utf-8"))
    assert token_byte_lengths(tok, tok.vocab_size)[tok.eos_id] == 0
    char = train_char(DOCS)  # a decoder that is not byte-level: measured by decoding
    lengths = token_byte_lengths(char, char.vocab_size)
    assert lengths[char.encode(text)].sum() == len(text.encode("utf-8")) and lengths[char.eos_id] == 0


# ---------------------------------------------------------------------------------------- uncertainty
def test_uncertainty_measures():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, 40, 7, generator=gen) * 2, dim=-1)  # (K, N, C)
    acc = MCPasses()
    for p in probs:
        acc.add(p.log())
    torch.testing.assert_close(acc.predictive_entropy(), predictive_entropy(probs))
    torch.testing.assert_close(acc.expected_entropy(), expected_entropy(probs))
    mi = mutual_information(probs)
    torch.testing.assert_close(acc.mutual_information(), mi)
    assert (mi >= 0).all() and (predictive_entropy(probs) >= mi).all()
    same = probs[:1].expand(4, -1, -1)
    assert mutual_information(same).abs().max() < 1e-5  # passes that agree: no epistemic uncertainty
    uniform = torch.full((2, 3, 7), 1 / 7)
    torch.testing.assert_close(predictive_entropy(uniform), torch.full((3,), math.log(7)))
    hard = torch.zeros(1, 1, 3)
    hard[0, 0, 1] = 1.0
    acc = MCPasses()
    acc.add(hard[0].log())  # log 0 = -inf must not turn the entropy into NaN
    assert acc.predictive_entropy().item() == 0 and acc.expected_entropy().item() == 0


def test_error_detectors_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    errors = rng.random(200) < 0.3
    scores = np.round(errors * 0.5 + rng.random(200), 1)  # rounded: many ties
    assert auroc(scores, errors) == pytest.approx(metrics.roc_auc_score(errors, scores))
    assert point_biserial(scores, errors) == pytest.approx(np.corrcoef(scores, errors)[0, 1])
    assert error_correlation(torch.tensor(-scores), torch.tensor(errors))["auroc"] == pytest.approx(
        1 - auroc(scores, errors))
    assert math.isnan(auroc(scores, np.zeros(200, bool)))  # no errors: undefined, not 0.5


def test_mc_dropout_context_restores_the_model(ckpt):
    model, _ = load_model(ckpt)
    lora_like = torch.nn.Dropout(0.0)
    model.add_module("extra", lora_like)
    x = torch.arange(20)[None] % model.cfg.vocab_size
    before = {m: m.training for m in model.modules()}
    with torch.inference_mode():
        clean = model(x)
        torch.manual_seed(0)
        with mc_dropout(model, 0.3):
            assert model.cfg.dropout == 0.3 and model.blocks[0].attn.dropout == 0.3 and lora_like.p == 0.3
            a, b = model(x), model(x)
        after = model(x)
    assert not torch.equal(a, b) and not torch.equal(a, clean)
    assert torch.equal(after, clean)
    assert model.cfg.dropout == 0.0 and model.blocks[0].attn.dropout == 0.0 and model.blocks[1].mlp.dropout == 0.0
    assert lora_like.p == 0.0 and {m: m.training for m in model.modules()} == before


def test_adapter_is_evaluated_on_its_base(ckpt, shards, text_files, tmp_path):
    """`--adapter RUN` scores base + adapters: the same numbers as the LoRA run itself, not the base's."""
    assert main(["finetune", "continue", "--base", str(ckpt), "--data", str(shards), "--out", str(tmp_path / "lora"),
                 "--lora.r=4", "--train.lr=3e-2", "--train.max_steps=6", "--train.warmup_steps=0",
                 "--train.batch_size=4", "--train.block_size=32", "--train.device=cpu",
                 "--train.tensorboard=false"]) == 0
    runs = {"base": ["--checkpoint", ckpt], "adapter": ["--checkpoint", ckpt, "--adapter", tmp_path / "lora"],
            "run": ["--checkpoint", tmp_path / "lora"]}
    for name, args in runs.items():
        assert _run(*args, "--data", *text_files, "--out", tmp_path / name) == 0
    base, adapter, run = (_report(tmp_path / n) for n in runs)
    assert adapter["loss"] == pytest.approx(run["loss"], rel=1e-6)
    assert adapter["loss"] != pytest.approx(base["loss"], rel=1e-4)
    assert adapter["adapter"] == str(tmp_path / "lora") and base["adapter"] is None
