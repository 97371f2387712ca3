"""What lm-evaluation-harness needs from the server: its remote tokenizer (/tokenizer_info, /tokenize,
/detokenize) and echo + logprobs that keep the generated token even when it is the stop token.

lm-eval scores a continuation with echo, max_tokens=1 and logprobs=1, and drops the last logprobs entry as
the generated token. When the model would end the text right there (EOS), that entry must still be there;
without it lm-eval silently drops the continuation's last token instead.
"""

import json

import pytest
import torch
from conftest import CORPUS
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

from haina.generate.engine import Engine
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.tokenizer.train import train_bpe

PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def eos_ckpt(tmp_path_factory):
    """A tiny model whose greedy next token after PROMPT is EOS (its EOS row scaled from the winner's)."""
    tok = train_bpe(CORPUS, vocab_size=320, special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=320, block_size=128, n_layer=2, init_std=0.3))
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        best = model(torch.tensor([ids]))[0, -1].argmax().item()
        model.lm_head.weight[tok.eos_id] = model.lm_head.weight[best] * 1.05
        assert model(torch.tensor([ids]))[0, -1].argmax().item() == tok.eos_id
    out = tmp_path_factory.mktemp("eos") / "eos"
    save_model(out, model, tok)
    return out


@pytest.fixture(scope="module")
def server(eos_ckpt, launch):
    with launch(eos_ckpt, served_model_name="eos") as s:
        yield s


def _body(**kw):
    return {"model": "eos", "prompt": PROMPT, "temperature": 0, **kw}


def test_echo_logprobs_keep_a_final_stop_token(server, eos_ckpt):
    model, tok = load_model(eos_ckpt)
    ids = tok.encode(PROMPT)
    expected = Engine(model, eos_token_id=tok.eos_id).score([ids])[0]
    r = server.post("/v1/completions", _body(prompt=[ids], max_tokens=1, echo=True, logprobs=1)).json()
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and choice["text"] == PROMPT  # the EOS is not text
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][-1] == tok.eos_token
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # it was the greedy token
    assert r["usage"]["completion_tokens"] == 1
    # lm-eval's own parser: the continuation (the last two prompt tokens) sums what the engine scores.
    (ll, _), = LocalCompletionsAPI.parse_logprobs(outputs=r, tokens=[ids], ctxlens=[len(ids) - 2])
    assert ll == pytest.approx(sum(expected[-2:]), abs=1e-4)
    # The stream says the same, token for token.
    events = server.post("/v1/completions", _body(prompt=[ids], max_tokens=1, echo=True, logprobs=1, stream=True))
    tokens = []
    for line in events.text.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line.removeprefix("data: "))
            tokens += [t for c in chunk["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert tokens == lp["tokens"]


def test_generated_logprobs_count_the_stop_token_as_usage_does(server):
    r = server.post("/v1/completions", _body(max_tokens=4, logprobs=0)).json()
    choice = r["choices"][0]
    assert choice["text"] == "" and choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["tokens"]) == r["usage"]["completion_tokens"] == 1
    # Without logprobs nothing changes.
    plain = server.post("/v1/completions", _body(max_tokens=4)).json()["choices"][0]
    assert plain["logprobs"] is None and plain["text"] == ""


def test_lm_eval_remote_tokenizer_reads_the_server(server, eos_ckpt):
    _, tok = load_model(eos_ckpt)
    url = server.url + "/v1/completions"
    assert check_remote_tokenizer_support(url)
    remote = RemoteTokenizer(url)
    for text in (PROMPT, "héllo wörld 😀", "  two spaces\n"):
        assert remote.encode(text) == tok.encode(text)
        assert remote.decode(tok.encode(text)) == text
    assert remote.eos_token == tok.eos_token
    assert remote.tokenizer_info["model_max_length"] == 128
