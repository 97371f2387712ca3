"""Ensembles (`haina.generate.ensemble`): the mixture through the engine, eval lm, generate and serve; bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import httpx
import pytest
import torch

import haina.generate.engine as engine_module
from haina.cli import main
from haina.core.errors import HainaError
from haina.eval.lm import encode_documents, eval_lm_command
from haina.generate import Engine, SamplingParams
from haina.generate.ensemble import Ensemble, load_ensemble, mixture_weights
from haina.generate.text import TextGenerator
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.model.transformer import lm_loss
from haina.serve.app import ServerThread, create_app, wait_healthy
from haina.serve.service import Service, ServiceConfig
from haina.tokenizer.train import train_bpe

WORDS = {"det": ["the", "a", "one", "every"], "adj": ["small", "red", "quiet", "old", "happy", "green"],
         "noun": ["cat", "dog", "bird", "child", "tree", "house", "river"],
         "verb": ["sees", "likes", "finds", "follows", "hears", "paints"]}


def corpus(seed: int, n: int) -> list[str]:
    """n documents of short sentences from a tiny grammar (held-out text: another seed)."""
    rng = random.Random(seed)

    def phrase() -> str:
        return f"{rng.choice(WORDS['det'])} {rng.choice(WORDS['adj'])} {rng.choice(WORDS['noun'])}"

    return [" ".join(f"{phrase()} {rng.choice(WORDS['verb'])} {phrase()}." for _ in range(6)) for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(corpus(0, 40), vocab_size=300)


def trained(tok, seed: int, steps: int = 150) -> Transformer:
    """A 2-layer model trained from init seed `seed` (batches drawn with that seed too) on four documents.

    So small a training set is overfitted, each model its own way: on held-out text the mixture, less sure
    where they disagree, beats both by about 10 % perplexity (9-14 % over four pairs of seeds).
    """
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    model = Transformer(cfg)
    ids = torch.from_numpy(encode_documents(corpus(0, 4), tok))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 33] for s in starts.tolist()])
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def ckpts(tok, tmp_path_factory):
    """Two differently seeded trained models (a, b) with one tokenizer; c with another tokenizer; wide with a
    larger vocabulary."""
    root = tmp_path_factory.mktemp("ensemble")
    for name, seed in (("a", 1), ("b", 2)):
        save_model(root / name, trained(tok, seed), tok)
    other = train_bpe(corpus(7, 40) + ["zebra quartz jukebox"] * 5, vocab_size=300)
    torch.manual_seed(3)
    save_model(root / "c", Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                                                   n_embd=32)), other)
    save_model(root / "wide", Transformer(ModelConfig(vocab_size=tok.vocab_size + 16, block_size=64, n_layer=1,
                                                      n_head=2, n_embd=32)), tok)
    return {k: root / k for k in ("a", "b", "c", "wide")}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("ensemble-text") / "held_out.txt"
    path.write_text("\n".join(corpus(123, 12)) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ the mixture
def _random(seed: int, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{"vocab_size": 96, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32,
                                      "init_std": 0.3, **kw})).eval()


SHAPES = {
    "same": [{}, {}],
    # Layers, heads, key/value heads, head size, width and positions all differ: the narrower members' keys live
    # in the leading part of the shared cache.
    "mixed": [{}, {"n_layer": 1, "n_head": 4, "n_kv_head": 2, "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
              {"n_layer": 1, "n_head": 1, "n_embd": 24, "pos": "sinusoidal", "block_size": 48}],
}


def hand_mixture(models, weights, tokens: list[int]) -> torch.Tensor:
    """log Σ w_i softmax(z_i) of the next token after `tokens`, from full forward passes of each model."""
    with torch.no_grad():
        x = torch.tensor([tokens])
        lps = torch.stack([m(x)[0, -1].log_softmax(-1) + torch.tensor(w).log() for m, w in zip(models, weights)])
    return lps.logsumexp(0)


@pytest.mark.parametrize("shapes", SHAPES)
def test_engine_steps_give_the_mixture_of_the_members(shapes, monkeypatch):
    models = [_random(i, **kw) for i, kw in enumerate(SHAPES[shapes])]
    ens = Ensemble(models, [0.5, 0.3, 0.2][:len(models)]).eval()
    weights = ens.mixture_weights  # normalized: (0.625, 0.375) for two
    assert sum(weights) == pytest.approx(1.0)
    assert ens.cfg.block_size == min(m.cfg.block_size for m in models)
    seen: list[tuple[list[int], torch.Tensor]] = []  # (the row's tokens so far, the logits it was sampled from)
    sample = engine_module.sample_tokens

    def spy(logits, rows, generators):
        seen.extend((list(r.tokens), z.clone()) for r, z in zip(rows, logits))
        return sample(logits, rows, generators)

    monkeypatch.setattr(engine_module, "sample_tokens", spy)
    engine = Engine(ens, max_batch_size=3)
    # Requests join while others decode, with prompts of different lengths (rows at different positions), leave
    # at different times (slots move), and one waits for a free slot.
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0.9, seed=1, max_new_tokens=7))
    engine.step()
    engine.step()
    engine.add_request("b", [4, 5, 6, 7, 8, 9, 10], SamplingParams(temperature=0.9, seed=2, max_new_tokens=2))
    engine.add_request("c", [11], SamplingParams(temperature=0, max_new_tokens=9))
    engine.add_request("d", [12, 13, 14, 15], SamplingParams(temperature=0, max_new_tokens=4))
    while engine.has_unfinished():
        engine.step()
    assert len(seen) == 7 + 2 + 9 + 4
    for tokens, got in seen:
        torch.testing.assert_close(got, hand_mixture(models, weights, tokens), atol=2e-5, rtol=1e-5)

    # Prompt log-probabilities (prefill hidden states through the mixture head) and beam search (its own cache).
    prompt = [3, 1, 4, 1, 5, 9]
    res = engine.generate([prompt], SamplingParams(num_beams=2, max_new_tokens=5, logprobs=1, prompt_logprobs=1,
                                                   ignore_eos=True))[0][0]  # the best beam
    for i, lp in enumerate(res.prompt_logprobs[1:], 1):
        assert lp.logprob == pytest.approx(float(hand_mixture(models, weights, prompt[:i])[prompt[i]]), abs=2e-5)
    seq = prompt + res.token_ids
    for i, lp in enumerate(res.logprobs):
        want = hand_mixture(models, weights, seq[:len(prompt) + i])[seq[len(prompt) + i]]
        assert lp.logprob == pytest.approx(float(want), abs=2e-5)


def test_an_ensemble_of_one_is_the_model():
    model = _random(0)
    ens = Ensemble([model], [1.0]).eval()
    x = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ens(x), model(x).log_softmax(-1))
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    for params in (SamplingParams(temperature=0, max_new_tokens=12, logprobs=3),
                   SamplingParams(temperature=0.8, top_k=20, seed=5, n=2, max_new_tokens=12),
                   SamplingParams(num_beams=3, max_new_tokens=8, logprobs=2)):
        got = Engine(ens, max_batch_size=4).generate(prompts, params)
        want = Engine(model, max_batch_size=4).generate(prompts, params)
        for g, w in zip(got, want):
            assert [r.token_ids for r in g] == [r.token_ids for r in w]
            if params.logprobs is not None:
                for a, b in zip(g[0].logprobs, w[0].logprobs):
                    assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
    (got,), (want,) = Engine(ens).score([[1, 2, 3, 4]]), Engine(model).score([[1, 2, 3, 4]])
    assert got[0] is None and got[1:] == pytest.approx(want[1:], abs=1e-5)


def test_weights_are_checked_and_normalized():
    assert mixture_weights(None, 2) == (0.5, 0.5)
    assert mixture_weights([3, 1], 2) == (0.75, 0.25)
    for bad, words in (([1.0], "1 value(s) for 2 checkpoint(s)"), ([0.5, 0.0], "must be positive"),
                       ([1.0, -1.0], "must be positive"), ([1.0, float("nan")], "must be positive")):
        with pytest.raises(HainaError, match=words.replace("(", r"\(").replace(")", r"\)")):
            mixture_weights(bad, 2)


# ------------------------------------------------------------------------------------------ the commands
def test_eval_lm_of_two_seeds_beats_each_member(ckpts, held_out, tmp_path):
    ppl = {}
    for name in ("a", "b"):
        eval_lm_command(str(ckpts[name]), [str(held_out)], str(tmp_path / name), context=32, device="cpu")
        ppl[name] = json.loads((tmp_path / name / "report.json").read_text())["ppl"]
    # Through the CLI: --checkpoint A B and --weights parse as a user types them.
    assert main(["eval", "lm", "--checkpoint", str(ckpts["a"]), str(ckpts["b"]), "--weights", "0.5,0.5", "--data",
                 str(held_out), "--out", str(tmp_path / "ens"), "--context", "32", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "ens" / "report.json").read_text())
    assert report["ppl"] < min(ppl.values()), (report["ppl"], ppl)
    assert report["checkpoint"] == f"{ckpts['a']} + {ckpts['b']}"
    members = report["details"]["ensemble"]
    assert [(m["checkpoint"], m["weight"]) for m in members] == [(str(ckpts["a"]), 0.5), (str(ckpts["b"]), 0.5)]
    # Each member's own perplexity, from the ensemble's forward passes, is what it scores alone.
    assert [m["ppl"] for m in members] == pytest.approx([ppl["a"], ppl["b"]], rel=1e-4)
    assert "## Ensemble" in (tmp_path / "ens" / "report.md").read_text()


def test_eval_generate_and_efficiency_take_an_ensemble(ckpts, tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"prompt": p, "reference": p}) + "\n" for p in ("the ", "a ")))
    pair = ["--checkpoint", str(ckpts["a"]), str(ckpts["b"]), "--weights", "0.6,0.4"]
    assert main(["eval", "generate", *pair, "--data", str(refs), "--out", str(tmp_path / "gen"),
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "gen" / "report.json").read_text())
    assert report["checkpoint"] == f"{ckpts['a']} + {ckpts['b']}" and report["examples"] == 2
    # The generations are the ensemble's own greedy ones.
    rows = [json.loads(line) for line in (tmp_path / "gen" / "outputs.jsonl").read_text().splitlines()]
    assert rows[0]["generations"] == [_greedy_text(ckpts, [0.6, 0.4], "the ", 4)]
    assert main(["eval", "efficiency", *pair, "--out", str(tmp_path / "eff"), "--prompt-tokens", "4",
                 "--new-tokens", "2", "--repeats", "1", "--batch-sizes", "1", "--device", "cpu"]) == 0
    eff = json.loads((tmp_path / "eff" / "report.json").read_text())
    assert eff["checkpoint"] == f"{ckpts['a']} + {ckpts['b']}"


def _greedy_text(ckpts, weights, prompt: str, n: int) -> str:
    model, tok = load_ensemble([str(ckpts["a"]), str(ckpts["b"])], weights)
    (res,), = TextGenerator(Engine(model, eos_token_id=tok.eos_id), tok).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
    return res.text


def test_generate_cli_with_two_checkpoints_and_weights(ckpts, capsys):
    want = _greedy_text(ckpts, [0.6, 0.4], "the small cat", 10)
    r = subprocess.run([sys.executable, "-m", "haina.cli", "generate", "--checkpoint", str(ckpts["a"]), str(ckpts["b"]),
                        "--weights", "0.6,0.4", "--prompt", "the small cat", "--temperature", "0",
                        "--max-new-tokens", "10", "--ignore-eos", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "the small cat" + want + "\n"
    # The flag repeated, and the weights as separate values, mean the same.
    assert main(["generate", "--checkpoint", str(ckpts["a"]), "--checkpoint", str(ckpts["b"]), "--weights", "0.6",
                 "0.4", "--prompt", "the small cat", "--temperature", "0", "--max-new-tokens", "10", "--ignore-eos",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == r.stdout


def test_serve_an_ensemble(ckpts):
    cfg = ServiceConfig(checkpoint=str(ckpts["a"]), ensemble=(str(ckpts["b"]),), weights=(0.6, 0.4), device="cpu",
                        max_batch_size=2)
    assert cfg.model_name == "a+b"
    service = Service(cfg)
    with ServerThread(create_app(cfg, service=service)) as server:
        wait_healthy(server.url, timeout=60)
        assert [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=60).json()["data"]] == ["a+b"]
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "a+b", "prompt": "the small cat", "max_tokens": 10, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == _greedy_text(ckpts, [0.6, 0.4], "the small cat", 10)
    service.close()


# ------------------------------------------------------------------------------------------ bad input
def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_mismatches_and_bad_weights_are_one_line_and_write_nothing(ckpts, held_out, tmp_path, capsys):
    a, b, c, wide = (str(ckpts[k]) for k in ("a", "b", "c", "wide"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n")
    gen_out, eval_out = tmp_path / "gen.jsonl", tmp_path / "eval"
    generate = ["generate", "--prompts-file", str(prompts), "--out", str(gen_out), "--device", "cpu"]
    evaluate = ["eval", "lm", "--data", str(held_out), "--out", str(eval_out), "--device", "cpu"]
    serve = ["serve", "--port", "0", "--device", "cpu"]
    for command in (generate, evaluate, serve):
        err = _one_line_error(capsys, command + ["--checkpoint", a, c])
        assert f"--checkpoint {a} and {c} have different tokenizers" in err
        err = _one_line_error(capsys, command + ["--checkpoint", a, wide])
        assert f"--checkpoint {a} has a vocabulary of" in err and wide in err
        assert "--weights has 3 value(s) for 2 checkpoint(s)" in _one_line_error(
            capsys, command + ["--checkpoint", a, b, "--weights", "0.5,0.3,0.2"])
        assert "--weights must be positive" in _one_line_error(
            capsys, command + ["--checkpoint", a, b, "--weights", "1,0"])
        assert "--weights" in _one_line_error(capsys, command + ["--checkpoint", a, b, "--weights", "x,1"])
        assert "--adapter applies to a single --checkpoint" in _one_line_error(
            capsys, command + ["--checkpoint", a, b, "--adapter", a])
    assert "does not apply to an ensemble" in _one_line_error(capsys, evaluate + ["--checkpoint", a, b,
                                                                                  "--mc-dropout", "2"])
    assert not gen_out.exists() and not eval_out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]
