"""Encoders (`causal: false`): every token sees the whole sequence, padding keys are masked, and an encoder is
refused in one line wherever text would be generated or a causal Hugging Face model written."""

import numpy as np
import pytest
import torch

from haina.cli import main
from haina.core.errors import HainaError
from haina.generate.engine import Engine
from haina.model import PRESETS, ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.model.classifier import Classifier, ClassifierConfig
from haina.model.hf import hf_layout
from haina.model.params import count_params
from haina.tokenizer.train import train_bpe

VARIANTS = {
    "bert-like": {"pos": "learned"},
    "llama-like": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 2},
}
ENCODER_ERROR = "error: an encoder (causal: false) cannot generate text"


def tiny(causal: bool, **kw) -> ModelConfig:
    return ModelConfig.from_name("tiny", vocab_size=97, block_size=32, n_layer=2, n_embd=32, causal=causal, **kw)


def one_line(capsys, start: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start), err
    return err[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_encoder_sees_later_tokens_and_a_decoder_does_not(variant):
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    later = x.clone()
    later[:, 9] = (later[:, 9] + 1) % 97  # a token after position 0 changes
    for causal in (True, False):
        torch.manual_seed(0)
        model = Transformer(tiny(causal, **VARIANTS[variant])).eval()
        with torch.no_grad():
            a, b = model(x), model(later)
        if causal:  # no position before the change can see it
            torch.testing.assert_close(a[:, :9], b[:, :9], atol=0, rtol=0)
        else:
            assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4)
        assert not torch.allclose(a[:, 9], b[:, 9])  # the changed position itself always differs


def test_the_field_defaults_to_causal_and_round_trips():
    assert ModelConfig().causal is True
    cfg = ModelConfig.from_dict({"preset": "tiny", "causal": False})
    assert cfg.causal is False and ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in ModelConfig().to_dict().items() if k != "causal"}  # a config.yaml from before the field
    assert ModelConfig.from_dict(old).causal is True


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_key_padding_mask_makes_a_padded_batch_equal_each_row_alone(variant):
    torch.manual_seed(0)
    model = Transformer(tiny(False, **VARIANTS[variant])).eval()
    rows = [torch.randint(1, 97, (n,)) for n in (5, 11, 8)]
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = r
    real = torch.arange(T)[None] < torch.tensor([len(r) for r in rows])[:, None]  # (B, T)
    mask = real[:, None, None, :].expand(len(rows), 1, T, T)  # every query sees the real keys only
    with torch.no_grad():
        padded = model.hidden_states(idx, attn_mask=mask)
        unmasked = model.hidden_states(idx)
        for i, r in enumerate(rows):
            alone = model.hidden_states(r[None])[0]
            torch.testing.assert_close(padded[i, : len(r)], alone, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(padded).all()  # padded queries still see real keys: no empty softmax row
    # Without the mask the short rows would read their padding: the mask is what makes them equal.
    assert not torch.allclose(unmasked[0, :5], padded[0, :5], atol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_an_encoder_classifier_is_unchanged_by_padding(pooling):
    tok = train_bpe(["the cat sat on the mat, a good film, a bad film " * 20], vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=300, block_size=32, n_layer=2, n_embd=64, causal=False)
    clf = Classifier(Transformer(cfg), ClassifierConfig(labels=["a", "b"], pooling=pooling), tok).eval()
    texts = ["a good film", "bad", "", "the cat sat on the mat and the dog ran", "x"]
    batched = clf.predict_proba(texts, batch_size=5)
    alone = np.concatenate([clf.predict_proba([t], batch_size=1) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_presets():
    small, bert = PRESETS["encoder-small"], PRESETS["bert-base"]
    assert not small.causal and not bert.causal
    assert (small.n_layer, small.n_embd, small.n_head, small.norm, small.pos, small.mlp) == \
        (4, 256, 4, "layernorm", "learned", "gelu")
    assert (bert.n_layer, bert.n_embd, bert.n_head, bert.ffn_dim, bert.block_size, bert.vocab_size) == \
        (12, 768, 12, 3072, 512, 30522)
    assert bert.norm_eps == 1e-12 and bert.bias and bert.pos == "learned" and bert.mlp == "gelu"
    assert 105e6 < count_params(bert)["total"] < 112e6  # BERT-base: 110M with its token types and pooler


def test_generation_is_refused_in_one_line(tmp_path, capsys):
    model = Transformer(tiny(False)).eval()
    for call in (lambda: Engine(model), lambda: model.decode(torch.zeros(1, 1, dtype=torch.long),
                                                             positions=torch.zeros(1, 1, dtype=torch.long),
                                                             cache=object()),
                 lambda: model(torch.zeros(1, 2, dtype=torch.long), cache=object())):
        with pytest.raises(HainaError, match="^an encoder \\(causal: false\\) cannot generate text"):
            call()
    tok = train_bpe(["some text to learn a few merges from " * 20], vocab_size=300)
    save_model(tmp_path / "enc", Transformer(ModelConfig.from_name("tiny", vocab_size=320, block_size=32, n_layer=1,
                                                                   causal=False)), tok)
    assert main(["generate", "--checkpoint", str(tmp_path / "enc"), "--prompt", "some", "--max-new-tokens", "4"]) == 2
    one_line(capsys, ENCODER_ERROR)


def test_hf_export_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(HainaError, match="no Llama or GPT-2 equivalent"):
        hf_layout(tiny(False))
    assert hf_layout(tiny(True)) == "gpt2"
    tok = train_bpe(["some text to learn a few merges from " * 20], vocab_size=300)
    save_model(tmp_path / "enc", Transformer(ModelConfig.from_name("tiny", vocab_size=320, block_size=32, n_layer=1,
                                                                   causal=False)), tok)
    assert main(["export", "hf", "--checkpoint", str(tmp_path / "enc"), "--out", str(tmp_path / "hf")]) == 2
    one_line(capsys, "error: an encoder (causal: false) has no Llama or GPT-2 equivalent")
    assert not (tmp_path / "hf").exists()
