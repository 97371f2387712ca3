"""The chat playground at `GET /`, in Debian's headless Chromium driven by Selenium, against a real `haina serve`.

Skips (saying why) when chromium or chromedriver is not installed; `make test` installs them when it may.
"""

import shutil

import httpx
import pytest
import torch

from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.serve.process import serve_process
from haina.tokenizer.train import train_bpe

CORPUS = ["the cat sat on the mat and the dog ran to the park. " * 10, "héllo wörld café 日本語 😀 " * 10,
          "To be, or not to be, that is the question. " * 10]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
KEY = "sk-playground-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`haina serve` (API key KEY) on a free loopback port, with a tiny random checkpoint; yields its base URL."""
    tmp = tmp_path_factory.mktemp("playground")
    torch.manual_seed(0)
    # 256 positions: the chat template's prompt plus the answer must fit the context.
    save_model(tmp / "ckpt", Transformer(ModelConfig.from_name("tiny", vocab_size=320, block_size=256, n_layer=2)),
               train_bpe(CORPUS, vocab_size=320))
    with serve_process(tmp / "ckpt", "--max-batch-size", "4", "--api-key", KEY, log_path=tmp / "server.log",
                       timeout=60) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_static_files_are_served_without_a_key(server):
    page = httpx.get(f"{server}/", timeout=10)
    assert page.status_code == 200 and 'id="prompt"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        r = httpx.get(f"{server}/static/{name}", timeout=10)
        assert r.status_code == 200 and kind in r.headers["content-type"], (name, r.status_code, r.headers)


def test_chat_streams_an_answer_with_stats(server, browser):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    wait = WebDriverWait(browser, 20)
    # Without the key the model list fails readably; with it (typed in, kept in localStorage) it loads.
    wait.until(lambda d: "401" in d.find_element(By.ID, "stats").text)
    browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)  # leaving the field fires "change"
    wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value"))
    assert browser.execute_script("return localStorage.getItem('haina.playground.apiKey')") == KEY
    assert browser.find_element(By.ID, "stats").text == ""
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")
    browser.execute_script("const t = document.getElementById('temperature'); t.value = '0';"
                           "t.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.ID, "temperature-value").text == "0"

    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("the cat", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "sat")  # Shift+Enter: a newline, not a send
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .message") == []
    browser.find_element(By.ID, "send").click()

    # textContent, not .text: a random model's answer may be only whitespace, which .text strips away.
    done = "#messages .message.assistant:not(.streaming) .content, #messages .message.error .content"
    try:
        answer = wait.until(lambda d: [t for e in d.find_elements(By.CSS_SELECTOR, done)
                                       if (t := e.get_attribute("textContent"))])
    except TimeoutException:
        pytest.fail(f"no answer within 20 s; the page shows: {browser.find_element(By.ID, 'messages').text!r}")
    errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#messages .message.error")]
    assert not errors, errors
    assert len(answer) == 1 and answer[0]
    # The streamed pieces add up to the greedy answer the API gives without streaming.
    body = {"messages": [{"role": "user", "content": "the cat\nsat"}], "max_tokens": 24, "temperature": 0}
    full = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30).json()
    assert answer[0] == full["choices"][0]["message"]["content"]
    users = browser.find_elements(By.CSS_SELECTOR, "#messages .message.user .content")
    assert [u.text for u in users] == ["the cat\nsat"]
    stats = browser.find_element(By.ID, "stats").text
    assert "tokens/s" in stats and "TTFT" in stats, stats
    generated = int(stats.split(" tokens", 1)[0])
    assert 1 <= generated <= 24, stats
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()

    # An OpenAI-shaped error is shown readably: max tokens beyond the context is a 400.
    max_tokens.clear()
    max_tokens.send_keys("100000")
    prompt.send_keys("again", Keys.ENTER)
    error = wait.until(lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#messages .message.error")])
    assert "HTTP 400" in error[0], error
    assert prompt.get_attribute("value") == "again"  # the failed message is given back to resend
