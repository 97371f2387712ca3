"""`haina eval lm` against transformers: the same sliding-window perplexity on a model exported with `export hf`.

The reference is the loop of Hugging Face's guide "Perplexity of fixed-length models", written here
independently: one window at a time, `labels` masked to -100 before the targets, the model's own
shifted loss. One correction: the guide weights each window's mean loss by `valid labels - 1`, but when
windows overlap the first label is already masked, so the loss averaged `valid labels` tokens; the
reference counts the labels the loss really averaged (the same thing where windows do not overlap).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from haina.cli import main
from haina.data.shards import TokenShards
from haina.data.tokenize import tokenize_to_shards
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.tokenizer.train import train_bpe

DOCS = [f"Document {i}: the quick brown fox {i} jumps over {i * 7 % 11} lazy dogs; café ✓ naïve. " * (2 + i % 3)
        for i in range(24)]
LAYOUTS = {
    "gpt2": {},
    "llama": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 1},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Token shards of DOCS (no test split: eval lm falls back to val) written with a small byte-level BPE."""
    tok = train_bpe(DOCS, vocab_size=300)
    out = tmp_path_factory.mktemp("parity-lm") / "shards"
    tokenize_to_shards(DOCS, tok, out, val_fraction=0.5)
    return out, tok


@pytest.fixture(scope="module", params=list(LAYOUTS))
def exported(request, shards, tmp_path_factory):
    """(haina checkpoint, its `haina export hf` directory) of a random model, norms and biases off their init."""
    _, tok = shards
    cfg = ModelConfig(vocab_size=tok.vocab_size + 3, block_size=40, n_layer=2, n_head=2, n_embd=32, init_std=0.2,
                      **LAYOUTS[request.param])
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp(f"parity-lm-{request.param}")
    save_model(root / "ckpt", model, tok)
    assert main(["export", "hf", "--checkpoint", str(root / "ckpt"), "--out", str(root / "hf")]) == 0
    return root / "ckpt", root / "hf"


def reference_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """(total NLL, tokens scored) by the guide's loop over ids (1, T), one window per forward pass."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        counted = int((target_ids[:, 1:] != -100).sum())  # the labels left after the model's own shift
        if counted:
            nll_sum += float(loss) * counted
            n_tokens += counted
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize("context, stride", [(32, 12), (None, None), (16, 1)])
def test_eval_lm_equals_transformers_reference(exported, shards, tmp_path, context, stride):
    ckpt, hf_dir = exported
    data, _ = shards
    args = ["eval", "lm", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r"),
            "--device", "cpu", "--batch-size", "3"]
    args += ["--context", str(context)] if context else []
    args += ["--stride", str(stride)] if stride else []
    if stride == 1:
        args += ["--limit-tokens", "60"]  # a window per token: keep it short
    assert main(args) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["details"]["split"] == "val"

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(TokenShards(data, "val").window(0, len(TokenShards(data, "val"))))[None]
    if stride == 1:
        ids = ids[:, :60]
    block = 40
    nll, n = reference_nll(hf, ids, context or block, stride or context or block)
    assert report["tokens"] == n
    assert report["loss"] == pytest.approx(nll / n, rel=1e-4)
    assert report["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert report["loss"] > 1.0  # a random model: far from a trivially small loss


def test_non_overlapping_windows_match_the_guide_formula_exactly(exported, shards, tmp_path):
    """With stride == context the guide's own count (valid labels - 1) is right; the numbers agree with it too."""
    ckpt, hf_dir = exported
    data, _ = shards
    assert main(["eval", "lm", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--device", "cpu", "--context", "24", "--stride", "24"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(TokenShards(data, "val").window(0, len(TokenShards(data, "val"))))[None]
    nll_sum, n_tokens = 0.0, 0
    for begin in range(0, ids.size(1), 24):
        window = ids[:, begin:begin + 24]
        if window.size(1) < 2:
            break
        with torch.no_grad():
            loss = hf(window, labels=window.clone()).loss
        nll_sum += float(loss) * (window.numel() - 1)
        n_tokens += window.numel() - 1
    assert report["tokens"] == n_tokens
    assert report["ppl"] == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-4)
