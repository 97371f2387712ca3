"""Fixtures for the server tests: a tiny checkpoint with a BPE tokenizer and a chat template, and real uvicorn
servers on free loopback ports (in a background thread, so tests can also look at the engine)."""

import contextlib
import time
from dataclasses import dataclass

import httpx
import pytest
import torch

from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.serve.app import ServerThread, create_app, wait_healthy
from haina.serve.service import Service, ServiceConfig, load_checkpoint
from haina.tokenizer.train import train_bpe

CORPUS = ["the cat sat on the mat and the dog ran to the park. " * 10, "héllo wörld café 日本語 😀 " * 10,
          "To be, or not to be, that is the question. " * 10]


@dataclass
class Running:
    """A server under test: its base URL and the in-process service behind it."""

    url: str
    service: Service

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample in /metrics (0 when absent)."""
        want = f"{name}{{{labels}}}" if labels else name
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A 2-layer random model (vocab 320, 128 positions) with a byte-level BPE tokenizer and ChatML."""
    tok = train_bpe(CORPUS, vocab_size=320, special_tokens=("<|endoftext|>", IM_START, IM_END))
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("serve") / "tiny"
    # A large init makes the distribution peaked: greedy choices are never near-ties that the float
    # reordering of another batch shape could flip (see tests/generate/test_engine_core.py).
    cfg = ModelConfig.from_name("tiny", vocab_size=320, block_size=128, n_layer=2, init_std=0.3)
    save_model(out, Transformer(cfg), tok)
    return out


@contextlib.contextmanager
def running(ckpt, loader=None, wait: bool = True, **config):
    """Start `create_app` for `ckpt` on uvicorn in a thread; stop it afterwards."""
    cfg = ServiceConfig(checkpoint=str(ckpt), device="cpu", **config)
    service = Service(cfg, loader=loader)
    with ServerThread(create_app(cfg, service=service)) as server:
        if wait:
            wait_healthy(server.url, timeout=60)
        yield Running(server.url, service)


@pytest.fixture(scope="session")
def launch():
    """`launch(ckpt, loader=None, wait=True, **ServiceConfig fields)`: a context manager yielding `Running`."""
    return running


def make_slow_loader(delay: float):
    """Loads the checkpoint and slows every forward pass by `delay` seconds (a hook on the LM head), so a
    request lasts long enough to be cancelled or to fill the queue deterministically."""

    def load(config):
        model, tok = load_checkpoint(config)
        model.lm_head.register_forward_pre_hook(lambda *_: time.sleep(delay))  # prefill runs the LM head module
        decode = model.decode  # the lean decode step skips module hooks, so it is wrapped instead

        def slow_decode(*args, **kwargs):
            time.sleep(delay)
            return decode(*args, **kwargs)

        model.decode = slow_decode
        return model, tok

    return load


@pytest.fixture(scope="session")
def slow_loader():
    """`slow_loader(delay)`: a loader whose model sleeps `delay` seconds per forward pass."""
    return make_slow_loader


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a tiny model it is the fastest, and on 2 shared cores extra OpenMP threads spin
    against the test process's own threads (a decode step goes from ~1 ms to ~80 ms). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def api_server(tiny_ckpt, one_torch_thread):
    """A default server (batch 16, queue 256) per module, for tests that need no special settings."""
    with running(tiny_ckpt, served_model_name="tiny") as server:
        yield server
