"""The web page at `/`, in a real browser: headless Chromium (Debian's) driven by Playwright, against a real
`dglocal serve` process on 127.0.0.1. What the page shows must be what the API answers to the same request."""

from __future__ import annotations

import json
import shutil

import pytest

import tiny
from test_server import Server
from test_sudoku import easy_puzzle

pytestmark = pytest.mark.backend

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# no background connections: this machine's network is closed, and Chromium retries them at every start
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "sk-page"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def chat_server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "1", "-c", "2048", "--alias", "tiny", "--seed", "1", "--api-key", KEY)
    yield s
    s.stop()


def _api(server, body: dict) -> dict:
    code, reply, _ = server.post("/v1/chat/completions", json.dumps(body), {"authorization": f"Bearer {KEY}"})
    assert code == 200, reply
    return reply


def _ask(page, text: str, n: int) -> str:
    """Send `text` from the page; the answer of the n-th assistant message once it has streamed to its end."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    box = page.locator(".msg.assistant").nth(n)
    box.wait_for(state="attached")
    page.wait_for_function("n => document.querySelectorAll('.msg.assistant')[n].dataset.done", arg=n,
                           timeout=120_000)
    assert box.get_attribute("data-done") == "1", box.inner_text()
    return box.locator("span").last.text_content()


def test_chat_page_streams_the_live_canvas_and_answers_as_the_api(browser, chat_server):
    page = browser.new_page()
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(chat_server.url + "/")
    assert page.inner_text("#model") == f"tiny · canvas {tiny.CANVAS} tokens"
    settings = dict(seed=5, steps=6, max_tokens=40)
    for name, value in settings.items():
        page.fill(f"#{name}", str(value))

    page.fill("#prompt", "Hello there")  # no key yet: the 401 is shown, and the page keeps working
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant .error")
    assert "API key" in page.inner_text(".msg.assistant .error")
    page.click("#reset")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")

    first = _ask(page, "Hello there", 0)
    body = dict(messages=[{"role": "user", "content": "Hello there"}], seed=5, max_denoising_steps=6, max_tokens=40,
                temperature=1, top_p=1)
    reply = _api(chat_server, body)
    assert first == reply["choices"][0]["message"]["content"]
    steps = sum(reply["dglocal"]["steps_per_canvas"])
    assert int(page.get_attribute("#canvas", "data-drafts")) == steps  # a live canvas per denoising step
    assert page.locator("#canvas .tok").count() == tiny.CANVAS  # every position of the canvas
    assert "steps" in page.inner_text("#status") and "seed 5" in page.inner_text("#status")
    assert sent[-1]["stream_options"] == {"include_drafts": True, "include_usage": True}

    page.check("#think")  # the second turn carries the first, and asks the template to think
    second = _ask(page, "And then?", 1)
    history = body["messages"] + [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    assert sent[-1]["messages"] == history and sent[-1]["chat_template_kwargs"] == {"enable_thinking": True}
    again = _api(chat_server, dict(body, messages=history, chat_template_kwargs={"enable_thinking": True}))
    message = again["choices"][0]["message"]
    assert second == message["content"]
    assert page.locator(".msg.assistant").nth(1).locator("details").inner_text().strip() in (
        "thinking" + (message.get("reasoning_content") or ""), "thinking")

    # a draft with positions re-noised (by a guide or a grammar): those are struck, accepted ones firm
    page.evaluate("""showDraft({block: 0, step: 3, pieces: ["a", "b", "", "d"], accepted: [1, 0, 0, 1],
                                guided: [0, 0, 1, 1], mean_entropy: 0.5, temperature: 0.6})""")
    kinds = page.eval_on_selector_all("#canvas .tok", "spans => spans.map(s => s.className + ':' + s.textContent)")
    assert kinds == ["tok held:a", "tok noisy:b", "tok renoised:·", "tok renoised:d"]
    assert "step 4 · 2/4 accepted" in page.inner_text("#status")
    page.close()


def test_sudoku_page_fills_the_board_as_the_api_answers(browser):
    from dglocal.sudoku.core import check_grid

    puzzle, solution = easy_puzzle()
    server = Server("--seed", "3")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        assert page.is_visible("#board") and not page.is_visible("#prompt")
        page.click("#sample")  # the sample loads, Clear empties the board
        assert page.locator("#board input.given").count() == 30
        page.click("#clear")
        assert page.locator("#board input.given").count() == 0
        cells = page.locator("#board input")
        for i, d in enumerate(puzzle):
            if d != ".":
                cells.nth(i).fill(d)
        page.fill("#seed", "7")
        page.click("#solve")
        page.wait_for_function("document.querySelector('.msg.assistant') && "
                               "document.querySelector('.msg.assistant').dataset.done", timeout=120_000)
        board = "".join(cells.nth(i).input_value() for i in range(81))
        drafts = int(page.get_attribute("#canvas", "data-drafts"))
        page.close()
        code, reply, _ = server.post("/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": puzzle}], "seed": 7}))
        assert code == 200, reply
        answer = reply["choices"][0]["message"]["content"].replace("\n", "")
        assert board == answer and check_grid(puzzle, answer) and answer == solution
        assert drafts == sum(reply["dglocal"]["steps_per_canvas"]) >= 1
    finally:
        server.stop()
