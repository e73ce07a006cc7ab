"""llama-server's /tokenize, /detokenize and /props through a real `dglocal serve` and httpx: the ids are the
Python API's tokenizer's, the shapes llama-server's, and bad input a 400 that names the value, never a 500."""

from __future__ import annotations

import httpx
import pytest

import tiny
from test_server import Server
from test_server import reference as api  # noqa: F401 (the tiny GGUF through the Python API)

pytestmark = pytest.mark.backend

KEY = {"Authorization": "Bearer sekrit"}
TEXT = "Once upon a time, there was a story."


@pytest.fixture(scope="module")
def server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "2048", "--alias", "tiny", "--api-key", "sekrit")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=KEY, timeout=120) as client:
        yield client


def test_tokenize_and_detokenize_are_the_models_tokenizer(http, api):
    plain = api.tokenize(TEXT, add_special=False, parse_special=True)
    assert http.post("/tokenize", json={"content": TEXT}).json() == {"tokens": plain}  # add_special: false
    assert http.post("/tokenize", json={"content": TEXT, "add_special": True}).json()["tokens"] == \
        api.tokenize(TEXT, add_special=True, parse_special=True)
    pieces = http.post("/tokenize", json={"content": TEXT, "with_pieces": True}).json()["tokens"]
    # the tiny vocabulary spells much of it in byte tokens (a space is the three bytes of "▁"): their pieces are
    # bytes, and the text they join to is the model's own detokenization
    assert [p["id"] for p in pieces] == plain and any(isinstance(p["piece"], list) for p in pieces)
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined == b"".join(api.token_piece(t, special=True) for t in plain)
    assert http.post("/detokenize", json={"tokens": plain}).json() == {"content": api.detokenize(plain, special=True)}
    assert http.post("/detokenize", json={"tokens": plain}).json()["content"].replace("\u2581", " ") == TEXT
    assert http.post("/detokenize", json={}).json() == {"content": ""}  # llama-server's: no tokens, no text
    # llama-server's mixed content: strings and ids, the BOS only before a first string
    mixed = http.post("/tokenize", json={"content": ["Once", 5, " upon"], "add_special": True}).json()["tokens"]
    assert mixed == api.tokenize("Once", add_special=True) + [5] + api.tokenize(" upon", add_special=False)
    assert http.post("/tokenize", json={"content": [5, "Once"], "add_special": True}).json()["tokens"] == \
        [5] + api.tokenize("Once", add_special=False)


def test_special_tokens_and_pieces_that_are_not_text(http, api):
    bos = api.tokenize("", add_special=True)[0]
    special = api.token_piece(bos, special=True).decode()
    assert http.post("/tokenize", json={"content": special}).json()["tokens"] == [bos]  # parse_special: true
    as_text = http.post("/tokenize", json={"content": special, "parse_special": False}).json()["tokens"]
    assert bos not in as_text and api.detokenize(as_text) == special
    assert http.post("/detokenize", json={"tokens": [bos]}).json()["content"] == special
    partial = [t for t in range(tiny.VOCAB) if not _utf8(api.token_piece(t, special=True))]
    if partial:  # a byte token: its piece is its bytes, its text U+FFFD
        t = partial[0]
        piece = http.post("/tokenize", json={"content": [t], "with_pieces": True}).json()["tokens"][0]
        assert piece == {"id": t, "piece": list(api.token_piece(t, special=True))}
        assert "\ufffd" in http.post("/detokenize", json={"tokens": [t]}).json()["content"]


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


V = tiny.VOCAB


@pytest.mark.parametrize("path, body, param, words", [
    ("/tokenize", {}, "content", "required"),
    ("/tokenize", {"content": 5}, "content", "a string or a list"),
    ("/tokenize", {"content": ["a", 1.5]}, "content", "content[1] must be a token id"),
    ("/tokenize", {"content": ["a", True]}, "content", "content[1] must be a token id"),
    ("/tokenize", {"content": ["a", V]}, "content", f"content[1] is {V}: outside the vocabulary [0, {V})"),
    ("/tokenize", {"content": "a", "add_special": "yes"}, "add_special", "boolean"),
    ("/tokenize", {"content": "a", "with_pieces": 1}, "with_pieces", "boolean"),
    ("/tokenize", {"content": "a", "special": True}, "special", "does not take"),
    ("/tokenize", {"content": "x" * ((1 << 22) + 1)}, "content", "tokenize it in parts"),
    ("/detokenize", {"tokens": [1, "a"]}, "tokens", "tokens[1] must be a token id"),
    ("/detokenize", {"tokens": [-1]}, "tokens", f"tokens[0] is -1: outside the vocabulary [0, {V})"),
    ("/detokenize", {"tokens": [2, V]}, "tokens", f"tokens[1] is {V}"),
    ("/detokenize", {"tokens": [10**400]}, "tokens", "outside the vocabulary"),
    ("/detokenize", {"tokens": "1 2"}, "tokens", "a list of token ids"),
    ("/detokenize", {"tokens": [0] * ((1 << 20) + 1)}, "tokens", "detokenize them in parts"),
    ("/detokenize", {"tokens": [1], "content": "x"}, "content", "does not take"),
])
def test_bad_input_is_a_400_that_names_it(http, path, body, param, words):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_bodies_that_are_not_objects_and_routes_without_the_key(http, server):
    for body in (b"not json", b"[1, 2]", b'{"content": "\\ud800"}', b'{"tokens": [1e400]}'):
        for path in ("/tokenize", "/detokenize"):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and "error" in r.json(), (path, body, r.text)
    with httpx.Client(base_url=server.url, timeout=60) as anonymous:
        for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/props")):
            r = anonymous.request(method, path, json={"content": "x"} if method == "POST" else None)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    assert http.post("/props").status_code == 405  # llama-server's POST /props needs --props: not served


def test_props_say_what_the_server_runs(http, api, tiny_f32_gguf):
    from dglocal.generation.config import GenerationConfig

    props = http.get("/props").json()
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] == 1024  # -c 2048 over two slots
    config = GenerationConfig.from_metadata(api.metadata)
    params = settings["params"]
    assert params["max_denoising_steps"] == config.max_denoising_steps and params["t_max"] == config.t_max
    assert params["seed"] == -1 and params["n_predict"] == -1 and params["temperature"] == 1.0
    assert params["lora"] == []
    assert props["total_slots"] == 2 and props["model_alias"] == "tiny"
    assert props["model_path"] == str(tiny_f32_gguf) and props["chat_template"] == (api.chat_template or "")
    assert props["modalities"] == {"vision": False, "video": False, "audio": False}
    bos = api.tokenize("", add_special=True)[0]
    assert props["bos_token"] == api.token_piece(bos, special=True).decode()
    assert props["build_info"].startswith("dglocal ") and props["is_sleeping"] is False
