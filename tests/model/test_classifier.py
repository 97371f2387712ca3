"""Classifier heads: pooling that ignores padding, and checkpoints (full and LoRA) that keep the head."""

import json

import numpy as np
import pytest
import torch

from haina.core.errors import HainaError
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.model.classifier import (
    CLASSIFIER_CONFIG,
    CLASSIFIER_WEIGHTS,
    Classifier,
    ClassifierConfig,
    load_classifier,
    pad_batch,
    save_classifier,
)
from haina.model.lora import LoRAConfig, apply_lora, base_weights_hash
from haina.model.packed import unpack_linears
from haina.tokenizer.train import train_bpe

TEXTS = ["a good film", "bad", "", "the cat sat on the mat and the dog ran " * 3, "good good bad", "x"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["the cat sat on the mat, a good film, a bad film " * 20], vocab_size=300)


def _model(tok, pooling="last", multi_label=False, seed=0, **changes) -> Classifier:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", vocab_size=300, block_size=32, n_layer=2, n_embd=64, n_head=4, **changes)
    labels = ["neg", "pos", "neutral"]
    return Classifier(Transformer(cfg), ClassifierConfig(labels=labels, multi_label=multi_label, pooling=pooling),
                      tok).eval()


def test_config_checks_its_fields():
    assert ClassifierConfig(labels=["a", "b"]).labels == ("a", "b")
    assert ClassifierConfig.from_dict({"labels": ["a", "b"], "pooling": "mean"}).pooling == "mean"
    for bad, match in [({"labels": ["a"]}, "at least 2"), ({"labels": ["a", "a"]}, "repeat"),
                       ({"labels": ["a", "b"], "pooling": "max"}, "pooling")]:
        with pytest.raises(HainaError, match=match):
            ClassifierConfig.from_dict(bad)
    assert ClassifierConfig(labels=["only"], multi_label=True).num_labels == 1


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_padding_never_changes_a_result(tok, pooling):
    model = _model(tok, pooling)
    batched = model.predict_proba(TEXTS, batch_size=4)
    alone = np.concatenate([model.predict_proba([t], batch_size=1) for t in TEXTS])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(batched.sum(1), 1.0, atol=1e-5)
    # Padding with another id changes nothing either (it is never attended to or pooled).
    ids, _ = model.encode(TEXTS)
    np.testing.assert_allclose(model.predict_ids(ids, 6, pad_id=0), model.predict_ids(ids, 6, pad_id=7), atol=1e-5)


def test_last_pooling_reads_the_end_of_text_token(tok):
    model = _model(tok, "last")
    ids, _ = model.encode(["good film"])
    assert ids[0][-1] == tok.eos_id
    idx, lengths = pad_batch(ids)
    with torch.no_grad():
        want = model.backbone.hidden_states(idx)[0, -1]
        np.testing.assert_allclose(model.pool(idx, lengths)[0].numpy(), want.numpy(), atol=1e-6)


def test_long_texts_are_cut_to_the_context(tok):
    model = _model(tok)
    ids, cut = model.encode(["the cat sat on the mat " * 50, "short"])
    assert cut == 1 and len(ids[0]) == 32 and ids[0][-1] == tok.eos_id
    assert model.predict_proba(["the cat sat on the mat " * 50]).shape == (1, 3)


def test_multi_label_gives_independent_probabilities(tok):
    p = _model(tok, multi_label=True).predict_proba(TEXTS)
    assert p.shape == (len(TEXTS), 3) and ((p > 0) & (p < 1)).all()


def test_save_load_round_trip_gives_identical_probabilities(tok, tmp_path):
    model = _model(tok, "mean")
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)  # a head that is not the initial one
    save_classifier(tmp_path / "clf", model, extra_config={"note": {"x": 1}})
    files = json.loads((tmp_path / "clf" / "checksums.json").read_text())["files"]
    assert CLASSIFIER_WEIGHTS in files and CLASSIFIER_CONFIG in files and "model.safetensors" in files
    loaded, tok2 = load_classifier(tmp_path / "clf")
    assert loaded.cfg == model.cfg and tok2 is not None and not loaded.training
    # Loaded for inference, its Linear products go through packed weights (haina.model.packed): equal within
    # float rounding; with the plain products again, bit for bit.
    np.testing.assert_allclose(loaded.predict_proba(TEXTS), model.predict_proba(TEXTS), rtol=1e-5, atol=1e-6)
    unpack_linears(loaded)
    np.testing.assert_array_equal(loaded.predict_proba(TEXTS), model.predict_proba(TEXTS))


def test_lora_checkpoint_keeps_the_whole_head(tok, tmp_path):
    model = _model(tok)
    save_model(tmp_path / "base", model.backbone, tok)
    base_hash = base_weights_hash(model.backbone)
    lora = LoRAConfig(r=2, targets=("q", "v"))
    apply_lora(model.backbone, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name or name.startswith("head."):
                p.normal_(0, 0.5)
    save_classifier(tmp_path / "run", model, lora=lora, base_hash=base_hash, base=tmp_path / "base")
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert (tmp_path / "run" / "adapter.safetensors").is_file() and (tmp_path / "run" / CLASSIFIER_WEIGHTS).is_file()
    want = model.predict_proba(TEXTS)
    loaded, _ = load_classifier(tmp_path / "run")  # the base it records, its adapters, its head
    np.testing.assert_allclose(loaded.predict_proba(TEXTS), want, atol=1e-6)
    # The base named with the adapters on top: the head comes from the adapters' directory.
    loaded, _ = load_classifier(tmp_path / "base", adapter=tmp_path / "run")
    np.testing.assert_allclose(loaded.predict_proba(TEXTS), want, atol=1e-6)


def test_a_checkpoint_without_a_head_is_one_line(tok, tmp_path):
    save_model(tmp_path / "lm", _model(tok).backbone, tok)
    with pytest.raises(HainaError, match="has no classifier head.*haina finetune classify") as e:
        load_classifier(tmp_path / "lm")
    assert "\n" not in str(e.value)


def test_a_damaged_head_is_named(tok, tmp_path):
    save_classifier(tmp_path / "clf", _model(tok))
    with open(tmp_path / "clf" / CLASSIFIER_WEIGHTS, "r+b") as f:
        f.truncate(40)
    with pytest.raises(HainaError, match=CLASSIFIER_WEIGHTS):
        load_classifier(tmp_path / "clf")


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
@pytest.mark.parametrize("layout", [{}, {"pos": "rope", "mlp": "swiglu", "n_head": 4, "n_kv_head": 2}])
def test_a_packed_batch_pools_and_trains_as_the_padded_one(pooling, layout, monkeypatch):
    """Uneven short texts run as one packed row (no padding computed): the same pooled states and gradients."""
    import haina.model.classifier as classifier_module

    cfg = ModelConfig.from_dict({"preset": "tiny", "vocab_size": 64, "block_size": 64, **layout})
    torch.manual_seed(0)
    clf = Classifier(Transformer(cfg), ClassifierConfig(labels=("a", "b", "c"), pooling=pooling))
    lengths = torch.tensor([3, 17, 5, 40, 1, 9])
    idx = torch.randint(1, 64, (6, 40))
    for b, n in enumerate(lengths):
        idx[b, n:] = 0
    assert classifier_module._worth_packing(cfg, 6, 40, lengths)  # 75 real tokens of 240

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clf.zero_grad()
        logits = clf(idx, lengths)
        logits.square().sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in clf.named_parameters() if p.grad is not None}

    packed, packed_grads = run()
    monkeypatch.setattr(classifier_module, "PACK_MAX_FILL", 0.0)  # the padded path
    padded, padded_grads = run()
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_uneven_causal_batches_are_packed():
    from haina.model.classifier import _worth_packing

    causal = ModelConfig.from_dict({"preset": "tiny", "vocab_size": 64, "block_size": 64})
    encoder = ModelConfig.from_dict({"preset": "tiny", "vocab_size": 64, "block_size": 64, "causal": False})
    uneven, even = torch.tensor([3, 40, 2, 5]), torch.tensor([38, 40, 39, 40])
    assert _worth_packing(causal, 4, 40, uneven)
    assert not _worth_packing(causal, 4, 40, even)  # little padding: the padded batch's flash attention wins
    assert not _worth_packing(encoder, 4, 40, uneven)  # bidirectional: another mask
    assert not _worth_packing(causal, 1, 40, torch.tensor([3]))
    assert not _worth_packing(causal, 64, 64, torch.full((64,), 20))  # 1,280 tokens: dense attention too long
