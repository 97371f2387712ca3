"""What `haina tune` leaves for people: the trials table, the best recipe, the plots and report.json.

The tables and best.yaml are rewritten after every trial, so a study that is stopped still shows what it
found; the plots and report.json are drawn when the study ends (matplotlib is imported only then, and
the tuner's memory stays what it was for the trials).
"""

from __future__ import annotations

import csv
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from haina.core.config import load_yaml, merge
from haina.core.io import atomic_path, write_json, write_text
from haina.finetune.tune_space import nested

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux: now; elsewhere: its peak, which also shows any growth)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def lookup(report: dict[str, Any], path: str) -> float | None:
    """The number at dotted `path` in `report` (val_loss, selection.value), or None."""
    node: Any = report
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def fold_mean(report: dict[str, Any], objective: str) -> float | None:
    """The objective of a k-fold report (`finetune classify --folds`): its mean over the folds.

    Each fold is scored on the same split (the test split, else its own validation fold), so `val_macro_f1`,
    `test_macro_f1` and `macro_f1` all name the folds' `macro_f1`, and `val_loss` / `test_loss` their `loss`.
    """
    for name in (objective, objective.removeprefix("val_"), objective.removeprefix("test_")):
        value = lookup(report, f"metrics.{name}.mean")
        if value is not None:
            return value
    return None


def is_interrupted(trial) -> bool:
    """A trial that failed because the tuner stopped (killed or interrupted), not because its command failed."""
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and "error" not in trial.user_attrs


def counted_trials(trials) -> int:
    """Trials that count towards --trials: completed, pruned, and failed by their own command."""
    from optuna.trial import TrialState

    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and not is_interrupted(t)))


def _state(trial) -> str:
    return "interrupted" if is_interrupted(trial) else {"FAIL": "failed"}.get(trial.state.name, trial.state.name.lower())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(trial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def _note(trial, reruns: dict[int, int]) -> str:
    attrs = trial.user_attrs
    if "error" in attrs:
        return attrs["error"]
    if "pruned_at" in attrs:
        last = attrs.get("last_value")
        return f"pruned at step {attrs['pruned_at']}" + (f" ({last:.4g})" if isinstance(last, float) else "")
    if is_interrupted(trial):
        return f"interrupted; run again as trial {reruns[trial.number]}" if trial.number in reruns else "interrupted"
    if "retry_of" in attrs:
        return f"rerun of trial {attrs['retry_of']}"
    return ""


def trial_line(trial, counted: int, total: int, objective: str, study) -> str:
    """The progress line printed after each trial."""
    state, duration = _state(trial), _duration(trial)
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    took = f" in {duration:.1f} s" if duration is not None else ""
    if state == "complete":
        what = f"{objective} {trial.value:.6g}"
    elif state == "pruned":
        what = _note(trial, {})
    else:
        what = f"{state}: {trial.user_attrs.get('error', '')}".rstrip(": ")
    try:
        best = f"; best {study.best_value:.6g} (trial {study.best_trial.number})"
    except ValueError:  # no completed trial yet
        best = ""
    return f"trial {counted}/{total} (#{trial.number}): {state}, {what}{took} ({params}){best}"


def write_tables(out: Path, trials, names: list[str]) -> None:
    """OUT/trials.csv and OUT/trials.md: number, state, value, duration, last step, parameters, tuner memory, note."""
    trials = sorted(trials, key=lambda t: t.number)
    reruns = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    rows = []
    for t in trials:
        duration = _duration(t)
        rows.append({"number": t.number, "state": _state(t), "value": t.value if t.value is not None else "",
                     "duration_s": "" if duration is None else round(duration, 2),
                     "last_step": t.user_attrs.get("last_step", ""),
                     **{n: t.params.get(n, "") for n in names},
                     "tuner_rss_mb": t.user_attrs.get("tuner_rss_mb", ""), "note": _note(t, reruns)})
    columns = ["number", "state", "value", "duration_s", "last_step", *names, "tuner_rss_mb", "note"]
    with atomic_path(out / "trials.csv") as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    head = ["trial", "state", "value", "duration (s)", "last step", *names, "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["number"], r["state"], _fmt(r["value"]), r["duration_s"], r["last_step"], *(_fmt(r[n]) for n in names),
                 str(r["note"]).replace("|", "\\|")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    write_text(out / "trials.md", "\n".join(lines) + "\n")


def typed(text: str) -> Any:
    """A command-line override's value as YAML should hold it: 8 → 8, 1e-3 → 0.001, true → True, [a, b] → a list."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    if _NUMBER.match(text):
        number = float(text)
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else number
    if text.startswith(("[", "{")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text
    return text


def best_recipe(recipe: Path, dotted: dict[str, str], params: dict[str, Any]) -> dict[str, Any]:
    """The recipe the trials started from, with the fixed overrides and then the best parameters merged in."""
    raw = merge(load_yaml(recipe), nested({k: typed(v) for k, v in dotted.items()}))
    return merge(raw, nested(params))


def write_best(study, ctx: dict[str, Any]) -> dict[str, Any] | None:
    """OUT/best.yaml from the best completed trial (none yet: nothing written); returns that trial's summary."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    flags = " ".join(f"--{k} {shlex.quote(v)}" for k, v in ctx["flags"])
    run = f"haina {ctx['command']} --config best.yaml {flags}".rstrip() + " --out DIR"
    header = (f"# haina tune: the best of the study's trials so far: trial {best.number}, {ctx['objective']} = "
              f"{best.value:.6g} ({ctx['direction']}).\n# Its recipe, {ctx['recipe']}, with the searched keys set; "
              f"train it with:\n#   {run}\n")
    body = yaml.safe_dump(best_recipe(Path(ctx["recipe"]), ctx["dotted"], best.params), sort_keys=False)
    write_text(ctx["out"] / "best.yaml", header + body)
    return {"number": best.number, "value": best.value, "params": dict(best.params),
            "run_dir": best.user_attrs.get("run_dir")}


def _plot_history(trials, path: Path, objective: str, direction: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    done = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE]
    pruned = [(t.number, t.user_attrs["last_value"]) for t in trials
              if t.state == TrialState.PRUNED and isinstance(t.user_attrs.get("last_value"), float)]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if done:
        ax.plot(*zip(*done), "o", label="completed", ms=5)
        pick = max if direction == "maximize" else min
        best, running = [], None
        for number, value in done:
            running = value if running is None else pick(running, value)
            best.append((number, running))
        ax.step(*zip(*best), where="post", label="best so far", lw=1.5)
    if pruned:
        ax.plot(*zip(*pruned), "x", color="grey", label="pruned (last value)", ms=6)
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title(f"optimization history ({direction})")
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _importances(study, names: list[str], seed: int) -> tuple[dict[str, float] | None, str]:
    """Optuna's fANOVA importances, or None and why not (they need two parameters and two completed trials)."""
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(names) < 2:
        return None, "one parameter: nothing to compare its importance with"
    if len(complete) < 2:
        return None, f"{len(complete)} completed trial(s): importances need at least 2"
    if len({t.value for t in complete}) < 2:
        return None, "every completed trial has the same value: no parameter explains a difference"
    try:
        from optuna.importance import FanovaImportanceEvaluator, get_param_importances

        # Seeded: fANOVA's random forest on a handful of trials gives noticeably different shares run to run.
        values = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError, ZeroDivisionError) as e:  # too few distinct points for fANOVA's trees
        return None, f"could not be computed ({str(e).splitlines()[0][:160]})"
    return {k: float(v) for k, v in values.items()}, ""


def _plot_importances(values: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)[::-1]  # the most important on top
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5), dpi=110)
    ax.barh(names, [values[n] for n in names])
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_final(study, ctx: dict[str, Any]) -> dict[str, Any]:
    """Tables, best.yaml, history.png, importance.png and report.json once the study has its trials."""
    from optuna.trial import TrialState

    out: Path = ctx["out"]
    trials = study.get_trials(deepcopy=False)
    write_tables(out, trials, ctx["space"])
    best = write_best(study, ctx)
    _plot_history(trials, out / "history.png", ctx["objective"], ctx["direction"])
    importances, why = _importances(study, ctx["space"], ctx["seed"])
    if importances is not None:
        _plot_importances(importances, out / "importance.png")
    elif (out / "importance.png").exists():  # an earlier end of this study drew one; it no longer stands
        (out / "importance.png").unlink()
    states = [_state(t) for t in trials]
    rss = [t.user_attrs["tuner_rss_mb"] for t in sorted(trials, key=lambda t: t.number)
           if "tuner_rss_mb" in t.user_attrs]
    report = {
        "command": ctx["command"], "recipe": str(ctx["recipe"]), "objective": ctx["objective"],
        "direction": ctx["direction"],
        "trials": {"requested": ctx["trials"], "counted": counted_trials(trials),
                   **{s: states.count(s) for s in ("complete", "pruned", "failed", "interrupted")}},
        "best": best,
        "importances": importances, "importance_note": why or None,
        "tuner_rss_mb": {"first": rss[0], "last": rss[-1], "max": max(rss)} if rss else None,
        "pruned_steps": sorted(t.user_attrs["pruned_at"] for t in trials
                               if t.state == TrialState.PRUNED and "pruned_at" in t.user_attrs),
    }
    if best is not None and not math.isfinite(best["value"]):
        report["best"] = None
    write_json(out / "report.json", report)
    return report


__all__ = ["best_recipe", "counted_trials", "is_interrupted", "lookup", "rss_mb", "trial_line", "typed", "write_best",
           "write_final", "write_tables"]
