"""Augmentation operators: deterministic, label-preserving, marked in meta."""

import random
from collections import Counter

import pytest

from haina.core.errors import HainaError
from haina.data.prepare.augment import (
    augment_documents,
    load_synonyms,
    random_deletion,
    random_swap,
    synonym_replacement,
)

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]


def test_deletion_and_swap():
    rng = random.Random(0)
    deleted = random_deletion(WORDS, 0.3, rng)
    assert 0 < len(deleted) < len(WORDS) and all(w in WORDS for w in deleted)
    assert random_deletion(WORDS, 1.0, rng) in [[w] for w in WORDS]  # never empty
    swapped = random_swap(WORDS, 0.2, rng)
    assert sorted(swapped) == sorted(WORDS) and swapped != WORDS


def test_synonyms_keep_case_and_punctuation(tmp_path):
    (tmp_path / "s.json").write_text('{"quick": ["fast"], "dog": ["hound"]}')
    table = load_synonyms(tmp_path / "s.json")
    out = synonym_replacement(["Quick,", "dog."], table, 1.0, random.Random(0))
    assert out == ["Fast,", "hound."]
    (tmp_path / "bad.txt").write_text("no separator here\n")
    with pytest.raises(HainaError, match="bad.txt:1"):
        load_synonyms(tmp_path / "bad.txt")


def test_augment_documents_is_deterministic_and_marked():
    docs = [{"id": "d1", "text": " ".join(WORDS), "label": 1, "meta": {}}]
    p = {"delete": 0.2, "swap": 0.2, "synonym": 0.5}

    def run():
        return list(augment_documents(iter(docs), ("delete", "swap"), 2, p, 7, None, Counter()))

    first = run()
    assert first == run()
    assert first[0] is docs[0] and len(first) == 5
    assert all(d["meta"]["augmented"] and d["meta"]["parent"] == "d1" and d["label"] == 1 for d in first[1:])
    assert len({d["id"] for d in first}) == 5


def test_invalid_synonym_json_is_a_clear_error(tmp_path):
    (tmp_path / "syn.json").write_text("{bad")
    with pytest.raises(HainaError, match="not valid JSON"):
        load_synonyms(tmp_path / "syn.json")


def test_augment_into_an_earlier_output_leaves_no_stale_shards(tmp_path):
    from haina.data.prepare.augment import augment_command

    (tmp_path / "in.jsonl").write_text('{"text": "a good movie to watch", "label": "pos"}\n')
    augment_command([str(tmp_path / "in.jsonl")], str(tmp_path / "out"))
    stale = tmp_path / "out" / "train" / "part-00001.jsonl.zst"
    stale.write_bytes(b"")  # a shard of an earlier, larger run (the directory is a `data augment` output)
    augment_command([str(tmp_path / "in.jsonl")], str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["part-00000.jsonl.zst"]
