"""Shared pieces of the Hugging Face parity tests: random models, logits and greedy decoding on both sides."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests build every model locally; never reach the hub
transformers = pytest.importorskip("transformers")

from haina.generate import Engine, SamplingParams
from haina.model import ModelConfig, Transformer

VOCAB = 97  # odd on purpose: no accidental alignment of shapes
NEW_TOKENS = 12
# Prompts of different lengths, decoded together by the engine (so the batch path is checked too).
PROMPTS = [[5, 17, 3, 88, 41, 2, 9], [60], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]]


def llama(**kw) -> ModelConfig:
    base = {"vocab_size": VOCAB, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64, "norm": "rmsnorm",
            "pos": "rope", "mlp": "swiglu", "bias": False, "init_std": 0.3}
    return ModelConfig(**{**base, **kw})


def gpt2(**kw) -> ModelConfig:
    base = {"vocab_size": VOCAB, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64, "init_std": 0.3}
    return ModelConfig(**{**base, **kw})


def random_haina(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A random model whose norms and biases are not at their trivial init (so their mapping is checked)."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def randomize_hf(model) -> None:
    """transformers initializes norms to 1 and biases to 0; perturb them so their mapping is checked."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()


def tokens(B: int = 2, T: int = 23, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(haina_model: Transformer, hf_model, x: torch.Tensor) -> None:
    with torch.no_grad():
        ours = haina_model(x)
        theirs = hf_model(input_ids=x).logits
    assert ours.shape == theirs.shape
    # Sanity: the logits are far from uniform, so an agreement within 1e-4 means something.
    assert ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


def haina_greedy(model: Transformer, prompts: list[list[int]], new: int = NEW_TOKENS) -> list[list[int]]:
    engine = Engine(model, max_batch_size=len(prompts), eos_token_id=None)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0))
    return [r[0].token_ids for r in results]


def hf_greedy(model, prompts: list[list[int]], new: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' own greedy search, one prompt at a time, with end-of-sequence disabled."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = []
    for p in prompts:
        x = torch.tensor([p])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                               min_new_tokens=new)
        out.append(y[0, len(p):].tolist())
    return out
