"""Checkpoints carry checksums that are verified at load; a damaged file is named in one line."""

import json
import os
import shutil

import pytest
import torch

from haina.core import checksums
from haina.core.checksums import CHECKSUMS, file_sha256, verify_checksums, write_checksums
from haina.core.errors import HainaError
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model, verify_checkpoint
from haina.tokenizer.train import train_bpe


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = train_bpe(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], vocab_size=280)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("sums") / "ckpt"
    save_model(out, Transformer(ModelConfig.from_name("tiny", vocab_size=280, block_size=16, n_layer=1, n_head=2,
                                                      n_embd=16)), tok)
    return out


@pytest.fixture
def copy(ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def test_save_model_lists_every_file_with_its_size_and_sha256(ckpt):
    listed = json.loads((ckpt / CHECKSUMS).read_text())
    assert listed["algorithm"] == "sha256"
    names = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != CHECKSUMS}
    assert set(listed["files"]) == names == {"model.safetensors", "config.yaml", "tokenizer/tokenizer.json",
                                             "tokenizer/tokenizer_config.json"}
    import hashlib

    for name, entry in listed["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checksums(ckpt) is True
    model, tok = load_model(ckpt)
    assert tok is not None and model.cfg.vocab_size == 280


@pytest.mark.parametrize("name", ["model.safetensors", "config.yaml", "tokenizer/tokenizer.json"])
def test_a_changed_byte_is_named(copy, name):
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(HainaError, match=f"{name} does not match its sha256 in checksums.json"):
        load_model(copy)
    with pytest.raises(HainaError, match=f"{name} does not match"):
        verify_checkpoint(copy)


def test_a_truncated_or_missing_file_is_named_before_any_hashing(copy, monkeypatch):
    monkeypatch.setattr(checksums, "file_sha256", lambda p: pytest.fail(f"hashed {p}"))
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(HainaError, match=rf"model.safetensors is truncated \({len(data) - 10:,} bytes, "
                                         rf"checksums.json records {len(data):,}\)"):
        load_model(copy)
    weights.write_bytes(data)
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(HainaError, match="tokenizer.json is missing"):
        verify_checksums(copy)


def test_checkpoints_without_checksums_still_load(copy):
    (copy / CHECKSUMS).unlink()
    assert verify_checksums(copy) is False
    _, tok = load_model(copy)
    assert tok is not None


def test_unlisted_files_are_ignored_and_a_foreign_list_is_refused(copy):
    (copy / "notes.txt").write_text("mine")
    (copy / "haina-manifest.json").write_text("{}")
    assert verify_checksums(copy)
    (copy / CHECKSUMS).write_text(json.dumps({"files": {"../x": {"size": 1, "sha256": "0"}}}))
    with pytest.raises(HainaError, match="not a haina checksum list"):
        verify_checksums(copy)
    listed = {"format": "haina-checksums/1", "algorithm": "sha256", "files": {"../x": {"size": 1, "sha256": "0"}}}
    (copy / CHECKSUMS).write_text(json.dumps(listed))
    with pytest.raises(HainaError, match="outside the directory"):
        verify_checksums(copy)


def test_a_digest_is_remembered_only_for_a_settled_file(tmp_path, monkeypatch):
    """A file hashed right after it was written is hashed again next time: a rewrite within the same timestamp tick
    keeps (size, mtime, ctime) and would otherwise be trusted. A settled file is read once."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    first = file_sha256(path)
    path.write_bytes(b"b" * 1000)  # same size, possibly the same tick
    assert file_sha256(path) != first
    old = path.stat().st_mtime - 60
    os.utime(path, (old, old))
    monkeypatch.setattr(checksums, "_SETTLED_NS", 0)  # ctime cannot be set back; the margin is what is tested above
    digest = file_sha256(path)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a) or real_open(*a, **k))
    assert file_sha256(path) == digest and not reads


def test_write_checksums_covers_files_added_later(copy):
    (copy / "trainer_state.pt").write_bytes(b"state")
    write_checksums(copy)
    assert "trainer_state.pt" in json.loads((copy / CHECKSUMS).read_text())["files"]
    (copy / "trainer_state.pt").write_bytes(b"stale")
    with pytest.raises(HainaError, match="trainer_state.pt does not match"):
        verify_checksums(copy)
