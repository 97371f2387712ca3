"""Llama layout: haina and transformers agree on logits (1e-4, fp32) and greedy tokens, both directions."""

from __future__ import annotations

import pytest
import torch
from hf_parity_helpers import (
    PROMPTS,
    VOCAB,
    assert_logits_close,
    haina_greedy,
    hf_greedy,
    llama,
    random_haina,
    randomize_hf,
    tokens,
)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from haina.export.hf import export_hf, import_hf

EXPORT_CONFIGS = {
    "mha-untied": llama(tie_embeddings=False),
    "gqa-tied-theta": llama(n_head=6, n_kv_head=2, n_embd=96, rope_theta=500000.0, norm_eps=1e-6),
    "mqa-odd-heads": llama(n_head=3, n_kv_head=1, n_embd=48, intermediate_size=80, tie_embeddings=False),
    "bias": llama(bias=True, n_layer=3),
}


@pytest.mark.parametrize("name", list(EXPORT_CONFIGS))
def test_llama_export_matches_transformers(name, tmp_path):
    cfg = EXPORT_CONFIGS[name]
    model = random_haina(cfg)
    export_hf(model, None, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.config.num_key_value_heads == cfg.kv_heads
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert_logits_close(model, hf.eval(), tokens())
    if name in ("gqa-tied-theta", "mqa-odd-heads"):  # generation is slower: two representative configs
        assert haina_greedy(model, PROMPTS) == hf_greedy(hf, PROMPTS)


IMPORT_CONFIGS = {
    "gqa": {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 112,
            "rope_theta": 20000.0, "tie_word_embeddings": False},
    "mqa-tied": {"num_attention_heads": 5, "num_key_value_heads": 1, "hidden_size": 80, "intermediate_size": 96,
                 "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    "mha-bias": {"num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64, "attention_bias": True,
                 "mlp_bias": True},
}


def _hf_llama(**kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, initializer_range=0.3,
                      bos_token_id=0, eos_token_id=1, **kw)
    model = LlamaForCausalLM(cfg)
    randomize_hf(model)
    return model


@pytest.mark.parametrize("name", list(IMPORT_CONFIGS))
def test_llama_import_matches_transformers(name, tmp_path):
    hf = _hf_llama(**IMPORT_CONFIGS[name])
    hf.save_pretrained(tmp_path / "hf")
    model, tokenizer = import_hf(tmp_path / "hf")
    assert tokenizer is None  # none was saved
    assert model.cfg.kv_heads == hf.config.num_key_value_heads
    assert model.cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert_logits_close(model, hf, tokens())
    if name == "gqa":
        assert haina_greedy(model, PROMPTS) == hf_greedy(hf, PROMPTS)


def test_llama_import_sharded_and_pickled(tmp_path):
    hf = _hf_llama(**IMPORT_CONFIGS["gqa"])
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, _ = import_hf(tmp_path / "sharded")
    assert_logits_close(model, hf, tokens())
    # The legacy pickle format, read with weights_only=True.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(hf.config.to_json_string())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model, _ = import_hf(tmp_path / "bin")
    assert_logits_close(model, hf, tokens())


def test_llama_round_trip_is_exact(tmp_path):
    model = random_haina(EXPORT_CONFIGS["gqa-tied-theta"])
    export_hf(model, None, tmp_path / "hf")
    back, _ = import_hf(tmp_path / "hf")
    assert back.cfg == model.cfg
    for k, v in model.weights().items():
        assert torch.equal(back.weights()[k], v), k


def test_mistral_without_sliding_window_imports_as_llama(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          sliding_window=None, initializer_range=0.3, bos_token_id=0,
                                          eos_token_id=1))
    randomize_hf(hf)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = import_hf(tmp_path / "hf")
    assert model.cfg.pos == "rope" and model.cfg.kv_heads == 2
    assert_logits_close(model, hf, tokens())
