"""`--dtype` on inference commands: bfloat16 runs on CPU, float16 asks for a device that has it, and
`import hf --dtype bfloat16` stores half-size weights that load as stored."""

import pytest
import torch
from safetensors import safe_open

from haina.cli import main
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.tokenizer.train import train_bpe


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = train_bpe(["the cat sat on the mat, the dog ran in the park. " * 20] * 3, vocab_size=280)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, norm="rmsnorm",
                      pos="rope", mlp="swiglu", bias=False, init_std=0.3)
    out = tmp_path_factory.mktemp("dtype") / "ckpt"
    save_model(out, Transformer(cfg), tok)
    return out


def test_generate_in_bfloat16_matches_float32_greedy_start(ckpt, capsys):
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", "the cat", "--max-new-tokens", "3", "--temperature",
            "0", "--device", "cpu"]
    assert main(args) == 0
    fp32 = capsys.readouterr().out
    assert main(args + ["--dtype", "bfloat16"]) == 0
    bf16 = capsys.readouterr().out
    assert fp32.startswith("the cat") and bf16.startswith("the cat")


def test_float16_on_cpu_is_one_line(ckpt, capsys):
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "x", "--dtype", "float16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float16 needs a CUDA or MPS device" in err[0]


def test_import_hf_stores_bfloat16(ckpt, tmp_path):
    pytest.importorskip("transformers")
    assert main(["export", "hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "hf", "--path", str(tmp_path / "hf"), "--out", str(tmp_path / "bf16"), "--dtype",
                 "bfloat16"]) == 0
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (a safe_open handle has keys(), not __iter__) == {"BF16"}
    model, _ = load_model(tmp_path / "bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    ref, _ = load_model(ckpt)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        got, want = model(x).float(), ref(x)
    assert (got - want).norm() / want.norm() < 0.05  # bfloat16 weights and arithmetic: about 2 %
