"""`haina data tasks --from-stdlib`: a labeled text-classification set built offline from the standard library.

Every documented public module, class, function and method of the standard library's pure-Python sources
gives one example: its docstring's summary, as `haina data instruct` makes it (`build_pairs`: the first
paragraph, cut at a sentence end to at most 250 characters), labeled with the area of the library that
its module belongs to. The areas follow the chapters of the Python Library Reference, merged where a
chapter is too small to learn from (cryptographic hashing joins math) or split where one is too broad
(development tools apart from the language's own services); `MODULE_AREAS` maps modules to areas by hand,
by the longest dotted prefix that it names (`importlib.metadata` is packaging, the rest of `importlib`
the language). A module missing from the table is left out and listed in report.json, so that a new
Python's additions are seen rather than guessed. The classes keep their natural imbalance (the
networking modules document about seven times as much as the math ones).

The split is stratified by label and grouped by module: no module's examples are in two splits, so a
test example never shares its module's vocabulary with a training one, and each label's modules are
dealt (in a seeded order) to whichever split is furthest below its share of that label's examples.
Identical summaries are kept once (the first, in module order), so that no text is in two splits either.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter

from haina.core.errors import HainaError
from haina.core.io import write_json, write_text
from haina.core.log import info
from haina.core.output import output_dir
from haina.data.instruct import build_pairs, stdlib_root

COMMAND = "data tasks"  # the name in the manifest of its outputs
SPLITS = ("train", "val", "test")
FIELDS = ("text", "label", "module", "name")

AREAS = {  # label → what it covers (report.md lists it)
    "text": "text processing: strings, regular expressions, diffs, codecs, locales and translations",
    "data-types": "containers, dates and calendars, enums, typing, copying, and functional tools",
    "math": "numbers, math, statistics, random numbers, secrets and hashing",
    "file-formats": "structured data: CSV, config files, JSON, XML and HTML, email and MIME, audio and images",
    "storage": "persistence and archives: pickle, shelve, dbm, sqlite, compression, zip and tar files",
    "os": "the operating system: files, directories and paths, processes' environment, terminals",
    "concurrency": "threads, processes, asyncio, subprocesses, queues and scheduling",
    "networking": "sockets, TLS, internet protocols, HTTP and URLs, web servers and CGI",
    "dev-tools": "testing, debugging, profiling, tracing, logging, warnings and documentation",
    "language": "the Python language and runtime: parsing, compiling, introspection, imports and sites",
    "packaging": "building, installing and distributing packages, virtual environments",
    "interfaces": "command-line parsing, interactive command loops, curses and turtle graphics",
}

_TABLE = {
    "text": "string re sre_compile sre_parse sre_constants difflib textwrap unicodedata stringprep codecs encodings "
            "locale gettext shlex",
    "data-types": "collections datetime calendar zoneinfo heapq bisect array weakref types copy pprint reprlib enum "
                  "graphlib dataclasses functools operator itertools contextlib abc typing uuid",
    "math": "numbers math cmath decimal fractions random statistics secrets hashlib hmac crypt colorsys",
    "file-formats": "csv configparser tomllib netrc plistlib json xml html email mailbox mimetypes base64 binascii "
                    "quopri uu binhex xdrlib wave aifc sunau chunk sndhdr imghdr mailcap",
    "storage": "pickle pickletools copyreg shelve marshal dbm sqlite3 zlib gzip bz2 lzma zipfile tarfile",
    "os": "os io time errno platform ctypes getpass pathlib posixpath ntpath genericpath nturl2path fileinput stat "
          "filecmp tempfile glob fnmatch linecache shutil signal mmap pty tty pipes fcntl termios",
    "concurrency": "threading multiprocessing concurrent subprocess sched queue contextvars asyncio",
    "networking": "socket ssl selectors select asyncore asynchat socketserver http urllib ftplib poplib imaplib nntplib "
                  "smtplib smtpd telnetlib xmlrpc wsgiref webbrowser ipaddress cgi cgitb",
    "dev-tools": "unittest doctest pdb bdb trace traceback tracemalloc timeit cProfile profile pstats pydoc logging "
                 "warnings faulthandler",
    "language": "ast dis symtable tokenize token keyword tabnanny pyclbr py_compile compileall opcode inspect "
                "importlib zipimport pkgutil modulefinder runpy site imp sysconfig atexit gc code codeop",
    "packaging": "distutils venv ensurepip zipapp importlib.metadata",
    "interfaces": "argparse optparse getopt cmd curses turtle readline rlcompleter",
}
# module (or dotted prefix) → area, from the table above
MODULE_AREAS: dict[str, str] = {module: area for area, names in _TABLE.items() for module in names.split()}


def area_of(module: str) -> str | None:
    """The area of `module` by the longest dotted prefix in `MODULE_AREAS`, or None when the table lacks it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        area = MODULE_AREAS.get(".".join(parts[:n]))
        if area is not None:
            return area
    return None


def build_examples() -> tuple[list[dict], Counter, list[str]]:
    """Examples `{"text", "label", "module", "name"}` in module order, skip counts, and the unmapped top-level modules."""
    pairs, skipped = build_pairs()
    examples, seen, unmapped = [], set(), set()
    for pair in pairs:
        if pair["kind"] == "signature":  # an answer made from the parameters, not documentation
            continue
        label = area_of(pair["module"])
        if label is None:
            unmapped.add(pair["module"].split(".")[0])
            skipped["unmapped_module"] += 1
            continue
        if pair["response"] in seen:
            skipped["duplicate_text"] += 1
            continue
        seen.add(pair["response"])
        examples.append({"text": pair["response"], "label": label, "module": pair["module"], "name": pair["name"]})
    return examples, skipped, sorted(unmapped)


def split_modules(examples: list[dict], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """module → split, stratified by label and grouped by module (see the module docstring)."""
    sizes = Counter(e["module"] for e in examples)
    label_of = {e["module"]: e["label"] for e in examples}
    by_label: dict[str, list[str]] = {}
    for module in sorted(sizes):
        by_label.setdefault(label_of[module], []).append(module)
    rng = random.Random(f"data tasks:{seed}")  # a str seed hashes the same in every process
    assign: dict[str, str] = {}
    for label in sorted(by_label):
        modules = by_label[label]
        rng.shuffle(modules)
        totals, dealt = dict.fromkeys(SPLITS, 0), 0
        for module in modules:
            dealt += sizes[module]
            split = max(SPLITS, key=lambda s: fractions[s] * dealt - totals[s])  # furthest below its share
            assign[module] = split
            totals[split] += sizes[module]
        # A label with three or more modules is in every split that should have examples: an evaluation
        # that never meets a class cannot say how well it is recognized.
        for split in ("val", "test"):
            mine = [m for m in modules if assign[m] == split]
            train = sorted((m for m in modules if assign[m] == "train"), key=lambda m: (sizes[m], m))
            if fractions[split] > 0 and not mine and len(train) >= 2:
                assign[train[0]] = split
    return assign


def _report_md(report: dict) -> str:
    intro = (f"Docstring summaries of Python {report['python']}'s standard library, labeled with the area their "
             f"module belongs to; split by module (seed {report['seed']}), so no module is in two splits.")
    lines = [f"# Standard-library areas: {report['examples']:,} examples, {len(report['classes'])} classes", "", intro,
             "", "| class | " + " | ".join(SPLITS) + " | total | covers |",
             "|---|" + "---:|" * (len(SPLITS) + 1) + "---|"]
    for label, total in report["class_counts"].items():
        cells = [str(report["splits"][s]["classes"].get(label, 0)) for s in SPLITS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {total} | {AREAS[label]} |")
    totals = [f"{report['splits'][s]['examples']:,}" for s in SPLITS]
    lines.append("| **all** | " + " | ".join(totals) + f" | {report['examples']:,} | |")
    modules = ", ".join(f"{s} {report['splits'][s]['modules']}" for s in SPLITS)
    lines += ["", f"Modules per split: {modules}. Largest class / smallest: {report['imbalance']:.1f}×."]
    if report["unmapped_modules"]:
        lines.append(f"Left out (no area in the table): {', '.join(report['unmapped_modules'])}.")
    return "\n".join(lines) + "\n"


def tasks_command(out: str, from_stdlib: bool = False, val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0, overwrite: bool = False) -> int:
    """Build a labeled text-classification set offline: which area of the standard library a docstring documents.

    Each documented public module, class, function and method of the standard library (read with ast, never
    imported) gives its docstring's summary as text, labeled with its module's area: text, data-types, math,
    file-formats, storage, os, concurrency, networking, dev-tools, language, packaging or interfaces (a
    hand-made module table; modules it lacks are listed in the report). The natural imbalance is kept. The
    split is stratified by label and grouped by module, so no module is in two splits. Writes OUT/train.jsonl,
    OUT/val.jsonl and OUT/test.jsonl, one {"text", "label", "module", "name"} object a line, and report.md and
    report.json with the class counts per split. Train a classifier on it with `haina finetune classify --data
    OUT/train.jsonl --val OUT/val.jsonl --test OUT/test.jsonl`. The same Python and seed give the same files.

    Args:
        out: output directory; built beside it and swapped in at the end. An earlier `data tasks` output there
            is replaced; anything else is refused unless --overwrite.
        from_stdlib: build from the standard library's docstrings (the only source for now).
        val_fraction: the share of each class's examples for validation (whole modules, so approximately).
        test_fraction: the share of each class's examples for the test split.
        seed: the seed of the module split.
        overwrite: replace an existing OUT that is not a `data tasks` output.
    """
    if not from_stdlib:
        raise HainaError("haina data tasks needs --from-stdlib: the standard library's docstrings are the only "
                         "source for now")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise HainaError(f"--val-fraction and --test-fraction must be ≥ 0 and leave some training data "
                         f"(their sum is below 1); got {val_fraction} and {test_fraction}")
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    root = stdlib_root()
    with output_dir(out, COMMAND, inputs=[root], overwrite=overwrite, extra={"seed": seed}) as tmp:
        examples, skipped, unmapped = build_examples()
        assign = split_modules(examples, fractions, seed)
        by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for example in examples:
            by_split[assign[example["module"]]].append(example)
        for split, rows in by_split.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({k: r[k] for k in FIELDS}, ensure_ascii=False) + "\n" for r in rows)
        counts = Counter(e["label"] for e in examples)
        class_counts = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        report = {
            "source": "stdlib docstrings",
            "python": sys.version.split()[0],
            "seed": seed,
            "fractions": fractions,
            "examples": len(examples),
            "classes": {label: AREAS[label] for label in class_counts},
            "class_counts": class_counts,
            "imbalance": max(counts.values()) / min(counts.values()) if counts else 0.0,
            "splits": {s: {"examples": len(rows), "modules": len({r["module"] for r in rows}),
                           "classes": dict(sorted(Counter(r["label"] for r in rows).items()))}
                       for s, rows in by_split.items()},
            "unmapped_modules": unmapped,
            "skipped": dict(sorted(skipped.items())),
        }
        write_json(tmp / "report.json", report)
        write_text(tmp / "report.md", _report_md(report))
    sizes = ", ".join(f"{s} {len(rows):,}" for s, rows in by_split.items())
    info(f"wrote {len(examples):,} examples in {len(class_counts)} classes to {out} ({sizes}); largest class / "
         f"smallest {report['imbalance']:.1f}× (see report.md)")
    return 0


__all__ = ["AREAS", "COMMAND", "MODULE_AREAS", "area_of", "build_examples", "split_modules", "tasks_command"]
