"""`haina serve --dtype bfloat16`: the served model holds bfloat16 weights and answers; float16 on a CPU is refused
before the port is bound."""

import subprocess
import sys

import torch


def test_bfloat16_server_answers(tiny_ckpt, launch, one_torch_thread):
    with launch(tiny_ckpt, dtype="bfloat16", served_model_name="tiny") as server:
        r = server.post("/v1/completions", {"model": "tiny", "prompt": "the cat", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        assert next(server.service.loop.engine.model.parameters()).dtype == torch.bfloat16


def test_float16_on_cpu_is_one_line_before_binding(tiny_ckpt):
    r = subprocess.run([sys.executable, "-m", "haina.cli", "serve", "--checkpoint", str(tiny_ckpt), "--device", "cpu",
                        "--dtype", "float16", "--port", "0"], check=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "float16 needs a CUDA or MPS device" in lines[0], r.stderr
