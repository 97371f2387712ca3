"""Masked-language-model pretraining: BERT's masking, the loss at masked positions, the mask token, and
`haina pretrain --objective mlm` end to end (the loss falls, a resumed run is bit-exact, and the encoder it
makes fine-tunes with `haina finetune classify`)."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from train_fixtures import char_tokenizer, text_dataset

from haina.cli import main
from haina.core.errors import HainaError
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model
from haina.model.classifier import load_classifier
from haina.tokenizer import Tokenizer
from haina.train.config import PretrainConfig, TrainConfig
from haina.train.mlm import MASK_TOKEN, MLMMasking, mlm_loss, with_mask_token
from haina.train.pretrain import load_pretrain_config

RECIPE = {
    "model": {"preset": "encoder-small", "vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "data": {"dir": "unused"},
    "train": {"objective": "mlm", "batch_size": 8, "max_steps": 8, "decay_steps": 8, "warmup_steps": 2,
              "lr": 3e-3, "eval_every": 4, "eval_batches": 4, "log_every": 3, "save_every": 0, "device": "cpu",
              "tensorboard": False, "grad_accum": 2},
}


def masking(vocab: int = 50, specials: tuple[int, ...] = (0, 1), mask_id: int = 49, p: float = 0.15) -> MLMMasking:
    ordinary = [i for i in range(vocab) if i not in (*specials, mask_id)]
    return MLMMasking(mask_id=mask_id, special_ids=torch.tensor([*specials, mask_id]),
                      replacements=torch.tensor(ordinary), mask_prob=p)


def test_masking_follows_bert():
    m = masking()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 49, (64, 400), generator=g)
    ids[:, ::25] = 0  # an end-of-text every 25 tokens, and another special token here and there
    ids[:, 7::50] = 1
    inputs, labels = m(ids, torch.Generator().manual_seed(1))
    chosen = labels != -100
    special = (ids == 0) | (ids == 1)
    ordinary_per_row = (~special).sum(1)
    # Exactly round(15 %) of each row's ordinary positions; a special token is never chosen nor changed.
    assert torch.equal(chosen.sum(1), (ordinary_per_row * 0.15).round().long())
    assert not (chosen & special).any() and torch.equal(inputs[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    # Of the chosen: 80 % the mask token, 10 % a random ordinary token, 10 % unchanged (within sampling noise;
    # a random draw equal to the original counts as unchanged, about 1/47 of the 10 %).
    n = int(chosen.sum())
    masked = (inputs[chosen] == 49).float().mean()
    kept = (inputs[chosen] == ids[chosen]).float().mean()
    swapped = 1 - masked - kept
    assert n > 3000 and abs(masked - 0.8) < 0.025 and abs(kept - 0.1) < 0.02 and abs(swapped - 0.1) < 0.02
    replaced = chosen & (inputs != 49) & (inputs != ids)
    assert not torch.isin(inputs[replaced], torch.tensor([0, 1, 49])).any()
    # Deterministic with the generator's seed; another seed masks elsewhere.
    again = m(ids, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    assert not torch.equal(m(ids, torch.Generator().manual_seed(2))[1], labels)


def test_every_row_has_a_target_and_the_generator_advances_the_same_whatever_the_data():
    m = masking()
    short = torch.tensor([[0, 0, 5, 0], [0, 0, 0, 0]])  # one ordinary token; none at all
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    _, labels = m(short, g1)
    assert labels[0].tolist() == [-100, -100, 5, -100] and (labels[1] == -100).all()
    m(torch.randint(2, 49, (2, 4)), g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_the_loss_is_the_mean_cross_entropy_at_the_masked_positions():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("encoder-small", vocab_size=11, block_size=8, n_layer=1, n_embd=16,
                                              n_head=2)).eval()
    inputs = torch.tensor([[3, 10, 4, 5], [10, 6, 7, 10]])
    labels = torch.tensor([[-100, 2, -100, -100], [8, -100, -100, 9]])
    with torch.no_grad():
        logits = model(inputs)  # (B, T, V): every position, by the model's plain forward
        by_hand = -sum(F.log_softmax(logits[b, t], -1)[labels[b, t]] for b, t in [(0, 1), (1, 0), (1, 3)]) / 3
        torch.testing.assert_close(mlm_loss(model, inputs, labels), by_hand)


def test_the_mask_token_is_added_as_a_special_token(tmp_path):
    tok = char_tokenizer("abc def")
    assert tok.token_to_id(MASK_TOKEN) is None
    with_mask = with_mask_token(tok, max_vocab=64)
    mask_id = with_mask.token_to_id(MASK_TOKEN)
    assert mask_id == tok.vocab_size and with_mask.vocab_size == tok.vocab_size + 1
    assert with_mask.encode("abc") == tok.encode("abc")  # every other id unchanged
    assert mask_id not in with_mask.encode(f"a{MASK_TOKEN}b")  # text cannot spell it
    with_mask.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.special_tokens[MASK_TOKEN] == mask_id and with_mask_token(loaded, 64) is loaded
    m = MLMMasking.from_tokenizer(loaded)
    assert m.mask_id == mask_id and set(m.special_ids.tolist()) == {0, mask_id}
    assert len(m.replacements) == tok.vocab_size - 1
    with pytest.raises(HainaError, match=rf"fill model.vocab_size {tok.vocab_size}, .*--model.vocab_size=64"):
        with_mask_token(tok, max_vocab=tok.vocab_size)
    with pytest.raises(HainaError, match="needs the shards' tokenizer|none was found"):
        with_mask_token(None, 64)


def test_objective_and_attention_must_agree():
    encoder = ModelConfig.from_name("encoder-small")
    with pytest.raises(HainaError, match="mlm needs a bidirectional model"):
        PretrainConfig(model=ModelConfig(), train=TrainConfig(objective="mlm"))
    with pytest.raises(HainaError, match="pretrain it with --objective mlm"):
        PretrainConfig(model=encoder)
    assert PretrainConfig(model=encoder, train=TrainConfig(objective="mlm")).train.mask_prob == 0.15
    with pytest.raises(HainaError, match="mask_prob"):
        TrainConfig(mask_prob=1.0)
    bundled = load_pretrain_config("encoder-small")  # the bundled recipe: MLM on the quickstart's data
    assert bundled.train.objective == "mlm" and not bundled.model.causal and bundled.model.vocab_size > 4096


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 8-step MLM run, and one stopped after 4 steps and resumed to 8."""
    root = tmp_path_factory.mktemp("mlm")
    data, _ = text_dataset(root)
    recipe = root / "mlm.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    common = ["pretrain", "--config", str(recipe), "--data", str(data)]
    assert main([*common, "--out", str(root / "straight")]) == 0
    assert main([*common, "--out", str(root / "split"), "--train.max_steps=4"]) == 0
    assert main([*common, "--out", str(root / "split"), "--resume"]) == 0
    return root


def test_pretrain_mlm_learns_and_resumes_exactly(runs):
    straight = runs / "straight"
    val = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4, 8] and all(0 <= r["val_accuracy"] <= 1 for r in val)
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.2  # from ln(64) ≈ 4.16 towards the character frequencies
    report = json.loads((straight / "report.json").read_text())
    assert report["objective"] == "mlm" and report["val_accuracy"] == val[-1]["val_accuracy"]
    a = load_file(straight / "checkpoints" / "step-0000008" / "model.safetensors")
    b = load_file(runs / "split" / "checkpoints" / "step-0000008" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The checkpoint is an encoder with the mask token in its tokenizer (the shards' 60 tokens, then the mask).
    model, tok = load_model(straight)
    assert model.cfg.causal is False and tok.token_to_id(MASK_TOKEN) == 60 and MASK_TOKEN in tok.special_tokens


def test_mlm_refuses_a_causal_model_and_a_full_vocabulary(runs, capsys):
    common = ["pretrain", "--config", str(runs / "mlm.yaml"), "--data", str(runs / "data")]
    for extra, start in [(["--model.causal=true"], "error: train.objective mlm needs a bidirectional model"),
                         (["--objective", "clm"], "error: an encoder (model.causal: false) sees the next token"),
                         (["--model.vocab_size=60"], "error: the tokenizer's 60 tokens fill model.vocab_size 60")]:
        assert main([*common, "--out", str(runs / "refused"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(start), err
    assert not (runs / "refused").exists()


def test_the_encoder_fine_tunes_as_a_classifier_with_mean_pooling(runs, tmp_path):
    rng = random.Random(0)
    words = ["the", "a", "day", "meal", "story", "was", "quite", "very", "so"]
    rows = []
    for i in range(96):
        label = rng.choice(["pos", "neg"])
        text = rng.choices(words, k=4)
        text.insert(rng.randint(0, 4), "good" if label == "pos" else "bad")
        rows.append({"text": " ".join(text), "label": label})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clf"
    assert main(["finetune", "classify", "--base", str(runs / "straight"), "--data", str(tmp_path / "train.jsonl"),
                 "--out", str(out), "--train.max_steps=6", "--train.batch_size=16", "--train.lr=3e-3",
                 "--train.warmup_steps=1", "--train.eval_every=6", "--train.device=cpu",
                 "--train.tensorboard=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pooling"] == "mean"  # auto: the mean for an encoder
    clf, _ = load_classifier(out)
    assert clf.cfg.pooling == "mean" and clf.backbone.cfg.causal is False
    assert clf.predict_proba(["good day", "a bad meal was so very bad"]).shape == (2, 2)
