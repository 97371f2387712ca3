"""`haina finetune sft` end to end: a tiny base learns a task, stops by itself, and the run loads everywhere."""

import json

import pytest
import torch

from haina.cli import main
from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START, encode_chat
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.tokenizer.train import train_bpe

COLORS = {"apple": "red", "banana": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black"}


def _records():
    out = []
    for i in range(120):
        thing = list(COLORS)[i % len(COLORS)]
        out.append({"prompt": f"What color is {thing}?", "response": f"It is {COLORS[thing]}."})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    corpus = [f"What color is {k}? It is {v}. " * 4 for k, v in COLORS.items()] * 5
    tok = train_bpe(corpus, vocab_size=300, special_tokens=("<|endoftext|>", IM_START, IM_END))
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=64, pos="rope", norm="rmsnorm",
                      mlp="swiglu", bias=False)
    save_model(root / "base", Transformer(cfg), tok)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()) + "not json\n" + '{"prompt": "x"}\n')
    return root


def _greedy(model, tok, question, max_new=16):
    ids = encode_chat(tok, [{"role": "user", "content": question}])
    end = tok.token_to_id(IM_END)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == end:
                return tok.decode(out), True
            out.append(nxt)
    return tok.decode(out), False


@pytest.mark.parametrize("lora", [False, True])
def test_sft_learns_task_and_stops(base, tmp_path, lora):
    out = tmp_path / "run"
    args = ["finetune", "sft", "--base", str(base / "base"), "--data", str(base / "train.jsonl"), "--out", str(out),
            "--train.max_steps=250", "--train.batch_size=16", "--train.lr=3e-3", "--train.warmup_steps=10",
            "--train.eval_every=125", "--train.device=cpu", "--train.tensorboard=false"]
    if lora:
        args += ["--lora.r=8", "--lora.alpha=16", "--train.lr=1e-2"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["records"]["rejected"] == 2
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 2 and all(r["reason"] for r in rejects)
    assert report["val_loss"] < report["initial_val_loss"]
    assert report["supervised_tokens"] < report["train_tokens"]
    model, tok = load_model(out)  # a LoRA run loads through the base it records
    answers = {thing: _greedy(model, tok, f"What color is {thing}?") for thing in COLORS}
    assert all(stopped for _, stopped in answers.values()), f"generation did not end by itself: {answers}"
    right = sum(answer == f"It is {COLORS[thing]}." for thing, (answer, _) in answers.items())
    assert right >= 4, answers  # learned the task, not just the shape of an answer
    ckpt = json.loads((out / "checkpoints" / "index.json").read_text())["latest"]
    files = {p.name for p in (out / "checkpoints" / ckpt).iterdir()}
    if lora:
        assert "adapter.safetensors" in files and "model.safetensors" not in files
        assert main(["finetune", "merge", "--checkpoint", str(out), "--out", str(tmp_path / "merged")]) == 0
        merged, _ = load_model(tmp_path / "merged")
        x = torch.tensor([encode_chat(tok, [{"role": "user", "content": "What color is snow?"}])])
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
        # export hf of the LoRA run: one plain transformers model with the adapters folded in
        from transformers import AutoModelForCausalLM

        assert main(["export", "hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 0
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)
    else:
        assert "model.safetensors" in files


def test_sft_bad_inputs_one_line(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnope\n')
    out = tmp_path / "run"
    assert main(["finetune", "sft", "--base", str(base / "base"), "--data", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert not out.exists()  # nothing half-written
    gelu = tmp_path / "gelu"
    _, tok = load_model(base / "base")
    save_model(gelu, Transformer(ModelConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32)), tok)
    for extra in (["--lora.r=4", "--lora.targets=gate"], ["--lora.r=4", "--lora.targets=wq"]):
        assert main(["finetune", "sft", "--base", str(gelu), "--data", str(base / "train.jsonl"), "--out", str(out),
                     *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1 and "targets" in err
        assert not out.exists()
