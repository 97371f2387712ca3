"""Exact and near-duplicate detection, and the deterministic, stratified split."""

import random

import numpy as np

from haina.data.prepare.dedup import Deduplicator, MinHasher, dedup_key, exact_hash, jaccard_estimate
from haina.data.prepare.split import SplitPlan

WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye", "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem", "fact", "water", "room", "mother", "area", "money", "story", "lot", "right", "study", "book", "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour", "game", "line", "end", "member", "law", "car", "city", "community", "name", "president", "team", "minute", "idea", "kid", "body", "information", "back", "parent", "face", "others", "level", "office", "door", "health", "art", "war", "history", "party", "result", "change", "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher", "force", "education"]


def document(rng, n=170):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def substitute(text, frac, rng):
    return " ".join(rng.choice(WORDS) if rng.random() < frac else w for w in text.split())


def check(dd, hasher, doc_id, text):
    key = dedup_key(text)
    return dd.check(doc_id, exact_hash(key), hasher.signature(key))


def test_exact_duplicates_ignore_case_and_whitespace():
    dd = Deduplicator(exact=True, minhash=False)
    hasher = MinHasher()
    assert check(dd, hasher, "a", "Hello   World\nagain") == (None, None)
    assert check(dd, hasher, "b", "hello world again") == ("exact_duplicate", "a")
    assert check(dd, hasher, "c", "hello world, again") == (None, None)
    assert dd.cluster_sizes == {"a": 2}


def test_minhash_signature_estimates_jaccard():
    rng = random.Random(0)
    hasher = MinHasher(num_perm=256, ngram=4)
    a = document(rng)
    b = substitute(a, 0.05, rng)
    sa, sb = hasher.signature(dedup_key(a)), hasher.signature(dedup_key(b))
    grams = lambda t: {t[i:i + 4] for i in range(len(t) - 3)}
    ga, gb = grams(dedup_key(a)), grams(dedup_key(b))
    true = len(ga & gb) / len(ga | gb)
    assert abs(jaccard_estimate(sa, sb) - true) < 0.08
    assert sa.dtype == np.uint32 and sa.shape == (256,)
    assert np.array_equal(sa, MinHasher(num_perm=256, ngram=4).signature(dedup_key(a)))  # deterministic


def test_near_duplicates_found_unrelated_kept_first_occurrence_wins():
    rng = random.Random(1)
    originals = [document(rng) for _ in range(60)]
    dd = Deduplicator(exact=True, minhash=True, threshold=0.8, num_perm=128)
    hasher = MinHasher()
    for i, text in enumerate(originals):
        assert check(dd, hasher, f"o{i}", text) == (None, None)  # no false positives among unrelated documents
    found = sum(check(dd, hasher, f"p{i}", substitute(originals[i], 0.03, rng)) == ("near_duplicate", f"o{i}")
                for i in range(30))
    assert found >= 27
    far = sum(check(dd, hasher, f"f{i}", substitute(originals[i], 0.5, rng))[0] is not None for i in range(30, 60))
    assert far == 0
    assert all(rep.startswith("o") for rep in dd.cluster_sizes)


def test_split_is_exact_stratified_and_order_independent():
    rng = random.Random(2)
    docs = [(rng.choice(["pos"] * 9 + ["neg"]), rng.getrandbits(64)) for _ in range(1000)]

    def run(items):
        groups = {}
        for label, h in items:
            groups.setdefault(f'"{label}"', []).append(h)
        plan = SplitPlan(0.1, 0.05, groups)
        return {h: plan.assign(label, h) for label, h in items}

    first = run(docs)
    assert run(list(reversed(docs))) == first
    for label in ("pos", "neg"):
        n = sum(1 for lab, _ in docs if lab == label)
        got = [first[h] for lab, h in docs if lab == label]
        assert got.count("val") == round(n * 0.1) and got.count("test") == round(n * 0.05)


def test_split_unlabeled_small_corpus_still_gets_validation():
    plan = SplitPlan(0.05, 0.0, {"": [5, 9, 1, 7]})
    out = [plan.assign(None, h) for h in (1, 5, 7, 9)]
    assert out == ["val", "train", "train", "train"]


def test_on_disk_index_decides_like_the_in_memory_one(tmp_path):
    rng = random.Random(3)
    originals = [document(rng) for _ in range(20)]
    docs = originals + [substitute(originals[i], 0.03, rng) for i in range(10)] + [originals[0]]
    hasher = MinHasher()
    mem = Deduplicator(exact=True, minhash=True)
    disk = Deduplicator(exact=True, minhash=True, path=tmp_path / "index.sqlite")
    verdicts = [(check(mem, hasher, f"d{i}", t), check(disk, hasher, f"d{i}", t)) for i, t in enumerate(docs)]
    assert all(a == b for a, b in verdicts)
    assert sum(a[0] == "near_duplicate" for a, _ in verdicts) >= 9 and verdicts[-1][0] == ("exact_duplicate", "d0")
    assert (tmp_path / "index.sqlite").stat().st_size > 0  # the index lives on disk, not in Python objects
    summary = disk.cluster_summary()
    assert summary["clusters"] == len(disk.cluster_sizes) and summary["largest_clusters"][0] >= 2
    disk.close()
    mem.close()
