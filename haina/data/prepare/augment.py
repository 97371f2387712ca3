"""`haina data augment`: easy data augmentation for labeled fine-tuning sets.

Random deletion, random swap and synonym replacement from a user-given synonym file (Wei & Zou
2019, "EDA"). Originals are kept; every augmented row has `meta.augmented = true`, the method and
its parent's id. Only the training split is augmented: val and test of a prepared directory are
copied unchanged, because augmented copies of evaluation data would measure nothing.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from haina.core.errors import HainaError
from haina.core.io import write_json
from haina.core.log import info
from haina.core.output import check_output, output_dir
from haina.data.prepare.config import Format, PrepareConfig
from haina.data.prepare.readers import discover_units, read_unit
from haina.data.prepare.writers import ShardedWriter

METHODS = ("delete", "swap", "synonym")
COMMAND = "data augment"  # the name in the manifest of its outputs
_EDGE_PUNCT = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


def load_synonyms(path: str | Path) -> dict[str, list[str]]:
    """Read synonyms: a JSON object {word: [synonyms]} or lines 'word: syn1, syn2' ('=' or a tab also work)."""
    p = Path(path)
    if not p.is_file():
        raise HainaError(f"synonym file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HainaError(f"synonym file {p} is not UTF-8 text (byte {e.start})") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise HainaError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); expected {{word: [synonyms]}}") from None
        if not isinstance(data, dict):
            raise HainaError(f"{p} must hold a JSON object mapping words to lists of synonyms")
        return {str(k).lower(): [str(s) for s in (v if isinstance(v, list) else [v])] for k, v in data.items()}
    table: dict[str, list[str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([^:=\t]+)[:=\t]\s*(.+)$", line)
        if not m:
            raise HainaError(f"{p}:{n}: expected 'word: synonym, synonym', got {line!r}")
        syns = [s.strip() for s in re.split(r"[,;\t]", m.group(2)) if s.strip()]
        table.setdefault(m.group(1).strip().lower(), []).extend(syns)
    return table


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability p, at least one word (when p > 0) and never all of them."""
    if len(words) <= 1 or p <= 0:
        return list(words)
    keep = [rng.random() >= p for _ in words]
    if all(keep):
        keep[rng.randrange(len(words))] = False
    kept = [w for w, k in zip(words, keep) if k]
    return kept or [rng.choice(words)]


def random_swap(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Swap two random words, max(1, p·len) times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(max(1, int(p * len(out)))):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def synonym_replacement(words: list[str], synonyms: dict[str, list[str]], p: float,
                        rng: random.Random) -> list[str]:
    """Replace words that have synonyms, each with probability p (at least one when any can be)."""
    out = list(words)
    candidates = []
    for i, w in enumerate(words):
        pre, core, post = _EDGE_PUNCT.match(w).groups()
        if core.lower() in synonyms:
            candidates.append((i, pre, core, post))
    if not candidates:
        return out
    chosen = [c for c in candidates if rng.random() < p] or [rng.choice(candidates)]
    for i, pre, core, post in chosen:
        new = rng.choice(synonyms[core.lower()])
        if core[:1].isupper():
            new = new[:1].upper() + new[1:]
        out[i] = pre + new + post
    return out


def augment_text(text: str, method: str, rng: random.Random, p: float,
                 synonyms: dict[str, list[str]] | None = None) -> str:
    """One augmented version of `text` by `method` (delete, swap or synonym); line breaks are kept."""
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        if method == "delete":
            words = random_deletion(words, p, rng)
        elif method == "swap":
            words = random_swap(words, p, rng)
        elif method == "synonym":
            words = synonym_replacement(words, synonyms or {}, p, rng)
        else:
            raise HainaError(f"unknown augmentation '{method}'; choose from {', '.join(METHODS)}")
        lines.append(" ".join(words))
    return "\n".join(lines)


def augment_documents(docs, methods: tuple[str, ...], copies: int, p: dict[str, float], seed: int,
                      synonyms: dict[str, list[str]] | None, stats: Counter) -> Iterator[dict]:
    """Yield each document, then its augmented copies (identical copies are skipped and counted)."""
    for doc in docs:
        yield doc
        stats["originals"] += 1
        # A per-document generator: the output does not depend on how documents are batched or ordered.
        rng = random.Random(f"{seed}:{doc['id']}")
        for k in range(copies):
            for method in methods:
                text = augment_text(doc["text"], method, rng, p[method], synonyms)
                if text == doc["text"]:
                    stats["unchanged"] += 1
                    continue
                new = {**doc, "id": f"{doc['id']}#{method}{k}", "text": text,
                       "meta": {**doc.get("meta", {}), "augmented": True, "method": method, "parent": doc["id"]}}
                stats[method] += 1
                yield new


def augment_command(input: list[str], out: str, synonyms: str | None = None, methods: str | None = None,
                    copies: int = 1, p_delete: float = 0.1, p_swap: float = 0.1, p_synonym: float = 0.15,
                    seed: int = 0, format: Format = "auto", text_field: str = "text",
                    label_field: str = "label", overwrite: bool = False) -> int:
    """Augment a labeled dataset with random deletion, random swap and synonym replacement.

    Reads any input `haina data prepare` reads. Given a directory written by `haina data prepare`,
    augments its train/ split and copies val/ and test/ unchanged. Writes OUT/train/ (originals
    plus augmented rows, marked with meta.augmented, meta.method and meta.parent) and
    OUT/augment_report.json, built beside OUT and swapped in when complete.

    Args:
        input: input files, directories or globs (or a directory written by `haina data prepare`).
        out: output directory (an earlier `data augment` output there is replaced; anything else needs --overwrite).
        synonyms: synonym file: JSON {word: [synonyms]} or lines 'word: syn1, syn2'.
        methods: comma list of delete, swap, synonym (default: delete,swap, plus synonym with --synonyms).
        copies: augmented copies per document and method.
        p_delete: probability of deleting each word.
        p_swap: swaps per word (at least one swap).
        p_synonym: probability of replacing each word that has a synonym.
        seed: random seed (with the document id, it fixes every augmentation).
        format: input format; auto decides by file extension.
        text_field: the field or column holding the text.
        label_field: the field or column holding the label.
        overwrite: replace an existing OUT that is not a `data augment` output (never one that is, holds or lies
            inside an input).
    """
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else \
        ("delete", "swap") + (("synonym",) if synonyms else ())
    for m in chosen:
        if m not in METHODS:
            raise HainaError(f"unknown augmentation '{m}'; choose from {', '.join(METHODS)}")
    if "synonym" in chosen and not synonyms:
        raise HainaError("synonym replacement needs a synonym file: pass --synonyms FILE")
    if copies < 1:
        raise HainaError("--copies must be at least 1")
    for name, value in (("p-delete", p_delete), ("p-swap", p_swap), ("p-synonym", p_synonym)):
        if not 0.0 <= value <= 1.0:
            raise HainaError(f"--{name} must be in [0, 1], got {value}")
    table = load_synonyms(synonyms) if synonyms else None
    cfg = PrepareConfig(format=format, text_field=text_field, label_field=label_field)
    out_dir = Path(out)
    # Before anything is read: `--input P --out P` would replace P (and its val/ with it) by the augmented copy.
    check_output(out_dir, COMMAND, inputs=input, overwrite=overwrite)

    inputs, copy_dirs = list(input), []
    if len(inputs) == 1 and (Path(inputs[0]) / "report.json").is_file() and (Path(inputs[0]) / "train").is_dir():
        prepared = Path(inputs[0])
        inputs = [str(prepared / "train")]
        copy_dirs = [prepared / s for s in ("val", "test") if (prepared / s).is_dir()]
    units, _ = discover_units(inputs, cfg.format, exclude=str(out_dir))  # an earlier output inside an input
    if not units:
        raise HainaError(f"no input files found in {', '.join(input)}")
    stats: Counter = Counter()

    def docs() -> Iterator[dict]:
        read_stats: dict = {}
        for unit in units:
            for doc in read_unit(unit, cfg, read_stats):
                if "reason" in doc or not doc["text"].strip():
                    stats["skipped_malformed_or_empty"] += 1
                    continue
                yield doc

    with output_dir(out_dir, COMMAND, inputs=input, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp / "train", "jsonl", cfg.shard_docs)
        try:
            for doc in augment_documents(docs(), chosen, copies, {"delete": p_delete, "swap": p_swap,
                                                                  "synonym": p_synonym}, seed, table, stats):
                writer.write(doc)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if stats["originals"] == 0:
            raise HainaError(f"no documents to augment in {', '.join(input)}")
        for d in copy_dirs:
            shutil.copytree(d, tmp / d.name)
        report = {"originals": stats["originals"], "augmented": sum(stats[m] for m in METHODS),
                  "by_method": {m: stats[m] for m in chosen}, "unchanged_skipped": stats["unchanged"],
                  "skipped_malformed_or_empty": stats["skipped_malformed_or_empty"], "written": writer.count,
                  "copied_unchanged": [d.name for d in copy_dirs], "seed": seed}
        write_json(tmp / "augment_report.json", report)
    info(f"augment: {report['originals']:,} originals + {report['augmented']:,} augmented rows → {out_dir / 'train'}")
    return 0
