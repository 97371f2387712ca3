"""The search space of `haina tune`: a YAML mapping over the dotted keys that overrides use.

    train.lr:           {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    train.warmup_steps: {type: int, low: 0, high: 200, step: 50}
    lora.r:             {type: categorical, choices: [4, 8, 16]}
    train.batch_size:   [8, 16, 32]                                   # a list: shorthand for categorical
    train.min_lr:       {type: float, low: 0.0, high: 1.0e-4, grid: [0.0, 1.0e-5, 1.0e-4]}

`float` and `int` take `low` and `high` (both included), optional `log` (sampled on a log scale; low > 0)
and `step` (a lattice from low; not with log). `categorical` takes `choices`: numbers, strings, booleans
or null, which Optuna can store. The grid sampler (`--sampler grid`) tries every combination, so it needs
a finite list per parameter: categorical choices, an int's lattice low, low + step, ..., high, or an
explicit `grid:` list on a float (the other samplers ignore `grid:`).

`parse_param` checks the shape of each entry; `check_space` checks, before any trial runs, that every key
exists in the command's config and takes the space's values, by loading the config with them as overrides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from haina.core.config import load_yaml
from haina.core.errors import HainaError

Kind = Literal["float", "int", "categorical"]
KINDS = ("float", "int", "categorical")
FIELDS = {"float": {"type", "low", "high", "log", "step", "grid"}, "int": {"type", "low", "high", "log", "step", "grid"},
          "categorical": {"type", "choices"}}
MAX_GRID = 10_000  # points in a grid: beyond this a grid search is a typo (an int range with step 1, say)


@dataclass(frozen=True, kw_only=True)
class Param:
    """One searched key: its distribution and, for the grid sampler, its values."""

    name: str
    kind: Kind
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    grid: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        """The value of this key for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid_values(self) -> list[Any] | None:
        """Every value the grid sampler tries, or None when the distribution is continuous without a `grid:`."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.grid:
            return list(self.grid)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return None

    def probes(self) -> list[Any]:
        """Values worth checking against the config before a trial runs: the ends of the range, or each choice."""
        if self.kind == "categorical":
            return list(self.choices)
        return list(dict.fromkeys([self.low, self.high, *self.grid]))


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _number(spec: dict, key: str, where: str, integer: bool) -> float | int:
    value = spec.get(key)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        want = "an integer" if integer else "a number"
        raise HainaError(f"{where}: '{key}' must be {want}, got {value!r}")
    return value


def parse_param(name: str, spec: Any, where: str) -> Param:
    """One entry of a space file as a `Param`, or a one-line error naming the entry and what is wrong."""
    where = f"{where}: {name}"
    if not isinstance(name, str) or not name or any(not part.isidentifier() for part in name.split(".")):
        raise HainaError(f"{where}: a key is a config key in dotted form, such as train.lr")
    if isinstance(spec, list):  # [a, b, c]: the categorical shorthand
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise HainaError(f"{where}: expected a mapping such as {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}} "
                         f"or a list of choices, got {spec!r}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise HainaError(f"{where}: 'type' must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = sorted(set(spec) - FIELDS[kind])
    if unknown:
        raise HainaError(f"{where}: unknown field '{unknown[0]}' for type {kind}; its fields are "
                         f"{', '.join(sorted(FIELDS[kind] - {'type'}))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise HainaError(f"{where}: 'choices' must be a non-empty list")
        bad = next((c for c in choices if not _scalar(c)), None)
        if bad is not None:
            raise HainaError(f"{where}: choice {bad!r} is not a number, string, boolean or null (Optuna stores only "
                             "those)")
        if len(set(map(repr, choices))) != len(choices):
            raise HainaError(f"{where}: 'choices' lists a value twice")
        return Param(name=name, kind=kind, choices=tuple(choices))
    integer = kind == "int"
    low, high = _number(spec, "low", where, integer), _number(spec, "high", where, integer)
    if low > high:
        raise HainaError(f"{where}: low ({low}) is above high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise HainaError(f"{where}: 'log' must be true or false, got {log!r}")
    if log and low <= 0:
        raise HainaError(f"{where}: a log scale needs low > 0, got {low}")
    step = None
    if "step" in spec:
        step = _number(spec, "step", where, integer)
        if step <= 0:
            raise HainaError(f"{where}: 'step' must be positive, got {step}")
        if log:
            raise HainaError(f"{where}: 'step' and 'log' cannot be combined (Optuna samples one or the other)")
    grid = spec.get("grid", [])
    if not isinstance(grid, list) or any(isinstance(g, bool) or not isinstance(g, (int, float)) for g in grid):
        raise HainaError(f"{where}: 'grid' must be a list of numbers")
    outside = next((g for g in grid if not low <= g <= high), None)
    if outside is not None:
        raise HainaError(f"{where}: grid value {outside} lies outside [{low}, {high}]")
    if integer and any(not isinstance(g, int) for g in grid):
        raise HainaError(f"{where}: an int's grid holds integers")
    return Param(name=name, kind=kind, low=low, high=high, log=log, step=step, grid=tuple(grid))


def load_space(path: str | Path) -> dict[str, Param]:
    """The parameters of a space file, in file order; one-line errors for anything malformed."""
    raw = load_yaml(path)
    if not raw:
        raise HainaError(f"{path} names no parameters; write e.g. 'train.lr: {{type: float, low: 1.0e-4, "
                         "high: 1.0e-2, log: true}'")
    return {name: parse_param(name, spec, str(path)) for name, spec in raw.items()}


def grid_space(space: dict[str, Param], where: str) -> dict[str, list[Any]]:
    """The grid sampler's search space; an error for a float without `grid:` or a grid too large to run."""
    out: dict[str, list[Any]] = {}
    size = 1
    for name, p in space.items():
        values = p.grid_values()
        if values is None:
            raise HainaError(f"{where}: {name} is a continuous float, which --sampler grid cannot enumerate; give it "
                             "'grid: [v1, v2, ...]' or make it categorical")
        out[name] = values
        size *= len(values)
    if size > MAX_GRID:
        raise HainaError(f"{where}: the grid has {size:,} points (more than {MAX_GRID:,}); give int keys a larger "
                         "'step' or explicit 'grid:' values, or use --sampler tpe")
    return out


def override_text(value: Any) -> str:
    """A sampled value as the command line's `--key=VALUE` writes it (and `coerce` reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float
    return str(value)


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 0.001} → {"train": {"lr": 0.001}}, to merge into a recipe."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out




def load_command_config(words: list[str], config: str | None, overrides: list[str]) -> Any:
    """The resolved config the command would run with: what proves that a key exists and a value fits it."""
    if words[0] == "pretrain":
        if config is None:
            raise HainaError("haina tune --command pretrain needs --config (a pretraining recipe)")
        from haina.train.pretrain import load_pretrain_config

        return load_pretrain_config(config, out="tune-check", overrides=overrides)
    from haina.finetune.command import load_finetune_config

    return load_finetune_config(words[1], config, {}, overrides)


def check_space(words: list[str], config: str | None, dotted: dict[str, str], space: dict[str, Param],
                where: str) -> Any:
    """Load the command's config with each searched key at each end of its range (or each choice), before any trial.

    An unknown key, a value of the wrong type, or one the recipe cannot take (train.lr below its min_lr) is
    a one-line error naming the key. Keys are tried one at a time, the others at the recipe's values.
    Returns the config of the recipe with the fixed overrides.
    """
    fixed = [f"{k}={v}" for k, v in dotted.items()]
    base = load_command_config(words, config, fixed)  # the recipe and the fixed overrides on their own
    both = [k for k in space if k in dotted]
    if both:
        raise HainaError(f"{both[0]} is both searched ({where}) and fixed (--{both[0]}); drop one of them")
    for name, param in space.items():
        for value in param.probes():
            try:
                load_command_config(words, config, [*fixed, f"{name}={override_text(value)}"])
            except HainaError as e:
                raise HainaError(f"{where}: {name}={override_text(value)}: {e}") from None
    return base


__all__ = ["Param", "check_space", "grid_space", "load_command_config", "load_space", "nested", "override_text",
           "parse_param"]
