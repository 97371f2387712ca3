"""Text → token shards: the exact on-disk format, dtype choice, splits, atomicity and errors."""

import functools
import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

import haina.data.tokenize as tokenize_mod
from haina.core.errors import HainaError
from haina.data.shards import TokenShards, find_tokenizer
from haina.data.text_input import iter_documents
from haina.data.tokenize import in_val, shard_dtype, tokenize_to_shards
from haina.tokenizer import EOT, Tokenizer
from haina.tokenizer.train import train_bpe

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma"]


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 30))) + "." for i in range(n)]


@functools.cache
def _tok() -> Tokenizer:
    return train_bpe(_docs(50), vocab_size=320)


def _read(out, split, dtype="<u2") -> list[int]:
    meta = json.loads((out / "meta.json").read_text())
    return [int(x) for name in meta["splits"][split]["shards"] for x in np.fromfile(out / name, dtype=dtype)]


def _split_docs(ids: list[int], eos: int) -> list[list[int]]:
    docs, cur = [], []
    for i in ids:
        if i == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    assert not cur, "every document must end with the end-of-text id"
    return docs


def test_shard_format_exactly(tmp_path):
    tok, docs = _tok(), _docs(200)
    meta = tokenize_to_shards(docs, tok, tmp_path, val_fraction=0.2, shard_tokens=500)
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk == meta
    assert meta["format"] == "haina-shards/1" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id
    assert meta["tokenizer_hash"] == tok.hash()
    assert set(meta["splits"]) == {"train", "val"}
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["shards"] == [f"{split}-{i:05d}.bin" for i in range(len(info["shards"]))]
        sizes = [(tmp_path / s).stat().st_size // 2 for s in info["shards"]]
        assert sum(sizes) == info["tokens"] and all(s <= 500 for s in sizes) and all(s == 500 for s in sizes[:-1])
    assert len(meta["splits"]["train"]["shards"]) > 1  # rolled over
    # Documents are separated by the end-of-text id, in input order within each split, split by hash.
    want = {"train": [d for d in docs if not in_val(d, 0.2)], "val": [d for d in docs if in_val(d, 0.2)]}
    assert 20 <= len(want["val"]) <= 60
    for split in ("train", "val"):
        got = _split_docs(_read(tmp_path, split), tok.eos_id)
        assert [tok.decode(ids) for ids in got] == want[split]
        assert meta["splits"][split]["documents"] == len(want[split])
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary files left behind
    # The reader written to this spec agrees, and finds the tokenizer saved beside the shards.
    train = TokenShards(tmp_path, "train")
    assert train.window(0, len(train)).tolist() == _read(tmp_path, "train")
    assert find_tokenizer(tmp_path) == tok


def _wordlevel(n: int) -> Tokenizer:
    vocab = {EOT: 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, n)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens([EOT])
    return Tokenizer(hf)


def test_dtype_uint32_for_large_vocab(tmp_path):
    assert shard_dtype(65536) == np.dtype("<u2") and shard_dtype(65537) == np.dtype("<u4")
    tok = _wordlevel(70_000)
    meta = tokenize_to_shards(["w69999 w2 w65536", "w3"], tok, tmp_path, val_fraction=0.0)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    assert _read(tmp_path, "train", "<u4") == [69999, 2, 65536, 0, 3, 0]
    assert meta["splits"]["val"] == {"tokens": 0, "documents": 0, "shards": []}


def test_deterministic_and_independent_of_order(tmp_path):
    tok, docs = _tok(), _docs(120)
    tokenize_to_shards(docs, tok, tmp_path / "a", val_fraction=0.25)
    tokenize_to_shards(docs, tok, tmp_path / "b", val_fraction=0.25)
    for name in ("meta.json", "train-00000.bin", "val-00000.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    shuffled = random.Random(1).sample(docs, len(docs))
    tokenize_to_shards(shuffled, tok, tmp_path / "c", val_fraction=0.25)
    val_a = {tok.decode(d) for d in _split_docs(_read(tmp_path / "a", "val"), tok.eos_id)}
    val_c = {tok.decode(d) for d in _split_docs(_read(tmp_path / "c", "val"), tok.eos_id)}
    assert val_a == val_c  # a document's split depends on its text, not its position


def test_single_document_is_split_by_its_tail(tmp_path):
    tok = _tok()
    doc = " ".join(_docs(40))
    ids = tok.encode(doc) + [tok.eos_id]
    meta = tokenize_to_shards([doc], tok, tmp_path, val_fraction=0.1)
    n_val = round(len(ids) * 0.1)
    assert meta["split_method"] == "tail"
    assert meta["splits"]["val"]["tokens"] == n_val and meta["splits"]["train"]["tokens"] == len(ids) - n_val
    assert _read(tmp_path, "train") == ids[:-n_val] and _read(tmp_path, "val") == ids[-n_val:]
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1


def test_val_never_empty_with_two_documents(tmp_path):
    tok, docs = _tok(), _docs(3)
    assert not any(in_val(d, 1e-6) for d in docs)
    meta = tokenize_to_shards(docs, tok, tmp_path, val_fraction=1e-6)
    assert meta["split_method"] == "tail" and meta["splits"]["val"]["tokens"] >= 1
    assert _read(tmp_path, "train") + _read(tmp_path, "val") == [t for d in docs for t in tok.encode(d) + [tok.eos_id]]


def test_given_splits_are_kept(tmp_path):
    tok = _tok()
    splits = {"train": _docs(5), "val": _docs(2, seed=9)}
    meta = tokenize_to_shards(splits, tok, tmp_path, val_fraction=0.5)
    assert meta["split_method"] == "given"
    for split, docs in splits.items():
        assert [tok.decode(d) for d in _split_docs(_read(tmp_path, split), tok.eos_id)] == docs


def test_long_documents_encode_in_pieces_exactly(tmp_path, monkeypatch):
    tok = _tok()
    doc = "\n".join(f"  line {i}: " + " ".join(WORDS[i % 7 : i % 7 + 5]) + "\n\n  x" for i in range(200))
    monkeypatch.setattr(tokenize_mod, "PIECE_CHARS", 300)
    pieces = tokenize_mod._pieces(doc)
    assert len(pieces) > 10 and "".join(pieces) == doc and max(map(len, pieces)) <= 300
    tokenize_to_shards([doc], tok, tmp_path, val_fraction=0.0)
    assert _read(tmp_path, "train") == tok.encode(doc) + [tok.eos_id]
    one_line = "  ".join(f"{w}, {i}!" for i, w in enumerate(WORDS * 20))  # no newline: cut before a space
    assert len(tokenize_mod._pieces(one_line)) > 10
    tokenize_to_shards([one_line], tok, tmp_path, val_fraction=0.0)
    assert _read(tmp_path, "train") == tok.encode(one_line) + [tok.eos_id]


def test_empty_corpus_and_interruption_leave_nothing(tmp_path):
    tok = _tok()
    with pytest.raises(HainaError, match="empty"):
        tokenize_to_shards(["", ""], tok, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []

    def broken():
        yield from _docs(2000)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        tokenize_to_shards(broken(), tok, tmp_path / "broken", shard_tokens=1000)
    assert list((tmp_path / "broken").iterdir()) == []
    # A reader error on the prefetch thread reaches the caller as the same HainaError.
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(1500)) + "{oops\n")
    with pytest.raises(HainaError, match=r"bad\.jsonl:1501: invalid JSON"):
        tokenize_to_shards(iter_documents([str(bad)]), tok, tmp_path / "bad", shard_tokens=1000)
    assert list((tmp_path / "bad").iterdir()) == []


def test_rewrite_replaces_old_dataset(tmp_path):
    tok = _tok()
    tokenize_to_shards(_docs(300), tok, tmp_path, val_fraction=0.1, shard_tokens=200)
    many = len(list(tmp_path.glob("train-*.bin")))
    meta = tokenize_to_shards(_docs(10), tok, tmp_path, val_fraction=0.1, shard_tokens=200)
    assert len(list(tmp_path.glob("train-*.bin"))) == len(meta["splits"]["train"]["shards"]) < many
    assert len(TokenShards(tmp_path, "train")) == meta["splits"]["train"]["tokens"]


def test_bad_arguments(tmp_path):
    with pytest.raises(HainaError, match="val_fraction"):
        tokenize_to_shards(["x"], _tok(), tmp_path, val_fraction=1.0)


def test_a_damaged_earlier_meta_json_is_replaced(tmp_path):
    # The library call writes into an existing directory: an unreadable earlier meta.json is no dataset to keep.
    (tmp_path / "meta.json").write_text("{not json")
    meta = tokenize_to_shards(_docs(10), _tok(), tmp_path, val_fraction=0.2)
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
