"""The server's context hook (`ServiceConfig.context`, what `haina serve --rag` sets): sources in chat answers,
the `haina_rag` switch, /v1/models, errors; then `haina serve --rag` end to end on a BM25-only collection, and
the playground's sources panel and toggle in headless Chromium."""

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from haina.core.errors import HainaError
from haina.serve.process import free_port

SOURCES = [{"n": 1, "id": "a.md:0", "source": "a.md", "score": 0.5, "text": "cats sit on mats"},
           {"n": 2, "id": "b.md:0", "source": "b.md", "score": 0.25, "text": "dogs run to parks"}]


class StandIn:
    """A context provider: records what it is given, adds a system message naming its sources."""

    def __init__(self, log: str, fail: bool = False, flood: bool = False):
        self.log, self.fail, self.flood = Path(log), fail, flood

    def describe(self):
        return {"collection": "stand-in", "top_k": 2}

    def __call__(self, messages, fits):
        if self.fail:
            raise HainaError("the store is down")
        with self.log.open("a") as f:
            f.write(json.dumps(messages) + "\n")
        huge = [{"role": "system", "content": "word " * 5000}, *messages]
        assert fits(messages) and not fits(huge)  # the server's measure of the model's context
        if self.flood:
            messages = huge
        return [{"role": "system", "content": "sources: a.md, b.md"}, *messages], SOURCES


@pytest.fixture(scope="module")
def rag_server(launch, tiny_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("rag") / "calls.jsonl"
    with launch(tiny_ckpt, served_model_name="tiny", context=functools.partial(StandIn, str(log))) as server:
        server.log = log
        yield server


def calls(server) -> list:
    return [json.loads(line) for line in server.log.read_text().splitlines()] if server.log.exists() else []


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "where do cats sit?"}], "max_tokens": 6,
        "temperature": 0}


def test_sources_in_the_answer_and_the_prompt_grows(rag_server):
    before = len(calls(rag_server))
    r = rag_server.post("/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sources"] == SOURCES and body["object"] == "chat.completion"
    assert calls(rag_server)[before:] == [CHAT["messages"]]  # the provider saw the request's messages
    off = rag_server.post("/v1/chat/completions", {**CHAT, "haina_rag": False}).json()
    assert "sources" not in off and len(calls(rag_server)) == before + 1  # switched off: not called
    assert body["usage"]["prompt_tokens"] > off["usage"]["prompt_tokens"]  # the added system message was rendered


def test_stream_carries_the_sources_in_its_first_chunk(rag_server):
    with httpx.stream("POST", rag_server.url + "/v1/chat/completions", json={**CHAT, "stream": True, "n": 2},
                      timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["sources"] == SOURCES and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("sources" not in c for c in chunks[1:])


def test_openai_client_and_models_card(rag_server):
    client = openai.OpenAI(base_url=rag_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(**CHAT)
    assert r.model_extra["sources"] == SOURCES
    off = client.chat.completions.create(**CHAT, extra_body={"haina_rag": False})
    assert "sources" not in (off.model_extra or {})
    card = rag_server.get("/v1/models").json()["data"][0]
    assert card["haina_rag"] == {"collection": "stand-in", "top_k": 2}


def test_without_a_provider_haina_rag_true_is_refused(api_server):
    r = api_server.post("/v1/chat/completions", {**CHAT, "haina_rag": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "haina_rag", r.text
    plain = api_server.post("/v1/chat/completions", CHAT).json()
    assert "sources" not in plain and "haina_rag" not in api_server.get("/v1/models").json()["data"][0]


def test_provider_errors_and_overflows(launch, tiny_ckpt, tmp_path):
    with launch(tiny_ckpt, served_model_name="tiny",
                context=functools.partial(StandIn, str(tmp_path / "a"), fail=True)) as server:
        r = server.post("/v1/chat/completions", CHAT)
        assert r.status_code == 503 and "the store is down" in r.json()["error"]["message"], r.text
        assert server.post("/v1/chat/completions", {**CHAT, "haina_rag": False}).status_code == 200
    # A provider that ignores `fits` gets the usual context-length error, not a crash.
    with launch(tiny_ckpt, served_model_name="tiny",
                context=functools.partial(StandIn, str(tmp_path / "b"), flood=True)) as server:
        r = server.post("/v1/chat/completions", CHAT)
        assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text


def test_a_provider_that_fails_to_build_is_a_load_error(launch, tiny_ckpt, tmp_path):
    def broken():
        raise HainaError("no collection 'x' in the store")

    with launch(tiny_ckpt, wait=False, context=broken) as server:
        assert not server.service.wait_ready(60)
        health = server.get("/health")
    assert health.status_code == 503 and "no collection 'x'" in health.json()["error"]["message"]


# ------------------------------------------------------------------------------ haina serve --rag, end to end
DOCS = {
    "cooking.md": "# Pasta\n\nBoil the pasta in salted water for nine minutes, then drain it and add the sauce.\n",
    "music.md": "# Instruments\n\nThe xylophone is struck with mallets; each wooden bar sounds one note.\n",
    "gardening.md": "# Roses\n\nPrune roses in late winter and water them deeply during dry summer weeks.\n",
}
# `haina serve` routed through the --rag wrapper, whatever haina/cli.py maps `serve` to.
SERVE_RAG = ("import sys, haina.cli as c; c.COMMANDS[('serve',)] = 'haina.rag.serving:serve_rag_command'; "
             "sys.exit(c.main())")


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    """A BM25-only collection `docs` in an exact store, indexed from DOCS."""
    pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'haina[rag]')")
    from haina.rag import open_store
    from haina.rag.index import index_documents

    root = tmp_path_factory.mktemp("kb")
    for name, text in DOCS.items():
        (root / name).write_text(text)
    with open_store("exact", root / "store") as store:
        index_documents(store, "docs", [str(root / n) for n in DOCS])
    return root


@pytest.fixture(scope="module")
def long_ckpt(kb):
    """A random model with room for a question and its sources (1,024 positions), and a tokenizer that knows DOCS."""
    from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START
    from haina.model import ModelConfig, Transformer
    from haina.model.checkpoint import save_model
    from haina.tokenizer.train import train_bpe

    tok = train_bpe([*DOCS.values(), "what how the and of sources answer cite number"] * 5, vocab_size=400,
                    special_tokens=("<|endoftext|>", IM_START, IM_END))
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=400, block_size=1024, n_layer=1, n_embd=32, n_head=2)
    save_model(kb / "ckpt", Transformer(cfg), tok)
    return kb / "ckpt"


@pytest.fixture(scope="module")
def rag_cli(kb, long_ckpt):
    """`haina serve --rag docs` in a child process; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-c", SERVE_RAG, "serve", "--checkpoint", str(long_ckpt), "--port", str(port),
           "--device", "cpu", "--threads", "1", "--served-model-name", "tiny", "--max-batch-size", "2", "--rag",
           "docs", "--rag-store", str(kb / "store"), "--rag-backend", "exact", "--rag-top-k", "2"]
    log = (kb / "server.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HAINA_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"haina serve --rag did not start:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_serve_rag_answers_with_the_matching_source(rag_cli):
    body = {**CHAT, "messages": [{"role": "user", "content": "what is a xylophone struck with?"}]}
    r = httpx.post(rag_cli + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    sources = r.json()["sources"]
    assert sources and sources[0]["n"] == 1 and sources[0]["source"].endswith("music.md")
    assert "xylophone" in sources[0]["text"] and sources[0]["score"] > 0 and sources[0]["id"]
    card = httpx.get(rag_cli + "/v1/models", timeout=10).json()["data"][0]
    assert card["haina_rag"] == {"collection": "docs", "top_k": 2, "mode": "bm25"}  # BM25-only: searched so


def test_serve_rag_refuses_a_missing_collection_before_starting(kb, tiny_ckpt):
    r = subprocess.run([sys.executable, "-c", SERVE_RAG, "serve", "--checkpoint", str(tiny_ckpt), "--rag", "nope",
                        "--rag-store", str(kb / "store"), "--rag-backend", "exact", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: no collection 'nope'") and r.stderr.count("\n") == 1, \
        r.stderr


# ------------------------------------------------------------------------------ the playground
@pytest.fixture(scope="module")
def browser():
    import shutil

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_sources_panel_and_toggle(rag_cli, api_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    # Without --rag there is neither toggle nor panel.
    browser.get(f"{api_server.url}/")
    wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value"))
    assert not browser.find_element(By.ID, "rag-toggle").is_displayed()
    assert not browser.find_element(By.ID, "sources-panel").is_displayed()

    browser.get(f"{rag_cli}/")
    wait.until(lambda d: d.find_element(By.ID, "rag-toggle").is_displayed())
    assert "(docs)" in browser.find_element(By.ID, "rag-name").text
    assert browser.find_element(By.ID, "use-rag").is_selected()
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("4")

    def ask(question: str) -> None:
        count = len(browser.find_elements(By.CSS_SELECTOR, "#messages .message.assistant"))
        browser.find_element(By.ID, "prompt").send_keys(question + "\n")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages .message.assistant:not(.streaming)"))
                   > count)
        assert not browser.find_elements(By.CSS_SELECTOR, "#messages .message.error")

    ask("how long do I boil pasta?")
    items = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sources li"))
    first = items[0]
    assert first.find_element(By.CSS_SELECTOR, ".n").text == "[1]"
    assert first.find_element(By.CSS_SELECTOR, ".path").text.endswith("cooking.md")
    assert float(first.find_element(By.CSS_SELECTOR, ".score").text) > 0
    assert "salted water" in first.get_attribute("title")  # the passage on hover
    first.find_element(By.CSS_SELECTOR, "summary").click()  # and on expanding
    assert "salted water" in first.find_element(By.CSS_SELECTOR, ".text").text
    assert "source" in browser.find_element(By.ID, "sources-note").text

    browser.find_element(By.ID, "use-rag").click()  # off: no retrieval, and the panel says so
    ask("and roses?")
    assert browser.find_elements(By.CSS_SELECTOR, "#sources li") == []
    assert "off" in browser.find_element(By.ID, "sources-note").text
