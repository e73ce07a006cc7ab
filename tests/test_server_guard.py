"""`dglocal serve` against what a local app server meets besides well-formed requests: a key on every route, pages
of other sites, bodies too large to read, clients that leave without a word, bursts, and fields sent to the wrong
route. A real server process on 127.0.0.1, raw sockets where a client misbehaves."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_server import Server

pytestmark = pytest.mark.backend

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def keyed(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-c", "1024", "--api-key", "sekrit", "--alias", "tiny")
    yield s
    s.stop()


def get(s, path: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(s.url + path, headers=headers or {}), timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def raw(s, request: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        sock.sendall(request)
        return sock.recv(4096) if read else b""


def test_every_route_but_health_models_and_the_page_needs_the_key(keyed):
    """As llama-server: /health, /v1/models and the page are open; generation, the adapters' scales, the slots
    and the metrics are not. Before, only /v1/ was guarded: /infill, POST /lora-adapters, /slots and /metrics
    answered without the key."""
    key = {"Authorization": "Bearer sekrit"}
    for path in ("/health", "/v1/models", "/v1/models/tiny", "/"):
        assert get(keyed, path) in (200, 404) and get(keyed, path) != 401, path
    assert get(keyed, "/health") == get(keyed, "/v1/models") == get(keyed, "/") == 200
    for path in ("/slots", "/metrics", "/lora-adapters"):
        assert get(keyed, path) == 401, path
        assert get(keyed, path, {"Authorization": "Bearer wrong"}) == 401, path
        assert get(keyed, path, key) == 200, path
    for path, body in (("/infill", {"input_prefix": "a", "input_suffix": "b"}), ("/lora-adapters", []),
                       ("/v1/edits", {"input": "ab", "spans": [[0, 1]]}), ("/v1/chat/completions", {"messages": HI})):
        code, reply, _ = keyed.post(path, json.dumps(body))
        assert code == 401 and reply["error"]["code"] == "invalid_api_key", path
    code, _, _ = keyed.post("/infill", json.dumps({"input_prefix": "a", "input_suffix": "b", "n_predict": 4,
                                                   "max_denoising_steps": 2}), key)
    assert code == 200


def test_a_page_of_another_site_cannot_post(tiny_server):
    """A cross-site text/plain POST needs no CORS preflight: before, it changed every user's adapter scales and
    could drive the model. A browser names the page's origin; requests from the server's own page still work."""
    body = json.dumps({"messages": HI, "max_tokens": 4, "max_denoising_steps": 2})
    code, reply, _ = tiny_server.post("/v1/chat/completions", body, {"Origin": "http://evil.example",
                                                                     "Content-Type": "text/plain"})
    assert code == 403 and reply["error"]["code"] == "cross_origin"
    code, reply, _ = tiny_server.post("/lora-adapters", "[]", {"Origin": "http://evil.example"})
    assert code == 403
    own = f"127.0.0.1:{tiny_server.port}"
    code, _, _ = tiny_server.post("/v1/chat/completions", body, {"Origin": f"http://{own}", "Host": own})
    assert code == 200


def test_bodies_past_the_limit_are_refused_before_they_are_read(tiny_server):
    """Content-Length 10 GB: a 413 at once (before, neither refused nor timed out); a chunked body is cut off at
    the limit; an integer of 5,000 digits is a 400 (Python's digit limit raised a bare ValueError: a 500)."""
    t0 = time.monotonic()
    head = raw(tiny_server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 10000000000\r\n\r\n{")
    assert head.startswith(b"HTTP/1.1 413") and time.monotonic() - t0 < 10
    with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(70):  # 70 MiB, over the 64 MiB limit
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:  # the server answered and closed: what it said is still to be read
            pass
        assert sock.recv(64).startswith(b"HTTP/1.1 413")
    code, reply, _ = tiny_server.post("/v1/chat/completions", '{"messages": [], "seed": ' + "9" * 5000 + "}")
    assert code == 400 and "digit" in reply["error"]["message"]
    assert get(tiny_server, "/health") == 200


def test_a_client_that_leaves_a_request_frees_its_slot_and_bursts_wait(tiny_f32_gguf):
    """One slot. A non-streaming request of 4,096 tokens whose client closes after 3 s: cancelled within a step
    (before, it kept the slot to its end: the next request had no answer in 240 s). Then a burst of 24 requests:
    all answered (before, the default queue of 4 x slots refused 20 of them with 503s)."""
    s = Server(str(tiny_f32_gguf), "-np", "1", "-c", "8192", "--alias", "tiny")
    try:
        long = json.dumps({"messages": HI, "max_tokens": 4096, "max_denoising_steps": 48, "ignore_eos": True})
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(long)}\r\n\r\n{long}".encode())
        deadline = time.monotonic() + 60
        while not json.load(urllib.request.urlopen(s.url + "/slots", timeout=30))[0]["busy"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(3)
        sock.close()
        deadline = time.monotonic() + 30
        while json.load(urllib.request.urlopen(s.url + "/slots", timeout=30))[0]["busy"]:
            assert time.monotonic() < deadline, "the dropped request kept its slot"
            time.sleep(0.1)
        small = json.dumps({"messages": HI, "max_tokens": 8, "max_denoising_steps": 2})
        with ThreadPoolExecutor(24) as pool:
            codes = [r[0] for r in pool.map(lambda _: s.post("/v1/chat/completions", small), range(24))]
        assert codes == [200] * 24
    finally:
        s.stop()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/edits", {"input": "ab", "spans": [[0, 1]], "suffix": "x"}, "suffix"),
    ("/v1/edits", {"input": "ab", "spans": [[0, 1]], "messages": HI}, "messages"),
    ("/v1/edits", {"input": "ab", "spans": [[0, 1]], "tools": []}, "tools"),
    ("/v1/edits", {"input": "ab", "spans": [[0, 1]], "guided_regex": "a+"}, "guided_regex"),
    ("/v1/edits", {"input": "ab", "spans": [[0, 1]], "max_tokens": 1}, "max_tokens"),
    ("/v1/edits", {"input": "ab", "spans": [[0, 1]], "stop": ["b"]}, "stop"),
    ("/infill", {"input_prefix": "a", "input_suffix": "b", "input_extra": 0}, "input_extra"),
    ("/infill", {"input_prefix": "a", "input_suffix": "b", "messages": HI}, "messages"),
    ("/infill", {"input_prefix": "a", "input_suffix": "b", "n_predict": 10**7}, "n_predict"),
    ("/infill", {"input_prefix": "a", "input_suffix": "b", "n_predict": 2**30}, "n_predict"),
    ("/v1/chat/completions", {"messages": HI, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ("/v1/chat/completions", {"messages": HI, "input": "ab"}, "input"),
    ("/v1/completions", {"prompt": "a", "messages": HI}, "messages"),
])
def test_a_field_of_another_route_is_refused_by_name(tiny_server, path, body, param):
    """Before, an edit accepted suffix, messages, tools and guided_regex and ignored them, returned 49 tokens for
    max_tokens 1 and cut its pinned text at a stop string; input_extra 0 passed as empty; parallel_tool_calls "no"
    passed; an infill's length error named the internal max_middle."""
    code, reply, _ = tiny_server.post(path, json.dumps(body))
    assert code == 400 and reply["error"]["param"] == param, reply
    assert "max_middle" not in reply["error"]["message"]


def test_an_edit_counts_only_the_tokens_it_wrote(tiny_server):
    """usage.completion_tokens of an edit: what the model wrote in its spans (before: the whole layout, pinned
    text and fillers included)."""
    text = "The cat sat on the mat. It was happy."
    code, reply, _ = tiny_server.post("/v1/edits", json.dumps({"input": text, "spans": [[4, 7]], "seed": 3,
                                                               "max_denoising_steps": 4}))
    assert code == 200, reply
    # the span had a token or two and no room: the model wrote at most those, never the pinned 10+ tokens
    assert 0 <= reply["usage"]["completion_tokens"] <= 3, reply["usage"]


@pytest.fixture(scope="module")
def tiny_server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "2048", "--alias", "tiny", "--seed", "1")
    yield s
    s.stop()
