"""Benchmark `haina data prepare`: throughput per core, and near-duplicate precision/recall.

Prints markdown tables for BENCHMARKS.md:
1. documents/s/core for normalize + filters (Gopher quality, Gopher repetition, C4) + exact dedup;
2. documents/s/core for MinHash (128 permutations, signature + LSH), with datasketch's own
   `MinHash.update_batch` beside it;
3. near-duplicate precision and recall, with planted copies whose words are substituted at 2, 5,
   10 and 20 %, against two kinds of negatives (documents that must not be flagged):
   - independent random-word documents, which share little but their vocabulary;
   - templated, boilerplate-heavy documents built from the standard library's sources: generated
     pages for sibling methods of one class (same summary, method list and footer; different
     docstrings), files under one project's license notice with different code below it, and
     pydoc-style pages of sibling classes that repeat their base class's inherited methods.
   Every flag on a negative counts against precision; the report also says how many of those
   flagged negatives are textually at or above the threshold (exact Jaccard of the shingle sets),
   which no choice of MinHash parameters can separate from copies.

Documents for the throughput and the first negatives are ~1 KB of English-like prose: sentences
drawn from the word frequencies of tinyshakespeare (when ../shared/data has it) or of a synthetic
Zipf vocabulary. Times are CPU time of this process (`time.process_time`), so "per core" holds on a
busy machine too. Each throughput is measured in --rounds rounds and reported as the median round
with the range; the ratio to datasketch is taken within each round, the two run back to back.

    .venv/bin/python benchmarks/data_pipeline.py [--docs 4000] [--originals 2000] [--planted 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ast
import collections
import datetime
import math
import os
import platform
import re
import sys
import sysconfig
import textwrap
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rounds import Spread, cpu_model, load_average, ratios, round_order

from haina.data.prepare.config import PrepareConfig
from haina.data.prepare.dedup import Deduplicator, MinHasher, dedup_key, exact_hash, shingle_hashes
from haina.data.prepare.filters import filter_document
from haina.data.prepare.normalize import normalize_text

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def vocabulary(rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """Words and their probabilities: tinyshakespeare's if present, else a synthetic Zipf vocabulary."""
    if SHAKESPEARE.is_file():
        words = re.findall(r"[a-z']+", SHAKESPEARE.read_text(encoding="utf-8").lower())
        vocab, counts = np.unique(words, return_counts=True)
        return [str(v) for v in vocab], counts / counts.sum()
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["the", "and", "to", "of", "that", "with", "be", "have"]
    vocab += ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(20_000)]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    return vocab, p / p.sum()


class Corpus:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.vocab, self.p = vocabulary(self.rng)

    def words(self, n: int) -> list[str]:
        return [self.vocab[i] for i in self.rng.choice(len(self.vocab), size=n, p=self.p)]

    def document(self, chars: int = 1000) -> str:
        """Paragraphs of sentences (one paragraph per line, blank lines between), about `chars` long."""
        paragraphs, total = [], 0
        while total < chars:
            sentences = []
            for _ in range(int(self.rng.integers(2, 5))):
                w = self.words(int(self.rng.integers(8, 20)))
                sentences.append(" ".join(w).capitalize() + ".")
            para = " ".join(sentences)
            paragraphs.append(para)
            total += len(para) + 2
        return "\n\n".join(paragraphs)

    def substitute(self, text: str, fraction: float) -> str:
        """Replace each word with a random word with probability `fraction` (punctuation kept)."""
        out = []
        for line in text.split("\n"):
            words = line.split(" ")
            for i, w in enumerate(words):
                if w and self.rng.random() < fraction:
                    new = self.words(1)[0]
                    words[i] = new + ("." if w.endswith(".") else "")
            out.append(" ".join(words))
        return "\n".join(out)


def bench_filters(docs: list[str], cfg: PrepareConfig) -> dict:
    dedup = Deduplicator(exact=True, minhash=False)
    kept = 0
    start = time.process_time()
    for i, text in enumerate(docs):
        doc = {"text": normalize_text(text, cfg.normalize)}
        if filter_document(doc, cfg, cfg.filters, {}) is None:
            reason, _ = dedup.check(str(i), exact_hash(dedup_key(doc["text"])), None)
            kept += reason is None
    dt = time.process_time() - start
    return {"docs_per_s": len(docs) / dt, "kept": kept}


def bench_minhash(docs: list[str], num_perm: int, ngram: int, round_index: int) -> dict:
    """One round: haina's signatures and datasketch's on the same shingles back to back, then the LSH index."""
    from datasketch import MinHash

    keys = [dedup_key(d) for d in docs]
    hasher = MinHasher(num_perm, ngram)
    sub = keys[: max(1, len(keys) // 4)]  # datasketch hashes in Python per shingle: a quarter is enough

    def ours() -> float:
        start = time.process_time()
        for k in keys:
            hasher.signature(k)
        return len(keys) / (time.process_time() - start)

    def peer() -> float:  # the same shingles (bytes), datasketch's `update_batch`
        start = time.process_time()
        for k in sub:
            MinHash(num_perm=num_perm).update_batch([k[i:i + ngram].encode() for i in range(len(k) - ngram + 1)])
        return len(sub) / (time.process_time() - start)

    rates = {name: fn() for name, fn in round_order([("ours", ours), ("peer", peer)], round_index)}
    sigs = [hasher.signature(k) for k in keys]
    dedup = Deduplicator(exact=False, minhash=True, num_perm=num_perm)
    start = time.process_time()
    for i, s in enumerate(sigs):
        dedup.check(str(i), 0, s)
    lsh = len(docs) / (time.process_time() - start)
    dedup.close()
    both = 1 / (1 / rates["ours"] + 1 / lsh)
    return {"sig_per_s": rates["ours"], "peer_per_s": rates["peer"], "lsh_per_s": lsh, "both_per_s": both,
            "bands": dedup.bands}


def bench_end_to_end(docs: list[str]) -> float:
    """docs/s of the whole `prepare_documents` in one process: read, every stage, write, report."""
    import json
    import tempfile

    from haina.data.prepare.pipeline import prepare_documents

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        start = time.process_time()
        prepare_documents([path], Path(tmp) / "out", PrepareConfig(workers=1))
        return len(docs) / (time.process_time() - start)


# --------------------------------------------------------------------------------- realistic negatives
# A license notice of the kind projects paste atop every file (written for this benchmark). Files of one
# project share it word for word; only the code below it differs.
LICENSE_NOTICE = """\
# Copyright {year} the {project} authors. All rights reserved.
#
# This file is part of {project}, released under the terms of the {project} License, version 2. You may use,
# copy, modify and distribute it, with or without changes, provided that this notice and the list of
# conditions below stay with every copy and every substantial portion of it.
#
#  1. Redistributions of source code must retain the above copyright notice and this list of conditions.
#  2. Neither the name of {project} nor the names of its contributors may endorse products derived from
#     this file without their prior written permission.
#
# THE FILE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING THE
# WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL
# THE AUTHORS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY ARISING FROM ITS USE.

"""
# The footer a documentation generator puts under every page it renders.
DOC_FOOTER = ("\n\nThis page was generated from the source of module {module} by the project's documentation "
              "builder. Index · Module index · Search page · Previous topic · Next topic · Show source. "
              "Found a problem with this page? Report it on the issue tracker, and say which version of the "
              "documentation you were reading.\n")


def _stdlib_trees() -> Iterator[tuple[str, ast.Module, str]]:
    """(module name, syntax tree, source) of the standard library's own modules, parsed and never imported."""
    from haina.data.stdlib_corpus import SKIP_DIRS

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith((".", "config-")) for part in rel.parts[:-1]):
            continue
        if any(part.startswith("_") and part != "__init__.py" for part in rel.parts):
            continue  # private modules: documentation generators leave them out
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        yield ".".join(rel.with_suffix("").parts).removesuffix(".__init__"), tree, source


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else "" for line in text.splitlines())


def _methods(cls: ast.ClassDef) -> list[ast.FunctionDef]:
    return [n for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]


def templated_documents() -> dict[str, list[tuple[str, str]]]:
    """Similar documents that are not duplicates, by kind: (group, text) with siblings sharing a group.

    - sibling method docs: one generated page per documented public method of a class, under the
      class's summary, the list of its other methods and the generator's footer;
    - license header + code: one file per stdlib function, each under its project's license notice;
    - sibling class API pages: pydoc-style pages of classes with the same base class in one module,
      which repeat the base's inherited methods.
    """
    methods, licensed, classes = [], [], []
    projects = ["Aster", "Birchwood", "Cobalt", "Driftless", "Eider", "Fenwick", "Gannet", "Hollis"]
    for module, tree, source in _stdlib_trees():
        project = projects[zlib.crc32(module.split(".")[0].encode()) % len(projects)]  # hash() varies by run
        notice = LICENSE_NOTICE.format(year=2010 + len(module) % 15, project=project)
        local = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                fns = [node] if isinstance(node, ast.FunctionDef) else _methods(node)
                for fn in fns:
                    code = ast.get_source_segment(source, fn) or ""
                    if 150 <= len(code) <= 1500:
                        licensed.append((project, notice + textwrap.dedent(code) + "\n"))
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            summary = (ast.get_docstring(node) or "").split("\n\n")[0]
            documented = [(m, ast.get_docstring(m)) for m in _methods(node)]
            documented = [(m, d) for m, d in documented if d and len(d) >= 40]
            names = ", ".join(m.name for m in _methods(node))
            for m, doc in documented if len(documented) >= 3 else []:
                methods.append((f"{module}.{node.name}", (
                    f"Help on method {m.name} of class {node.name} in module {module}:\n\n"
                    f"{module}.{node.name}.{m.name}({ast.unparse(m.args)})\n{_indent(doc)}\n\n"
                    f"class {node.name}: {summary}\n\nOther methods of {node.name}: {names}"
                    + DOC_FOOTER.format(module=module))))
            bases = [ast.unparse(b) for b in node.bases]
            if len(bases) == 1 and bases[0] in local:
                base = local[bases[0]]
                own = "\n |  ".join(f"{m.name}({ast.unparse(m.args)})\n |      {(ast.get_docstring(m) or '').strip()}"
                                    for m in _methods(node))
                inherited = "\n |  ".join(
                    f"{m.name}({ast.unparse(m.args)})\n |      {(ast.get_docstring(m) or '').strip()}"
                    for m in _methods(base))
                if not inherited:
                    continue
                page = (f"Help on class {node.name} in module {module}:\n\nclass {node.name}({bases[0]})\n"
                        f"{_indent(ast.get_docstring(node) or '', ' |  ')}\n |\n |  Method resolution order:\n"
                        f" |      {node.name}\n |      {bases[0]}\n |      builtins.object\n |\n"
                        + (f" |  Methods defined here:\n |\n |  {own}\n |\n" if own else "")
                        + " |  " + "-" * 70 + f"\n |  Methods inherited from {bases[0]}:\n |\n |  {inherited}\n")
                classes.append((f"{module}.{bases[0]}", page))
    # Only groups with siblings: a lone page is a negative only in the way the random documents are.
    kinds = {"sibling method docs (stdlib docstrings)": methods, "license header + code (stdlib functions)": licensed,
             "sibling class API pages (pydoc style)": classes}
    out = {}
    for kind, docs in kinds.items():
        sizes = collections.Counter(g for g, _ in docs)
        seen, kept = set(), []
        for g, text in docs:
            key = dedup_key(text)
            if sizes[g] >= 2 and key not in seen:  # an exact repeat is a true duplicate, not a negative
                seen.add(key)
                kept.append((g, text))
        out[kind] = kept
    return out


def true_jaccard(a: str, b: str, n: int) -> float:
    """The exact Jaccard similarity of two texts' character n-gram sets (after `dedup_key`)."""
    sa, sb = set(shingle_hashes(dedup_key(a), n).tolist()), set(shingle_hashes(dedup_key(b), n).tolist())
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def bench_near_dup(negatives: list[str], corpus: Corpus, n_planted: int, cfg: PrepareConfig) -> dict:
    """Negatives into a fresh index, then planted copies of some of them, per substitution level.

    Copies are made of negatives the index kept (a copy of a negative that was itself flagged has
    nothing of its own to be matched with). A copy counts as found when it is flagged, whichever
    earlier document it is matched with (`elsewhere` counts those matched with another document
    than its source). Precision is found copies over all flags: the copies' and the negatives'
    own, each of which is false, since no negative is a copy of another. `flagged` maps each flagged
    negative to the exact Jaccard with the document it was matched with.
    """
    n, threshold = cfg.minhash_ngram, cfg.minhash_threshold
    hasher = MinHasher(cfg.minhash_perm, n)
    keys = [dedup_key(t) for t in negatives]
    sigs, hashes = [hasher.signature(k) for k in keys], [exact_hash(k) for k in keys]

    def index() -> tuple[Deduplicator, dict[int, int]]:
        dedup = Deduplicator(exact=True, minhash=True, threshold=threshold, num_perm=cfg.minhash_perm)
        matched = {}
        for i in range(len(negatives)):
            reason, rep = dedup.check(f"o{i}", hashes[i], sigs[i])
            if reason is not None:
                matched[i] = int(rep[1:])
        return dedup, matched

    dedup, matched = index()
    dedup.close()
    flagged = {i: true_jaccard(negatives[i], negatives[r], n) for i, r in matched.items()}
    kept = [i for i in range(len(negatives)) if i not in matched]
    above = sum(j >= threshold for j in flagged.values())
    rows = []
    for frac in (0.02, 0.05, 0.10, 0.20):
        dedup, _ = index()
        found = elsewhere = 0
        planted = corpus.rng.choice(kept, size=min(n_planted, len(kept)), replace=False)
        for j in planted:
            key = dedup_key(corpus.substitute(negatives[j], frac))
            reason, rep = dedup.check(f"p{j}", exact_hash(key), hasher.signature(key))
            if reason is not None:
                found += 1
                elsewhere += rep != f"o{j}"
        dedup.close()
        flags = found + len(flagged)
        rows.append({"substituted": frac, "recall": found / len(planted), "elsewhere": elsewhere,
                     "precision": found / flags if flags else float("nan"),
                     # the threshold's own reading: a flagged negative at or above it is a textual near-duplicate
                     "precision_textual": (found + above) / flags if flags else float("nan")})
    return {"rows": rows, "negatives": len(negatives), "flagged": flagged, "above": above,
            "planted": min(n_planted, len(kept))}


def sibling_similarity(docs: list[tuple[str, str]], n: int, rng: np.random.Generator, pairs: int = 300) -> Spread:
    """Exact Jaccard of random pairs of siblings (same group): how alike these negatives are."""
    groups = collections.defaultdict(list)
    for g, text in docs:
        groups[g].append(text)
    multi = [v for v in groups.values() if len(v) >= 2]
    values = []
    for _ in range(pairs if multi else 0):
        group = multi[int(rng.integers(len(multi)))]
        a, b = rng.choice(len(group), size=2, replace=False)
        values.append(true_jaccard(group[a], group[b], n))
    return Spread.of(values)


def whole_groups(docs: list[tuple[str, str]], limit: int, per_group: int,
                 rng: np.random.Generator) -> list[tuple[str, str]]:
    """Random sibling groups, up to `per_group` pages each, until `limit` documents.

    Whole groups rather than single pages: a random sample of pages would lose most siblings.
    """
    groups = collections.defaultdict(list)
    for g, text in docs:
        groups[g].append((g, text))
    values = list(groups.values())
    out: list[tuple[str, str]] = []
    for i in rng.permutation(len(values)):
        if len(out) >= limit:
            break
        out += values[i][: min(per_group, limit - len(out))]
    return out


def _f(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}"  # NaN: nothing was flagged at all


def print_near_dup(result: dict, cfg: PrepareConfig) -> None:
    flagged, t = result["flagged"], cfg.minhash_threshold
    below = [j for j in flagged.values() if j < t]
    print(f"{result['negatives']:,} negatives, then {result['planted']} planted copies per level of negatives the "
          f"index kept (a fresh index each level); threshold {t}, {cfg.minhash_perm} permutations, char "
          f"{cfg.minhash_ngram}-grams. Negatives flagged: {len(flagged)} ({len(flagged) / result['negatives']:.1%}); "
          f"{result['above']} of them at an exact Jaccard ≥ {t} to the document they were matched with"
          + (f", {len(below)} below it (exact Jaccard {min(below):.2f}–{max(below):.2f}: MinHash's estimate "
             f"erring upwards)" if below else "") + ".\n")
    print(f"| substituted words | recall | precision (every flagged negative is false) | precision (flagged negatives "
          f"at exact Jaccard ≥ {t} count as correct) | copies matched with another document | target |")
    print("|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        target = "recall ≥ 0.9, precision ≥ 0.99" if r["substituted"] <= 0.05 else "—"
        print(f"| {r['substituted']:.0%} | {_f(r['recall'])} | {_f(r['precision'])} | {_f(r['precision_textual'])} | "
              f"{r['elsewhere']} | {target} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--originals", type=int, default=2000, help="random-word negatives")
    ap.add_argument("--templated", type=int, default=700, help="templated negatives per kind (at most)")
    ap.add_argument("--per-group", type=int, default=30, help="templated negatives per sibling group (at most)")
    ap.add_argument("--planted", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each throughput measurement")
    args = ap.parse_args()
    cfg = PrepareConfig()
    corpus = Corpus(0)
    docs = [corpus.document() for _ in range(args.docs)]
    mean_chars = sum(map(len, docs)) / len(docs)
    load_before = load_average()
    print(f"## Data pipeline ({datetime.date.today()}, {cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()})\n")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/data_pipeline.py', *sys.argv[1:]])}`\n")
    print(f"{args.docs:,} generated documents of {mean_chars:.0f} characters on average; one core, CPU time; "
          f"{args.rounds} rounds of each measurement: median (min–max, rounds).\n")
    filters, minhash, e2e = [], [], []
    for r in range(args.rounds):
        filters.append(bench_filters(docs, cfg))
        minhash.append(bench_minhash(docs, cfg.minhash_perm, cfg.minhash_ngram, r))
        e2e.append(bench_end_to_end(docs))
    f = Spread.of([x["docs_per_s"] for x in filters])
    m = {k: Spread.of([x[k] for x in minhash]) for k in ("sig_per_s", "peer_per_s", "lsh_per_s", "both_per_s")}
    bands = minhash[0]["bands"]
    print("| stage | docs/s/core | target | ratio to target (median) |")
    print("|---|---:|---:|---:|")
    print(f"| normalize + filters (gopher, repetition, c4) + exact dedup | {f.text(',.0f')} | 2,000 | "
          f"{f.median / 2000:.2f} |")
    print(f"| MinHash {cfg.minhash_perm} perm, char {cfg.minhash_ngram}-grams: signature + LSH "
          f"({bands[0]} bands × {bands[1]} rows) | {m['both_per_s'].text(',.0f')} | 500 | "
          f"{m['both_per_s'].median / 500:.2f} |")
    print(f"| &nbsp;&nbsp; signature only (haina, numpy) | {m['sig_per_s'].text(',.0f')} | | |")
    peer_ratio = ratios([x["sig_per_s"] for x in minhash], [x["peer_per_s"] for x in minhash])
    print(f"| &nbsp;&nbsp; signature only (datasketch `MinHash.update_batch`, same shingles) | "
          f"{m['peer_per_s'].text(',.0f')} | | haina / datasketch per round: {peer_ratio.text('.1f', '×')} |")
    print(f"| &nbsp;&nbsp; LSH query + insert (SQLite band index, in memory here) | {m['lsh_per_s'].text(',.0f')} | | |")
    print(f"| end to end: `prepare_documents` (read JSONL, all stages, exact + MinHash, write shards, report) | "
          f"{Spread.of(e2e).text(',.0f')} | | |")
    print(f"\n({filters[0]['kept']:,} of {args.docs:,} documents passed every filter.)\n")

    print("### Near duplicates against independent random-word documents\n")
    originals = [corpus.document() for _ in range(args.originals)]
    print_near_dup(bench_near_dup(originals, corpus, args.planted, cfg), cfg)

    print("\n### Near duplicates against templated, boilerplate-heavy documents (standard library)\n")
    rng = np.random.default_rng(1)
    kinds = {kind: whole_groups(docs_of_kind, args.templated, args.per_group, rng)
             for kind, docs_of_kind in templated_documents().items()}
    labelled = [(kind, text) for kind, docs_of_kind in kinds.items() for _, text in docs_of_kind]
    labelled = [labelled[i] for i in rng.permutation(len(labelled))]  # kinds and groups mixed, as in a crawl
    result = bench_near_dup([text for _, text in labelled], corpus, args.planted, cfg)
    t = cfg.minhash_threshold
    print(f"| kind of negative | documents | sibling groups | exact Jaccard of random sibling pairs: median (min–max, "
          f"pairs) | flagged | flagged at exact Jaccard ≥ {t} |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, docs_of_kind in kinds.items():
        sim = sibling_similarity(docs_of_kind, cfg.minhash_ngram, rng)
        groups = len({g for g, _ in docs_of_kind})
        ours = [j for i, j in result["flagged"].items() if labelled[i][0] == kind]
        print(f"| {kind} | {len(docs_of_kind):,} | {groups:,} | {sim.text('.2f', what='pair')} | {len(ours)} | "
              f"{sum(j >= t for j in ours)} |")
    random_pairs = sibling_similarity([("all", d) for d in originals], cfg.minhash_ngram, rng)
    print(f"| (for comparison) random-word documents | {len(originals):,} | — | "
          f"{random_pairs.text('.2f', what='pair')} | | |\n")
    print_near_dup(result, cfg)
    print(f"\nLoad average {load_before:.1f} before, {load_average():.1f} after.")


if __name__ == "__main__":
    main()
