"""`haina compress quantize`: the integer layers, the saved checkpoint, and the commands that load it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from haina.compress.quantize import quantize_command
from haina.core.errors import HainaError
from haina.core.output import read_manifest
from haina.generate.engine import Engine
from haina.generate.sampling import SamplingParams
from haina.generate.text import TextGenerator
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.model.lora import LoRAConfig, apply_lora, base_weights_hash, merge_lora, save_adapter
from haina.model.quant import (
    QuantConfig,
    QuantLinear,
    dequantize_model,
    dequantize_weight,
    is_quantized,
    quantize_model,
    quantize_weight,
)
from haina.tokenizer.train import train_bpe

TEXT = ["the cat sat on the mat and the dog ran to the park. " * 12,
        "To be, or not to be, that is the question. " * 12, "a stitch in time saves nine, they said. " * 12]
# Llama-style with biases and grouped key/value heads; 128 inputs (384 in the MLP's proj) take no group of 256.
CFG = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, norm="rmsnorm",
                  pos="rope", mlp="swiglu", bias=True)
METHODS = [("int8-weight", 64), ("int8-dynamic", 64), ("int4-weight", 64)]
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)  # non-zero biases, so that dropping one would show
    out = tmp_path_factory.mktemp("quant") / "float"
    save_model(out, model, train_bpe(TEXT, vocab_size=300))
    return out


def _ids() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))


def _linear_bytes(path, quantized: bool) -> int:
    """Bytes of the block Linears' weights in a model.safetensors (integers and scales when quantized)."""
    parts = ("qweight", "scale", "zero") if quantized else ("weight",)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()  # noqa: SIM118
                   if any(k.endswith(f"{lin}.{p}") for lin in LINEARS for p in parts))


@pytest.mark.parametrize("method,group_size", METHODS)
def test_saved_checkpoint_loads_back_to_the_same_model(ckpt, tmp_path, method, group_size):
    out = tmp_path / method
    quantize_command(str(ckpt), str(out), method, group_size=group_size)
    loaded, tok = load_model(out)
    assert tok is not None and is_quantized(loaded)
    assert all(isinstance(loaded.get_submodule(f"blocks.{i}.{lin}"), QuantLinear) for i in range(2) for lin in LINEARS)
    assert type(loaded.lm_head) is torch.nn.Linear and loaded.lm_head.weight.dtype == torch.float32
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # built on the meta device, the head is tied again

    float_model, _ = load_model(ckpt)
    in_memory = copy.deepcopy(float_model)
    names = quantize_model(in_memory, QuantConfig(method=method,
                                                  group_size=group_size if method == "int4-weight" else None))
    assert len(names) == 2 * len(LINEARS)
    x = _ids()
    with torch.no_grad():
        ref, got = float_model(x), loaded(x)
        assert torch.equal(got, in_memory(x))  # the same integers and the same kernels: the very same logits
    rel = float((got - ref).norm() / ref.norm())
    assert rel < (0.02 if method.startswith("int8") else 0.15), rel

    config = (out / "config.yaml").read_text()
    assert f"method: {method}" in config
    assert (f"group_size: {group_size}" if method == "int4-weight" else "group_size: null") in config
    assert read_manifest(out)["command"] == "compress quantize"
    assert "model.safetensors" in json.loads((out / "checksums.json").read_text())["files"]
    ratio = _linear_bytes(ckpt, False) / _linear_bytes(out, True)
    assert ratio > (3.9 if method.startswith("int8") else 7.0), ratio  # bf16 scales: 3.96x and 7.1x here
    assert (out / "model.safetensors").stat().st_size < (ckpt / "model.safetensors").stat().st_size

    if method == "int4-weight":  # `--dtype bfloat16`: the floats are cast, the integers kept
        b16, _ = load_model(out, dtype=torch.bfloat16)
        assert b16.tok_emb.weight.dtype == torch.bfloat16 and b16.blocks[0].attn.qkv.qweight.dtype == torch.uint8
        with torch.no_grad():
            torch.testing.assert_close(b16(x).float(), got, rtol=0.05, atol=0.05)


def test_generate_and_eval_lm_on_a_quantized_checkpoint(ckpt, tmp_path, caplog):
    from haina.eval.lm import eval_lm_command

    out = tmp_path / "q4"
    with caplog.at_level("INFO", logger="haina"):
        quantize_command(str(ckpt), str(out), "int4-weight", group_size=32)
    assert "x smaller" in caplog.text and "agrees with the float model" in caplog.text

    r = subprocess.run([sys.executable, "-m", "haina.cli", "generate", "--checkpoint", str(out), "--prompt", "the cat",
                        "--temperature", "0", "--max-new-tokens", "10", "--ignore-eos", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    model, tok = load_model(out)
    (res,), = TextGenerator(Engine(model, eos_token_id=tok.eos_id), tok).generate(
        ["the cat"], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    assert r.stdout == "the cat" + res.text + "\n"

    with pytest.raises(HainaError) as e:
        quantize_command(str(out), str(tmp_path / "again"), "int8-weight")
    assert str(e.value).startswith(f"{out} is already quantized (int4-weight, group size 32); quantize the float")
    assert "\n" not in str(e.value) and not (tmp_path / "again").exists()

    text = tmp_path / "held_out.txt"
    text.write_text("the dog sat on the mat. to be or not to be. a stitch in time.\n" * 8)
    ppl = {}
    for name, path in (("float", ckpt), ("int4", out)):
        eval_lm_command(str(path), [str(text)], str(tmp_path / f"eval-{name}"), context=32, device="cpu")
        ppl[name] = json.loads((tmp_path / f"eval-{name}" / "report.json").read_text())["ppl"]
    assert abs(ppl["int4"] / ppl["float"] - 1) < 0.1, ppl


def test_a_lora_run_is_merged_before_quantizing(ckpt, tmp_path):
    base, _ = load_model(ckpt)
    adapted = copy.deepcopy(base)
    apply_lora(adapted, LoRAConfig(r=2, targets=("q", "down")))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.3)
    save_adapter(tmp_path / "adapter", adapted, LoRAConfig(r=2, targets=("q", "down")),
                 base_hash=base_weights_hash(base), base=ckpt)
    quantize_command(str(ckpt), str(tmp_path / "q"), "int8-weight", adapter=str(tmp_path / "adapter"))
    quantize_model(merge_lora(adapted), QuantConfig(method="int8-weight"))  # what the command should have done
    loaded, _ = load_model(tmp_path / "q")
    x = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), adapted(x))
    with pytest.raises(HainaError, match="cannot be applied to a quantized checkpoint"):
        load_model(tmp_path / "q", adapter=tmp_path / "adapter")


@pytest.mark.parametrize("args,message", [
    ({"method": "int4-weight", "group_size": 256}, ("--group-size 256 does not divide the 128 inputs of "
                                                    "blocks.0.attn.qkv; choose 32 or 64 or 128")),
    ({"method": "int4-weight", "group_size": 48}, "--group-size 48 is not one int4-weight takes"),
    ({"method": "int3"}, "unknown quantization method 'int3'"),
])
def test_bad_options_are_one_line_errors(ckpt, tmp_path, args, message):
    with pytest.raises(HainaError) as e:
        quantize_command(str(ckpt), str(tmp_path / "out"), **args)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_damaged_quantization_section_is_named_on_load(ckpt, tmp_path):
    out = tmp_path / "q"
    quantize_command(str(ckpt), str(out), "int8-dynamic")
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("method: int8-dynamic", "method: int2"))
    (out / "checksums.json").unlink()  # an edited file, not a damaged one: no checksum to trip first
    with pytest.raises(HainaError, match=r"config.yaml: invalid value for 'quantization.method': 'int2'"):
        load_model(out)


@pytest.mark.parametrize("method,group_size", [("int8-weight", None), ("int8-dynamic", None), ("int4-weight", 32)])
def test_layer_without_a_fast_kernel_computes_the_same(method, group_size):
    # 40 outputs: the CPU int4 kernel wants a multiple of 16, so int4 takes the plain path here.
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = QuantLinear.from_linear(linear, method, group_size)
    x = torch.randn(5, 3, 96)
    with torch.no_grad():
        fast = layer(x)
        layer._kernel.fast = False
        plain = layer(x)
        want = torch.nn.functional.linear(x, layer.dequantized(), linear.bias)
    exact = 0.02 if method == "int8-dynamic" else 1e-5  # int8-dynamic also rounds the activations
    torch.testing.assert_close(plain, want, rtol=exact, atol=exact)
    torch.testing.assert_close(fast, plain, rtol=0.02, atol=0.02)
    model = torch.nn.Sequential(layer)
    dequantize_model(model)
    assert type(model[0]) is torch.nn.Linear
    torch.testing.assert_close(model[0].weight, layer.dequantized())


def test_int4_values_survive_packing():
    w = torch.randn(32, 64)
    stored = quantize_weight(w, "int4-weight", 32)
    assert stored["qweight"].shape == (32, 32) and stored["qweight"].dtype == torch.uint8
    back = dequantize_weight("int4-weight", 32, **stored)
    step = stored["scale"].float().repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= step * 0.51 + 1e-6).all()  # within half a step of the group's grid


def test_commands_that_need_float_weights_refuse_a_quantized_checkpoint(ckpt, tmp_path, capsys):
    from haina.cli import main

    quantize_command(str(ckpt), str(tmp_path / "q"), method="int8-weight")
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 10)
    capsys.readouterr()
    for argv in (["export", "hf", "--checkpoint", str(tmp_path / "q"), "--out", str(tmp_path / "out")],
                 ["export", "onnx", "--checkpoint", str(tmp_path / "q"), "--out", str(tmp_path / "out")],
                 ["finetune", "sft", "--base", str(tmp_path / "q"), "--data", str(tmp_path / "sft.jsonl"), "--out",
                  str(tmp_path / "out"), "--train.device=cpu"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("quantized" in err[0] or "QuantLinear" in err[0]), err
        assert not (tmp_path / "out").exists()
