"""`haina eval harness`: lm-evaluation-harness tasks against the checkpoint, through `haina serve`.

The server runs as a child process on a free loopback port, with a one-time API key (the port is open to
every local user for the run); lm-eval runs in this process with its `local-completions` model and
`tokenizer_backend=remote`, so that it tokenizes through the server's /tokenize and scores through echo +
logprobs on /v1/completions, as it would against any OpenAI-compatible server. The server is stopped
whatever happens (an error, Ctrl-C); if this process is killed outright, the kernel sends it SIGTERM.

Tasks are local YAML files (or the bundled ones in `recipes/eval/`) whose data are local files: everything
runs with the Hugging Face hub offline. Each YAML is read with lm-eval's own loader (its `include` and
`!function` resolved beside the file), its relative `data_files` made absolute against the YAML's
directory, and the config handed to a TaskManager that does not scan lm-eval's 200-odd bundled task
folders (10 s, and they need the hub). A task lm-eval rejects is a one-line error before the server starts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from haina.core.errors import HainaError
from haina.core.io import write_text
from haina.core.log import info
from haina.eval.report import Report, eval_output, markdown_table, print_summary, write_report

KIND = "harness"
HEALTH_TIMEOUT_S = 600.0  # a large checkpoint on a CPU takes minutes to load
STOP_TIMEOUT_S = 20.0
NUM_CONCURRENT = 2  # requests in flight: the server batches them together while lm-eval prepares the next
MAX_PROMPTS_PER_REQUEST = 256  # the server's limit on prompts in one completions request
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def eval_harness_command(checkpoint: str, tasks: list[str], out: str, adapter: str | None = None,
                         limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                         max_length: int | None = None, port: int | None = None, device: str = "auto",
                         overwrite: bool = False) -> int:
    """Run lm-evaluation-harness tasks (local YAML + data files) against the checkpoint through `haina serve`.

    Starts `haina serve` on a free loopback port, runs lm-eval's local-completions model with the server's
    tokenizer (tokenizer_backend=remote), and stops the server. Writes OUT/report.json with `<task>.<metric>`
    at the top level (e.g. stdlib_mc.acc), their standard errors and lm-eval's config under details, and
    OUT/samples_<task>.jsonl with every scored item.

    Args:
        checkpoint: checkpoint or training run directory (with a tokenizer).
        tasks: task YAML files, or names of the bundled tasks in recipes/eval (stdlib_mc, stdlib_docstring).
        out: output directory for the report.
        adapter: a LoRA adapter (run or checkpoint directory) served on the checkpoint and evaluated.
        limit: evaluate only the first N items of each task.
        num_fewshot: examples in each prompt (default: the task's own setting, else 0).
        batch_size: prompts per request to the server.
        max_length: context lm-eval may fill (default: the server's context); longer inputs are left-truncated.
        port: port for the server (default: a free one).
        device: auto, cpu, cuda, cuda:1 or mps (where the server runs the model).
        overwrite: replace OUT even if it holds something other than an earlier harness report.
    """
    if not tasks:
        raise HainaError("--tasks is empty; give task YAML files or bundled task names (stdlib_mc, ...)")
    if limit is not None and limit < 1:
        raise HainaError(f"--limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise HainaError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if not 1 <= batch_size <= MAX_PROMPTS_PER_REQUEST:
        raise HainaError(f"--batch-size must be between 1 and {MAX_PROMPTS_PER_REQUEST}, got {batch_size}")
    if max_length is not None and max_length < 2:
        raise HainaError(f"--max-length must be at least 2 (one token is kept for generation), got {max_length}")
    if port is not None and not 1 <= port <= 65535:
        raise HainaError(f"--port must be between 1 and 65535, got {port}")
    if not Path(checkpoint).exists():
        raise HainaError(f"--checkpoint {checkpoint} not found")
    if adapter is not None and not Path(adapter).exists():
        raise HainaError(f"--adapter {adapter} not found; point it at a LoRA run or checkpoint directory")
    try:
        import lm_eval
    except ModuleNotFoundError:
        raise HainaError("lm-eval is not installed; install it with: pip install 'haina[eval]'") from None

    paths = [find_task(t) for t in tasks]
    with tempfile.TemporaryDirectory(prefix="haina-harness-") as scratch, offline():
        configs = [task_config(p, Path(scratch) / "datasets") for p in paths]
        names = [c["task"] for c in configs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise HainaError(f"task '{dup}' is given twice; each task YAML must name its own task")
        loaded = load_tasks(configs, paths)
        data = [*paths, *(f for c in configs for f in _data_files(c))]
        with eval_output(out, KIND, inputs=[checkpoint, adapter, *data], overwrite=overwrite) as tmp:
            with serve(checkpoint, adapter, port=port, device=device, slots=batch_size * NUM_CONCURRENT,
                       log_path=Path(scratch) / "serve.log") as server:
                context = server.max_model_len
                if max_length is not None and max_length > context:
                    raise HainaError(f"--max-length {max_length} exceeds the model's context of {context} tokens")
                results = run_lm_eval(server, loaded, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                                      max_length=max_length or context)
            report = build_report(results, names, paths, checkpoint=checkpoint, adapter=adapter, data=data,
                                  lm_eval_version=lm_eval.__version__, secret=server.key)
            for name in names:
                _write_samples(tmp / f"samples_{name}.jsonl", results.get("samples", {}).get(name, []))
            obj = write_report(tmp, report)
    print_summary(obj, list(report.metrics), out)
    return 0


# ---------------------------------------------------------------------------------------------- tasks
def bundled_tasks_dir() -> Path | None:
    """recipes/eval: package data in an installed haina, beside the package in a source checkout."""
    candidates = [Path(str(resources.files("haina") / "recipes" / "eval"))]
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        candidates.append(checkout / "recipes" / "eval")
    return next((d for d in candidates if d.is_dir()), None)


def find_task(spec: str) -> Path:
    """A task YAML as given, or a bundled task by name (`stdlib_mc`)."""
    path = Path(spec)
    if path.is_file():
        return path
    bundled = bundled_tasks_dir()
    names = sorted(p.stem for p in bundled.glob("*.yaml")) if bundled else []
    if bundled is not None and "/" not in spec and (bundled / f"{spec}.yaml").is_file():
        return bundled / f"{spec}.yaml"
    hint = f" (bundled: {', '.join(names)})" if names else ""
    raise HainaError(f"--tasks {spec}: no such task YAML file nor bundled task{hint}; lm-eval's own task names "
                     "need the Hugging Face hub, which this command does not use")


def _resolve(value: Any, base: Path) -> Any:
    """A data_files value (a path, a list of them, or split → paths) with relative paths made absolute."""
    if isinstance(value, str):
        return value if Path(value).is_absolute() or "://" in value else str((base / value).resolve())
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, base) for k, v in value.items()}
    return value


def _data_files(config: dict[str, Any]) -> list[str]:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    flat: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            flat.append(v)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    walk(files)
    return [f for f in flat if "://" not in f and "*" not in f]


def task_config(path: Path, cache_dir: Path) -> dict[str, Any]:
    """The task config of a YAML file, its relative data paths resolved against the file's directory."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's loader: `include` and `!function` beside the file

    try:
        cfg = load_yaml(path, resolve_func=True)
    except Exception as e:  # noqa: BLE001 - YAML syntax, a missing include or !function module: the user's file
        raise HainaError(f"task {path}: lm-eval cannot read it: {_one_line(e)}") from None
    if "group" in cfg:
        raise HainaError(f"task {path} is a group; pass the YAML of each of its tasks to --tasks")
    if not isinstance(cfg.get("task"), str):
        raise HainaError(f"task {path} has no 'task:' name; lm-eval needs one")
    base = path.resolve().parent
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _resolve(kwargs["data_files"], base)
    local = base / str(cfg.get("dataset_path", ""))
    if cfg.get("dataset_path") and not Path(cfg["dataset_path"]).is_absolute() and local.exists():
        cfg["dataset_path"] = str(local.resolve())  # a data folder beside the YAML
    kwargs.setdefault("cache_dir", str(cache_dir))  # the Arrow cache goes with the run, not into ~/.cache
    cfg["dataset_kwargs"] = kwargs
    missing = next((f for f in _data_files(cfg) if not Path(f).exists()), None)
    if missing is not None:
        raise HainaError(f"task {path}: data file {missing} not found (relative paths are read beside the YAML)")
    return cfg


def load_tasks(configs: list[dict[str, Any]], paths: list[Path]) -> list[Any]:
    """lm-eval's Task objects (their data loaded), or a one-line error naming the task lm-eval rejects."""
    import datasets
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False)
    out = []
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per small local file is noise
    try:
        for cfg, path in zip(configs, paths):
            try:
                out += list(manager.load([cfg])["tasks"].values())
            except Exception as e:  # noqa: BLE001 - lm-eval raises anything from a bad config: name it, one line
                raise HainaError(f"lm-eval rejects task {path}: {_one_line(e)}") from None
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(e).__name__}: {text}" if not isinstance(e, HainaError) else text


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The Hugging Face libraries offline for the block: environment variables, and the flags they already read."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    patched = []
    for module, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        mod = sys.modules.get(module)  # imported before this block: it read the environment already
        for attr in attrs if mod is not None else ():
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in reversed(patched):
            setattr(mod, attr, value)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------- server
@dataclass
class Server:
    """A running `haina serve` child: where it listens, the model name and key to send, what it serves."""

    url: str
    model: str
    key: str
    max_model_len: int
    prefix_token_id: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run first in the child on Linux: ask the kernel for SIGTERM when this process dies, even by SIGKILL, so that no
# server outlives it; then become the server (the request survives exec). A preexec_fn would do the same from
# Python between fork and exec, where another thread's lock can deadlock the child.
_PDEATHSIG_BOOT = ("import ctypes, os, signal, sys; ppid = int(sys.argv[1]); "
                   "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "  # PR_SET_PDEATHSIG
                   "os.getppid() == ppid or sys.exit(1); os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def _get(url: str, key: str | None = None, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}


def _log_tail(path: Path) -> str:
    """The server's own error line when it printed one, else its last line."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1].removeprefix("error: ")


@contextlib.contextmanager
def serve(checkpoint: str, adapter: str | None, *, port: int | None, device: str, slots: int,
          log_path: Path) -> Iterator[Server]:
    """Run `haina serve` for the checkpoint (and adapter) until the block ends; yield it once it is healthy."""
    port = port or _free_port()
    base = Path(checkpoint).resolve().name or "model"
    cmd = [sys.executable, "-m", "haina.cli", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--device", device, "--served-model-name", base, "--max-batch-size", str(slots),
           "--max-queue", str(max(256, 2 * slots)), "--drain-timeout", "1", "--log-level", "warning"]
    model = base
    if adapter is not None:
        model = f"{base}+{Path(adapter).resolve().name}"
        cmd += ["--adapter", f"{model}={adapter}"]
    key = secrets.token_urlsafe(24)
    # The key travels in the environment, which only this user can read (argv is visible to everyone).
    env = {**os.environ, "HAINA_API_KEY": key}
    url = f"http://127.0.0.1:{port}"
    info(f"starting haina serve for {checkpoint} on {url}")
    if sys.platform == "linux":
        cmd = [sys.executable, "-c", _PDEATHSIG_BOOT, str(os.getpid()), *cmd[1:]]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise HainaError(f"haina serve exited with status {proc.returncode}: {_log_tail(log_path)}")
            with contextlib.suppress(OSError):
                status, body = _get(f"{url}/health", timeout=2)
                if status == 200 and body.get("model") == base:
                    break
                if body.get("status") == "error":
                    raise HainaError(f"haina serve cannot load {checkpoint}: "
                                     f"{body.get('error', {}).get('message', _log_tail(log_path))}")
            if time.monotonic() > deadline:
                raise HainaError(f"haina serve did not become ready within {HEALTH_TIMEOUT_S:g} s: "
                                 f"{_log_tail(log_path)}")
            time.sleep(0.2)
        status, tok = _get(f"{url}/tokenizer_info", key)
        if status != 200:
            raise HainaError(f"haina serve answered /tokenizer_info with {status}: {tok}")
        bos, eos = tok.get("bos_token_id"), tok.get("eos_token_id")
        yield Server(url=url, model=model, key=key, max_model_len=int(tok["model_max_length"]),
                     prefix_token_id=bos if bos is not None else eos)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains: nothing is in flight by now, or what is gets cancelled after 1 s), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except KeyboardInterrupt:  # a second Ctrl-C while waiting: do not leave it running
        proc.kill()
        proc.wait()
        raise


# ---------------------------------------------------------------------------------------------- lm-eval
def run_lm_eval(server: Server, tasks: list[Any], *, limit: int | None, num_fewshot: int | None, batch_size: int,
                max_length: int) -> dict[str, Any]:
    """lm-eval's results for the loaded tasks, scored through the server."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {
        "model": server.model, "base_url": f"{server.url}/v1/completions", "tokenizer_backend": "remote",
        "tokenized_requests": True, "num_concurrent": NUM_CONCURRENT, "max_retries": 3, "max_length": max_length,
        # lm-eval's remote tokenizer finds EOS by encoding its text, which the server keeps as text (a prompt
        # cannot smuggle in a control token); the id an empty context stands for is given instead.
        "custom_prefix_token_id": server.prefix_token_id,
        "header": {"Authorization": f"Bearer {server.key}"}, "auth_token": server.key,
    }
    try:
        results = lm_eval.simple_evaluate(
            model="local-completions", model_args=model_args, tasks=tasks, num_fewshot=num_fewshot,
            batch_size=batch_size, limit=limit, log_samples=True, task_manager=TaskManager(include_defaults=False),
            bootstrap_iters=1000)
    except HainaError:
        raise
    except Exception as e:  # noqa: BLE001 - a failed request after retries, a task failing on its data
        raise HainaError(f"lm-eval failed: {_one_line(e)}") from None
    if not results:
        raise HainaError("lm-eval returned no results")
    return results


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # lm-eval writes "N/A" for a standard error it could not compute
    return float(value) if math.isfinite(value) else None


def _scrub(obj: Any, key: str) -> Any:
    """`obj` with the one-time API key replaced, wherever else lm-eval may have recorded it."""
    if isinstance(obj, dict):
        return {k: _scrub(v, key) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v, key) for v in obj]
    return obj.replace(key, "***") if isinstance(obj, str) else obj


def _jsonable(obj: Any) -> Any:
    """lm-eval's records as JSON: tuples as lists, numpy scalars as numbers, anything else as its text."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def build_report(results: dict[str, Any], names: list[str], paths: list[Path], *, checkpoint: str,
                 adapter: str | None, data: list[Path | str], lm_eval_version: str, secret: str = "") -> Report:
    """The report: `<task>.<metric>` metrics, their standard errors, lm-eval's config and versions."""
    metrics: dict[str, float | None] = {}
    stderr: dict[str, float | None] = {}
    for name in names:
        for key, value in results["results"].get(name, {}).items():
            if "," not in key:
                continue  # "alias" and the like
            metric, filt = key.split(",", 1)
            suffix = "" if filt == "none" else f".{filt}"
            if metric.endswith("_stderr"):
                stderr[f"{name}.{metric.removesuffix('_stderr')}{suffix}"] = _number(value)
            else:
                metrics[f"{name}.{metric}{suffix}"] = _number(value)
    config = dict(results.get("config") or {})
    config["model_args"] = {k: v for k, v in (config.get("model_args") or {}).items()
                            if k not in ("header", "auth_token")}
    record = _jsonable({"version": lm_eval_version, "config": config, "versions": results.get("versions", {}),
                        "n_shot": results.get("n-shot", {}), "higher_is_better": results.get("higher_is_better", {}),
                        "task_configs": results.get("configs", {})})
    details = {
        "stderr": stderr,
        "tasks": {name: str(path) for name, path in zip(names, paths)},
        "n_samples": _jsonable(results.get("n-samples", {})),
        "lm_eval": _scrub(record, secret) if secret else record,
    }
    rows = [(m, metrics[m], stderr.get(m)) for m in metrics]
    sections = [("lm-evaluation-harness", markdown_table(["task.metric", "value", "stderr"], rows)
                 + f"\n\nlm-eval {lm_eval_version}, through haina serve (local-completions, remote tokenizer); "
                   "per-item outputs in samples_<task>.jsonl.")]
    return Report(kind=KIND, metrics=metrics, details=details, sections=sections, checkpoint=checkpoint,
                  adapter=adapter, data=[str(p) for p in data])


def _write_samples(path: Path, samples: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(_jsonable(s), ensure_ascii=False) + "\n" for s in samples))
