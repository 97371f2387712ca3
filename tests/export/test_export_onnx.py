"""`haina export onnx` and `haina generate --backend onnxruntime`: parity with haina's engine, the CLI, the errors.

Two exports in all (each takes seconds): a Llama-style model through the CLI, a GPT-2-style one in process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from haina.core.errors import HainaError
from haina.core.output import read_manifest
from haina.export import onnx as onnx_export
from haina.export.onnx import export_onnx, export_onnx_command
from haina.generate import Engine, SamplingParams
from haina.generate.command import generate_command
from haina.generate.onnx_backend import SPEC_FILE, OnnxDecoder, OnnxEngine, load_onnx_engine
from haina.generate.text import TextGenerator
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.model.lora import LoRAConfig, apply_lora, base_weights_hash, has_lora, save_adapter
from haina.tokenizer import Tokenizer
from haina.tokenizer.train import train_bpe

# init_std 0.3 gives peaked, varied next-token distributions: greedy paths that do not fall into one repeated token.
LLAMA = ModelConfig(vocab_size=300, block_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, norm="rmsnorm",
                    pos="rope", mlp="swiglu", bias=False, init_std=0.3)
GPT2 = ModelConfig(vocab_size=300, block_size=96, n_layer=2, n_head=4, n_embd=64, norm="layernorm", pos="learned",
                   mlp="gelu", bias=True, init_std=0.3)
PROMPT = "a small corpus"


def _haina(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haina.cli", *args], check=False, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=180)


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-zero biases, so that a graph that dropped them would show
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(["a small corpus for a small tokenizer, " * 30] * 3, vocab_size=290)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tok) -> dict[str, tuple[Transformer, object]]:
    """{kind: (model, export dir)}: Llama-style through the CLI, GPT-2-style through export_onnx."""
    root = tmp_path_factory.mktemp("onnx")
    llama, gpt2 = _model(LLAMA), _model(GPT2)
    save_model(root / "llama-ckpt", llama, tok)
    # The CLI's export runs in a subprocess beside the in-process one: its start-up (imports) overlaps that work.
    cli = subprocess.Popen([sys.executable, "-m", "haina.cli", "export", "onnx", "--checkpoint",
                            str(root / "llama-ckpt"), "--out", str(root / "llama")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    export_onnx(gpt2, tok, root / "gpt2")
    stdout, stderr = cli.communicate(timeout=180)
    assert cli.returncode == 0, stderr
    assert "checked with ONNX Runtime" in stderr and stdout == ""
    return {"llama": (llama, root / "llama"), "gpt2": (gpt2, root / "gpt2"), "llama-ckpt": (llama, root / "llama-ckpt")}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefill_and_64_decode_steps_match_haina(exports, tok, kind):
    model, path = exports[kind]
    prompt = tok.encode(PROMPT)
    # The graph alone: logits of every prompt position, then of 64 decode steps, against the model's forward (one
    # pass over the whole sequence: under the causal mask, row i is the forward of the first i + 1 tokens).
    decoder = OnnxDecoder(path, device="cpu")
    logits, cache = decoder(np.array([prompt]), decoder.empty_cache(1))
    steps, seq = [logits[0]], list(prompt)
    for _ in range(64):
        seq.append(int(logits[0, -1].argmax()))
        logits, cache = decoder(np.array([seq[-1:]]), cache)
        steps.append(logits[0])
    assert cache[0].shape == (1, model.cfg.kv_heads, len(seq), model.cfg.head_dim)
    with torch.no_grad():
        want = model(torch.tensor([seq]))[0]
    torch.testing.assert_close(torch.from_numpy(np.concatenate(steps)), want, atol=1e-4, rtol=0)
    assert len(set(seq[len(prompt):])) > 3  # a varied path, not one token repeated

    # The engines: same greedy tokens, and every token's full distribution within 1e-4 of haina's engine.
    params = SamplingParams(max_new_tokens=65, temperature=0.0, ignore_eos=True, logprobs=model.cfg.vocab_size)
    ours = load_onnx_engine(path, device="cpu")[0].generate([prompt], params)[0][0]
    ref = Engine(model, max_batch_size=2).generate([prompt], params)[0][0]
    assert ours.token_ids == ref.token_ids == seq[len(prompt):] + [int(logits[0, -1].argmax())]
    for a, b in zip(ours.logprobs, ref.logprobs):
        got, want = dict(a.top), dict(b.top)
        assert abs(a.logprob - b.logprob) < 1e-4
        assert max(abs(got[t] - want[t]) for t in want) < 1e-4


def test_seeded_sampling_matches_haina(exports, tok):
    model, path = exports["gpt2"]
    prompt = tok.encode(PROMPT)
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1,
                            seed=7, n=3, ignore_eos=True)
    ours = load_onnx_engine(path, device="cpu")[0].generate([prompt], params)[0]
    ref = Engine(model, max_batch_size=4).generate([prompt], params)[0]
    assert [r.token_ids for r in ours] == [r.token_ids for r in ref]
    assert len({tuple(r.token_ids) for r in ours}) == 3  # seed + i per sample


def test_export_directory_and_dynamic_batch(exports, tok):
    model, path = exports["llama"]
    assert read_manifest(path)["command"] == "export onnx"
    assert Tokenizer.load(path / "tokenizer") == tok
    spec = json.loads((path / SPEC_FILE).read_text())
    assert spec["opset"] >= 18 and spec["dtype"] == "float32" and spec["eos_token_id"] == tok.eos_id
    assert spec["cache"]["key_inputs"] == ["past_key.0", "past_key.1"]
    assert spec["cache"]["value_outputs"] == ["present_value.0", "present_value.1"]
    decoder = OnnxDecoder(path, device="cpu")
    dims = {i.name: i.shape for i in decoder.session.get_inputs()}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["past_key.1"] == ["batch", 2, "past_length", 16]
    # Three rows of one length, prefilled and then decoded together.
    ids = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    first, cache = decoder(ids[:, :5].numpy(), decoder.empty_cache(3))
    rest, _ = decoder(ids[:, 5:].numpy(), cache)
    with torch.no_grad():
        want = model(ids)
    torch.testing.assert_close(torch.from_numpy(np.concatenate([first, rest], axis=1)), want, atol=1e-4, rtol=0)


def test_cli_generate_with_onnxruntime(exports, tok):
    model, path = exports["llama"]
    r = _haina("generate", "--backend", "onnxruntime", "--checkpoint", str(path), "--prompt", PROMPT,
               "--temperature", "0", "--max-new-tokens", "20", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    want = TextGenerator(Engine(model, eos_token_id=tok.eos_id), tok).generate(
        [PROMPT], SamplingParams(max_new_tokens=20, temperature=0.0))[0][0].text
    assert r.stdout == PROMPT + want + "\n"
    # The export is not a checkpoint: the plain backend says which one to use, in one line.
    r = _haina("generate", "--checkpoint", str(path), "--prompt", PROMPT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "--backend onnxruntime" in r.stderr


def test_generate_errors(exports, tmp_path):
    _, path = exports["llama"]
    _, ckpt = exports["llama-ckpt"]

    def gen(checkpoint, **kw):
        return generate_command(str(checkpoint), prompt=PROMPT, backend="onnxruntime", device="cpu", **kw)

    with pytest.raises(HainaError, match="needs a directory written by `haina export onnx`"):
        gen(ckpt)
    with pytest.raises(HainaError, match="beam search"):
        gen(path, num_beams=2)
    with pytest.raises(HainaError, match="merge the adapters in at export"):
        gen(path, adapter=str(ckpt))
    with pytest.raises(HainaError, match="float32, fixed at export"):
        gen(path, dtype="bfloat16")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(HainaError, match="ONNX Runtime cannot load"):
        OnnxDecoder(broken, device="cpu")
    (broken / SPEC_FILE).write_text("{")
    with pytest.raises(HainaError, match="not valid JSON"):
        OnnxDecoder(broken)
    (broken / SPEC_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(HainaError, match="not a haina ONNX export description"):
        OnnxDecoder(broken)
    engine = OnnxEngine(OnnxDecoder(path, device="cpu"))
    with pytest.raises(HainaError, match="no LoRA adapters"):
        engine.add_request("a", [1, 2], SamplingParams(), adapter=0)
    with pytest.raises(HainaError, match="context holds 96"):
        engine.add_request("b", list(range(96)), SamplingParams())


def test_export_refuses_what_it_cannot_express(tmp_path, tok):
    out = tmp_path / "out"
    with pytest.raises(HainaError, match="--opset 17"):
        export_onnx_command(str(tmp_path / "nowhere"), str(out), opset=17)
    lora = _model(GPT2)
    apply_lora(lora, LoRAConfig(r=2))
    with pytest.raises(HainaError, match=r"LoRA adapters \(merge them first"):
        export_onnx(lora, tok, out)

    class Int8Linear(torch.nn.Module):  # what a quantization method might put in a Linear's place
        def forward(self, x):
            return x

    odd = _model(GPT2)
    odd.blocks[1].mlp.fc = Int8Linear()
    with pytest.raises(HainaError, match="Int8Linear layer at blocks.1.mlp.fc"):
        export_onnx(odd, tok, out)
    with pytest.raises(HainaError, match="unknown dtype"):
        export_onnx(_model(GPT2), tok, out, dtype="int8")
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_a_lora_run_is_merged_before_export(tmp_path, tok, monkeypatch):
    base = _model(GPT2)
    save_model(tmp_path / "base", base, tok)
    tuned = _model(GPT2)
    apply_lora(tuned, LoRAConfig(r=2, targets=("all",)))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".lora." in name:
                p.normal_(0.0, 0.2)
    save_adapter(tmp_path / "adapter", tuned, LoRAConfig(r=2), base_hash=base_weights_hash(base))
    got = {}
    monkeypatch.setattr(onnx_export, "export_onnx", lambda model, *a, **kw: got.update(model=model))
    export_onnx_command(str(tmp_path / "base"), str(tmp_path / "out"), adapter=str(tmp_path / "adapter"))
    x = torch.randint(0, 300, (1, 9))
    assert not has_lora(got["model"])
    with torch.no_grad():
        torch.testing.assert_close(got["model"](x), tuned(x), atol=1e-3, rtol=1e-4)  # merged: rounded once more
