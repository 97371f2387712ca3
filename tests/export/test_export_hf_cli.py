"""`haina export hf` and `haina import hf` through the real CLI, in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.tokenizer.train import train_bpe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _haina(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haina.cli", *args], check=False, capture_output=True, text=True,
                          env=ENV, timeout=120)


def test_export_then_import_round_trip(tmp_path):
    cfg = ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, norm="rmsnorm",
                      pos="rope", mlp="swiglu", bias=False, init_std=0.3)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tok = train_bpe(["a small corpus for a small tokenizer, " * 30] * 3, vocab_size=290)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    save_model(tmp_path / "ckpt", model, tok)

    r = _haina("export", "hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert "LlamaForCausalLM" in r.stderr
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-4, rtol=1e-5)

    r = _haina("import", "hf", "--path", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    back, back_tok = load_model(tmp_path / "back")
    assert back.cfg == cfg
    assert back_tok == tok
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_cli_errors_are_one_line(tmp_path):
    torch.manual_seed(0)
    save_model(tmp_path / "sin", Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2,
                                                         n_embd=16, pos="sinusoidal")))
    r = _haina("export", "hf", "--checkpoint", str(tmp_path / "sin"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: no Hugging Face equivalent for pos=sinusoidal")
    assert "Traceback" not in r.stderr and not (tmp_path / "hf").exists()

    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5"}')
    r = _haina("import", "hf", "--path", str(tmp_path / "t5"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "error: cannot import model_type 't5'; supported: llama, mistral, gpt2, bert" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
