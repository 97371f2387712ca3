"""`haina tune`: Optuna over a command's dotted keys, each trial a child process and a run directory.

Most tests stand a small fake trainer in for the command (`Tuner.argv` patched): it writes metrics.jsonl and
report.json as the trainer does and stops on SIGTERM, in a fraction of a second, so the tuner's own logic
(pruning, failures, resume after a kill, flat memory) is tested quickly and deterministically. The real
`haina pretrain` runs in one fast test with two trials and in the slow tests (a kill mid-study with pruning,
and the memory check over ten real trials).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("optuna")  # haina[tune]

from haina.cli import COMMANDS, main
from haina.finetune import tune
from haina.finetune.tune_report import typed
from haina.finetune.tune_space import check_space, load_space, parse_param
from haina.train.pretrain import find_recipe, load_pretrain_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from train_fixtures import text_dataset

RECIPE = {"model": {"preset": "tiny", "vocab_size": 64, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32,
                    "dropout": 0.0},
          "train": {"batch_size": 8, "max_steps": 8, "warmup_steps": 2, "eval_every": 2, "eval_batches": 2, "lr": 3e-3,
                    "min_lr": 0.0, "log_every": 2, "save_every": 0, "keep_last": 0, "device": "cpu",
                    "tensorboard": False}}
SPACE = {"train.lr": {"type": "categorical", "choices": [1.0e-4, 3.0e-3]},
         "train.warmup_steps": {"type": "int", "low": 1, "high": 3}}

# Run as `python WRAPPER tune ...`: the CLI with `tune` registered and, with FAKE_TRAINER set, the fake trainer.
WRAPPER = """
import os, sys
from haina.cli import COMMANDS, main
COMMANDS.setdefault(("tune",), "haina.finetune.tune:tune_command")
if os.environ.get("FAKE_TRAINER"):
    from haina.finetune import tune
    def argv(self, params, run):
        return [sys.executable, os.environ["FAKE_TRAINER"], str(run),
                *[f"--{k}={tune.override_text(v)}" for k, v in params.items()]]
    tune.Tuner.argv = argv
raise SystemExit(main(sys.argv[1:]))
"""

# What the trainer leaves for the tuner: val_loss every 2 steps in metrics.jsonl, report.json at the end, and on
# SIGTERM a stop at the next step. A good lr (>= 1e-3) lowers the loss, a small one barely; lr > 1 fails.
FAKE_TRAINER = """
import json, os, signal, sys, time
from pathlib import Path
run = Path(sys.argv[1])
args = dict(a[2:].split("=", 1) for a in sys.argv[2:])
lr, steps = float(args.get("train.lr", "3e-3")), int(args.get("train.max_steps", "8"))
warmup = int(args.get("train.warmup_steps", "2"))
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append("SIGTERM"))
run.mkdir(parents=True)
if lr > 1:
    print("error: the loss diverged at step 1; lower train.lr", file=sys.stderr)
    sys.exit(2)
val = 4.0
with open(run / "metrics.jsonl", "w") as f:
    for step in range(steps + 1):
        if step % 2 == 0:
            f.write(json.dumps({"step": step, "loss": val + 0.1}) + "\\n")
            f.write(json.dumps({"step": step, "val_loss": val}) + "\\n")
            f.flush()
        if stop or step == steps:
            break
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0.03")))
        val -= 0.1 if lr >= 1e-3 else 0.002
# warmup_steps changes the final value a little (trials tie while they run: only the small lr is pruned)
(run / "report.json").write_text(json.dumps({"val_loss": val - 0.001 * warmup, "steps": step,
                                             "stopped_because": stop[0] if stop else "max_steps"}))
"""


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    # The lead registers `tune` in haina/cli.py; until then the tests add it for their duration.
    monkeypatch.setitem(COMMANDS, ("tune",), COMMANDS.get(("tune",), "haina.finetune.tune:tune_command"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Token shards (a char tokenizer over Python's docs), a tiny pretraining recipe, a space, and the scripts."""
    root = tmp_path_factory.mktemp("tune")
    data, _ = text_dataset(root)
    (root / "recipe.yaml").write_text(yaml.safe_dump({**RECIPE, "data": {"dir": str(data)}}))
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (root / "wrapper.py").write_text(WRAPPER)
    (root / "fake_trainer.py").write_text(FAKE_TRAINER)
    return root


@pytest.fixture
def fake(world, monkeypatch):
    """Trials run the fake trainer (in-process tuner)."""
    def argv(self, params, run):
        return [sys.executable, str(world / "fake_trainer.py"), str(run),
                *[f"--{k}={tune.override_text(v)}" for k, v in params.items()]]
    monkeypatch.setattr(tune.Tuner, "argv", argv)
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.08")  # a trial lasts long enough for the pruner's SIGTERM to land


def _tune_args(world: Path, out: Path, *extra: str, trials: int = 6, space: Path | None = None) -> list[str]:
    return ["tune", "--command", "pretrain", "--config", str(world / "recipe.yaml"), "--space",
            str(space or world / "space.yaml"), "--trials", str(trials), "--out", str(out), *extra]


def _rows(out: Path) -> list[dict]:
    with open(out / "trials.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _spawn(world: Path, args: list[str], fake_seconds: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fake_seconds is not None:
        env |= {"FAKE_TRAINER": str(world / "fake_trainer.py"), "FAKE_STEP_SECONDS": str(fake_seconds)}
    return subprocess.Popen([sys.executable, str(world / "wrapper.py"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _one_line_error(capsys, start: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start), err
    return err[0]


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_key_is_one_line_and_nothing_is_written(world, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("train.lrr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    out = tmp_path / "out"
    assert main(_tune_args(world, out, space=space)) == 2
    line = _one_line_error(capsys, f"error: {space}: train.lrr=0.0001: unknown config key 'train.lrr'")
    assert "did you mean 'lr'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
    # The same for a fine-tuning command, checked against its bundled recipe.
    space.write_text("classify.polling: [mean, last]\n")
    assert main(["tune", "--command", "finetune classify", "--space", str(space), "--trials", "2", "--out",
                 str(out)]) == 2
    _one_line_error(capsys, f"error: {space}: classify.polling=mean: unknown config key 'classify.polling'")
    assert not out.exists()


@pytest.mark.parametrize("space, extra, start", [
    ({"train.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, [], "{space}: train.lr: low (0.01) is above high"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, [], "{space}: train.lr: a log scale"),
    ({"train.lr": {"type": "uniform", "low": 0, "high": 1}}, [], "{space}: train.lr: 'type' must be one of"),
    ({"train.lr": {"type": "float", "low": 1e-4, "hi": 1e-2}}, [], "{space}: train.lr: unknown field 'hi'"),
    ({"lora.targets": {"type": "categorical", "choices": [["q"], ["v"]]}}, [], "{space}: lora.targets: choice"),
    ({"train.batch_size": {"type": "categorical", "choices": ["big"]}}, [],
     "{space}: train.batch_size=big: invalid value for 'train.batch_size'"),
    ({"train.lr": {"type": "float", "low": 1e-5, "high": 1e-2}}, ["--train.min_lr=1e-4"],
     "{space}: train.lr=1e-05: need 0 <= train.min_lr <= train.lr"),
    ({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, ["--sampler", "grid"],
     "{space}: train.lr is a continuous float, which --sampler grid cannot enumerate"),
    ({"train.lr": [1e-3, 3e-3]}, ["--train.lr=1e-3"], "train.lr is both searched"),
    ({"train.lr": [1e-3, 3e-3]}, ["--resume=true"], "--resume cannot be passed to the trials"),
    ({"train.lr": [1e-3, 3e-3]}, ["--study", "runs/study.db"], "--study runs/study.db is not a database URL"),
    ({}, [], "{space} names no parameters"),
])
def test_bad_space_or_arguments(world, tmp_path, capsys, space, extra, start):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space) if space else "")
    out = tmp_path / "out"
    assert main(_tune_args(world, out, *extra, space=path)) == 2
    _one_line_error(capsys, "error: " + start.format(space=path))
    assert not out.exists()


def test_unknown_command_is_refused(world, tmp_path, capsys):
    assert main(["tune", "--command", "finetune merge", "--space", str(world / "space.yaml"), "--trials", "2",
                 "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "error: --command 'finetune merge' cannot be tuned")


def test_space_pieces():
    p = parse_param("train.lr", {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}, "s")
    assert p.probes() == [1e-4, 1e-2] and p.grid_values() is None
    q = parse_param("train.warmup_steps", {"type": "int", "low": 0, "high": 100, "step": 50}, "s")
    assert q.grid_values() == [0, 50, 100]
    assert parse_param("lora.r", [4, 8], "s").grid_values() == [4, 8]
    assert tune.default_direction("macro_f1") == "maximize" and tune.default_direction("val_loss") == "minimize"
    assert tune.default_direction("selection.value") == "minimize"
    assert tune.default_direction("retrieval_after.mrr") == "maximize"  # `finetune embed`'s report
    assert tune.intermediate_keys("macro_f1") == ["macro_f1", "val_macro_f1"]
    assert tune.intermediate_keys("best_val_loss") == ["best_val_loss", "val_best_val_loss", "val_loss"]
    assert [typed(t) for t in ("8", "1e-3", "true", "null", "[a, b]", "runs/x")] == [8, 1e-3, True, None, ["a", "b"],
                                                                                   "runs/x"]
    dotted, flags = tune.split_args(["train.max_steps=4", "base=runs/b", "text-field=body"])
    assert dotted == {"train.max_steps": "4"} and flags == [("base", "runs/b"), ("text-field", "body")]


# ------------------------------------------------------------------------------------------------ the study
def test_study_prunes_bad_trials_and_writes_the_best_recipe(world, tmp_path, fake, capsys):
    out = tmp_path / "tune"
    assert main(_tune_args(world, out, "--sampler", "random", "--seed", "3", trials=8)) == 0
    printed = capsys.readouterr().out
    assert printed.count("\ntrial ") + printed.startswith("trial ") == 8  # one progress line per trial
    rows = _rows(out)
    assert [int(r["number"]) for r in rows] == list(range(8))
    assert list(rows[0]) == ["number", "state", "value", "duration_s", "last_step", "train.lr", "train.warmup_steps",
                             "tuner_rss_mb", "note"]
    pruned = [r for r in rows if r["state"] == "pruned"]
    complete = [r for r in rows if r["state"] == "complete"]
    assert pruned and all(float(r["train.lr"]) == 1e-4 for r in pruned)  # only the small lr is pruned
    assert all(int(r["last_step"]) < 8 and r["note"].startswith("pruned at step") for r in pruned)
    # A pruned trial's process gets SIGTERM and stops at its next step (unless it ended before the signal came).
    stopped = [json.loads((out / "trials" / f"trial-{int(r['number']):04d}" / "report.json").read_text())
               for r in pruned]
    assert any(s["stopped_because"] == "SIGTERM" and s["steps"] < 8 for s in stopped), stopped
    best = min(complete, key=lambda r: float(r["value"]))
    assert float(best["train.lr"]) == 3e-3
    # best.yaml is the recipe with the best parameters: it loads, and keeps everything else.
    cfg = load_pretrain_config(str(out / "best.yaml"))
    assert cfg.train.lr == 3e-3 and cfg.train.warmup_steps == int(best["train.warmup_steps"])
    assert cfg.train.max_steps == RECIPE["train"]["max_steps"] and cfg.model.n_embd == 32
    report = json.loads((out / "report.json").read_text())
    assert report["best"]["number"] == int(best["number"]) and report["best"]["value"] == float(best["value"])
    assert report["trials"]["counted"] == 8 and report["trials"]["pruned"] == len(pruned)
    assert (out / "history.png").stat().st_size > 1000 and (out / "trials.md").read_text().count("\n| ") == 8
    assert (out / "importance.png").is_file() or report["importance_note"]
    # Running it again continues the same study: nothing more to run, the outputs stay.
    assert main(_tune_args(world, out, "--sampler", "random", "--seed", "3", trials=8)) == 0
    assert len(_rows(out)) == 8
    # A larger --trials runs only the difference; another space is refused.
    assert main(_tune_args(world, out, "--sampler", "random", "--seed", "3", trials=9)) == 0
    assert len(_rows(out)) == 9
    other = tmp_path / "other.yaml"
    other.write_text("train.lr: [0.001, 0.002]\n")
    capsys.readouterr()
    assert main(_tune_args(world, out, space=other)) == 2
    _one_line_error(capsys, f"error: --out {out} holds a tune with another space")


def test_failed_trials_count_with_their_error_and_grid_stops_at_its_size(world, tmp_path, fake, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: [0.003, 10.0]\n")
    out = tmp_path / "tune"
    assert main(_tune_args(world, out, "--sampler", "grid", trials=5, space=space)) == 0
    rows = {float(r["train.lr"]): r for r in _rows(out)}
    assert len(rows) == 2 and rows[0.003]["state"] == "complete"
    assert rows[10.0]["state"] == "failed"
    assert "error: the loss diverged at step 1; lower train.lr" in rows[10.0]["note"]
    assert json.loads((out / "report.json").read_text())["trials"] == {
        "requested": 2, "counted": 2, "complete": 1, "pruned": 0, "failed": 1, "interrupted": 0}
    # A setup that fails every trial alike (here: every lr diverges) stops the study after two, with one line.
    space.write_text("train.lr: [10.0, 20.0, 30.0]\n")
    capsys.readouterr()
    assert main(_tune_args(world, tmp_path / "broken", "--sampler", "grid", trials=3, space=space)) == 2
    _one_line_error(capsys, "error: the first 2 trials all failed alike, so the study stopped: exit status 2: "
                            "error: the loss diverged at step 1; lower train.lr (see ")
    assert len(_rows(tmp_path / "broken")) == 2
    # While a tuner runs in OUT (it holds OUT/.tune.lock), a second one is refused before it touches anything.
    if sys.platform != "win32":
        import fcntl

        with open(out / ".tune.lock", "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            capsys.readouterr()
            assert main(_tune_args(world, out, "--sampler", "grid", "--overwrite", trials=5, space=space)) == 2
            _one_line_error(capsys, f"error: another haina tune is running with --out {out}")
        assert len(_rows(out)) == 2


def test_study_in_a_shared_database(world, tmp_path, fake, capsys):
    (tmp_path / "db").mkdir()
    url = f"sqlite:///{tmp_path / 'db' / 'studies.db'}"
    first, second = tmp_path / "a" / "tune", tmp_path / "b" / "tune"
    assert main(_tune_args(world, first, "--study", url, "--sampler", "random", trials=2)) == 0
    assert not (first / "study.db").exists() and json.loads((first / "tune.json").read_text())["storage"] == url
    # Another tune whose --out has the same name would share the study's name: refused, not silently continued.
    capsys.readouterr()
    assert main(_tune_args(world, second, "--study", url, trials=2)) == 2
    _one_line_error(capsys, f"error: --study {url} already holds a study named haina-tune-tune")
    assert not second.exists()
    # The first continues from tune.json, without --study.
    assert main(_tune_args(world, first, "--sampler", "random", trials=3)) == 0
    assert len(_rows(first)) == 3


@pytest.mark.parametrize("command, config, space", [
    ("pretrain", "quickstart", "pretrain-space.yaml"),
    ("finetune classify", None, "classify-space.yaml"),
])
def test_bundled_spaces_fit_their_recipes(command, config, space):
    path = find_recipe(space.removesuffix(".yaml"), stage="tune")  # found by name, as --space takes it
    assert path == ROOT / "recipes" / "tune" / space
    params = load_space(path)
    check_space(command.split(), config, {}, params, str(path))
    assert len(params) >= 4


def test_resume_after_the_tuner_is_killed(world, tmp_path):
    out = tmp_path / "tune"
    args = _tune_args(world, out, "--sampler", "random", "--pruner", "none", trials=3)
    proc = _spawn(world, args, fake_seconds=0.15)  # slow trials: the kill lands inside the second one
    second = out / "trials" / "trial-0001" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.exists(), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if sys.platform.startswith("linux"):  # the orphaned trial was told to stop (PR_SET_PDEATHSIG), and did
        report = second.parent / "report.json"
        deadline = time.monotonic() + 30
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert json.loads(report.read_text())["stopped_because"] == "SIGTERM"
    done = _spawn(world, args, fake_seconds=0.02)
    _, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr
    assert "continuing the study" in stderr and "1 interrupted trial(s) queued to run again" in stderr
    rows = _rows(out)
    states = [r["state"] for r in rows]
    assert states.count("complete") == 3 and states.count("interrupted") == 1 and len(rows) == 4
    lost = next(r for r in rows if r["state"] == "interrupted")
    assert lost["number"] == "1" and lost["note"].startswith("interrupted; run again as trial ")
    rerun = next(r for r in rows if r["note"] == "rerun of trial 1")
    assert (rerun["train.lr"], rerun["train.warmup_steps"]) == (lost["train.lr"], lost["train.warmup_steps"])
    assert json.loads((out / "report.json").read_text())["trials"]["counted"] == 3


def test_tuner_memory_is_flat_across_trials(world, tmp_path):
    # The tuner holds nothing of a trial: its resident memory after the 10th is that after the 2nd.
    out = tmp_path / "tune"
    proc = _spawn(world, _tune_args(world, out, "--sampler", "random", trials=10), fake_seconds=0.005)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    rss = [float(r["tuner_rss_mb"]) for r in _rows(out)]
    assert len(rss) == 10 and abs(rss[9] - rss[1]) / rss[1] < 0.03, rss


# ------------------------------------------------------------------------------------------------ real trials
def test_real_pretrain_trials(world, tmp_path):
    """Two real `haina pretrain` trials: run directories, values from their report.json, a best.yaml that trains."""
    out = tmp_path / "tune"
    proc = _spawn(world, _tune_args(world, out, "--sampler", "random", "--train.max_steps=4", trials=2))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["complete", "complete"]
    for r in rows:
        run = out / "trials" / f"trial-{int(r['number']):04d}"
        report = json.loads((run / "report.json").read_text())
        assert report["val_loss"] == float(r["value"]) and report["steps"] == 4
        resolved = yaml.safe_load((run / "config.yaml").read_text())
        assert resolved["train"]["lr"] == float(r["train.lr"])
        assert resolved["train"]["warmup_steps"] == int(r["train.warmup_steps"])
    cfg = load_pretrain_config(str(out / "best.yaml"))
    best = min(rows, key=lambda r: float(r["value"]))
    assert cfg.train.lr == float(best["train.lr"]) and cfg.train.max_steps == 4  # the fixed override is kept
    assert "best: trial" in stdout


@pytest.mark.slow
def test_real_study_killed_mid_way_prunes_and_reproduces(world, tmp_path):
    """Six real trials, the tuner killed during the third and run again: pruned trials, and best.yaml retrains to
    the best value exactly."""
    out = tmp_path / "tune"
    args = _tune_args(world, out, "--sampler", "random", "--seed", "3", trials=6)
    proc = _spawn(world, args)
    third = out / "trials" / "trial-0002" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not third.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert third.exists(), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    again = _spawn(world, args)
    _, stderr = again.communicate(timeout=1200)
    assert again.returncode == 0, stderr
    rows = _rows(out)
    counted = [r for r in rows if r["state"] != "interrupted"]
    assert len(counted) == 6 and [r["state"] for r in rows].count("interrupted") == 1
    # Real losses differ a little with warmup_steps too, so a good trial may fall below the median as well.
    assert any(float(r["train.lr"]) == 1e-4 for r in rows if r["state"] == "pruned")
    best = json.loads((out / "report.json").read_text())["best"]
    assert best["params"]["train.lr"] == 3e-3
    retrain = subprocess.run([sys.executable, "-m", "haina.cli", "pretrain", "--config", str(out / "best.yaml"),
                              "--out", str(tmp_path / "retrain")], capture_output=True, text=True, timeout=600,
                             check=False)
    assert retrain.returncode == 0, retrain.stderr
    assert json.loads((tmp_path / "retrain" / "report.json").read_text())["val_loss"] == best["value"]


@pytest.mark.slow
def test_real_trials_memory_is_flat(world, tmp_path):
    out = tmp_path / "tune"
    proc = _spawn(world, _tune_args(world, out, "--sampler", "random", "--train.max_steps=2", trials=10))
    _, stderr = proc.communicate(timeout=1800)
    assert proc.returncode == 0, stderr
    rss = [float(r["tuner_rss_mb"]) for r in _rows(out)]
    assert len(rss) == 10 and abs(rss[9] - rss[1]) / rss[1] < 0.03, rss


def test_space_file_round_trip(world):
    space = load_space(world / "space.yaml")
    assert list(space) == ["train.lr", "train.warmup_steps"] and space["train.warmup_steps"].kind == "int"
