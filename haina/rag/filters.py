"""Metadata filters: one validated language for every vector store, in Chroma's own `where` syntax.

A filter is a JSON object:

    {"lang": "en"}                               equality
    {"year": {"$gte": 2020}}                     $eq $ne $gt $gte $lt $lte
    {"lang": {"$in": ["en", "fr"]}}              $in $nin (a non-empty list of one kind of value)
    {"$and": [f1, f2]}  {"$or": [f1, f2]}        combinations
    {"lang": "en", "year": 2024}                 several fields: shorthand for $and

`normalize` checks a filter and returns the form Chroma accepts (one key per object, $and/$or with at
least two terms), so a mistake is reported once, in one line, before any backend sees it. `compile_filter`
turns a normalized filter into a predicate over a record's metadata with Chroma's semantics, so the exact
index answers exactly what Chroma answers:

- values are of three kinds, strings, numbers (int and float compare with each other) and booleans; a
  value of another kind never equals, so `{"flag": 1}` does not match `flag: true`;
- $gt/$gte/$lt/$lte take numbers and match only numeric fields;
- $ne and $nin are the complements of $eq and $in: they also match records that lack the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from haina.core.errors import HainaError

__all__ = ["COMPARISONS", "Filter", "compile_filter", "fields_of", "normalize", "value_kind"]

Filter = dict[str, Any]
Predicate = Callable[[Mapping[str, Any]], bool]
COMPARISONS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin")
_RANGE = ("$gt", "$gte", "$lt", "$lte")


def value_kind(value: Any) -> str | None:
    """'str', 'number' or 'bool' for a value metadata may hold; None for anything else."""
    if isinstance(value, bool):  # before int: bool is a subclass of int, but Chroma keeps them apart
        return "bool"
    if isinstance(value, int):
        return "number" if -(2**63) <= value < 2**63 else None  # Chroma stores int64
    if isinstance(value, float):
        return "number" if math.isfinite(value) else None
    if isinstance(value, str):
        return "str"
    return None


def normalize(where: Mapping[str, Any] | None) -> Filter | None:
    """Check `where` and return it in Chroma's form; None (or {}) means no filter.

    Raises:
        HainaError: one line naming the first thing wrong (an unknown operator, a value of the wrong type).
    """
    if where is None:
        return None
    if not isinstance(where, Mapping):
        raise HainaError(f"bad filter {_show(where)}: a filter is a JSON object such as {{\"lang\": \"en\"}}")
    if not where:
        return None
    return _node(where, where)


def fields_of(where: Filter | None) -> set[str]:
    """The metadata fields a normalized filter reads."""
    if not where:
        return set()
    (key, value), = where.items()
    if key in ("$and", "$or"):
        return set().union(*(fields_of(term) for term in value))
    return {key}


def compile_filter(where: Filter | None) -> Predicate:
    """A predicate `metadata -> bool` for a normalized filter (None matches everything)."""
    if not where:
        return lambda meta: True
    (key, value), = where.items()
    if key == "$and":
        terms = [compile_filter(t) for t in value]
        return lambda meta: all(t(meta) for t in terms)
    if key == "$or":
        terms = [compile_filter(t) for t in value]
        return lambda meta: any(t(meta) for t in terms)
    (op, operand), = value.items() if isinstance(value, dict) else (("$eq", value),)
    return _comparison(key, op, operand)


def _comparison(field: str, op: str, operand: Any) -> Predicate:
    missing = object()
    if op in ("$eq", "$ne"):
        def test(v: Any) -> bool:
            return _same(v, operand)
    elif op in ("$in", "$nin"):
        def test(v: Any) -> bool:
            return any(_same(v, o) for o in operand)
    else:
        compare = {"$gt": float.__gt__, "$gte": float.__ge__, "$lt": float.__lt__, "$lte": float.__le__}[op]
        bound = float(operand)

        def test(v: Any) -> bool:
            return value_kind(v) == "number" and compare(float(v), bound)
    if op in ("$ne", "$nin"):
        return lambda meta: (v := meta.get(field, missing)) is missing or not test(v)
    return lambda meta: (v := meta.get(field, missing)) is not missing and test(v)


def _same(value: Any, operand: Any) -> bool:
    kind = value_kind(value)
    return kind is not None and kind == value_kind(operand) and value == operand


def _node(node: Any, whole: Mapping[str, Any]) -> Filter:
    if not isinstance(node, Mapping) or not node:
        raise HainaError(f"bad filter {_show(whole)}: {_show(node)} is not a non-empty JSON object")
    terms = []
    for key, value in node.items():
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise HainaError(f"bad filter {_show(whole)}: {key} takes a non-empty list of filters")
            subs = [_node(v, whole) for v in value]
            terms.append(subs[0] if len(subs) == 1 else {key: subs})  # Chroma wants two or more terms
        elif not isinstance(key, str) or not key or key[0] in "$#":
            hint = "; combine with $and or $or" if isinstance(key, str) and key.startswith("$") else ""
            raise HainaError(f"bad filter {_show(whole)}: {key!r} is not a metadata field or operator{hint}")
        else:
            terms.append({key: _condition(key, value, whole)})
    return terms[0] if len(terms) == 1 else {"$and": terms}


def _condition(field: str, value: Any, whole: Mapping[str, Any]) -> Any:
    if not isinstance(value, Mapping):
        _check_scalar(field, "$eq", value, whole)
        return value
    if len(value) != 1:
        raise HainaError(f"bad filter {_show(whole)}: give one operator per field object for {field!r} "
                         "(combine conditions with $and)")
    (op, operand), = value.items()
    if op not in COMPARISONS:
        raise HainaError(f"bad filter {_show(whole)}: unknown operator {op!r} on {field!r} "
                         f"(use {', '.join(COMPARISONS)}, $and, $or)")
    if op in ("$in", "$nin"):
        if not isinstance(operand, list) or not operand:
            raise HainaError(f"bad filter {_show(whole)}: {op} on {field!r} takes a non-empty list of values")
        for item in operand:
            _check_scalar(field, op, item, whole)
        kinds = {value_kind(item) for item in operand}
        if len(kinds) > 1:
            raise HainaError(f"bad filter {_show(whole)}: the values of {op} on {field!r} mix "
                             f"{' and '.join(sorted(kinds))}; give values of one kind")
        if kinds == {"number"} and len({type(item) for item in operand}) > 1:
            operand = [float(item) for item in operand]  # Chroma wants one type; 1 == 1.0 still matches ints
        return {op: operand}
    _check_scalar(field, op, operand, whole)
    if op in _RANGE and value_kind(operand) != "number":
        raise HainaError(f"bad filter {_show(whole)}: {op} on {field!r} takes a number, got {_show(operand)}")
    return {op: operand}


def _check_scalar(field: str, op: str, value: Any, whole: Mapping[str, Any]) -> None:
    if value_kind(value) is None:
        raise HainaError(f"bad filter {_show(whole)}: {op} on {field!r} takes a string, number or boolean, "
                         f"got {_show(value)}")


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
