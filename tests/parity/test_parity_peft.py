"""`haina export peft`: PEFT on the `haina export hf` base computes haina's adapted logits (1e-4, fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hf_parity_helpers import assert_logits_close, gpt2, llama, random_haina, tokens
from safetensors.torch import load_file

from haina.core.io import write_json
from haina.export.hf import export_hf
from haina.export.peft import export_peft
from haina.model.checkpoint import save_model
from haina.model.lora import LoRAConfig, apply_lora, base_weights_hash, save_adapter

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM

CASES = {
    "llama-gqa-all": (llama(n_head=4, n_kv_head=2), LoRAConfig(r=4, alpha=8, targets="all")),
    "llama-fc-k-o-rslora": (llama(tie_embeddings=False), LoRAConfig(r=3, alpha=6, targets="fc,k,o", rslora=True)),
    "llama-bias-q-v-down": (llama(bias=True), LoRAConfig(r=2, targets="q,v,down")),
    "gpt2-q-v": (gpt2(), LoRAConfig(r=4, alpha=8, targets="q,v")),
    "gpt2-all-rslora": (gpt2(), LoRAConfig(r=3, alpha=5, targets="all", rslora=True)),
    "gpt2-k-proj-fc": (gpt2(bias=False), LoRAConfig(r=2, targets="k,proj,fc")),
}


def adapted_model(name: str, tmp_path):
    """The case's random model, its base exported for transformers, and its adapter (with random B) saved."""
    cfg, lora = CASES[name]
    model = random_haina(cfg)
    export_hf(model, None, tmp_path / "base")
    base_hash = base_weights_hash(model)
    apply_lora(model, lora)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):  # zero at init: give the adapters something to do
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    save_adapter(tmp_path / "ckpt", model, lora, base_hash=base_hash)
    return model


def load_peft(base_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_peft_adapter_matches_haina(name, tmp_path):
    model = adapted_model(name, tmp_path)
    export_peft(tmp_path / "ckpt", tmp_path / "peft", base_model="my-base")
    hf = load_peft(tmp_path / "base", tmp_path / "peft")
    x = tokens()
    assert_logits_close(model, hf, x)
    with torch.no_grad(), hf.disable_adapter():  # the adapter is what made the agreement non-trivial
        assert (hf(input_ids=x).logits - model(x)).abs().max() > 0.1
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "my-base"
    assert config["fan_in_fan_out"] == name.startswith("gpt2")


def test_llama_keys_and_shapes_are_peft_s(tmp_path):
    adapted_model("llama-gqa-all", tmp_path)
    export_peft(tmp_path / "ckpt", tmp_path / "peft")
    sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    pre = "base_model.model.model.layers.1."
    assert sd[pre + "self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert sd[pre + "self_attn.k_proj.lora_B.weight"].shape == (32, 4)  # 2 kv heads of 16
    assert sd[pre + "mlp.up_proj.lora_B.weight"].shape == (llama().ffn_dim, 4)
    assert len(sd) == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}


def test_gpt2_fused_c_attn_is_block_diagonal(tmp_path):
    model = adapted_model("gpt2-q-v", tmp_path)
    export_peft(tmp_path / "ckpt", tmp_path / "peft")
    sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    A = sd["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    B = sd["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert A.shape == (8, 64) and B.shape == (192, 8)  # q and v: rank 2·4
    assert torch.count_nonzero(B[64:128]) == 0 and torch.count_nonzero(B[:64, 4:]) == 0  # k untouched
    assert torch.equal(B[128:, 4:], model.blocks[0].attn.qkv.lora["v"].B.detach())
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"]
    assert config["rank_pattern"] == {"c_attn": 8} and config["alpha_pattern"] == {"c_attn": 16}


# ---------------------------------------------------------------------------------------- the command
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _haina(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haina.cli", *args], check=False, capture_output=True, text=True,
                          env=ENV, timeout=120)


def test_cli_exports_a_run_s_best_adapter(tmp_path):
    model = adapted_model("gpt2-all-rslora", tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (tmp_path / "ckpt").rename(run / "checkpoints" / "step-0000005")
    write_json(run / "checkpoints" / "index.json", {"latest": "step-0000005", "best": "step-0000005"})
    r = _haina("export", "peft", "--checkpoint", str(run), "--out", str(tmp_path / "peft"))
    assert r.returncode == 0, r.stderr
    assert_logits_close(model, load_peft(tmp_path / "base", tmp_path / "peft"), tokens())
    # Again over its own output: replaced. Over a full checkpoint: one line pointing at `export hf`.
    assert _haina("export", "peft", "--checkpoint", str(run), "--out", str(tmp_path / "peft")).returncode == 0
    save_model(tmp_path / "full", random_haina(gpt2()))
    r = _haina("export", "peft", "--checkpoint", str(tmp_path / "full"), "--out", str(tmp_path / "peft2"))
    assert r.returncode == 2
    assert "full checkpoint without a LoRA adapter" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "peft2").exists()
