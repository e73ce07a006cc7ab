"""Grammars the engine (llguidance) cannot satisfy, cannot hold, or crashes on: each is a ConfigError that names the
fault, raised before any generation work; none is an empty answer, a signal or a minute-long step.

They used to end as: an empty answer with finish "eos" (a $ref loop, a schema or Lark grammar with no finite
instance, an empty character class, a{1000000}, a 1 MB literal); SIGSEGV (a chain of 5,000 rules, 1,000 nested
$refs); 88 s of masks (((((a{20}){20}){20}){20})); a bare ValueError (an integer of 400 digits in a schema).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from test_server import Server

from dglocal.errors import ConfigError
from dglocal.generation.driver import generate, stream
from dglocal.generation.grammar import MAX_JSON_DEPTH, CanvasGrammar, GrammarSpec, check_depth

BUDGET = dict(max_new_tokens=64, max_denoising_steps=8)


def chain(n: int, gbnf: bool = False) -> str:
    """A grammar of n rules, each the next one's only parent: "a" n times, then "b"."""
    if gbnf:
        return "root ::= r0\n" + "".join(f'r{i} ::= "a" r{i + 1}\n' for i in range(n)) + f'r{n} ::= "b"\n'
    return "start: r0\n" + "".join(f'r{i}: "a" r{i + 1}\n' for i in range(n)) + f'r{n}: "b"\n'


def ref_chain(n: int) -> dict:
    """A schema of n $defs, each an object whose one required property is the next."""
    defs = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}, "required": ["a"],
                      "additionalProperties": False} for i in range(n)}
    return {"$ref": "#/$defs/d0", "$defs": {**defs, f"d{n}": {"type": "integer"}}}


def nested(n: int) -> dict:
    s = {"type": "string"}
    for _ in range(n):
        s = {"type": "object", "properties": {"a": s}}
    return s


UNSATISFIABLE = [
    (dict(json_schema={"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}), "no finite instance"),
    (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}),
     "no finite instance"),
    (dict(json_schema={"type": "array", "minItems": 1, "items": {"anyOf": [{"$ref": "#"}, {"$ref": "#/items"}]}}),
     "no finite instance"),
    (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#"}, "b": {"$ref": "#"}},
                       "required": ["a"], "minProperties": 1}), "no finite instance"),
    (dict(regex=r"[^\x00-\x{10FFFF}]"), "no text matches the regex"),
    (dict(grammar='start: a\na: "x" a'), "no finite instance: 'a'"),
    (dict(grammar='start: a\na: ("x" | "y") a+ | "z" a'), "no finite instance"),
    (dict(grammar='root ::= x\nx ::= "x" x'), "no finite instance"),
    (dict(regex="a{1000000}"), "cannot end within"),
    (dict(grammar='start: "' + "a" * 1_000_000 + '"'), "more than the 262,144 a grammar may have"),
    (dict(grammar='start: "' + "a" * 100_000 + '"'), "cannot end within"),
    (dict(regex="((((a{20}){20}){20}){20})"), "cannot end within"),
    (dict(json_schema={"type": "string", "maxLength": 10**400}), "/maxLength is an integer of 1329 bits"),
    (dict(json_schema='{"properties": {"n": {"type": "number", "maximum": 1e400}}}'), "/properties/n/maximum is inf"),
    (dict(json_schema='{"type": "number", "minimum": NaN}'), "/minimum is nan"),
    (dict(json_schema={"type": "integer", "maximum": 2**64}), "/maximum is an integer of 65 bits"),
    (dict(grammar=chain(600)), "nests more than 500 rules deep"),
    (dict(json_schema=ref_chain(300)), "nests more than 500 schema levels deep"),
    (dict(json_schema=nested(60)), f"nests more than {MAX_JSON_DEPTH} objects and arrays deep"),
    (dict(json_schema="[" * 100_000), f"nests more than {MAX_JSON_DEPTH} objects and arrays deep"),
]


@pytest.mark.backend
@pytest.mark.parametrize("options, message", UNSATISFIABLE, ids=range(len(UNSATISFIABLE)))
def test_unsatisfiable_grammars_are_errors_before_any_step(llama_model, options, message):
    events = []
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        for event in stream(llama_model, [2, 3], seed=0, **BUDGET, **options):
            events.append(event)
    assert events == []  # refused while the request was prepared: not one denoising step
    assert time.monotonic() - t0 < 30  # the nested regex held the engine for 88 s


@pytest.mark.backend
def test_a_grammar_forced_past_max_tokens_is_refused(llama_model):
    """What a grammar forces before any choice must fit the answer: max_tokens when the caller gives it."""
    spec = GrammarSpec("regex", "(abc){40}")
    CanvasGrammar(llama_model.model, spec, llama_model.model.eos_ids)  # within the default bound
    with pytest.raises(ConfigError, match=r"cannot end within max_tokens \(30\): it forces at least 120 tokens"):
        CanvasGrammar(llama_model.model, spec, llama_model.model.eos_ids, max_tokens=30)


@pytest.mark.backend
def test_the_engine_failing_part_way_is_an_error_not_a_cut_answer(llama_model):
    """The first token is a choice, then a lexeme past the engine's limits: its mask after that allowed the end
    alone, and the answer came out as 'x' or 'y' with finish "eos"."""
    with pytest.raises(ConfigError, match="the grammar engine gave up on the regex after .* too many expressions"):
        generate(llama_model, [2, 3], seed=0, regex="(x|y)a{100000}", **BUDGET)


@pytest.mark.backend
def test_bounded_grammars_still_generate(llama_model):
    """Just within the bounds: a chain of 400 rules, a schema 40 levels deep, a 20-deep $ref chain."""
    for spec in (GrammarSpec("lark", chain(400)), GrammarSpec("gbnf", chain(400, gbnf=True)),
                 GrammarSpec("json_schema", nested(40)), GrammarSpec("json_schema", ref_chain(20))):
        spec.check()
        CanvasGrammar(llama_model.model, spec, llama_model.model.eos_ids)
    out = generate(llama_model, [2, 3], seed=0, json_schema=ref_chain(3), max_new_tokens=64, max_denoising_steps=8)
    assert out.finish_reason == "eos" and isinstance(json.loads(out.text)["a"]["a"]["a"], int), out.text


DEEP = {
    "lark chain": f"GrammarSpec('lark', {chain(5000)!r})",
    "gbnf chain": f"GrammarSpec('gbnf', {chain(5000, gbnf=True)!r})",
    "ref chain": f"GrammarSpec('json_schema', {ref_chain(1000)!r})",
    "inline ref chain": f"GrammarSpec('lark', {'start: %json ' + json.dumps(ref_chain(1500))!r})",
}


@pytest.mark.parametrize("name", DEEP)
def test_deep_grammars_are_refused_without_a_crash(name):
    """Each of these killed the process (SIGSEGV in llguidance's grammar compiler); in a child, so a regression
    fails here rather than ends the test run."""
    code = f"""
from dglocal.errors import ConfigError
from dglocal.generation.grammar import GrammarSpec
try:
    {DEEP[name]}.check()
except ConfigError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "nests more than 500" in r.stdout and "overflows its stack" in r.stdout, r.stdout


def test_check_depth_names_the_limit_and_where():
    check_depth(nested(45), MAX_JSON_DEPTH, "tools")
    with pytest.raises(ConfigError, match=r"tools nests more than 100 objects and arrays deep \(at /properties/a/"):
        check_depth(nested(300), MAX_JSON_DEPTH, "tools")
    deep: list = []
    for _ in range(100_000):  # deeper than Python's own recursion: the check is iterative
        deep = [deep]
    with pytest.raises(ConfigError, match="nests more than 100"):
        check_depth(deep, MAX_JSON_DEPTH, "messages")


@pytest.fixture(scope="module")
def server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-c", "1024", "--seed", "1")
    yield s
    s.stop()


CHAT = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=32, max_denoising_steps=4)


@pytest.mark.backend
@pytest.mark.parametrize("extra, words", [
    (dict(json_schema={"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}), "no finite instance"),
    (dict(guided_regex="a{1000000}"), "cannot end within"),
    (dict(grammar=chain(5000)), "nests more than 500 rules deep"),
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "t", "schema": {"type": "string", "maxLength": 10**400}}}), "/maxLength is an integer of 1329 bits"),
], ids=["ref loop", "a{1000000}", "5000 rules", "huge integer"])
def test_the_server_answers_400_naming_the_fault(server, extra, words):
    """400s with the reason, where they were 200s with an empty answer, a 500, or the server killed."""
    status, body, _ = server.post("/v1/chat/completions", json.dumps({**CHAT, **extra}))
    assert status == 400 and words in body["error"]["message"], (status, body)
    assert server.proc.poll() is None


@pytest.mark.backend
def test_tools_nested_past_the_bound_are_a_400(server):
    """A tool's parameters 300 levels deep overflowed the chat template's recursive macro: a 500."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": nested(300)}}]
    status, body, _ = server.post("/v1/chat/completions", json.dumps({**CHAT, "tools": tools}))
    assert status == 400 and "nests more than 100 objects and arrays deep" in body["error"]["message"], (status, body)
