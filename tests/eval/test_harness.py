"""`haina eval harness`: lm-eval through `haina serve` scores the bundled tasks exactly as haina scores them itself.

The proof that echo + logprobs are right is that lm-eval's multiple-choice accuracy, computed from what the
server answered, equals `haina.eval.loglik`'s, computed from the model directly. The checkpoint here is
built so that the model ends the text (predicts EOS) after about half of the continuations, the case where
a server that leaves the stop token out of the logprobs makes lm-eval drop a token; and lm-eval's context is
shorter than some items, so that its left-truncation is matched too.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from haina.core.errors import HainaError
from haina.eval.harness import bundled_tasks_dir, eval_harness_command, find_task
from haina.eval.load import load_for_eval
from haina.eval.loglik import encode_pair, loglikelihood, multiple_choice, prefix_token_id
from haina.eval.stdlib_tasks import functions, generation_items, multiple_choice_items
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.model.lora import LoRAConfig, apply_lora, base_weights_hash, save_adapter
from haina.tokenizer.train import train_bpe

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 20
MAX_LENGTH = 64  # below the longest items (about 80 tokens): lm-eval left-truncates some


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (bundled_tasks_dir() / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 2-layer random model with a BPE tokenizer trained on the tasks' text, and an EOS row that wins about
    half the time at the end of a multiple-choice continuation."""
    texts = [v if isinstance(v, str) else " ".join(v) for name in ("stdlib_mc", "stdlib_docstring")
             for r in _records(name) for v in r.values() if isinstance(v, str | list)]
    tok = train_bpe(texts, vocab_size=512, special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=512, block_size=256, n_layer=2, init_std=0.3)).eval()
    pairs = [encode_pair(tok, r["query"], " " + c) for r in _records("stdlib_mc")[:LIMIT] for c in r["choices"]]
    seqs = [ctx + cont for ctx, cont in pairs]
    with torch.no_grad():
        ends = torch.stack([model.hidden_states(torch.tensor([s]))[0, -1] for s in seqs])  # (N, C)
        mean = ends.mean(0)
        model.lm_head.weight[tok.eos_id] = mean * (model.lm_head(ends).max(-1).values / (ends @ mean)).median()
        share = (model.lm_head(ends).argmax(-1) == tok.eos_id).float().mean().item()
    assert 0.2 < share < 0.8, share
    out = tmp_path_factory.mktemp("harness") / "tiny"
    save_model(out, model, tok)
    return out


def serve_pids(checkpoint: Path) -> list[int]:
    """Processes running `haina serve` for `checkpoint` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and str(checkpoint).encode() in argv:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def run(ckpt, tmp_path_factory):
    """One harness run of both bundled tasks (the first LIMIT items each): the report directory."""
    out = tmp_path_factory.mktemp("runs") / "report"
    assert eval_harness_command(str(ckpt), ["stdlib_mc", "stdlib_docstring"], str(out), limit=LIMIT,
                                max_length=MAX_LENGTH, device="cpu") == 0
    return out


def test_lm_eval_accuracy_equals_haina_loglik_exactly(ckpt, run):
    report = json.loads((run / "report.json").read_text())
    model, tok = load_model(ckpt)
    items = [(r["query"], r["choices"], r["label"]) for r in _records("stdlib_mc")[:LIMIT]]
    ours, scored = multiple_choice(model, tok, items, max_length=MAX_LENGTH)
    assert report["stdlib_mc.acc"] == ours["acc"]
    assert report["stdlib_mc.acc_norm"] == ours["acc_norm"]
    assert report["details"]["stderr"]["stdlib_mc.acc"] is not None
    samples = sorted((json.loads(line) for line in (run / "samples_stdlib_mc.jsonl").read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    assert len(samples) == LIMIT
    truncated = 0
    for sample, (query, choices, _), mine in zip(samples, items, scored):
        # lm-eval asked for the same (context, continuation) pairs, and the server's scores are ours.
        assert [tuple(a) for a in sample["arguments"]] == [(query, " " + c) for c in choices]
        theirs = [resp[0] for resp in sample["resps"]]
        assert [g for _, g in theirs] == mine.greedy
        assert all(abs(a - b) < 1e-4 for (a, _), b in zip(theirs, mine.loglikelihoods))
        assert sample["acc"] == float(mine.pred == mine.gold) and sample["acc_norm"] == float(mine.pred_norm == mine.gold)
        truncated += any(sum(map(len, encode_pair(tok, query, " " + c))) > MAX_LENGTH - 1 for c in choices)
    assert truncated > 0  # the left-truncation path was taken
    assert len({ll for s in scored for ll in s.loglikelihoods}) > LIMIT  # real scores, not a constant
    assert serve_pids(ckpt) == []


def test_generation_task_runs_end_to_end(run):
    report = json.loads((run / "report.json").read_text())
    assert report["kind"] == "harness"
    assert 0.0 <= report["stdlib_docstring.exact_match"] <= 1.0 and report["stdlib_docstring.chrf"] is not None
    samples = [json.loads(line) for line in (run / "samples_stdlib_docstring.jsonl").read_text().splitlines()]
    assert len(samples) == LIMIT and all(isinstance(s["resps"][0][0], str) for s in samples)
    assert all("\n" not in s["filtered_resps"][0] for s in samples)  # until: ["\n"] reached the server as a stop
    lm = report["details"]["lm_eval"]
    assert lm["version"] == "0.4.13" and lm["config"]["model_args"]["tokenizer_backend"] == "remote"
    assert "auth_token" not in lm["config"]["model_args"] and "header" not in lm["config"]["model_args"]
    assert report["details"]["n_samples"]["stdlib_mc"] == {"original": 80, "effective": LIMIT}
    assert "stdlib_mc.acc" in (run / "report.md").read_text()


def test_an_adapter_is_what_lm_eval_scores(ckpt, tmp_path):
    base, tok = load_model(ckpt)
    base_hash = base_weights_hash(base)
    lora = LoRAConfig(r=4, targets="all")
    apply_lora(base, lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".B"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    save_adapter(tmp_path / "lora", base, lora, base_hash=base_hash, base=str(ckpt))
    out = tmp_path / "report"
    eval_harness_command(str(ckpt), ["stdlib_mc"], str(out), adapter=str(tmp_path / "lora"), limit=8, device="cpu")
    report = json.loads((out / "report.json").read_text())
    model, tok, _ = load_for_eval(str(ckpt), str(tmp_path / "lora"), device="cpu")
    items = [(r["query"], r["choices"], r["label"]) for r in _records("stdlib_mc")[:8]]
    ours, scored = multiple_choice(model, tok, items)
    assert (report["stdlib_mc.acc"], report["stdlib_mc.acc_norm"]) == (ours["acc"], ours["acc_norm"])
    samples = sorted((json.loads(line) for line in (out / "samples_stdlib_mc.jsonl").read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    theirs = [r[0][0] for s in samples for r in s["resps"]]
    adapted = [ll for item in scored for ll in item.loglikelihoods]
    _, plain = multiple_choice(load_model(ckpt)[0], tok, items)
    assert max(abs(a - b) for a, b in zip(theirs, adapted)) < 1e-4
    assert max(abs(a - b) for a, b in zip(theirs, (ll for item in plain for ll in item.loglikelihoods))) > 0.1
    assert report["adapter"] == str(tmp_path / "lora") and serve_pids(ckpt) == []


def _harness(ckpt, out, *args):
    return subprocess.run([sys.executable, "-m", "haina.cli", "eval", "harness", "--checkpoint", str(ckpt),
                           "--out", str(out), "--device", "cpu", *args], check=False, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


LOCAL = "dataset_path: json\ndataset_kwargs:\n  data_files: {test: data.jsonl}\ntest_split: test\n"
BAD_TASKS = [
    ("task: broken\n  dataset_path: [\n", "lm-eval cannot read it"),
    (f"task: bad_type\n{LOCAL}output_type: bogus\ndoc_to_text: q\n", "lm-eval rejects task"),
    (f"task: typo\n{LOCAL}output_type: generate_until\ndoc_to_txt: q\n", "unexpected keyword argument 'doc_to_txt'"),
    ("task: no_data\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: missing.jsonl}\n", "not found"),
    ("group: a_group\ntask: [stdlib_mc]\n", "is a group"),
]


@pytest.mark.parametrize("yaml_text, message", BAD_TASKS)
def test_a_task_yaml_lm_eval_rejects_is_refused_before_the_server_starts(ckpt, tmp_path, yaml_text, message):
    (tmp_path / "data.jsonl").write_text('{"q": "x", "a": "y"}\n')
    (tmp_path / "task.yaml").write_text(yaml_text)
    with pytest.raises(HainaError, match=message):
        eval_harness_command(str(ckpt), [str(tmp_path / "task.yaml")], str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out").exists() and serve_pids(ckpt) == []


def test_a_bad_task_on_the_command_line_is_one_line_exit_2(ckpt, tmp_path):
    (tmp_path / "data.jsonl").write_text('{"q": "x", "a": "y"}\n')
    (tmp_path / "task.yaml").write_text(BAD_TASKS[1][0])
    r = _harness(ckpt, tmp_path / "out", "--tasks", str(tmp_path / "task.yaml"))
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lm-eval rejects task" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and serve_pids(ckpt) == []


def test_unknown_task_names_the_bundled_ones():
    with pytest.raises(HainaError, match="bundled: stdlib_docstring, stdlib_mc"):
        find_task("hellaswag")
    assert find_task("stdlib_mc").name == "stdlib_mc.yaml"


def test_an_error_after_the_server_started_stops_it_and_writes_nothing(ckpt, tmp_path):
    with pytest.raises(HainaError, match="exceeds the model's context of 256 tokens"):
        eval_harness_command(str(ckpt), ["stdlib_mc"], str(tmp_path / "out"), max_length=100_000, device="cpu")
    assert not (tmp_path / "out").exists() and serve_pids(ckpt) == []


def _scored_tokens(port: int) -> float:
    """The server's count of prompt tokens processed (0 while it is not up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("haina_prompt_tokens_total"))


def test_ctrl_c_mid_run_stops_the_server(ckpt, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "haina.cli", "eval", "harness", "--checkpoint", str(ckpt),
                             "--tasks", "stdlib_mc", "--out", str(tmp_path / "out"), "--device", "cpu",
                             "--port", str(port), "--batch-size", "1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _scored_tokens(port):  # lm-eval is scoring through the server: interrupt it there
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert serve_pids(ckpt) == [] and not (tmp_path / "out").exists()


def test_loglik_splits_pairs_as_lm_eval_does(ckpt):
    model, tok = load_model(ckpt)
    ctx, cont = encode_pair(tok, "Answer: ", "base64")  # the space moves to the continuation
    assert ctx == tok.encode("Answer:") and ctx + cont == tok.encode("Answer: base64")
    ctx, cont = encode_pair(tok, "", "heapq")  # an empty context is the prefix token
    assert ctx == [prefix_token_id(tok)] and cont == tok.encode("heapq")
    full = loglikelihood(model, [(tok.encode("Function:"), tok.encode(" heapq"))])
    cut = loglikelihood(model, [(tok.encode("Function:"), tok.encode(" heapq"))], max_length=4)
    assert len(tok.encode("Function:")) > 1 and full[0][0] != cut[0][0]  # the context lost its first token
    with pytest.raises(HainaError, match="no context"):
        loglikelihood(model, [([1], tok.encode(" heapq heapq heapq"))], max_length=2)


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the shipped files were built from Python 3.11's docs")
def test_bundled_jsonl_rebuild_identically():
    funcs = functions()
    assert multiple_choice_items(funcs) == _records("stdlib_mc")
    assert generation_items(funcs) == _records("stdlib_docstring")
    assert 50 <= len(_records("stdlib_mc")) <= 100 and 50 <= len(_records("stdlib_docstring")) <= 100
