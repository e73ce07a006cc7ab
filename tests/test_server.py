"""`dglocal serve` as apps use it: a real server process on 127.0.0.1 and the official `openai` client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from test_cli import DGLOCAL, program_env
from test_sudoku import easy_puzzle

from dglocal.convert.hub import DEFAULT_MODEL

pytestmark = pytest.mark.backend

SMALL = dict(max_tokens=24, extra_body={"max_denoising_steps": 4})
# A request compared with the Python API: the prompt encoded afresh on both sides. With prefix reuse, which slot
# history a request meets depends on what ran before; where keys sit in the cache moves attention's rounding,
# and a random-weight model's draws flip on the last bit.
FRESH = dict(max_tokens=24, extra_body={"max_denoising_steps": 4, "cache_prompt": False})
REF = dict(max_new_tokens=24, max_denoising_steps=4, cache_prompt=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*DGLOCAL, "serve", *args, "--port", str(self.port), "-t", "1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=program_env())
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.log)
            try:
                if json.load(urllib.request.urlopen(self.url + "/health", timeout=2))["status"] == "ok":
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not come up:\n" + "".join(self.log))

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=120, **kw)

    def post(self, path: str, body: bytes | str, headers: dict | None = None) -> tuple[int, dict, dict]:
        req = urllib.request.Request(self.url + path, data=body if isinstance(body, bytes) else body.encode(),
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.load(r), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e), dict(e.headers)

    def metrics(self) -> str:
        return urllib.request.urlopen(self.url + "/metrics", timeout=30).read().decode()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "2048", "--alias", "tiny", "--seed", "1", "-ngl", "99")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(tiny_f32_gguf):
    """The same file through the Python API, for what a request must answer."""
    import dglocal

    m = dglocal.load(tiny_f32_gguf, n_ctx=1024, n_threads=1)
    yield m
    m.close()


def chat_tokens(model, messages):
    from dglocal.generation.chat import ChatSession

    return ChatSession(model).prompt_tokens(messages)


@pytest.mark.gpu_tier
def test_models_and_health(tiny_server):
    assert [m.id for m in tiny_server.client().models.list().data] == ["tiny"]
    banner = next(line for line in tiny_server.log if "dglocal serve:" in line)
    # -ngl 99: on a build with a GPU every weight but the token embedding (llama.cpp keeps it on the host) is there
    device = os.environ.get("DGLOCAL_TEST_DEVICE")
    assert (f"weights on {device} " if device else "weights on CPU") in banner, banner  # CPU: CPU_Mapped, CPU_REPACK..


@pytest.mark.gpu_tier
def test_chat_stream_equals_whole_equals_generate(tiny_server, reference):
    c = tiny_server.client()
    msgs = [{"role": "user", "content": "Write a line about the sea."}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, seed=3, **FRESH)
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, seed=3, stream=True,
                                            stream_options={"include_usage": True}, **FRESH))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    want = reference.generate(chat_tokens(reference, msgs), seed=3, **REF)
    assert whole.choices[0].message.content == streamed == want.text
    assert whole.model_extra["dglocal"]["prompt_tokens_cached"] == 0  # cache_prompt false: all encoded
    assert whole.choices[0].finish_reason == ("stop" if want.finish_reason != "length" else "length")
    prompt = len(chat_tokens(reference, msgs))
    assert whole.usage.prompt_tokens == prompt and whole.usage.completion_tokens == len(want.tokens)
    assert chunks[-1].usage.prompt_tokens == prompt and chunks[-1].usage.total_tokens == prompt + len(want.tokens)
    text_chunks = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(text_chunks) == 2  # a chunk per committed canvas (24 tokens: two canvases of 16), not at the end


def test_live_canvas_drafts_are_ordered(tiny_server):
    chunks = list(tiny_server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], seed=4, stream=True,
        stream_options={"include_drafts": True}, **SMALL))
    drafts = [ch.model_extra["dglocal_draft"] for ch in chunks if "dglocal_draft" in (ch.model_extra or {})]
    assert [(d["block"], d["step"]) for d in drafts] == [(b, s) for b in range(2) for s in range(1, 5)]
    assert all(len(d["accepted"]) == 16 and isinstance(d["text"], str) for d in drafts)


def test_completions_and_stop_strings(tiny_server, reference):
    c = tiny_server.client()
    r = c.completions.create(model="tiny", prompt="Once upon a time", seed=5, **FRESH)
    want = reference.generate("Once upon a time", seed=5, **REF)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.tokens)
    stop = want.text[3:5]
    s = c.completions.create(model="tiny", prompt="Once upon a time", seed=5, stop=[stop], **FRESH)
    assert s.choices[0].text == want.text[: want.text.index(stop)] and s.choices[0].finish_reason == "stop"


def test_second_turn_encodes_only_the_new_tokens(tiny_f32_gguf):
    """A chat's second turn reuses the slot's cached first turn and encodes the rest; its answer is what the
    Python API gives after the same two turns on one sequence. (A server of its own, and a model of its own, so
    that both caches hold the same history: where keys sit in the cache decides the float rounding of
    attention, and a random-weight model's draws flip on the last bit.)"""
    import dglocal
    from dglocal.generation.chat import ChatSession

    server = Server(str(tiny_f32_gguf), "-np", "1", "-c", "1024", "--alias", "tiny", "--seed", "1")
    try:
        c = server.client()
        first = [{"role": "user", "content": "Tell me something."}]
        a = c.chat.completions.create(model="tiny", messages=first, seed=6, **SMALL)
        turn = first + [{"role": "assistant", "content": a.choices[0].message.content},
                        {"role": "user", "content": "And then?"}]
        b = c.chat.completions.create(model="tiny", messages=turn, seed=7, **SMALL)
    finally:
        server.stop()
    stats = b.model_extra["dglocal"]
    with dglocal.load(tiny_f32_gguf, n_ctx=1024, n_threads=1) as ref:
        chat = ChatSession(ref)  # its prompt_tokens only (creating another would empty the cache)
        # Gemma 4's template drops the generation prompt's thought channel from the history: the whole first
        # user turn is reused, the reply is encoded again (as in llama-server)
        turn1 = chat.template.render(messages=first, add_generation_prompt=False, bos_token="")
        assert stats["prompt_tokens_cached"] >= len(ref.tokenize(turn1, add_special=True))
        assert stats["prompt_tokens_encoded"] == b.usage.prompt_tokens - stats["prompt_tokens_cached"]
        options = dict(max_new_tokens=24, max_denoising_steps=4)
        assert a.choices[0].message.content == ref.generate(chat.prompt_tokens(first), seed=6, **options).text
        again = ref.generate(chat.prompt_tokens(turn), seed=7, **options)  # same sequence: the prefix is reused
        assert b.choices[0].message.content == again.text


def test_errors_are_openai_shaped_and_the_server_keeps_serving(tiny_server):
    cases = [
        (b"{not json", 400, None),
        (json.dumps({"messages": "hi"}), 400, "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}), 400, "max_tokens"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.2}), 400, "temperature"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 17}), 400, "n"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "t_min": 2, "t_max": 1}), 400, None),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}), 400, "bogus"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "ignore_eos": "yes"}), 400, "ignore_eos"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "cache_prompt": 0}), 400, "cache_prompt"),
        (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}), 404, "model"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}), 400, "max_tokens"),
    ]
    for body, status, param in cases:
        code, reply, _ = tiny_server.post("/v1/chat/completions", body)
        assert code == status and set(reply["error"]) == {"message", "type", "param", "code"}, (body, reply)
        assert reply["error"]["param"] == param, reply
    code, reply, _ = tiny_server.post("/v1/chat/completions", cases[-1][0])
    assert "need" in reply["error"]["message"] and "1024" in reply["error"]["message"]  # both numbers named
    assert tiny_server.client().models.list().data  # still serving


def test_load_concurrent_streams_each_answered_once_and_right(tiny_server, reference):
    """8 concurrent streaming clients x 5 requests on 2 slots: every answer once, each equal to its request
    served alone with its seed (FRESH: the prompt encoded afresh on both sides)."""
    c = tiny_server.client()
    prompts = [f"Request number {i}." for i in range(8)]

    def client(i):
        out = []
        for k in range(5):
            msgs = [{"role": "user", "content": prompts[i]}]
            chunks = c.chat.completions.create(model="tiny", messages=msgs, seed=100 * i + k, stream=True, **FRESH)
            out.append((i, k, "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        answers = [a for part in pool.map(client, range(8)) for a in part]
    elapsed = time.perf_counter() - t0
    assert sorted((i, k) for i, k, _ in answers) == [(i, k) for i in range(8) for k in range(5)]
    for i, k, text in answers:
        want = reference.generate(chat_tokens(reference, [{"role": "user", "content": prompts[i]}]),
                                  seed=100 * i + k, **REF)
        assert text == want.text, (i, k)
    print(f"40 streamed requests on 2 slots in {elapsed:.1f} s")


def test_queue_full_gives_503_and_a_dropped_client_frees_its_slot(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "1", "--queue", "1", "-c", "4096", "--alias", "tiny")
    try:
        # long whatever the build's speed: 64 canvases, no end at an EOS the random weights may draw
        long = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2048,
                           "max_denoising_steps": 48, "ignore_eos": True, "stream": True})
        # a client that starts a long stream and disconnects after the first bytes
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(long)}\r\n\r\n{long}".encode())
        sock.recv(64)
        with ThreadPoolExecutor(3) as pool:  # the slot is busy: one request waits, the next is refused
            waits = pool.submit(s.post, "/v1/chat/completions", json.dumps(
                {"messages": [{"role": "user", "content": "a"}], "max_tokens": 16, "max_denoising_steps": 2}))
            deadline = time.monotonic() + 60  # until it waits: a loaded machine may take a while to send it
            while "dglocal_queue_length 1.0" not in s.metrics() and time.monotonic() < deadline:
                time.sleep(0.05)
            code, reply, headers = s.post("/v1/chat/completions", json.dumps(
                {"messages": [{"role": "user", "content": "b"}], "max_tokens": 16}))
            assert code == 503 and headers.get("retry-after") == "1" and reply["error"]["type"] == "server_error"
            sock.close()  # the long stream's client goes away
            t0 = time.perf_counter()
            code, reply, _ = waits.result(timeout=120)
            assert code == 200 and reply["choices"][0]["message"]["content"] is not None
            assert time.perf_counter() - t0 < 30  # the waiting request got the freed slot
        assert s.client().models.list().data
    finally:
        s.stop()


def test_api_key(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-c", "1024", "--api-key", "sekrit", "--alias", "tiny")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}])
        assert s.client(api_key="wrong").models.list().data[0].id == "tiny"  # open, as llama-server's
        assert s.client(api_key="sekrit").models.list().data[0].id == "tiny"
    finally:
        s.stop()


def test_sudoku_served_with_no_model():
    from dglocal.sudoku import core as sc

    s = Server("-np", "2")
    try:
        c = s.client()
        assert [m.id for m in c.models.list().data] == ["sudoku"]
        puzzle, solution = easy_puzzle()
        r = c.chat.completions.create(model="sudoku", messages=[{"role": "user", "content": puzzle}], seed=0)
        grid = "".join(r.choices[0].message.content.split())
        assert grid == solution and sc.check_grid(puzzle, grid), r.choices[0].message.content
        code, reply, _ = s.post("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
        assert code == 400 and "Sudoku puzzle" in reply["error"]["message"]
        code, reply, _ = s.post("/v1/chat/completions",
                                json.dumps({"messages": [{"role": "user", "content": "55" + "." * 79}]}))
        assert code == 400 and "its givens break a rule (5 twice in row 1)" in reply["error"]["message"], reply
    finally:
        s.stop()
    s = Server(str(DEFAULT_MODEL), "-np", "1")  # named as MODEL: served as the built-in one, not as a chat model
    try:
        r = s.client().chat.completions.create(model="sudoku", messages=[{"role": "user", "content": puzzle}], seed=0)
        assert "".join(r.choices[0].message.content.split()) == solution, r.choices[0].message.content
    finally:
        s.stop()


@pytest.mark.gpu_tier
def test_the_fast_sampler_is_a_request_field(tiny_server, reference):
    """`sampler` and `fast_k` as extra body fields (chat, completions) answer what the Python API gives with the
    same settings; a sampler the server does not know is a 400 naming the field."""
    c = tiny_server.client()
    fast = dict(sampler="fast", fast_k=24)
    r = c.completions.create(model="tiny", prompt="Once upon a time", seed=5, max_tokens=FRESH["max_tokens"],
                             extra_body={**FRESH["extra_body"], **fast})
    want = reference.generate("Once upon a time", seed=5, **REF, **fast)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.tokens)
    status, body, _ = tiny_server.post("/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "sampler": "turbo"}))
    assert status == 400 and body["error"]["param"] == "sampler" and "reference" in body["error"]["message"]
    status, body, _ = tiny_server.post("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "fast_k": 0}))
    assert status == 400 and body["error"]["param"] == "fast_k"
