"""`haina finetune dpo`: preference pairs move a tiny model toward what they prefer; the reference is computed once."""

import json
import math

import pytest
import torch

from haina.cli import main
from haina.core.errors import HainaError
from haina.finetune.dpo import DPOTrainer, adapters_disabled, dpo_loss, sequence_logps
from haina.finetune.dpo_data import (
    PairSet,
    Preference,
    read_preferences,
    record_to_preference,
    tokenize_preferences,
)
from haina.finetune.sft_data import prepare_chat_tokenizer
from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START, encode_chat
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.model.lora import LoRAConfig, apply_lora
from haina.tokenizer.train import train_bpe
from haina.train.config import TrainConfig

THINGS = ("apple", "banana", "grass", "sky", "snow", "coal", "cherry", "lemon", "leaf", "sea", "milk", "night")
PROMPTS = [f"Is {t} {c}?" for t in THINGS for c in ("red", "blue", "green")]
HELD = PROMPTS[::5]  # 8 prompts no DPO pair trains on
TRAIN = [p for p in PROMPTS if p not in HELD]  # 28
FAST = ["--train.device=cpu", "--train.tensorboard=false", "--train.warmup_steps=0"]


def _pair(prompt: str) -> dict:
    # The property: answering "yes", which the base, trained on 3 "no" for every 2 "yes", does not prefer.
    return {"prompt": prompt, "chosen": "yes", "rejected": "no"}


def _jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A ChatML BPE tokenizer, a random base, and the preference files (train, held-out val)."""
    root = tmp_path_factory.mktemp("dpo")
    corpus = [f"{p} yes. {p} no." for p in PROMPTS] * 3
    tok = train_bpe(corpus, vocab_size=300, special_tokens=("<|endoftext|>", IM_START, IM_END))
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, block_size=48, n_layer=2, n_head=2, n_embd=48, pos="rope", norm="rmsnorm",
                      mlp="swiglu", bias=False)
    save_model(root / "init", Transformer(cfg), tok)
    _jsonl(root / "train.jsonl", [_pair(p) for p in TRAIN])
    _jsonl(root / "val.jsonl", [_pair(p) for p in HELD])
    return root


@pytest.fixture(scope="module")
def sft_base(world):
    """The init base briefly SFT-trained to answer both ways, "no" (60%) more often than "yes" (40%)."""
    records = [{"prompt": p, "response": "yes" if k < 2 else "no"} for k in range(5) for p in PROMPTS]
    data = _jsonl(world / "sft.jsonl", records)
    assert main(["finetune", "sft", "--base", str(world / "init"), "--data", data, "--out", str(world / "sft"),
                 "--train.max_steps=60", "--train.batch_size=16", "--train.lr=6e-3", "--train.warmup_steps=10",
                 "--data.val_fraction=0", "--train.device=cpu", "--train.tensorboard=false"]) == 0
    return world / "sft"


def _greedy(model, tok, question: str, max_new: int = 12) -> str:
    ids = encode_chat(tok, [{"role": "user", "content": question}])
    end, out = tok.token_to_id(IM_END), []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == end:
                break
            out.append(nxt)
    return tok.decode(out)


def _says_yes(run) -> float:
    """The share of held-out prompts whose greedy answer is "yes" (and ends there)."""
    model, tok = load_model(run)
    model.eval()
    return sum(_greedy(model, tok, q) == "yes" for q in HELD) / len(HELD)


# ---------------------------------------------------------------------------------------------- acceptance
def test_dpo_shifts_the_policy_toward_the_preferred_property(world, sft_base, tmp_path):
    before = _says_yes(sft_base)
    assert before <= 0.5, "the base should not already prefer the property"
    out = tmp_path / "dpo"
    # eps ≫ the gradients makes AdamW a momentum SGD. Adam's per-parameter normalization turns the near-zero
    # gradients of every other token's logit into full-size steps, which on a 70k-parameter model moves
    # probability onto unrelated tokens within a few steps (measured: "yes" and "no" both fell to ~0); SGD
    # follows the DPO gradient, which at the answer's first position is exactly +yes −no.
    assert main(["finetune", "dpo", "--base", str(sft_base), "--data", str(world / "train.jsonl"),
                 "--val", str(world / "val.jsonl"), "--out", str(out), "--beta", "0.5", "--train.max_steps=20",
                 "--train.batch_size=8", "--train.lr=3e-2", "--train.eps=0.1", "--train.eval_every=20", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    dpo = report["dpo"]
    assert dpo["beta"] == 0.5
    # At step 0 the policy is the reference: every reward is exactly 0, and the loss exactly log 2.
    assert dpo["val_reward_accuracy"]["before"] == 0.0 and dpo["val_reward_margin"]["before"] == 0.0
    assert report["initial_val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo["val_reference_prefers_chosen"] <= 0.5
    assert dpo["val_reward_accuracy"]["after"] >= 0.9
    assert dpo["val_reward_margin"]["after"] > 0
    assert report["val_loss"] < report["initial_val_loss"]
    after = _says_yes(out)
    assert after >= 0.8 and after > before, f"greedy answers 'yes': {before:.0%} → {after:.0%}"


# ---------------------------------------------------------------------------------------------- data
GOOD = {"prompt": "hi", "chosen": "yes!", "rejected": "yes."}
BAD = [
    ("nope", "invalid JSON"),
    ("[1, 2]", "not a JSON object (an array)"),
    ({"prompt": "hi", "chosen": "a"}, "no 'rejected'"),
    ({**GOOD, "prompt": 5}, "prompt is a number"),
    ({**GOOD, "chosen": " "}, "chosen is empty"),
    ({**GOOD, "rejected": "yes!"}, "the same text"),
    ({**GOOD, "prompt": []}, "empty list of messages"),
    ({**GOOD, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "last message has role 'assistant'"),
    ({**GOOD, "prompt": [{"role": "robot", "content": "q"}, {"role": "user", "content": "q"}]}, "unknown role"),
    ({**GOOD, "chosen": [{"role": "assistant", "content": "a"}] * 2}, "list of 2 items"),
    ({**GOOD, "rejected": [{"role": "user", "content": "a"}]}, "not 'assistant'"),
]


@pytest.mark.parametrize(("record", "reason"), BAD, ids=[r for _, r in BAD])
def test_each_bad_record_is_rejected_with_its_reason(tmp_path, record, reason):
    path = _jsonl(tmp_path / "d.jsonl", [GOOD, record])
    got = read_preferences(path)
    assert len(got.pairs) == 1 and len(got.rejects) == 1
    assert reason in got.rejects[0]["reason"] and got.rejects[0]["line"] == 2
    assert "\n" not in got.rejects[0]["reason"]


def test_plain_and_chat_records_render_the_same(world):
    tok = prepare_chat_tokenizer(load_model(world / "init")[1], 320)
    plain = record_to_preference(GOOD)
    chat = record_to_preference({"prompt": [{"role": "user", "content": "hi"}],
                                 "chosen": [{"role": "assistant", "content": "yes!"}], "rejected": "yes."})
    assert plain == chat
    (a,), _ = tokenize_preferences(tok, [Preference(*plain, "x", 1)], block_size=48)
    assert a.prompt == encode_chat(tok, plain[0], add_generation_prompt=True)
    assert tok.decode(a.chosen) == f"yes!{IM_END}" and tok.decode(a.rejected) == f"yes.{IM_END}"


def test_long_prompts_lose_their_start_and_long_answers_are_dropped(world):
    tok = prepare_chat_tokenizer(load_model(world / "init")[1], 320)
    long = " ".join(["What color is apple?"] * 10)
    pairs = [Preference([{"role": "user", "content": long}], "It is red!", "It is red.", "f", 1),
             Preference([{"role": "user", "content": "hi"}], long, "no.", "f", 2)]
    kept, rejects = tokenize_preferences(tok, pairs, block_size=24)
    assert len(kept) == 1 and kept[0].truncated
    assert len(kept[0].prompt) + len(kept[0].chosen) == 25  # block_size + 1: the prompt's end is kept
    assert len(rejects) == 1 and rejects[0]["line"] == 2 and "block_size 24" in rejects[0]["reason"]


def test_no_usable_record_is_one_line(world, tmp_path, capsys):
    data = _jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD])
    out = tmp_path / "run"
    assert main(["finetune", "dpo", "--base", str(world / "init"), "--data", data, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no usable preference record") and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(HainaError, match="the input is empty"):
        read_preferences(_jsonl(tmp_path / "empty.jsonl", []))


# ---------------------------------------------------------------------------------------------- the loss
def test_sequence_logps_and_dpo_loss_follow_their_definitions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    y = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 6]])
    lp = logits.log_softmax(-1)
    want = torch.stack([lp[0, 1, 3] + lp[0, 2, 4], lp[1, 2, 1] + lp[1, 3, 2] + lp[1, 4, 6]])
    torch.testing.assert_close(sequence_logps(logits, y), want)
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.3)
    torch.testing.assert_close(chosen, torch.tensor([0.15]))
    torch.testing.assert_close(rejected, torch.tensor([-0.3]))
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(torch.tensor([0.45])))


def test_batches_weight_pairs_and_reference_is_the_base(world, tmp_path):
    model, tok = load_model(world / "init")
    tok = prepare_chat_tokenizer(tok, 320)
    pairs, _ = tokenize_preferences(tok, read_preferences(str(world / "train.jsonl")).pairs, block_size=48)
    data = PairSet(pairs, tok.eos_id)
    apply_lora(model, LoRAConfig(r=2))
    cfg = TrainConfig(batch_size=4, max_steps=1, device="cpu", tensorboard=False, block_size=48)
    trainer = DPOTrainer(model, cfg, tmp_path, train_data=data, beta=0.1, lora=LoRAConfig(r=2))
    for m in model.modules():  # adapters that are not a no-op: the reference must still be the base
        if hasattr(m, "lora"):
            for part in m.lora.values():
                torch.nn.init.normal_(part.B)
    trainer.compute_reference()
    batch = data.batch([3, 0, 5])
    assert batch["x"].shape[0] == 6 and int(trainer.loss_weight(batch)) == 3  # 3 pairs, 6 rows
    for row, i in enumerate([3, 0, 5]):  # chosen row, then its rejected row 3 further: the same prompt
        n = len(pairs[i].prompt)
        assert batch["x"][row, :n].tolist() == batch["x"][row + 3, :n].tolist() == pairs[i].prompt
    assert int((batch["y"][0] != -100).sum()) == len(pairs[3].chosen)
    with torch.no_grad(), adapters_disabled(model):
        base = sequence_logps(model(batch["x"]), batch["y"])
    torch.testing.assert_close(batch["ref"], base)
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model(batch["x"]), batch["y"]), base)  # the scale came back


# ---------------------------------------------------------------------------------------------- runs
def test_reference_once_and_pairs_as_loss_weight(world, tmp_path, monkeypatch):
    calls = []
    forward = Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **k: calls.append(id(self)) or forward(self, *a, **k))
    out = tmp_path / "run"
    assert main(["finetune", "dpo", "--base", str(world / "init"), "--data", str(world / "train.jsonl"),
                 "--val", str(world / "val.jsonl"), "--out", str(out), "--train.max_steps=3", "--train.batch_size=4",
                 "--train.grad_accum=2", "--train.eval_every=3", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    # 28 train and 8 val pairs, 4 at a time: 7 + 2 reference batches, once; 3 steps × 2 micro-batches;
    # evaluations at steps 0 and 3 of 2 batches each. One model did all of it.
    assert len(calls) == (7 + 2) + 3 * 2 + 2 * 2
    assert len(set(calls)) == 1
    assert report["pairs_seen"] == 3 * 2 * 4 and report["supervised_tokens"] is None
    assert report["data"]["records"] == {"read": 36, "rejected": 0, "train_pairs": 28, "val_pairs": 8,
                                         "truncated_prompts": 0}


def test_lora_dpo_saves_adapters_and_keeps_rejects(world, tmp_path):
    chat = {"prompt": [{"role": "system", "content": "Be loud."}, {"role": "user", "content": "What color is sky?"}],
            "chosen": [{"role": "assistant", "content": "It is blue!"}], "rejected": "It is blue."}
    too_long = {"prompt": "hi", "chosen": " ".join(["red"] * 60), "rejected": "no."}
    data = _jsonl(tmp_path / "d.jsonl", [_pair(p) for p in TRAIN] + [chat, too_long] + [r for r, _ in BAD])
    out = tmp_path / "run"
    assert main(["finetune", "dpo", "--base", str(world / "init"), "--data", data, "--val", str(world / "val.jsonl"),
                 "--out", str(out), "--lora.r=4", "--train.max_steps=4", "--train.batch_size=8", "--train.lr=1e-3",
                 "--train.eval_every=4", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lora"] and report["data"]["records"]["train_pairs"] == 29
    assert report["data"]["records"]["rejected"] == len(BAD) + 1
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == len(BAD) + 1 and all(r["reason"] for r in rejects)
    assert report["dpo"]["val_reward_accuracy"]["before"] == 0.0
    assert report["dpo"]["val_reward_accuracy"]["after"] is not None
    ckpt = out / "checkpoints" / json.loads((out / "checkpoints" / "index.json").read_text())["latest"]
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter.safetensors" in files and "model.safetensors" not in files


def test_resume_continues_exactly(world, tmp_path):
    def run(out, steps, *extra):
        assert main(["finetune", "dpo", "--base", str(world / "init"), "--data", str(world / "train.jsonl"),
                     "--val", str(world / "val.jsonl"), "--out", str(out), f"--train.max_steps={steps}",
                     "--train.decay_steps=6", "--train.batch_size=4", "--train.lr=1e-3", "--train.eval_every=3",
                     *FAST, *extra]) == 0
        return json.loads((out / "report.json").read_text())

    run(tmp_path / "a", 3)
    resumed = run(tmp_path / "a", 6, "--resume")
    straight = run(tmp_path / "b", 6)
    assert resumed["steps"] == 6 and resumed["steps_this_run"] == 3
    assert resumed["val_loss"] == straight["val_loss"]
    assert resumed["dpo"] == straight["dpo"]  # "before" came back from the checkpoint
