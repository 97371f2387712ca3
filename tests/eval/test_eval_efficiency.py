"""`haina eval efficiency`: sizes, memory and engine timings of a tiny checkpoint, in a report."""

import json

import pytest
import torch

from haina.cli import main
from haina.eval.efficiency import PeakMemory, percentile
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import WEIGHTS, save_model
from haina.model.lora import ADAPTER_WEIGHTS, LoRAConfig, apply_lora, base_weights_hash, save_adapter
from haina.tokenizer.train import train_bpe

FAST = ["--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "2", "--warmup", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = train_bpe(["the cat sat on the mat and the dog ran to the park. " * 10], vocab_size=300)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("eff") / "tiny"
    save_model(out, Transformer(ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=4, n_embd=32)), tok)
    return out


@pytest.fixture(scope="module")
def adapter(ckpt, tmp_path_factory):
    from haina.model.checkpoint import load_model

    model, _ = load_model(ckpt)
    base_hash = base_weights_hash(model)
    apply_lora(model, LoRAConfig(r=2))
    out = tmp_path_factory.mktemp("eff") / "adapter"
    save_adapter(out, model, LoRAConfig(r=2), base_hash=base_hash, base=ckpt)
    return out


def _run(*args) -> int:
    return main(["eval", "efficiency", *map(str, args)])


def test_report_has_sizes_memory_and_timings(ckpt, tmp_path):
    out = tmp_path / "eff"
    assert _run("--checkpoint", ckpt, "--out", out, "--batch-sizes", 1, 2, *FAST) == 0
    r = json.loads((out / "report.json").read_text())
    model = Transformer(ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=4, n_embd=32))
    assert r["kind"] == "efficiency"
    assert r["params"] == model.num_params()  # the tied LM head once
    assert r["params_incl_tied"] == model.num_params() + 320 * 32  # and once more as the head
    assert r["size_mb"] == pytest.approx((ckpt / WEIGHTS).stat().st_size / 2**20)
    for b in (1, 2):
        assert r[f"decode_tok_s_b{b}_p50"] > 0
        assert 0 < r[f"decode_tok_s_b{b}_p99"] <= r[f"decode_tok_s_b{b}_p50"]  # p99: the slow tail
    assert 0 < r["prefill_ms_p50"] <= r["prefill_ms_p99"]
    memory = r["details"]["memory"]
    assert r["peak_memory_mb"] is None and "not resettable" in memory["basis"] or r["peak_memory_mb"] > 0
    env = r["details"]["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["device_name"]
    rows = r["details"]["batches"]
    assert [row["batch"] for row in rows] == [1, 2]
    assert [row["decoded_tokens"] for row in rows] == [3, 6]  # every row ran to --new-tokens: EOS ignored
    assert all(len(row["prefill_ms"]) == 2 for row in rows)
    assert (out / "decode_tok_s.png").stat().st_size > 1000
    assert "## Per batch size" in (out / "report.md").read_text()


def test_prefill_is_measured_alone_when_batch_one_is_not_asked_for(ckpt, tmp_path):
    out = tmp_path / "b3"
    assert _run("--checkpoint", ckpt, "--out", out, "--batch-sizes", 3, *FAST) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["prefill_ms_p50"] > 0 and r["decode_tok_s_b3_p50"] > 0
    assert "decode_tok_s_b1_p50" not in r


def test_adapter_counts_on_disk_and_in_parameters(ckpt, adapter, tmp_path):
    out = tmp_path / "lora"
    assert _run("--checkpoint", ckpt, "--adapter", adapter, "--out", out, "--batch-sizes", 1, *FAST) == 0
    r = json.loads((out / "report.json").read_text())
    files = [ckpt / WEIGHTS, adapter / ADAPTER_WEIGHTS]
    assert r["size_mb"] == pytest.approx(sum(f.stat().st_size for f in files) / 2**20)
    assert r["params_adapter"] > 0 and r["adapter"] == str(adapter)


@pytest.mark.parametrize("args, message", [
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--batch-sizes", "0"], "--batch-sizes must be positive"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--prompt-tokens", "30", "--new-tokens", "8"], "exceeds the model's context of 32"),
])
def test_bad_options_are_one_line_and_write_nothing(ckpt, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert _run("--checkpoint", ckpt, "--out", out, "--device", "cpu", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()


def test_percentiles_interpolate():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([5.0], 99) == 5.0


def test_cpu_peak_memory_sees_an_allocation():
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    if memory.baseline_kib is None or not memory.resettable:
        pytest.skip("no resettable peak resident set on this system")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert memory.peak_mib() >= 60
    del block
