"""Never crash, round two: one test per class of misuse. Signals and hangs are looked for in child processes;
every refusal must be a DglocalError (or an HTTP 4xx in OpenAI's error shape) that names the value."""

from __future__ import annotations

import errno
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from test_cli import DGLOCAL, program_env
from test_robustness import _rewrite, child
from test_server import Server

import dglocal
from dglocal.errors import ConfigError, ConvertError, DglocalError, ModelError

pytestmark = pytest.mark.backend

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "max_denoising_steps": 2}


@pytest.fixture(scope="module")
def server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "2048", "--seed", "1")
    yield s
    s.stop()


def _post(server, body) -> tuple[int, dict]:
    code, reply, _ = server.post("/v1/chat/completions", body if isinstance(body, (bytes, str)) else json.dumps(body))
    return code, reply


def _openai_error(reply: dict) -> bool:
    return set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}


# -- the server: a 400 naming the field, never a 500 -----------------------------------------------------------

BAD = [  # (body, param the 400 names)
    (dict(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]), "messages"),
    (dict(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": None}]}]), "messages"),
    (dict(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]), "messages"),
    (dict(CHAT, messages=[{"role": "user", "content": ["bare string"]}]), "messages"),
    (dict(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages"),
    (dict(CHAT, messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]), "messages"),
    (dict(CHAT, messages=[{"role": "tool", "content": "42", "tool_call_id": "a", "extra": 1}]), "messages"),
    (dict(CHAT, messages=[{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]),
     "messages"),
    (dict(CHAT, messages=[{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]), "messages"),
    (dict(CHAT, messages=[{"role": "user", "content": "hi", "name": 5}]), "messages"),  # a name is text
    (dict(CHAT, messages=[{"role": "assistant", "content": "a", "refusal": "no"}]), "messages"),  # null only
    (dict(CHAT, max_tokens=10**300), "max_tokens"),
    (dict(CHAT, seed=-(10**200)), "seed"),
    (dict(CHAT, max_denoising_steps=10**400), "max_denoising_steps"),
    (dict(CHAT, stability_threshold=10**9), "stability_threshold"),
    (dict(CHAT, entropy_bound=10**500), "entropy_bound"),
    (dict(CHAT, t_min=1e301), "t_min"),
    (dict(CHAT, t_max=float("inf")), "t_max"),  # Python's JSON reads Infinity
    (dict(CHAT, frequency_penalty=0.5), "frequency_penalty"),
    (dict(CHAT, presence_penalty=1), "presence_penalty"),
    (dict(CHAT, logprobs="yes"), "logprobs"),
    (dict(CHAT, logprobs=True, top_logprobs=-1), "top_logprobs"),
    (dict(CHAT, tools=[{"type": "function", "function": {"name": "f g"}}]), "tools"),
    (dict(CHAT, tools={"f": {}}), "tools"),
    (dict(CHAT, tool_choice="required"), "tool_choice"),
    (dict(CHAT, tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"function": {"name": "g"}}),
     "tool_choice"),
    (dict(CHAT, response_format={"type": "json_schema"}), "response_format"),
    (dict(CHAT, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}),
     "response_format"),
    (dict(CHAT, guided_regex="("), "guided_regex"),
    (dict(CHAT, json_schema={"type": "object"}, guided_regex="a"), "guided_regex"),
    (dict(CHAT, chat_template_kwargs={"messages": []}), "chat_template_kwargs"),
    (dict(CHAT, top_p=0), "top_p"),
    (dict(CHAT, top_k=-2), "top_k"),
    (dict(CHAT, min_p=1.5), "min_p"),
    (dict(CHAT, temperature=2.5), "temperature"),
    (dict(CHAT, stream_options={"include_usage": "yes"}), "stream_options"),
    (dict(CHAT, stop=["ok", 3]), "stop"),
]


def test_bad_fields_are_400s_that_name_them(server):
    for body, param in BAD:
        raw = json.dumps(body, allow_nan=True)
        code, reply = _post(server, raw)
        assert code == 400 and _openai_error(reply), (body, code, reply)
        assert reply["error"]["param"] == param, (body, reply)
    for raw in ['{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 16}',
                '{"messages": [{"role": "user", "content": "ok"}], "stop": "\\udfff", "max_tokens": 16}',
                "[" * 100_000 + "]" * 100_000,
                '{"a":' * 100_000 + "1" + "}" * 100_000]:
        code, reply = _post(server, raw)
        assert code == 400 and _openai_error(reply), (raw[:40], code, reply)
    code, reply = _post(server, dict(CHAT, frequency_penalty=0, presence_penalty=0.0, temperature=1, top_p=1,
                                     top_k=-1, min_p=0))
    assert code == 200 and reply["choices"][0]["message"]["content"] is not None  # the neutral values are fine


def test_the_sudoku_server_keeps_the_requests_seed_and_steps():
    from test_sudoku import easy_puzzle

    puzzle, _ = easy_puzzle()
    s = Server()
    try:
        answers = {}
        for seed, steps in [(0, 2), (0, 2), (5, 2), (0, 48)]:
            code, reply, _ = s.post("/v1/chat/completions", json.dumps(
                {"messages": [{"role": "user", "content": puzzle}], "seed": seed, "max_denoising_steps": steps,
                 "cache_prompt": False}))
            assert code == 200, reply
            answers.setdefault((seed, steps), []).append(reply)
        assert {r["dglocal"]["seed"] for r in answers[0, 2]} == {0}
        assert answers[0, 2][0]["choices"] == answers[0, 2][1]["choices"]  # the seed repeats the answer
        assert all(r["dglocal"]["steps"] <= 2 * 32 for r in answers[0, 2] + answers[5, 2])  # 2 steps an attempt
        assert answers[5, 2][0]["dglocal"]["seed"] == 5
    finally:
        s.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_exits_within_seconds_with_streams_open(tiny_f32_gguf, sig):
    """Two long streams open: the signal ends each with an error event and the process exits in seconds."""
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "8192")
    events: list[list[str]] = [[], []]

    def listen(k):
        body = json.dumps({"messages": [{"role": "user", "content": f"story {k}"}], "max_tokens": 4000,
                           "max_denoising_steps": 48, "ignore_eos": True, "stream": True}).encode()
        req = urllib.request.Request(s.url + "/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                for line in r:
                    if line.startswith(b"data: "):
                        events[k].append(line[6:].decode().strip())
        except OSError:
            pass

    threads = [threading.Thread(target=listen, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not all(events) and time.monotonic() < deadline:  # both streams running
        time.sleep(0.05)
    assert all(events), events
    t0 = time.monotonic()
    s.proc.send_signal(sig)
    s.proc.wait(timeout=30)
    took = time.monotonic() - t0
    for t in threads:
        t.join(timeout=30)
    assert took < 5, f"{took:.1f} s to exit"
    for stream in events:
        last = json.loads(stream[-1])
        assert "error" in last and last["error"]["code"] == "shutting_down", stream[-3:]


def test_fuzzed_request_bodies_get_200_or_an_openai_4xx(server):
    """Bodies drawn from the request schema's fields with values of every JSON shape: each answer is a 200 or a
    4xx in OpenAI's error shape, and a normal request answers the same before and after."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dglocal.serving import schema

    normal = dict(CHAT, seed=3, cache_prompt=False)  # its answer does not depend on what a slot held before
    before = _post(server, normal)
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(0, 8),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=6), inner, max_size=3), max_leaves=6)
    names = st.sampled_from(sorted(schema.ALL | set(schema.REFUSED) | {"bogus"}))
    bodies = st.dictionaries(names, values, max_size=6)

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(body):
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
        body["max_denoising_steps"] = 1  # a body that passes costs one step a canvas
        body["max_tokens"] = body.get("max_tokens") if body.get("max_tokens") in (None, 1, 2) else 16
        code, reply = _post(server, body)
        assert code == 200 or (400 <= code < 500 and _openai_error(reply)), (body, code, reply)

    check()
    after = _post(server, normal)
    assert after[0] == before[0] == 200 and after[1]["choices"] == before[1]["choices"]


# -- the Python API ------------------------------------------------------------------------------------------

def test_constraints_and_guides_of_any_shape_are_config_errors(llama_model):
    opts = dict(max_new_tokens=16, max_denoising_steps=2)
    for constraints in [{0: "a"}, {0: None}, {0: 1.5}, {"x": 3}, [[1, 2], [3, 4]], {0: [1]}, [0.5]]:
        with pytest.raises(ConfigError, match="constraint"):
            llama_model.generate([2, 10, 11], constraints=constraints, **opts)
    for answer in [None, 3, "ab", {1: 2}, [1e30], [True], ["1"], [10**30]]:
        with pytest.raises(ConfigError, match="guide"):
            llama_model.generate([2, 10, 11], guide=lambda d, a, r=answer: r, **opts)
    # arrays are fine: the positions they name are re-noised (a Step's `guided`); an empty answer may end the output
    steps = [e for e in llama_model.stream([2, 10, 11], guide=lambda d, a: np.array([0, 1]), **opts)
             if e.kind == "step"]
    assert steps and all(list(np.flatnonzero(e.guided)) == [0, 1] for e in steps)


def test_api_state_never_mixes(tiny_f32_gguf):
    """Threads take turns (each gets its own answer); an open stream refuses a second generation in its thread;
    one model's sequence is refused by another."""
    opts = dict(max_new_tokens=32, max_denoising_steps=3, eos_token_id=(), cache_prompt=False)
    with dglocal.load(tiny_f32_gguf, n_ctx=512, n_threads=1) as m, \
            dglocal.load(tiny_f32_gguf, n_ctx=512, n_threads=1) as other:
        alone = {s: m.generate([2, 10 + s, 11], seed=s, **opts).tokens for s in range(4)}
        got = {}
        threads = [threading.Thread(target=lambda s=s: got.__setitem__(s, m.generate([2, 10 + s, 11], seed=s,
                                                                                     **opts).tokens))
                   for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == alone
        a = m.stream([2, 10, 11], seed=0, **opts)
        next(a)
        with pytest.raises(ConfigError, match="still open"):
            m.generate([2, 12, 11], seed=1, **opts)
        with pytest.raises(ConfigError, match="still open"):
            next(m.stream([2, 12, 11], seed=1, **opts))
        assert [e for e in a][-1].tokens == alone[0]  # the open stream is not disturbed
        a.close()
        assert m.generate([2, 10, 11], seed=0, **opts).tokens == alone[0]
        seq = m.sequence()
        for call in (lambda: other.encode_batch([(seq, [3])]),
                     lambda: other.denoise_batch([(seq, np.zeros(other.canvas_length, np.int32), 1.0, None, False)])):
            with pytest.raises(ConfigError, match="another model"):
                call()


def test_an_output_file_survives_a_failed_write(tmp_path, monkeypatch):
    from dglocal.sudoku.solve import write_grids
    from dglocal.sudoku.stream import Solved

    out = tmp_path / "grids.txt"
    out.write_text("the grids of yesterday\n")
    real = Path.write_text

    def full_disk(self, data, *a, **kw):
        real(self, data[: len(data) // 2], *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(DglocalError, match="disk full"):
        write_grids(out, [Solved([0] * 81, [1] * 81, False, 1, 0.0)])
    monkeypatch.undo()
    assert out.read_text() == "the grids of yesterday\n" and list(tmp_path.iterdir()) == [out]


def test_a_file_name_that_is_not_utf8_loads(tiny_f32_gguf, tmp_path):
    """A GGUF under a name that is not UTF-8 (bytes kept as surrogates, as Python passes them): it loads, its
    info shows, and a missing one is a clear error."""
    import os

    name = os.fsencode(tmp_path) + b"/bad-\xff.gguf"
    with open(name, "wb") as f:
        f.write(Path(tiny_f32_gguf).read_bytes())
    r = subprocess.run([*DGLOCAL, "info", name], capture_output=True, env=program_env(), timeout=120)
    assert r.returncode == 0 and b"bad-" in r.stdout, r.stderr
    with dglocal.load(os.fsdecode(name), n_ctx=256, n_threads=1) as m:
        assert m.generate([2, 10, 11], max_new_tokens=16, max_denoising_steps=2).stats.canvases == 1
    r = subprocess.run([*DGLOCAL, "info", name + b".missing"], capture_output=True, env=program_env(), timeout=120)
    assert r.returncode == 1 and r.stderr.decode().startswith("error: ") and b"Traceback" not in r.stderr, r.stderr


def test_a_chat_template_that_does_not_compile_is_a_model_error(tiny_f32_gguf, tmp_path):
    broken = _rewrite(tiny_f32_gguf, tmp_path / "t.gguf", set_keys={"tokenizer.chat_template": "{% for %}"})
    with dglocal.load(broken, n_ctx=256, n_threads=1) as m:
        with pytest.raises(ModelError, match="chat template does not compile"):
            m.chat()


def test_docs_list_every_request_field_as_supported_or_refused():
    import re

    from dglocal.serving import schema

    table = (Path(__file__).parent.parent / "docs" / "serving.md").read_text().split("## Request fields")[1]
    table = table.split("\n## ")[0]
    listed = {name for row in table.splitlines() if row.startswith("| `")
              for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    fields = schema.ALL | set(schema.REFUSED)
    assert fields <= listed, sorted(fields - listed)
    assert listed - fields <= {"image_url", "input_audio", "tool", "name", "tool_calls", "include_usage",
                               "include_drafts", "system", "user", "assistant", "developer", "type", "text"}, \
        sorted(listed - fields)


# -- the converter: inputs of the wrong shape are ConvertErrors, values it used to drop are refused -------------

def _variant(tiny_checkpoint, tmp_path, edit) -> Path:
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    edit(d)
    return d


def _json_edit(name, change):
    def edit(d):
        path = d / name
        data = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(change(data) if callable(change) else change)
    return edit


def _config(**text):
    return _json_edit("config.json", lambda c: json.dumps({**c, "text_config": {**c["text_config"], **text}}))


CONVERTER_CASES = [
    ("index a list", lambda d: (d / "model.safetensors.index.json").write_text("[]"), "must be a JSON object"),
    ("weight_map a list", lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
     "weight_map"),
    ("config nested 100000 deep", _json_edit("config.json", '{"a":' * 100_000 + "1" + "}" * 100_000),
     "nested too deeply"),
    ("config a list", _json_edit("config.json", "[1, 2]"), "must be a JSON object"),
    ("eos_token_id an object", _json_edit("generation_config.json", lambda g: json.dumps({**g, "eos_token_id": {"a": 1}})),
     "eos_token_id"),
    ("eos_token_id a string", _json_edit("generation_config.json", lambda g: json.dumps({**g, "eos_token_id": "1"})),
     "eos_token_id"),
    ("sampler_config a list", _json_edit("generation_config.json",
                                         lambda g: json.dumps({**g, "sampler_config": [0.1]})), "sampler_config"),
    ("top-k above the experts", _config(top_k_experts=99), "top_k_experts"),
    ("a rotary factor that rotates nothing", _config(rope_parameters={
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "partial_rotary_factor": 1e-6, "rope_theta": 1e4}}),
     "RoPE needs"),
    ("tokenizer.json a list", lambda d: (d / "tokenizer.json").write_text("[]"), "must be a JSON object"),
    ("added tokens without ids", lambda d: (d / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "WordLevel", "vocab": {"a": 0}}, "added_tokens": [{"content": "<x>"}]})), "added_tokens"),
]


@pytest.mark.parametrize("case", CONVERTER_CASES, ids=[c[0] for c in CONVERTER_CASES])
def test_converter_inputs_of_the_wrong_shape_are_convert_errors(case, tiny_checkpoint, tiny_vocab, tmp_path):
    from dglocal.convert import convert

    _, edit, message = case
    source = _variant(tiny_checkpoint, tmp_path, edit)
    tokenizer = None if "tokenizer" in case[0] or "added tokens" in case[0] else tiny_vocab
    with pytest.raises(ConvertError, match=message):
        convert(source, tmp_path / "out.gguf", "f32", tokenizer_from=tokenizer)
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob("*.partial"))


def test_info_refuses_a_tensor_whose_element_count_overflows(tmp_path):
    import struct

    def s(text):
        return struct.pack("<Q", len(text)) + text.encode()

    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    header += s("general.architecture") + struct.pack("<I", 8) + s("diffusion-gemma")
    header += s("t.weight") + struct.pack("<I", 3) + struct.pack("<3Q", 2**39, 2**39, 2**39) + struct.pack("<IQ", 0, 0)
    path = tmp_path / "huge.gguf"
    path.write_bytes(header + b"\0" * (-len(header) % 32) + b"\0" * 64)
    r = subprocess.run([*DGLOCAL, "info", str(path)], capture_output=True, text=True, env=program_env(), timeout=120)
    assert r.returncode == 1 and "shape" in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- metadata llama.cpp asserts on: refused before the native load ----------------------------------------------

def _u32(v):
    import gguf

    return (v, gguf.GGUFValueType.UINT32)


def _u32s(v):
    import gguf

    return (v, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)


A = "diffusion-gemma."
METADATA_CASES = {  # each reached a GGML_ASSERT, a fault or a hang in llama.cpp before it was checked here
    "no layers": dict(set_keys={A + "block_count": 0}),
    "past LLAMA_MAX_LAYERS": dict(set_keys={A + "block_count": 513}),
    "nextn layers": dict(set_keys={A + "nextn_predict_layers": _u32(7)}),
    "no experts": dict(set_keys={A + "expert_count": 0}),
    "past LLAMA_MAX_EXPERTS": dict(set_keys={A + "expert_count": 2000}),
    "more used experts than experts": dict(set_keys={A + "expert_used_count": 9}),
    "no used experts": dict(set_keys={A + "expert_used_count": 0}),
    "expert groups": dict(set_keys={A + "expert_group_count": _u32(3)}),
    "used experts differ by layer": dict(set_keys={A + "expert_used_count": _u32s([2, 3, 2, 2, 2, 2])}),
    "unknown rope scaling": dict(set_keys={A + "rope.scaling.type": ("bogus", __import__("gguf").GGUFValueType.STRING)}),
    "rope rotating nothing": dict(set_keys={A + "rope.dimension_count": 0}),
    "sliding rope rotating nothing": dict(set_keys={A + "rope.dimension_count_swa": 0}),
    "odd rope dimensions": dict(set_keys={A + "rope.dimension_count": 30 + 1}),
    "rope past rope_freqs": dict(set_keys={A + "rope.dimension_count": 34}),
    "sliding rope past the head": dict(set_keys={A + "rope.dimension_count_swa": 32}),
    "sliding rope missing": dict(drop_keys=(A + "rope.dimension_count_swa",)),
    "negative norm epsilon": dict(set_keys={A + "attention.layer_norm_rms_epsilon": -1.0}),
    "NaN norm epsilon": dict(set_keys={A + "attention.layer_norm_rms_epsilon": float("nan")}),
    "heads not a multiple of KV heads": dict(set_keys={A + "attention.head_count": 3}),
    "value length unlike key length": dict(set_keys={A + "attention.value_length": 16}),
    "shared KV layers": dict(set_keys={A + "attention.shared_kv_layers": 2}),
    "a one-entry sliding pattern": dict(set_keys={A + "attention.sliding_window_pattern": (
        [True], __import__("gguf").GGUFValueType.ARRAY, __import__("gguf").GGUFValueType.BOOL)}),
    "no sliding window": dict(set_keys={A + "attention.sliding_window": 0}),
    "NaN softcap": dict(set_keys={A + "final_logit_softcapping": float("nan")}),
    "embeddings out": dict(set_keys={A + "embedding_length_out": _u32(7)}),
    "pooling": dict(set_keys={A + "pooling_type": _u32(3)}),
    "per-layer input embeddings": dict(set_keys={A + "embedding_length_per_layer_input": 4}),
    "a layer without its router": dict(drop_tensors=("blk.2.ffn_gate_inp.weight",)),
    "a layer without its queries": dict(drop_tensors=("blk.1.attn_q.weight",)),
    "a bert vocabulary": dict(set_keys={"tokenizer.ggml.model": "bert"}),
    "no BOS": dict(drop_keys=("tokenizer.ggml.bos_token_id",)),
    "BOS past the vocabulary": dict(set_keys={"tokenizer.ggml.bos_token_id": 99999}),
}


def test_metadata_llama_cpp_asserts_on_is_refused_before_loading(tiny_f32_gguf, tmp_path):
    import gguf

    tokens = gguf.GGUFReader(tiny_f32_gguf).fields["tokenizer.ggml.tokens"].contents()
    cases = dict(METADATA_CASES, **{"duplicate tokens": dict(set_keys={
        "tokenizer.ggml.tokens": tokens[:5] + [tokens[6]] + tokens[6:]})})
    files = {name: _rewrite(tiny_f32_gguf, tmp_path / f"{i}.gguf", **change) for i, (name, change) in
             enumerate(cases.items())}
    r = child(f"""
import json, dglocal
for name, path in json.loads({json.dumps({k: str(v) for k, v in files.items()})!r}).items():
    try:
        with dglocal.load(path, n_ctx=256, n_threads=1) as m:
            m.generate([2, 10, 11], max_new_tokens=16, max_denoising_steps=1)
        print(name, "| loaded")
    except dglocal.ModelError as e:
        print(name, "|", str(e).split(": ", 1)[1][:100])
""", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    outcome = dict(line.split(" | ", 1) for line in r.stdout.splitlines())
    assert set(outcome) == set(cases), r.stdout
    loaded = sorted(name for name, what in outcome.items() if what == "loaded")
    assert not loaded, f"loaded although llama.cpp asserts on them: {loaded}\n{r.stdout}"


def test_a_chat_message_or_stop_strings_of_the_wrong_type_are_config_errors(tiny_f32_gguf):
    """A chat message that is not text used to join the history as it was (None rendered by the template), and
    stop=5 raised a bare TypeError; both are ConfigErrors naming the value, and the session goes on."""
    import dglocal

    with dglocal.load(tiny_f32_gguf, n_ctx=512, n_threads=1) as llm:
        session = llm.chat()
        for bad in (None, 5, ["hi"], b"hi"):
            with pytest.raises(ConfigError, match=f"a chat message is text \\(a str\\), got {type(bad).__name__}"):
                session.send(bad, max_new_tokens=4)
        assert session.messages == []
        for bad in (5, 1.5, True):
            with pytest.raises(ConfigError, match=f"stop must be a string or a list of strings, got {bad!r}"):
                llm.generate("hi", stop=bad, max_new_tokens=4)
        session.send("hi", max_new_tokens=4, seed=1)
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
        for bad, message in ((5, "messages are a list of {'role': ..., 'content': ...} dicts, got 5"),
                             ([{}], "a message needs a 'role' (a str) and a 'content', got {}"),
                             (["hi"], "messages are a list of")):
            with pytest.raises(ConfigError, match=re.escape(message)):
                llm.chat(messages=bad)
        # a message the template cannot read: a ConfigError (a 400 from the server), not the template's TypeError
        odd = llm.chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                                     "tool_calls": 5}])
        with pytest.raises(ConfigError, match="the chat template cannot render these messages: TypeError"):
            odd.send("hi", max_new_tokens=4)


def test_serve_says_it_cannot_listen_before_it_loads(tiny_f32_gguf):
    """A port in use used to be uvicorn's log line and exit 3, after the model loaded (minutes for a large one)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([*DGLOCAL, "serve", str(tiny_f32_gguf), "--port", str(port)], capture_output=True,
                           text=True, env=program_env(), timeout=120)
    assert (r.returncode, r.stderr.strip()) == (1, f"error: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "dglocal serve:" not in r.stdout + r.stderr  # said before the load, which ends in that line
