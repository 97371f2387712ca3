"""Chat templates, chat tokens and `haina chat` under a pseudo-terminal."""

import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from haina.core.errors import HainaError
from haina.generate.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatSession,
    apply_chat_template,
    chat_stop_strings,
    chat_stop_token_ids,
    encode_chat,
    ensure_chat_tokens,
)
from haina.generate.engine import Engine
from haina.generate.sampling import SamplingParams
from haina.generate.text import TextGenerator
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.tokenizer.train import train_bpe, train_char

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Café? 😀"}]
EXPECTED = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCafé? 😀<|im_end|>\n<|im_start|>assistant\n")
# A template in the style of the Hub's: whitespace control, loop variables, raise_exception, bos_token.
CUSTOM = """{{ bos_token }}{% for m in messages %}
  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
  {% if loop.first and m['role'] == 'system' %}[SYS] {{ m['content'] | trim }}
  {% else %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token if m['role'] == 'assistant' else '' }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""


@pytest.fixture(scope="module")
def tok():
    t = train_bpe(["hello world, café 😀 " * 50], vocab_size=300, special_tokens=["<|endoftext|>", "<s>"])
    t.bos_token = "<s>"
    return t


def test_default_template_renders_chatml(tok):
    assert tok.chat_template is None
    assert apply_chat_template(tok, MESSAGES) == EXPECTED
    assert apply_chat_template(tok, MESSAGES, add_generation_prompt=False) == EXPECTED[:-len("<|im_start|>assistant\n")]


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, CUSTOM])
def test_same_as_transformers(tok, template, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.chat_template = template
    try:
        tok.save(tmp_path)
    finally:
        tok.chat_template = None
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for gen_prompt in (True, False):
        ours = apply_chat_template(tok, MESSAGES, add_generation_prompt=gen_prompt, template=template)
        theirs = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen_prompt)
        assert ours == theirs
    if template == CUSTOM:
        assert ours.startswith("<s>[SYS] Be brief.\n[USER] Hi there\n[ASSISTANT] Hello!<|endoftext|>")


def test_template_errors(tok):
    with pytest.raises(HainaError, match="bad role"):
        apply_chat_template(tok, [{"role": "robot", "content": "x"}], template=CUSTOM)
    with pytest.raises(HainaError, match="does not parse"):
        apply_chat_template(tok, MESSAGES, template="{% for %}")
    with pytest.raises(HainaError, match="message 0"):
        apply_chat_template(tok, [{"role": "user", "content": 3}])


def test_ensure_chat_tokens(tok):
    assert chat_stop_strings(tok) == ["<|im_end|>", "<|im_start|>"]  # plain text markers: stop on their text
    assert chat_stop_token_ids(tok) == [tok.eos_id]
    with pytest.raises(HainaError, match="vocabulary"):
        ensure_chat_tokens(tok, max_vocab=tok.vocab_size + 1)
    chat = ensure_chat_tokens(tok, max_vocab=tok.vocab_size + 2)
    assert tok.token_to_id("<|im_end|>") is None  # the original is untouched
    end = chat.token_to_id("<|im_end|>")
    assert end == tok.vocab_size + 1 and chat.vocab_size == tok.vocab_size + 2
    ids = encode_chat(chat, MESSAGES)
    assert ids.count(end) == 4 and ids.count(chat.token_to_id("<|im_start|>")) == 5
    assert chat.decode(ids, skip_special=True).startswith("system\nBe brief.\n")
    assert chat_stop_token_ids(chat) == [chat.eos_id, end] and chat_stop_strings(chat) == []
    assert ensure_chat_tokens(chat) is chat


# ---------------------------------------------------------------------------------------------- the REPL
@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    """A random model over a character vocabulary: its replies are printable, so a terminal shows them as is."""
    tok = train_char(["abcdefghij klmnop"])
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, block_size=256, n_layer=2)
    out = tmp_path_factory.mktemp("chat") / "ckpt"
    save_model(out, Transformer(cfg), tok)
    return out


def _session(ckpt, **kw):
    model, tok = load_model(ckpt)
    params = SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 12), temperature=1.0, top_p=0.95, seed=5)
    return ChatSession(TextGenerator(Engine(model, max_batch_size=1, eos_token_id=tok.eos_id), tok), params, **kw)


def test_history_truncated_when_context_fills(char_ckpt):
    s = _session(char_ckpt, max_new_tokens=8)
    for i in range(6):
        s.reply(f"message {i}", out=io.StringIO())
    ids, dropped = s.prompt_for("again")
    assert len(ids) <= s.gen.engine.max_seq_len - 8  # room left for the reply
    kept = s.history[2 * dropped:]  # the prompt is the newest exchanges and the new message
    assert ids == encode_chat(s.gen.tokenizer, kept + [{"role": "user", "content": "again"}])
    assert kept[-2]["content"] == "message 5" and all(m["content"] != "message 0" for m in kept) and dropped >= 1
    assert s.history[0]["content"] != "message 0" and s.history[-2]["content"] == "message 5"


def _read_until(fd, marker: bytes, timeout: float = 60.0) -> bytes:
    buf, end = b"", time.monotonic() + timeout
    while marker not in buf:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_chat_under_a_pty(char_ckpt):
    # What the REPL should print, computed in-process with the same seeds.
    s, expected = _session(char_ckpt, system="sys"), []
    for msg in ("hello", "how are you", None, "hello"):
        if msg is None:
            s.reset()
            continue
        out = io.StringIO()
        s.reply(msg, out=out)
        expected.append(out.getvalue())
    assert all(e.strip() for e in expected)
    assert expected[0] != expected[2]  # different seeds per turn: the /reset check below means something

    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "haina.cli", "chat", "--checkpoint", str(char_ckpt),
                             "--system", "sys", "--max-new-tokens", "12", "--temperature", "1", "--top-p", "0.95",
                             "--seed", "5", "--device", "cpu"], stdin=slave, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    try:
        banner = _read_until(master, b">>> ")
        assert b"/reset" in banner
        replies = []
        for line in ("hello", "how are you", "/reset", "hello"):
            os.write(master, line.encode() + b"\n")
            got = _read_until(master, b">>> ").decode().replace("\r\n", "\n")
            if line == "/reset":
                assert "conversation cleared" in got
            else:
                replies.append(got)
        for want, got in zip(expected, replies):
            assert want in got
        assert replies[2].count(expected[2]) == 1
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_chat_exits_on_eof(char_ckpt):
    r = subprocess.run([sys.executable, "-m", "haina.cli", "chat", "--checkpoint", str(char_ckpt),
                        "--max-new-tokens", "4", "--device", "cpu"], input="hi\n", capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(">>> ") == 2 and "Traceback" not in r.stderr
