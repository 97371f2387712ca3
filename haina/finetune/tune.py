"""`haina tune`: hyperparameter search with Optuna over a training command's dotted keys.

    haina tune --command "finetune classify" --config recipe.yaml --space space.yaml --trials 20 \
        --out runs/tune --objective macro_f1 --base runs/base --data labeled.jsonl

Each trial is a run directory, OUT/trials/trial-NNNN, written by the command itself in a child process
(`python -m haina.cli <command> --config RECIPE --out OUT/trials/trial-NNNN --key=value ...`, its output in
trial-NNNN.log beside it). The tuner holds no model, no tensors and no CUDA context, so its memory stays flat
from trial to trial however many run (in-process tuners keep what every trial leaves behind: caches,
compiled graphs, fragmented allocators), and a trial that crashes takes only itself down.

While a trial runs, its metrics.jsonl is followed: each validation value of the objective is reported to
the pruner, and a trial the pruner gives up on gets SIGTERM, on which the trainer stops at its next step
with a checkpoint. A finished trial's value is the objective in its report.json (a dotted path reaches
inside it: selection.value); where report.json lacks it, the best validation value in metrics.jsonl.
With `--folds K` among the flags (finetune classify), each trial is a k-fold run and its value is the
objective's mean over the folds (report.json's metrics.NAME.mean); such a trial has no run-level metrics.jsonl
(each fold has its own), so it is never pruned.

The study is kept in an Optuna RDB storage, OUT/study.db unless --study names a database. Running the
same command again continues it up to --trials: trials that were running when the tuner was killed are
marked failed and run again with the same parameters; trials that failed on their own (their command
exited with an error) count, with their error in the table, unless every trial so far failed with the same
error: that is a broken setup (a wrong --base, a bad flag), and the study stops with it after two trials.
One tuner at a time works in an OUT (it holds OUT/.tune.lock).

OUT holds tune.json (what defines the study), trials.md and trials.csv (rewritten after every trial),
best.yaml (the recipe with the best parameters merged in, ready for --config), history.png,
importance.png (with two or more parameters and completed trials) and report.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from haina.core.errors import HainaError
from haina.core.io import read_json, write_json
from haina.core.log import info
from haina.core.output import check_output, claim_output, is_output_of
from haina.finetune.tune_report import (
    counted_trials,
    fold_mean,
    is_interrupted,
    lookup,
    rss_mb,
    trial_line,
    write_best,
    write_final,
    write_tables,
)
from haina.finetune.tune_space import Param, check_space, grid_space, load_space, override_text

COMMAND = "tune"  # the name in the manifest of its outputs
TUNABLE = ("pretrain", "finetune sft", "finetune continue", "finetune distill", "finetune dpo", "finetune classify",
           "finetune embed")
RESERVED = {"out": "the tuner gives each trial its own --out under OUT/trials",
            "config": "--config is the tuner's own option, handed to every trial",
            "resume": "the tuner resumes a study by itself: run the same haina tune command again",
            "overwrite": "--overwrite is the tuner's own option (it starts the study over)"}
SPEC = "tune.json"
LOCK = ".tune.lock"
# Objectives that grow as the model gets better; anything else (losses, perplexity) is minimized.
_MAXIMIZE = re.compile(r"accuracy|f1|auc|precision|recall|mrr|ndcg|exact_match|bleu|chrf|rouge", re.IGNORECASE)
POLL_SECONDS = 0.2  # how often a running trial's metrics.jsonl is read
STOP_GRACE_SECONDS = 120.0  # after SIGTERM, how long a trial may take to write its checkpoint before SIGKILL


class TrialFailed(Exception):
    """A trial whose command failed or left no objective value: recorded as failed, and the study goes on."""


def default_direction(objective: str) -> Literal["minimize", "maximize"]:
    """maximize for accuracy, F1, AUC and the like; minimize for losses and everything else."""
    return "maximize" if _MAXIMIZE.search(objective.rsplit(".", 1)[-1]) else "minimize"


def intermediate_keys(objective: str) -> list[str]:
    """The metrics.jsonl keys whose values stand for `objective` during a run (macro_f1 → val_macro_f1)."""
    keys = [objective, f"val_{objective}", objective.removeprefix("best_")]
    return [k for k in dict.fromkeys(keys) if "." not in k]


def split_args(overrides: list[str] | tuple[str, ...]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The extra arguments: dotted config overrides (`train.max_steps=50`) and the command's flags (`base=DIR`)."""
    dotted: dict[str, str] = {}
    flags: list[tuple[str, str]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HainaError(f"argument '{item}' must look like --key=value")
        if "." in key:
            dotted[key] = value
            continue
        name = key.replace("_", "-")
        if name in RESERVED:
            raise HainaError(f"--{name} cannot be passed to the trials: {RESERVED[name]}")
        flags.append((name, value))
    return dotted, flags


def _storage_url(study: str | None, out: Path) -> str:
    if study is None:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    if not re.match(r"^[a-z][a-z0-9+]*://", study):
        raise HainaError(f"--study {study} is not a database URL; write e.g. sqlite:///runs/tune/study.db")
    if study.startswith("sqlite:///"):
        path = Path(study.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            raise HainaError(f"--study {study}: the directory {path.parent} does not exist; create it or choose another")
        return f"sqlite:///{path.resolve()}"  # tune.json keeps it: a resume from another directory finds it
    return study


def _sampler(kind: str, space: dict[str, Param], seed: int, offset: int, where: str):
    import optuna

    if kind == "grid":  # the grid's order comes from the seed: the same seed on resume, or the grid would reshuffle
        return optuna.samplers.GridSampler(grid_space(space, where), seed=seed)
    # Offset by the trials already in the study, so that a resumed study does not draw its first values again.
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed + offset)
    return optuna.samplers.TPESampler(seed=seed + offset)


def _pruner(kind: str, trials: int):
    import optuna

    if kind == "none":
        return optuna.pruners.NopPruner()
    # Two to five completed trials before any is pruned (a median of one trial is that trial's luck), and
    # never at step 0: the evaluation before training says nothing about the hyperparameters.
    return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, trials // 4)), n_warmup_steps=1)


class _Tail:
    """The complete JSON lines appended to a file since the last read (a line still being written waits)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def records(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # rewritten from the start (a trainer resuming trims its log)
            self.offset, self.partial = 0, b""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has Linux send the child SIGTERM when the tuner dies, even by SIGKILL; else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: nothing may be imported between fork and exec
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the trainer checkpoints and exits), then SIGKILL if it takes too long or we are interrupted again."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def error_line(log: Path) -> str:
    """The trial's own one-line error (`error: ...`) from its log, else its last line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "no log"
    lines = [ln.split("\r")[-1].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    line = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "no output")
    return line[:300]


class Tuner:
    """The objective Optuna calls: runs one trial's command in a child process and follows its metrics."""

    def __init__(self, *, words: list[str], config: str | None, space: dict[str, Param], out: Path, objective: str,
                 direction: str, dotted: dict[str, str], flags: list[tuple[str, str]], prune: bool, max_steps: int):
        self.words, self.config, self.space, self.out = words, config, space, out
        self.max_steps = max_steps  # the recipe's train.max_steps, unless a trial searches it
        self.objective, self.direction, self.prune = objective, direction, prune
        self.keys = intermediate_keys(objective)
        self.fixed_args = [f"--{k}={v}" for k, v in dotted.items()] + [f"--{k}={v}" for k, v in flags]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log shows progress as it happens
        self.preexec = _die_with_parent()

    def argv(self, params: dict[str, Any], run: Path) -> list[str]:
        config = ["--config", self.config] if self.config is not None else []
        searched = [f"--{k}={override_text(v)}" for k, v in params.items()]
        return [sys.executable, "-m", "haina.cli", *self.words, *config, "--out", str(run), *searched, *self.fixed_args]

    def __call__(self, trial) -> float:
        params = {name: p.suggest(trial) for name, p in self.space.items()}
        run = self.out / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run))
        try:
            return self._run(trial, params, run)
        finally:
            trial.set_user_attr("tuner_rss_mb", round(rss_mb(), 2))  # the memory check reads it in trials.csv

    def _run(self, trial, params: dict[str, Any], run: Path) -> float:
        import optuna

        if run.exists():  # under OUT/trials, which only the tuner writes: a leftover of an earlier study here
            shutil.rmtree(run)
        log_path = run.parent / f"{run.name}.log"
        run.parent.mkdir(parents=True, exist_ok=True)
        argv = self.argv(params, run)
        with open(log_path, "w", encoding="utf-8") as log:
            log.write("$ " + shlex.join(argv) + "\n")
            log.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env, preexec_fn=self.preexec)  # noqa: PLW1509 (no threads here)
        last_step = int(params.get("train.max_steps", self.max_steps))
        try:
            pruned_at, values = self._follow(trial, proc, run / "metrics.jsonl", last_step)
        except BaseException:  # interrupted: the trial's process must not outlive the tuner
            _stop(proc)
            raise
        if values:
            trial.set_user_attr("last_step", values[-1][0])
            trial.set_user_attr("last_value", values[-1][1])
        if pruned_at is not None:
            trial.set_user_attr("pruned_at", pruned_at)
            raise optuna.TrialPruned(f"pruned at step {pruned_at}")
        if proc.returncode != 0:
            self._fail(trial, f"exit status {proc.returncode}: {error_line(log_path)}")
        return self._final(trial, run, [v for _, v in values])

    def _follow(self, trial, proc: subprocess.Popen, metrics: Path,
                last_step: int) -> tuple[int | None, list[tuple[int, float]]]:
        """Report the run's validation values as they appear; SIGTERM it once the pruner says so.

        The evaluation at `last_step` (train.max_steps) is reported but never prunes: the run is ending anyway,
        and its value is then a completed trial's.
        """
        tail = _Tail(metrics)
        values: list[tuple[int, float]] = []
        steps: set[int] = set()
        pruned_at, stop_sent, started = None, None, time.monotonic()
        while True:
            finished = proc.poll() is not None  # read before the last records, so none is missed
            for rec in tail.records():
                step, value = rec.get("step"), self._intermediate(rec)
                if pruned_at is not None or value is None or not isinstance(step, int) or step in steps:
                    continue  # a rollback can log a step twice; Optuna takes one value per step
                steps.add(step)
                values.append((step, value))
                trial.report(value, step)
                if self.prune and not finished and step < last_step and trial.should_prune():
                    pruned_at, stop_sent = step, time.monotonic()
                    proc.send_signal(signal.SIGTERM)
            if finished:
                return pruned_at, values
            if stop_sent is not None and time.monotonic() - stop_sent > STOP_GRACE_SECONDS:
                proc.kill()
            # Often at first, so that a command failing at once (a bad flag) costs no more than it takes.
            time.sleep(POLL_SECONDS if time.monotonic() - started > 2 else POLL_SECONDS / 4)

    def _intermediate(self, rec: dict[str, Any]) -> float | None:
        for key in self.keys:
            value = rec.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None

    def _final(self, trial, run: Path, values: list[float]) -> float:
        path = run / "report.json"
        if not path.is_file():
            self._fail(trial, f"the run wrote no report.json ({run})")
        report = read_json(path, expect=dict)
        value = lookup(report, self.objective)
        if value is None and "fold_runs" in report:  # a --folds trial: its value is the mean over the folds
            value = fold_mean(report, self.objective)
        if value is None:
            finite = [v for v in values if math.isfinite(v)]
            value = (max if self.direction == "maximize" else min)(finite) if finite else None
        if value is None:
            numbers = sorted(k for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            self._fail(trial, f"no value of '{self.objective}' in {path} or its metrics.jsonl; report.json has "
                              f"{', '.join(numbers[:12])}")
        if not math.isfinite(value):
            self._fail(trial, f"{self.objective} is {value} (the run diverged)")
        return value

    @staticmethod
    def _fail(trial, message: str) -> None:
        trial.set_user_attr("error", message)
        raise TrialFailed(message)


def _same_study(saved: dict[str, Any], spec: dict[str, Any], out: Path) -> None:
    """Continuing a study needs what defines it unchanged; the number of trials and the sampler may change."""
    for key in ("command", "config", "space", "objective", "direction", "overrides", "flags"):
        if saved.get(key) != spec.get(key):
            raise HainaError(f"--out {out} holds a tune with another {key} ({saved.get(key)!r}, now "
                             f"{spec.get(key)!r}); run it as it was to continue it, choose another --out, or pass "
                             "--overwrite to start over")


def _recover(study, storage) -> int:
    """Mark trials a killed tuner left running as failed; queue every interrupted trial's parameters once more."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for t in stale:
        storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                       TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = 0
    for t in trials:
        if is_interrupted(t) and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            queued += 1
    return queued


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def tune_command(command: str, space: str, trials: int, out: str, config: str | None = None,
                 sampler: Literal["tpe", "random", "grid"] = "tpe", pruner: Literal["median", "none"] = "median",
                 study: str | None = None, objective: str = "val_loss",
                 direction: Literal["minimize", "maximize"] | None = None, seed: int = 0, overwrite: bool = False,
                 overrides: list[str] = ()) -> int:
    """Search hyperparameters of a training command with Optuna; each trial is a run directory, the study resumable.

    The space is YAML over the dotted keys overrides use: `train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log:
    true}`, `{type: int, low: 1, high: 8, step: 1}`, `{type: categorical, choices: [4, 8, 16]}` (or a list). Every
    key is checked against the command's config before the first trial. Each trial runs the command in a child
    process with --out OUT/trials/trial-NNNN, so the tuner's memory stays flat; validation values of the objective
    in its metrics.jsonl go to the pruner, which stops bad trials early (SIGTERM: a checkpoint, then exit). The
    study lives in --study (default OUT/study.db): the same command again continues it up to --trials, rerunning
    trials a kill interrupted. Other arguments go to every trial: --section.key=value overrides and the command's
    flags as --flag=value (--base=DIR --data=FILE). OUT gets best.yaml (the recipe with the best parameters, ready
    for --config), trials.md and trials.csv, history.png, importance.png and report.json.

    Args:
        command: the command to tune: pretrain, or finetune sft|continue|distill|dpo|classify|embed (quoted, one
            string).
        space: the search space YAML, or the name of a bundled one in recipes/tune (classify-space, pretrain-space).
        trials: the number of trials the study should hold (failed ones count; interrupted ones are rerun).
        out: the tune's directory (OUT/trials holds the runs); an existing tune there is continued.
        config: the recipe every trial starts from (pretrain needs one; finetune defaults to its bundled recipe).
        sampler: tpe (Bayesian), random, or grid (every combination: categorical, int lattices, or float grid: lists).
        pruner: median stops a trial whose best validation value is worse than the median of completed trials' at
            the same step (after 2 to 5 completed trials, never at step 0); none lets every trial finish.
        study: an Optuna storage URL (sqlite:///DIR/study.db, postgresql://...); default OUT/study.db.
        objective: the number to optimize: a key (or dotted path) of the trial's report.json, such as val_loss,
            best_val_loss, accuracy or macro_f1 (classify: measured on its test split when it has one; its
            validation values drive the pruner; with --folds, the mean over the folds).
        direction: minimize or maximize (default: maximize for accuracy, F1, AUC, precision, recall; else minimize).
        seed: the sampler's seed.
        overwrite: start over in an existing OUT (a tune's, or any directory that is not an input).
    """
    try:
        import optuna
    except ModuleNotFoundError:
        raise HainaError("haina tune needs optuna; install it with: pip install 'haina[tune]'") from None
    words = command.split()
    if " ".join(words) not in TUNABLE:
        raise HainaError(f"--command {command!r} cannot be tuned; choose one of: {', '.join(TUNABLE)}")
    if trials < 1:
        raise HainaError(f"--trials must be at least 1, got {trials}")
    if not objective.strip():
        raise HainaError("--objective names the number to optimize, such as val_loss or macro_f1")
    dotted, flags = split_args(overrides)
    from haina.train.pretrain import find_recipe

    space_file = find_recipe(space, stage="tune")  # a file, or a bundled space by name (recipes/tune)
    params = load_space(space_file)
    base = check_space(words, config, dotted, params, space)
    grid_size = math.prod(len(v) for v in grid_space(params, space).values()) if sampler == "grid" else None
    asked, trials = trials, min(trials, grid_size or trials)
    direction = direction or default_direction(objective)
    out_path = Path(out)
    recipe = find_recipe(config or words[-1], stage="pretrain" if words[0] == "pretrain" else "finetune")
    inputs = [str(recipe), str(space_file), *[v for _, v in flags if Path(v).exists()]]
    spec = {"command": " ".join(words), "config": config, "space": {k: _spec(p) for k, p in params.items()},
            "objective": objective, "direction": direction, "overrides": dotted, "flags": [list(f) for f in flags]}
    if study and study.startswith("sqlite:///") and \
            Path(study.removeprefix("sqlite:///")).resolve() == (out_path / "study.db").resolve():
        study = None  # the default, named: OUT need not exist yet
    _check_idle(out_path)
    resuming, url, name = _open_out(out_path, spec, study, inputs, overwrite, seed, optuna)
    if trials < asked:
        info(f"the grid has {grid_size} points; the study stops after {grid_size} trials")
    tuner = Tuner(words=words, config=config, space=params, out=out_path, objective=objective, direction=direction,
                  dotted=dotted, flags=flags, prune=pruner != "none", max_steps=base.train.max_steps)
    context = {"command": " ".join(words), "recipe": recipe, "objective": objective, "direction": direction,
               "dotted": dotted, "flags": flags, "space": list(params), "trials": trials, "out": out_path,
               "seed": seed}
    with _exclusive(out_path):
        opened = _load_study(optuna, url, name, direction, pruner, trials, resuming)
        opened.sampler = _sampler(sampler, params, seed, len(opened.trials), space)
        return _run_study(opened, tuner, context)


def _open_out(out: Path, spec: dict[str, Any], study: str | None, inputs: list[str], overwrite: bool, seed: int,
              optuna) -> tuple[bool, str, str]:
    """Continue the tune in OUT (same study definition) or claim OUT for a new one; (resuming, storage URL, name)."""
    if not overwrite and is_output_of(out, COMMAND) and (out / SPEC).is_file():
        check_output(out, COMMAND, inputs=inputs)
        saved = read_json(out / SPEC, expect=dict)
        _same_study(saved, spec, out)
        # None: OUT/study.db, wherever OUT is now (a moved tune directory keeps its study)
        url, name = saved["storage"] or _storage_url(None, out), saved["study_name"]
        if study is not None and _storage_url(study, out) != url:
            raise HainaError(f"--out {out} keeps its study in {url}; run it without --study (or with that one)")
        return True, url, name
    check_output(out, COMMAND, inputs=inputs, overwrite=overwrite)
    url, name = _storage_url(study, out), f"haina-tune-{out.resolve().name}"
    if study is not None:  # a shared database may hold a study of this name already
        _clear_study(optuna, url, name, overwrite)
    claim_output(out, COMMAND, inputs=inputs, overwrite=overwrite, extra={"tuned": spec["command"]})
    write_json(out / SPEC, {**spec, "storage": study and url, "study_name": name, "seed": seed})
    return False, url, name


def _load_study(optuna, url: str, name: str, direction: str, pruner: str, trials: int, resuming: bool):
    """The study, created or loaded, with what a killed tuner left running marked failed and queued again."""
    # One line per trial is ours to print; Optuna's own warnings would add a traceback for each failed trial.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = optuna.storages.RDBStorage(url)
    opened = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True,
                                 pruner=_pruner(pruner, trials))
    queued = _recover(opened, storage)
    if resuming:
        done = counted_trials(opened.get_trials(deepcopy=False))
        info(f"continuing the study in {url}: {done} of {trials} trials done"
             + (f", {queued} interrupted trial(s) queued to run again" if queued else ""))
    return opened


def _run_study(opened, tuner: Tuner, ctx: dict[str, Any]) -> int:
    """Run the trials still missing, one progress line and fresh tables after each; then the plots and report."""
    out, names, trials, objective = ctx["out"], ctx["space"], ctx["trials"], ctx["objective"]

    broken: list[str] = []

    def after_trial(s, frozen) -> None:
        all_trials = s.get_trials(deepcopy=False)
        print(trial_line(frozen, counted_trials(all_trials), trials, objective, s), flush=True)
        write_tables(out, all_trials, names)
        write_best(s, ctx)
        errors = [t.user_attrs.get("error") for t in all_trials if not is_interrupted(t)]
        if len(errors) >= 2 and len(set(errors)) == 1 and errors[0] is not None:
            broken.append(errors[0])  # every trial failed alike: the setup is wrong, not the parameters
            s.stop()

    remaining = trials - counted_trials(opened.get_trials(deepcopy=False))
    old = signal.signal(signal.SIGTERM, _raise_interrupt)  # a killed tuner stops its trial first
    try:
        if remaining > 0:
            opened.optimize(tuner, n_trials=remaining, catch=(TrialFailed,), callbacks=[after_trial])
    except KeyboardInterrupt:
        write_tables(out, opened.get_trials(deepcopy=False), names)
        print(f"interrupted; run the same command again to continue the study in {out}", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
    report = write_final(opened, ctx)
    if broken:
        raise HainaError(f"the first {report['trials']['counted']} trials all failed alike, so the study stopped: "
                         f"{broken[0]} (see {out / 'trials' / 'trial-0000.log'})")
    best = report.get("best")
    if best is None:
        print(f"{report['trials']['counted']} trials, none completed; see {out / 'trials.md'}")
        return 1
    chosen = ", ".join(f"{k}={override_text(v)}" for k, v in best["params"].items())
    print(f"best: trial {best['number']}, {objective} {best['value']:.6g} ({chosen})")
    print(f"recipe: {out / 'best.yaml'}   trials: {out / 'trials.md'}")
    return 0


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold OUT/.tune.lock while the study runs: a second tuner would mark the first one's running trials failed."""
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): one tuner per OUT is then the user's care
        yield
        return
    with open(out / LOCK, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise HainaError(f"another haina tune is running with --out {out}; wait for it to end, or stop it and "
                             "run this again to continue its study") from None
        yield


def _check_idle(out: Path) -> None:
    """Refuse, before anything is replaced, an OUT whose tune is running now."""
    if (out / LOCK).is_file():
        with _exclusive(out):
            pass


def _spec(p: Param) -> dict[str, Any]:
    """A parameter as tune.json records it (plain values, comparable across runs)."""
    out: dict[str, Any] = {"type": p.kind}
    if p.kind == "categorical":
        return {**out, "choices": list(p.choices)}
    out |= {"low": p.low, "high": p.high, "log": p.log}
    if p.step is not None:
        out["step"] = p.step
    if p.grid:
        out["grid"] = list(p.grid)
    return out


def _clear_study(optuna, url: str, name: str, overwrite: bool) -> None:
    """A new tune in a shared database: its study name must be free, or freed with --overwrite."""
    try:
        names = set(optuna.get_all_study_names(storage=url))
    except Exception as e:  # noqa: BLE001 (a URL that does not connect: the database's own message is the one line)
        raise HainaError(f"--study {url}: cannot open it ({str(e).splitlines()[0][:200]})") from None
    if name not in names:
        return
    if not overwrite:
        raise HainaError(f"--study {url} already holds a study named {name} (another tune with --out named "
                         f"like this one); pass --overwrite to replace it, or choose another --out")
    optuna.delete_study(study_name=name, storage=url)


__all__ = ["TUNABLE", "TrialFailed", "Tuner", "default_direction", "intermediate_keys", "split_args",
           "tune_command"]
