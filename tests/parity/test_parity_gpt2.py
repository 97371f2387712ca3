"""GPT-2 layout: haina and transformers agree on logits (1e-4, fp32) and greedy tokens, both directions."""

from __future__ import annotations

import pytest
import torch
from hf_parity_helpers import (
    PROMPTS,
    VOCAB,
    assert_logits_close,
    gpt2,
    haina_greedy,
    hf_greedy,
    random_haina,
    randomize_hf,
    tokens,
)
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from haina.export.hf import export_hf, import_hf

EXPORT_CONFIGS = {
    "tied": gpt2(),
    "untied-odd-heads": gpt2(n_head=3, n_embd=48, intermediate_size=100, tie_embeddings=False, n_layer=3),
    "no-bias": gpt2(bias=False, norm_eps=1e-6),  # exported with zero biases
}


@pytest.mark.parametrize("name", list(EXPORT_CONFIGS))
def test_gpt2_export_matches_transformers(name, tmp_path):
    cfg = EXPORT_CONFIGS[name]
    model = random_haina(cfg)
    export_hf(model, None, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(hf, GPT2LMHeadModel)
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == cfg.tie_embeddings
    assert_logits_close(model, hf.eval(), tokens())
    if name != "no-bias":
        assert haina_greedy(model, PROMPTS) == hf_greedy(hf, PROMPTS)


IMPORT_CONFIGS = {
    "tied": {"n_head": 4, "n_embd": 64},
    "untied-odd-heads-inner": {"n_head": 3, "n_embd": 48, "n_inner": 72, "tie_word_embeddings": False,
                               "layer_norm_epsilon": 1e-6},
}


@pytest.mark.parametrize("name", list(IMPORT_CONFIGS))
def test_gpt2_import_matches_transformers(name, tmp_path):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=2, n_positions=64, initializer_range=0.3,
                                    bos_token_id=0, eos_token_id=0, **IMPORT_CONFIGS[name]))
    randomize_hf(hf)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = import_hf(tmp_path / "hf")
    assert model.cfg.block_size == 64 and model.cfg.pos == "learned"
    assert_logits_close(model, hf, tokens())
    assert haina_greedy(model, PROMPTS) == hf_greedy(hf, PROMPTS)


def test_gpt2_base_model_without_head_imports_when_tied(tmp_path):
    """A bare GPT2Model saves keys without the `transformer.` prefix and no head; tied, that is complete."""
    from transformers import GPT2Model

    torch.manual_seed(0)
    base = GPT2Model(GPT2Config(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, n_positions=32,
                                bos_token_id=0, eos_token_id=0))
    base.eval().save_pretrained(tmp_path / "hf")
    model, _ = import_hf(tmp_path / "hf")
    with torch.no_grad():
        x = tokens(T=9)
        hidden = base(input_ids=x).last_hidden_state
        torch.testing.assert_close(model.hidden_states(x), hidden, atol=1e-5, rtol=1e-5)
