"""`haina generate` end to end through a subprocess, on a tiny random checkpoint."""

import json
import subprocess
import sys

import pytest
import torch

from haina.generate.engine import Engine
from haina.generate.sampling import SamplingParams
from haina.generate.text import TextGenerator
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.tokenizer.train import train_bpe

CORPUS = ["the cat sat on the mat and the dog ran to the park. " * 10, "héllo wörld café 日本語 😀 " * 10,
          "To be, or not to be, that is the question. " * 10]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = train_bpe(CORPUS, vocab_size=320)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=320, block_size=64, n_layer=2)
    out = tmp_path_factory.mktemp("gen") / "ckpt"
    save_model(out, Transformer(cfg), tok)
    return out


def haina(*args, ok=True):
    r = subprocess.run([sys.executable, "-m", "haina.cli", "generate", *map(str, args)], capture_output=True,
                       text=True, timeout=120, check=False)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def test_greedy_is_reproducible_and_matches_the_library(ckpt):
    args = ["--checkpoint", ckpt, "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "12",
            "--ignore-eos", "--device", "cpu"]
    a, b = haina(*args).stdout, haina(*args, "--seed", "99").stdout
    assert a == b  # greedy: the seed does not matter
    model, tok = load_model(ckpt)
    (res,), = TextGenerator(Engine(model, eos_token_id=tok.eos_id), tok).generate(
        ["the cat"], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    assert a == "the cat" + res.text + "\n"


def test_prompts_file_jsonl(ckpt, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"prompt": "the cat", "id": "a"},
        {"prompt": "To be", "temperature": 0, "n": 2, "max_new_tokens": 5},
        {"prompt": "héllo", "stop": "x"},
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    haina("--checkpoint", ckpt, "--prompts-file", prompts, "--out", out, "--max-new-tokens", "8", "--seed", "1",
          "--logprobs", "1", "--device", "cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat", "To be", "héllo"] and rows[0]["id"] == "a"
    assert len(rows[1]["completions"]) == 2
    assert rows[1]["completions"][0]["text"] == rows[1]["completions"][1]["text"]  # greedy twice
    assert all(c["num_tokens"] <= 5 for c in rows[1]["completions"])
    for r in rows:
        for c in r["completions"]:
            assert c["finish_reason"] in ("stop", "length")
            assert len(c["logprobs"]) == c["num_tokens"] and all(len(t["top"]) == 1 for t in c["logprobs"])
    assert "x" not in rows[2]["completions"][0]["text"]
    # Same prompt, same seed: the same completion alone as inside the batch.
    alone = haina("--checkpoint", ckpt, "--prompt", "the cat", "--max-new-tokens", "8", "--seed", "1",
                  "--device", "cpu").stdout
    assert alone == "the cat" + rows[0]["completions"][0]["text"] + "\n"


def test_txt_prompts_to_stdout(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\nTo be\n")
    r = haina("--checkpoint", ckpt, "--prompts-file", prompts, "--max-new-tokens", "4", "--device", "cpu")
    assert [json.loads(line)["prompt"] for line in r.stdout.splitlines()] == ["the cat", "To be"]


def test_stream_with_logprobs(ckpt):
    base = ["--checkpoint", ckpt, "--prompt", "To be", "--max-new-tokens", "10", "--seed", "4", "--device", "cpu"]
    plain = haina(*base).stdout
    streamed = haina(*base, "--stream", "--logprobs", "2").stdout
    text, _, table = streamed.partition("\n\ntoken logprobs")
    assert text + "\n" == plain  # streaming prints the same text
    assert table.count("\n") >= 10  # a line per generated token


def test_stop_string(ckpt):
    base = ["--checkpoint", ckpt, "--prompt", "the cat", "--max-new-tokens", "16", "--seed", "2", "--ignore-eos",
            "--device", "cpu"]
    full = haina(*base).stdout[len("the cat"):-1]
    stop = full[5:7]
    cut = haina(*base, "--stop", stop, "zzz").stdout
    assert cut == "the cat" + full[:full.index(stop)] + "\n"


def test_bad_input_through_a_subprocess(ckpt):
    r = haina("--checkpoint", ckpt, "--prompt", "", "--device", "cpu", ok=False)
    assert r.returncode == 2 and r.stderr == "error: the prompt is empty; give some text to continue\n"


@pytest.mark.parametrize("args,message", [
    (["--prompt", "the cat " * 40], "context"),
    (["--prompt", "x", "--top-p", "1.5"], "top_p"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--num-beams", "0"], "num_beams"),
    (["--prompt", "x", "--stream", "--n", "2"], "--stream"),
    (["--prompt", "x", "--prompts-file", "p.txt"], "exactly one"),
    (["--prompts-file", "{bad}"], "stop strings must be strings"),
    (["--prompts-file", "{unknown}"], "unknown field"),
    # In a batch, the error names the prompt at fault.
    (["--prompts-file", "{overrides}"], "overrides.jsonl:prompt 2: n must be at least 1"),
    (["--prompts-file", "{long}"], "prompt 2: the prompt has"),
    (["--prompts-file", "{blank}"], "holds no prompts"),
])
def test_bad_input_is_one_error_line(ckpt, tmp_path, capsys, args, message):
    from haina.cli import main

    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "stop": [1]}) + "\n")
    (tmp_path / "unknown.jsonl").write_text(json.dumps({"prompt": "x", "temprature": 1}) + "\n")
    (tmp_path / "overrides.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n" + json.dumps({"prompt": "y", "n": 0}))
    (tmp_path / "long.txt").write_text("the cat\n" + "the cat " * 40 + "\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    for name in ("bad.jsonl", "unknown.jsonl", "overrides.jsonl", "long.txt", "blank.txt"):
        args = [a.replace("{" + name.split(".")[0] + "}", str(tmp_path / name)) for a in args]
    assert main(["generate", "--checkpoint", str(ckpt), *args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_checkpoint_without_tokenizer(tmp_path):
    save_model(tmp_path / "bare", Transformer(ModelConfig.from_name("tiny", vocab_size=300, n_layer=1)))
    r = haina("--checkpoint", tmp_path / "bare", "--prompt", "x", "--device", "cpu", ok=False)
    assert r.returncode == 2 and "no tokenizer" in r.stderr
