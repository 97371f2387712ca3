"""`haina data instruct`: question → answer pairs from the documentation that ships with Python.

An instruction dataset anyone can build offline, for the fine-tuning worked example. The standard
library's pure-Python sources are read with `ast` (never imported: importing runs module code), and
every documented public module, class, function and method gives one question ("What does
json.dumps do?") answered by its docstring's summary: the first paragraph, whitespace-normalized,
cut at a sentence end to at most `MAX_ANSWER_CHARS`. Functions, methods and classes with an
`__init__` also get a signature question ("What are the parameters of json.dumps?").

Answers stay short because the student model is tiny (a 256-token context). The split is by module,
from a seeded hash of its name, so the test questions are about functions the model never saw.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from haina.core.errors import HainaError
from haina.core.io import write_json
from haina.core.log import info, progress
from haina.core.output import output_dir
from haina.data.stdlib_corpus import stdlib_files

COMMAND = "data instruct"  # the name in the manifest of its outputs
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
FIELDS = ("prompt", "response", "module", "name")  # a record as the files hold it: the instruction format SFT reads
MAX_ANSWER_CHARS = 250
MIN_ANSWER_CHARS = 20
# Beyond stdlib_corpus's skips: ensurepip only bundles wheels and a bootstrap script.
SKIP_TOP = {"ensurepip"}

# One template per question, picked by a seeded hash of the name: varied wording, the same file every run.
TEMPLATES = {
    "module": ("What is the {name} module for?", "What does the {name} module provide?"),
    "class": ("What is {name} for?", "What is {name}?", "Describe the class {name}."),
    "function": ("What does {name} do?", "Explain {name}.", "What is {name} used for?"),
    "method": ("What does {name} do?", "Explain {name}.", "What does the method {name} do?"),
    "signature": ("What are the parameters of {name}?", "What is the signature of {name}?"),
}

# Docstrings that describe the protocol, not the thing: CPython's slot wrappers and pickling helpers, copied
# into pure-Python twins, say nothing a question could be about.
_AUTO_DOC = re.compile(
    r"^(Return self\s*(==|!=|<=|>=|<|>|[-+*/%@&|^]|//|\*\*|<<|>>)\s*value\b"
    r"|Return (repr|str|hash|len|iter|format|bool|abs|int|float)\(self\)"
    r"|Return -?self\.?$|Return ~self\.?$"
    r"|Implement \w+\(self\b"
    r"|Helper for pickle"
    r"|(Create and return a new object|Initialize self)\. See help\(type"
    r"|See help\(type\b"
    r"|Python Character Mapping Codec .* generated from)",  # encodings.cp1252 and its hundred siblings
    re.IGNORECASE)
# A first paragraph that is only a signature ("heappush(heap, item) -> None") or a title ("distutils.core"): the
# summary is the next one.
_SIGNATURE_LINE = re.compile(r"^[\w.]+(\(.*\))?(\s*->\s*\S.*)?$")
# Where a summary paragraph turns into a list ("  * short and long options ...") or a section ("Arguments:").
_LIST_ITEM = re.compile(r"^\s*([*+-]|\d+[.)])\s", re.MULTILINE)
_SECTION_TAIL = re.compile(r"\s*\b(Args|Arguments|Parameters|Returns|Raises|Examples?|Usage|Notes?):$")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.", "incl.", "Mr.", "Dr.", "No.")
_PROPERTY_DECORATORS = re.compile(r"(^|\.)(property|cached_property|setter|getter|deleter)$")


def _stable_unit(*parts: object) -> float:
    """A number in [0, 1) from `parts`, the same in every process (Python's `hash` is salted per run)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(module: str, seed: int = 0) -> str:
    """The split ("train", "val" or "test") of every pair about `module`: a seeded hash, ≈ 80/10/10."""
    u, edge = _stable_unit("split", seed, module), 0.0
    for name, share in SPLITS:
        edge += share
        if u < edge:
            return name
    return SPLITS[-1][0]


def _sentence_ends(text: str) -> list[int]:
    """Indices just after each sentence-ending `.`, `!` or `?` (followed by a space or the end), abbreviations aside."""
    return [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)
            if not text[:m.end()].endswith(_ABBREVIATIONS)]


def summarize(doc: str, limit: int = MAX_ANSWER_CHARS) -> tuple[str | None, str]:
    """The summary of docstring `doc` as an answer, or None and the reason it makes none.

    The summary is the first paragraph (a bare signature or title line before it is passed over), up
    to any list or doctest in it, with its whitespace collapsed, cut at the last sentence end within
    `limit` characters. A paragraph that leads into a list or a section ("... the following:",
    "Arguments:") keeps its whole sentences, or ends in a full stop.

    Returns:
        (answer, "") or (None, reason), reason one of "no_docstring", "example_only", "auto_generated",
        "too_long", "unfinished", "too_short".
    """
    paragraphs = [" ".join(_LIST_ITEM.split(p, maxsplit=1)[0].split()) for p in re.split(r"\n\s*\n", doc or "")]
    paragraphs = [p for p in paragraphs if p]
    if paragraphs and _SIGNATURE_LINE.match(paragraphs[0]):
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return None, "no_docstring"
    text = paragraphs[0].split(" >>> ")[0]  # a doctest run into the summary is an example, not a sentence
    if text.startswith(">>>"):
        return None, "example_only"
    if _AUTO_DOC.match(text):
        return None, "auto_generated"
    if len(text) > limit:
        ends = [e for e in _sentence_ends(text) if e <= limit]
        if not ends:
            return None, "too_long"
        text = text[:ends[-1]]
    text = _SECTION_TAIL.sub("", text)
    if text.endswith(":"):  # "An NNTP client class based on:" says nothing without the list it leads into
        ends = _sentence_ends(text)
        if not ends:
            return None, "unfinished"
        text = text[:ends[-1]]
    if len(text) < MIN_ANSWER_CHARS:
        return None, "too_short"
    return text, ""


def _param(arg: ast.arg, default: ast.expr | None, prefix: str = "") -> str:
    text = prefix + arg.arg
    if arg.annotation is not None:
        text += ": " + ast.unparse(arg.annotation)
    if default is not None:
        text += (" = " if arg.annotation is not None else "=") + ast.unparse(default)
    return text


def _parameters(args: ast.arguments, drop_first: bool) -> list[str]:
    """The parameters of a signature as pydoc writes them, one string each, `/` and `*` markers included."""
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pieces = []
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        if not (drop_first and i == 0):  # self or cls: implied by the call through an instance or the class
            pieces.append(_param(arg, default))
        if args.posonlyargs and i == len(args.posonlyargs) - 1 and pieces:
            pieces.append("/")
    if args.vararg:
        pieces.append(_param(args.vararg, None, "*"))
    elif args.kwonlyargs:
        pieces.append("*")
    pieces += [_param(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        pieces.append(_param(args.kwarg, None, "**"))
    return pieces


def signature_answer(name: str, pieces: list[str], limit: int = MAX_ANSWER_CHARS) -> str:
    """`name(p1, p2, ...)`, with the parameters that do not fit in `limit` characters elided as `...`."""
    full = f"{name}({', '.join(pieces)})"
    if len(full) <= limit:
        return full
    kept: list[str] = []
    for piece in pieces:
        if len(f"{name}({', '.join([*kept, piece])}, ...)") > limit:
            break
        kept.append(piece)
    return f"{name}({', '.join([*kept, '...'])})"


def _decorators(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    out = []
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        try:
            out.append(ast.unparse(target))
        except Exception:  # noqa: BLE001 (a decorator ast cannot unparse only loses its name here)
            out.append("")
    return out


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements of `body`, looking inside `if` and `try` blocks (platform and fallback definitions)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _statements(node.body)
            yield from _statements(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _statements(block)
        else:
            yield node


def _candidates(body: list[ast.stmt], prefix: str, in_class: bool, skipped: Counter) -> Iterator[tuple[str, str, str]]:
    """(kind, dotted name, answer) for the documented public definitions in `body`; rejects counted in `skipped`."""
    for node in _statements(body):
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        name = prefix + node.name
        if node.name.startswith("__") and node.name.endswith("__"):
            skipped["dunder"] += 1
            continue
        if node.name.startswith("_"):
            skipped["private_name"] += 1
            continue
        kind = "class" if isinstance(node, ast.ClassDef) else "method" if in_class else "function"
        answer, reason = summarize(ast.get_docstring(node, clean=True) or "")
        if answer is None:
            skipped[reason] += 1
        else:
            yield kind, name, answer
        if isinstance(node, ast.ClassDef):
            init = next((n for n in _statements(node.body)
                         if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            if answer is not None and init is not None:
                pieces = _parameters(init.args, drop_first=True)
                if pieces:
                    yield "signature", name, signature_answer(name, pieces)
            yield from _candidates(node.body, name + ".", True, skipped)
            continue
        decorators = _decorators(node)
        if answer is None or any(_PROPERTY_DECORATORS.search(d) for d in decorators):
            continue  # an attribute has no parameters to ask about; an undocumented function is not the API
        pieces = _parameters(node.args, drop_first=in_class and "staticmethod" not in decorators)
        if pieces:
            yield "signature", name, signature_answer(name, pieces)


def _module_candidates(module: str, path: Path, skipped: Counter) -> list[tuple[str, str, str]]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))  # bytes: ast honours coding cookies
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        skipped["unparsable_module"] += 1
        return []
    out = []
    answer, reason = summarize(ast.get_docstring(tree, clean=True) or "")
    if answer is None:
        skipped[f"module_{reason}"] += 1
    else:
        out.append(("module", module, answer))
    out += _candidates(tree.body, module + ".", False, skipped)
    return out


def stdlib_root() -> Path:
    """The directory of the standard library's pure-Python sources: the one holding the `json` package."""
    return Path(json.__file__).parents[1]


def build_pairs(seed: int = 0, max_pairs: int | None = None) -> tuple[list[dict], Counter]:
    """Question → answer records `{"prompt", "response", "module", "name", "kind"}` from the stdlib, and skip counts.

    Records come in module order, then source order; `name` is the dotted name the question is about (the
    module's own name for a module question), `kind` is "module", "class", "function", "method" or
    "signature" (the report counts it; the files leave it out). With `max_pairs`, a seeded-hash sample of
    that many is kept, in the same order, so that every split keeps its share.
    """
    skipped: Counter = Counter()
    files = stdlib_files(stdlib_root())
    records, seen = [], set()
    with progress(total=len(files), desc="reading modules", unit="module") as bar:
        for module, path in files:
            bar.update(1)
            parts = module.split(".")
            if parts[0] in SKIP_TOP:
                continue
            if any(p.startswith("_") for p in parts):  # _pydecimal, json.__main__: not the documented API
                skipped["private_module"] += 1
                continue
            for kind, name, answer in _module_candidates(module, path, skipped):
                templates = TEMPLATES[kind]
                prompt = templates[int(_stable_unit("template", seed, kind, name) * len(templates))].format(name=name)
                if prompt in seen:  # a definition repeated in an if/else or try/except branch
                    skipped["duplicate_question"] += 1
                    continue
                seen.add(prompt)
                records.append({"prompt": prompt, "response": answer, "module": module, "name": name, "kind": kind})
    if max_pairs is not None and max_pairs < len(records):
        ranked = sorted(range(len(records)), key=lambda i: _stable_unit("sample", seed, records[i]["prompt"]))
        keep = set(ranked[:max(max_pairs, 0)])
        skipped["max_pairs"] += len(records) - len(keep)
        records = [r for i, r in enumerate(records) if i in keep]
    return records, skipped


def instruct_command(out: str, from_stdlib: bool = False, max_pairs: int | None = None, seed: int = 0,
                     overwrite: bool = False) -> int:
    """Build an instruction dataset (question → answer pairs) offline, from Python's own documentation.

    Reads the docstrings of the standard library's pure-Python modules with ast (nothing is imported)
    and asks about each documented public module, class, function and method ("What does json.dumps
    do?", "What are the parameters of json.dumps?"); the answer is the docstring's summary, cut at a
    sentence end to at most 250 characters, or the signature. Writes OUT/train.jsonl, OUT/val.jsonl
    and OUT/test.jsonl, one {"prompt", "response", "module", "name"} object a line, split about
    80/10/10 by module (so test questions are about unseen modules), and OUT/report.json with the
    counts and the reasons definitions were skipped. The same Python and seed give the same files.

    Args:
        out: output directory; built beside it and swapped in at the end. An earlier `data instruct`
            output there is replaced; anything else is refused unless --overwrite.
        from_stdlib: build from the standard library's docstrings (the only source for now).
        max_pairs: keep at most this many pairs, a seeded sample spread over all modules.
        seed: seed of the module split, the question wording and the sample.
        overwrite: replace an existing OUT that is not a `data instruct` output.
    """
    if not from_stdlib:
        raise HainaError("haina data instruct needs --from-stdlib: the standard library's docstrings are the only "
                         "source for now")
    if max_pairs is not None and max_pairs < 1:
        raise HainaError(f"--max-pairs must be at least 1, got {max_pairs}")
    root = stdlib_root()
    with output_dir(out, COMMAND, inputs=[root], overwrite=overwrite, extra={"seed": seed}) as tmp:
        records, skipped = build_pairs(seed, max_pairs)
        by_split: dict[str, list[dict]] = {name: [] for name, _ in SPLITS}
        for record in records:
            by_split[split_of(record["module"], seed)].append(record)
        for split, rows in by_split.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({k: r[k] for k in FIELDS}, ensure_ascii=False) + "\n" for r in rows)
        report = {
            "source": "stdlib docstrings",
            "python": sys.version.split()[0],
            "seed": seed,
            "max_pairs": max_pairs,
            "max_answer_chars": MAX_ANSWER_CHARS,
            "pairs": len(records),
            "splits": {split: {"pairs": len(rows), "modules": sorted({r["module"] for r in rows})}
                       for split, rows in by_split.items()},
            "questions": dict(sorted(Counter(r["kind"] for r in records).items())),
            "skipped": dict(sorted(skipped.items())),
        }
        write_json(tmp / "report.json", report)
    counts = ", ".join(f"{s} {len(rows):,} ({len(report['splits'][s]['modules'])} modules)"
                       for s, rows in by_split.items())
    sampled = f", {skipped['max_pairs']:,} pairs left out by --max-pairs" if skipped["max_pairs"] else ""
    info(f"wrote {len(records):,} question-answer pairs to {out}: {counts}; "
         f"{sum(skipped.values()) - skipped['max_pairs']:,} definitions skipped{sampled} (see report.json)")
    return 0


__all__ = ["COMMAND", "build_pairs", "instruct_command", "signature_answer", "split_of", "summarize"]
