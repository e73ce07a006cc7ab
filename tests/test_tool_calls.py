"""Tool calls valid by construction (dglocal.generation.calls): the JSON-schema → Lark converter checked on the
grammar engine directly (argument texts it must accept and refuse, read back by channels.split and validated by
jsonschema), then the tiny random-weights model through a real server and the `openai` client: a model whose free
output is noise writes calls that parse and validate, because the grammar allows nothing else."""

from __future__ import annotations

import json

import gguf
import jsonschema
import llguidance
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from test_server import Server

from dglocal.errors import ConfigError
from dglocal.generation import channels
from dglocal.generation.calls import reply_grammar
from dglocal.generation.chat import ChatTemplate
from dglocal.generation.grammar import GrammarSpec, limits

N_SEEDS = 20
BUDGET = dict(max_tokens=160, extra_body={"max_denoising_steps": 8})


def function(name: str, parameters: dict | None = None) -> dict:
    fn = {"name": name, "description": f"the {name} tool"}
    return {"type": "function", "function": fn if parameters is None else {**fn, "parameters": parameters}}


MODE = function("set_mode", {"type": "object", "properties": {
    "mode": {"type": "string", "enum": ["eco", "fast", "off"]},
    "level": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["mode", "level"]})
PING = function("ping", {"type": "object", "properties": {"host": {"type": "string", "maxLength": 6}},
                         "required": ["host"]})
RICH = {"type": "object", "required": ["city", "days"], "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 40},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "Units": {"enum": ["C", "F", None]},
    "at": {"type": ["number", "null"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 2},
    "where": {"$ref": "#/$defs/place"},
    "flag": {"type": "boolean"},
    "odd key": {"const": 1}},
    "$defs": {"place": {"type": "object", "properties": {"lat": {"type": "number"}, "near": {"$ref": "#/$defs/place"}},
                        "required": ["lat"]}}}


# -- the engine, with a byte-level vocabulary: no model needed --------------------------------------------------

class Bytes:  # llguidance's TokenizerWrapper protocol: a token per byte, and an EOS
    eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Bytes()), n_vocab=257)


def accepts(spec: GrammarSpec, text: str) -> bool:
    """The whole of `text` is a reply the grammar allows."""
    m = llguidance.LLMatcher(TOKENIZER, spec.check(), log_level=0, limits=limits())
    ids = list(text.encode())
    return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()


@pytest.fixture(scope="module")
def template(tiny_vocab):
    field = gguf.GGUFReader(tiny_vocab).fields["tokenizer.chat_template"]
    return ChatTemplate(bytes(field.parts[field.data[0]]).decode())


def written(template, name: str, arguments: dict) -> str:
    """The call as the chat template writes it in a model turn: what the model was trained to write."""
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}]
    text = template.render(channels.template_messages(history), add_generation_prompt=False)
    return text.split("<|turn>model\n", 1)[1].split("<turn|>")[0]


def valid(arguments, schema) -> bool:
    try:
        jsonschema.validate(arguments, schema)
    except jsonschema.ValidationError:
        return False
    return True


RICH_CASES = [  # (arguments, whether RICH, read with no extra keys, allows them)
    ({"city": "Paris", "days": 3}, True),
    ({"city": 'He said "hi", {ok}: [x]\nnext', "days": 14, "Units": None, "at": -2.5e-3, "flag": False}, True),
    ({"city": "a", "days": 1, "tags": ["x", "abc"], "odd key": 1, "Units": "F", "at": None}, True),
    ({"city": "b", "days": 2, "where": {"lat": 1, "near": {"lat": -0.5, "near": {"lat": 3}}}}, True),
    ({"city": "Paris"}, False),                                    # a required key missing
    ({"city": "Paris", "days": 15}, False),                        # past maximum
    ({"city": "Paris", "days": 2.5}, False),                       # not an integer
    ({"city": "", "days": 2}, False),                              # under minLength
    ({"city": "Paris", "days": 2, "Units": "K"}, False),           # not in the enum
    ({"city": "Paris", "days": 2, "tags": []}, False),             # under minItems
    ({"city": "Paris", "days": 2, "tags": ["a", "b", "c"]}, False),
    ({"city": "Paris", "days": 2, "tags": ["long"]}, False),
    ({"city": "x" * 41, "days": 2}, False),                        # past maxLength
    ({"city": "Paris", "days": 2, "where": {"near": {"lat": 1}}}, False),
    ({"city": "Paris", "days": 2, "flag": "yes"}, False),
    ({"city": "Paris", "days": 2, "extra": 1}, False),             # a key the schema does not declare
    ({"city": "Paris", "days": 2, "odd key": 2}, False),
]


@pytest.mark.parametrize("arguments, ok", RICH_CASES)
def test_the_templates_own_calls_are_accepted_exactly_when_valid(template, arguments, ok):
    """The call the template writes from `arguments` passes the grammar iff jsonschema finds the arguments valid
    (extra keys refused, as grammar.closed reads the schema); an accepted one reads back as exactly `arguments`."""
    spec = reply_grammar([function("weather", RICH)], "required")
    text = written(template, "weather", arguments)
    assert valid(arguments, {**RICH, "additionalProperties": False}) == ok
    assert accepts(spec, text) == ok, text
    if ok:
        [call] = channels.split(text).tool_calls
        assert (call.name, json.loads(call.arguments)) == ("weather", arguments)


def q(text: str) -> str:
    return f"{channels.QUOTE}{text}{channels.QUOTE}"


SCHEMAS = [  # (a parameter's schema, argument texts it allows, argument texts it refuses)
    ({"type": "integer"}, ["0", "-12", "123456789012345678"], ["01", "1.5", "1e3", q("1"), "true"]),
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, ["0.5", "1"], ["0", "1.5", "-1"]),
    ({"type": "integer", "multipleOf": 5}, ["10", "-5"], ["7"]),
    ({"type": "boolean"}, ["true", "false"], ["True", "1", "null"]),
    ({"type": "null"}, ["null", "None"], ["Null", q("")]),  # None: as the template writes it
    ({"type": "string", "nullable": True}, [q("x"), "null"], ["1"]),
    ({"type": ["string", "integer"]}, [q("x"), "7"], ["true"]),
    ({"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "boolean"}}]}, ["3", "[true,false]", "[]"],
     ["[1]", q("3")]),
    ({"oneOf": [{"const": "a"}, {"const": 2}]}, [q("a"), "2"], [q("b"), "3"]),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}}]}, ["{a:1}", "{a:1,b:true}"], ["{b:true}", "{a:1,c:1}"]),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, ["{}", "{x:1,y_2:3}"], ["{x:true}"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True},
     [f"{{a:1,zz:{q('q')}}}", "{zz:[1,{k:null}]}"], ["{zz:1,a:1}", "{a:1,a:2}"]),
    ({"type": "object"}, ["{}", f"{{k:[1,{q('s')},{{}}]}}"], ["{k}"]),
    ({"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"}, [q("ab-12")], [q("ab-1"), q("Ab-12")]),
    ({"type": "string", "pattern": "[0-9]"}, [q("a1b")], [q("ab")]),
    ({"type": "string", "maxLength": 3}, [q(""), q("日本語")], [q("abcd"), q(q("a"))]),
    ({"type": "string"}, [q('a "quoted" {brace}\n'), q("}<tool_call|>")], [q(q("a")), '<|"|>a']),
    # long bounds: a count that large intersected with "no quote" would run the engine out of fuel
    ({"type": "string", "maxLength": 100_000}, [q("x<" * 3000)], [q(q("a"))]),
    ({"type": "string", "minLength": 2, "maxLength": 5000}, [q('ab<|"|')], [q("a"), q(q("ab"))]),
    ({"enum": [{"b": 1, "A": [True]}, "x\ty"]}, ["{A:[true],b:1}", q("x\ty")], ["{b:1,A:[true]}"]),
    ({"type": "array", "items": {"enum": [1, 2]}, "maxItems": 0}, ["[]"], ["[1]"]),
]


@pytest.mark.parametrize("schema, allowed, refused", SCHEMAS)
def test_each_keyword_allows_what_it_validates(schema, allowed, refused):
    """Each text allowed is read back by channels and validates against the schema; each refused one does not
    pass the grammar."""
    spec = reply_grammar([function("f", {"type": "object", "properties": {"v": schema}, "required": ["v"]})])
    if schema.get("nullable"):  # OpenAPI's word, which jsonschema does not know
        schema = {"type": [schema["type"], "null"]}
    for text in allowed:
        reply = f"<|tool_call>call:f{{v:{text}}}<tool_call|>"
        assert accepts(spec, reply), reply
        [call] = channels.split(reply).tool_calls
        assert json.loads(call.arguments) == channels.parse_arguments(f"v:{text}")
        jsonschema.validate(json.loads(call.arguments)["v"], schema)
    for text in refused:
        assert not accepts(spec, f"<|tool_call>call:f{{v:{text}}}<tool_call|>"), text


def test_a_recursive_schema_and_keys_that_need_quotes():
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}, "a:b": {"const": 1},
                                             "": {"type": "boolean"}}, "additionalProperties": False}
    spec = reply_grammar([function("t", tree)])
    text = '<|tool_call>call:t{<|"|><|"|>:true,<|"|>a:b<|"|>:1,kids:[{kids:[{}]},{}]}<tool_call|>'
    assert accepts(spec, text)
    args = json.loads(channels.split(text).tool_calls[0].arguments)
    assert args == {"": True, "a:b": 1, "kids": [{"kids": [{}]}, {}]}
    jsonschema.validate(args, tree)


def test_the_shapes_of_a_reply():
    clock, call = function("clock"), "<|tool_call>call:clock{}<tool_call|>"
    ping = '<|tool_call>call:ping{host:<|"|>a<|"|>}<tool_call|>'
    auto = reply_grammar([clock, PING], "auto")
    assert all(accepts(auto, t) for t in ("", "some text", "text, then " + call + ping, call))
    assert not any(accepts(auto, t) for t in (call + " then text", "<|tool_call>call:ping{}<tool_call|>"))
    one = reply_grammar([clock, PING], "auto", parallel=False)
    assert accepts(one, "a" + call) and not accepts(one, call + call)
    named = reply_grammar([clock, PING], "ping")
    assert accepts(named, ping + ping) and not accepts(named, call) and not accepts(named, "")
    required = reply_grammar([clock, PING], "required", parallel=False)
    assert accepts(required, ping) and not accepts(required, "text" + ping) and not accepts(required, ping + call)
    thought = "<|channel>thought\nfirst, the clock<channel|>"
    assert accepts(reply_grammar([clock], "required", thinking=True), thought + call)
    assert not accepts(required, thought + ping)
    answer = GrammarSpec("json_schema", {"type": "object", "properties": {"t": {"type": "integer"}}, "required": ["t"]})
    either = reply_grammar([clock], "auto", answer=answer)
    assert accepts(either, call) and accepts(either, '{"t": 5}')
    assert not any(accepts(either, t) for t in ("free text", '{"t": "x"}', call + '{"t": 5}'))
    assert accepts(reply_grammar([clock], "auto", answer=GrammarSpec("regex", "[ab]{2}")), "ab")


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "not cannot be expressed"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)y"}}}, "look-around"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}}, "minimum (5)"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}, "not a local reference"),
    ({"type": "object", "properties": {"a": {"enum": ['<|"|>']}}}, "holds"),
    ({"type": "array"}, "parameters must be an object"),
])
def test_what_cannot_be_expressed_is_a_config_error_naming_the_tool(schema, words):
    tools = [PING, function("bad", schema)]
    with pytest.raises(ConfigError, match="tools\\[1\\] \\(bad\\)") as e:
        reply_grammar(tools, "required")
    assert words in str(e.value) and e.value.param == "tools[1].function.parameters"
    loose = reply_grammar(tools, "auto", loose=True)  # auto: that tool takes any arguments, the others their own
    assert accepts(loose, "<|tool_call>call:bad{x:1}<tool_call|>")
    assert not accepts(loose, "<|tool_call>call:ping{x:1}<tool_call|>")


# -- the tiny model through the server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "4096", "--alias", "tiny", "--seed", "1")
    yield s
    s.stop()


def ask(server, seed: int, **kw):
    kw = {**BUDGET, **kw}
    return server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Set the mode."}], seed=seed, **kw).choices[0]


def checked_calls(choice, tools) -> list[tuple[str, dict]]:
    """The calls of a choice, each to a listed tool with arguments valid against its parameters."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    out = []
    for call in choice.message.tool_calls or []:
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, schemas[call.function.name])
        assert call.id and call.type == "function"
        out.append((call.function.name, args))
    return out


@pytest.mark.backend
def test_a_named_function_is_called_with_valid_arguments_every_time(server):
    tools = [PING, MODE]
    for seed in range(N_SEEDS):
        choice = ask(server, seed, tools=tools, tool_choice={"type": "function", "function": {"name": "set_mode"}})
        assert choice.finish_reason == "tool_calls", (seed, choice)
        calls = checked_calls(choice, tools)
        assert calls and {name for name, _ in calls} == {"set_mode"}, (seed, calls)


@pytest.mark.backend
def test_required_calls_a_tool_every_time_and_parallel_false_once(server):
    for seed in range(8):
        parallel = seed % 2 == 0
        choice = ask(server, seed, tools=[PING], tool_choice="required", parallel_tool_calls=parallel)
        calls = checked_calls(choice, [PING])
        assert choice.finish_reason == "tool_calls" and calls, (seed, choice)
        assert parallel or len(calls) == 1, calls


@pytest.mark.backend
def test_auto_with_a_response_format_answers_calls_or_the_format(server):
    """auto with a response_format: each reply is calls whose arguments validate, or JSON valid against the
    schema; required with one: calls (the format does not apply), not a 400."""
    fmt = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
           "required": ["ok", "n"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": fmt}}
    kinds = set()
    for seed in range(8):
        choice = ask(server, seed, tools=[MODE], response_format=response_format, parallel_tool_calls=False)
        calls = checked_calls(choice, [MODE])
        if calls:
            assert len(calls) == 1 and not choice.message.content, choice
        else:
            jsonschema.validate(json.loads(choice.message.content), fmt)
        kinds.add(bool(calls))
    assert kinds == {True, False}, "the noise picks either branch at the first token"
    choice = ask(server, 0, tools=[MODE], tool_choice="required", response_format=response_format)
    assert choice.finish_reason == "tool_calls" and checked_calls(choice, [MODE])


@pytest.mark.backend
def test_auto_without_a_format_and_parallel_false(server):
    """auto: free text, or calls held to their schemas; parallel_tool_calls false: never more than one."""
    for seed in range(6):
        choice = ask(server, seed, tools=[PING, MODE], parallel_tool_calls=False)
        assert len(checked_calls(choice, [PING, MODE])) <= 1
        assert channels.CALL_OPEN not in (choice.message.content or "")


@pytest.mark.backend
def test_streamed_calls_equal_the_whole_ones(server):
    kw = dict(tools=[MODE], tool_choice="required", parallel_tool_calls=False, **BUDGET)
    whole = ask(server, 3, **kw)
    chunks = list(server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Set the mode."}], seed=3, stream=True, **kw))
    deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert [(d.index, d.type, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(k, "function", name, args) for k, (name, args) in enumerate(checked_calls(whole, [MODE]))]
    assert all(d.id for d in deltas) and chunks[-1].choices[0].finish_reason == "tool_calls"
    # each call as the canvas that closes it commits, not with the end
    assert all(not ch.choices[0].delta.tool_calls for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    state = ChatCompletionStreamState()  # the SDK's own accumulator reads the chunks as OpenAI's
    for chunk in chunks:
        state.handle_chunk(chunk)
    [message] = [c.message for c in state.get_final_completion().choices]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls] == \
        checked_calls(whole, [MODE])


@pytest.mark.backend
def test_a_schema_the_converter_cannot_express(server):
    """required: a 400 naming the tool; auto: the request runs, that tool's calls unconstrained."""
    bad = function("bad", {"type": "object", "properties": {"a": {"not": {}}}})
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [bad], "max_tokens": 16}
    status, out, _ = server.post("/v1/chat/completions", json.dumps({**body, "tool_choice": "required"}))
    assert status == 400 and out["error"]["param"] == "tools[0].function.parameters", out
    assert "tools[0] (bad)" in out["error"]["message"] and "not" in out["error"]["message"]
    status, out, _ = server.post("/v1/chat/completions", json.dumps(body))
    assert status == 200, out
