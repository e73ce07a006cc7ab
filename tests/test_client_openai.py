"""The official openai package against `dglocal serve` (issue 40), as its own helpers use the server: chat
completions parsed into a pydantic model (whole and streamed), forced tool calls (required and named) and auto
ones, `n` choices, log-probabilities, and the Responses API (`responses.parse`, its stream, a forced call): every
structured answer and every call parses and validates, over 20 seeds at the default max_tokens (none sent)."""

from __future__ import annotations

import openai
import pytest

import clients
from clients import ASK_ORDER, ASK_WEATHER, MODEL, GetTime, GetWeather, Order, over_seeds, parsed, validated_call, \
    validated_json

pytestmark = [pytest.mark.backend, pytest.mark.slow]
server = clients.module_server()


@pytest.fixture(scope="module")
def client(server):
    return clients.openai_client(server)


def test_parse_whole_and_streamed(client):
    def check(seed):
        r = client.chat.completions.parse(model=MODEL, messages=ASK_ORDER, response_format=Order, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Order), choice
        validated_json(choice.message.content)
        with client.chat.completions.stream(model=MODEL, messages=ASK_ORDER, response_format=Order,
                                            seed=seed) as stream:
            streamed = stream.get_final_completion().choices[0]
        assert streamed.message.parsed == choice.message.parsed  # the same seed: the same answer

    over_seeds(check)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "GetTime"}}],
                         ids=["required", "named"])
def test_forced_calls_parse_into_their_models(client, tool_choice):
    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]

    def check(seed):
        r = client.chat.completions.parse(model=MODEL, messages=ASK_WEATHER, tools=tools, tool_choice=tool_choice,
                                          seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            if isinstance(tool_choice, dict):
                assert call.function.name == "GetTime", call
            assert isinstance(call.function.parsed_arguments, (GetWeather, GetTime)), call
            validated_call(call.function.name, call.function.arguments)

    over_seeds(check)


def test_auto_calls_validate_and_text_stays_text(client):
    tools = [clients.openai_tool(GetWeather), clients.openai_tool(GetTime)]

    def check(seed):
        choice = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=tools, seed=seed,
                                                max_tokens=96).choices[0]  # free text is noise: it runs to the end
        for call in choice.message.tool_calls or []:
            validated_call(call.function.name, call.function.arguments)
        assert "<|tool_call>" not in (choice.message.content or ""), choice.message
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls", choice

    over_seeds(check)


def test_n_choices_each_parse(client):
    def check(seed):
        r = client.chat.completions.parse(model=MODEL, messages=ASK_ORDER, response_format=Order, seed=seed, n=2)
        assert [c.index for c in r.choices] == [0, 1]
        for choice in r.choices:
            assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Order), choice
            validated_json(choice.message.content)
        assert r.choices[0].message.content != r.choices[1].message.content  # each choice its own seed

    over_seeds(check)


def test_responses_parse_whole_and_streamed(client):
    def check(seed):
        r = client.responses.parse(model=MODEL, input=ASK_ORDER[0]["content"], text_format=Order,
                                   extra_body={"seed": seed})
        assert r.status == "completed" and isinstance(r.output_parsed, Order), r
        validated_json(r.output_text)
        with client.responses.stream(model=MODEL, input=ASK_ORDER[0]["content"], text_format=Order,
                                     extra_body={"seed": seed}) as stream:
            assert stream.get_final_response().output_parsed == r.output_parsed

    over_seeds(check)


def test_responses_forced_call(client):
    tool = {"type": "function", "name": "GetWeather", "description": GetWeather.__doc__,
            "parameters": GetWeather.model_json_schema(), "strict": False}

    def check(seed):
        r = client.responses.create(model=MODEL, input=ASK_WEATHER[0]["content"], tools=[tool],
                                    tool_choice="required", extra_body={"seed": seed})
        calls = [o for o in r.output if o.type == "function_call"]
        assert r.status == "completed" and calls, r
        for call in calls:
            validated_call(call.name, call.arguments)

    over_seeds(check)


def test_logprobs_list_each_token(client):
    def check(seed):
        r = client.chat.completions.create(model=MODEL, messages=ASK_ORDER, response_format={"type": "json_object"},
                                           seed=seed, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
        for t in content:
            values = [x.logprob for x in t.top_logprobs]
            assert len(values) == 3 and values == sorted(values, reverse=True) and t.logprob <= 0, t
        parsed(r.choices[0].message.content)

    over_seeds(check)
