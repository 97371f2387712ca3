"""Frozen dataclass configs: to and from dicts and YAML, with dotted overrides.

Every config in haina is a frozen, keyword-only dataclass. Nested configs are dataclass
fields. `from_dict` refuses unknown keys (a typo should never be silently ignored) and
coerces strings from the command line to the field's declared type.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from haina.core.errors import HainaError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a (nested) dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Path):
            value = str(value)
        out[f.name] = value
    return out


def _unknown_key(cls: type, key: str, where: str) -> HainaError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(names)}"
    return HainaError(f"unknown config key '{where}{key}'{hint}")


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert `value` (often a string from the CLI or a YAML scalar) to type `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))) and \
                type(None) in get_args(tp):
            return None
        errors = []
        for a in args:
            try:
                return coerce(value, a, name)
            except HainaError as e:
                errors.append(str(e))
        raise HainaError(errors[0] if errors else f"invalid value for '{name}': {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise HainaError(f"invalid value for '{name}': {value!r}; choose one of {', '.join(map(str, choices))}")
    if origin in (tuple, list):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise HainaError(f"invalid value for '{name}': expected a list, got {value!r}")
        if inner in (int, float):  # `--rates 0,0.05 0.1` as well as `--rates 0 0.05 0.1` (strings keep their commas)
            value = [p for v in value for p in (v.split(",") if isinstance(v, str) else [v]) if p != ""]
        items = [coerce(v, inner, name) for v in value]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise HainaError(f"invalid value for '{name}': expected a mapping")
        return from_dict(tp, value, where=f"{name}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise HainaError(f"invalid value for '{name}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise HainaError(f"invalid value for '{name}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise HainaError(f"invalid value for '{name}': expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise HainaError(f"invalid value for '{name}': expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise HainaError(f"invalid value for '{name}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise HainaError(f"invalid value for '{name}': expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and coercing types."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(cls, key, where)
    kwargs = {k: coerce(v, hints[k], f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise HainaError(f"invalid config{(' ' + where.rstrip('.')) if where else ''}: {e}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["a.b=1", "c=x"]` into a nested dict `{"a": {"b": "1"}, "c": "x"}`.

    Values stay strings unless they parse as YAML lists/mappings; `coerce` types them later.
    """
    out: dict[str, Any] = {}
    for item in items:
        item = item.removeprefix("--")
        if "=" not in item:
            raise HainaError(f"override '{item}' must look like key.sub=value")
        key, value = item.split("=", 1)
        parsed: Any = value
        if value.startswith(("[", "{")):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise HainaError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)})") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise HainaError(f"override '{item}' conflicts with another override of '{p}'")
        node[parts[-1]] = parsed
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for missing files, binary files and bad syntax."""
    path = Path(path)
    if path.is_dir():
        raise HainaError(f"{path} is a directory; expected a YAML config file")
    if not path.is_file():
        raise HainaError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HainaError(f"cannot read {path}: not UTF-8 text (is it a YAML file?)") from None
    except yaml.YAMLError as e:
        raise HainaError(f"cannot read {path}: not valid YAML ({_yaml_problem(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HainaError(f"{path} must contain a YAML mapping at the top level")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line 3: mapping values are not allowed here' from a PyYAML error (whose message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def replace(cfg: T, **changes: Any) -> T:
    """`dataclasses.replace` re-exported for frozen configs."""
    return dataclasses.replace(cfg, **changes)


__all__ = ["coerce", "from_dict", "load_yaml", "merge", "parse_overrides", "replace", "to_dict"]
