"""langchain-openai's ChatOpenAI against `dglocal serve` (issue 40): bind_tools with tool_choice "any" (sent as
"required") and with a tool's name, and with_structured_output by function calling (a named tool) and by
json_schema (response_format, made strict by the openai SDK), every call and answer parsed by langchain and
validated, over 20 seeds at the default max_tokens."""

from __future__ import annotations

import pytest
from langchain_openai import ChatOpenAI

import clients
from clients import ASK_ORDER, ASK_WEATHER, MODEL, GetTime, GetWeather, Order, over_seeds, validated_call, \
    validated_json

pytestmark = [pytest.mark.backend, pytest.mark.slow]
server = clients.module_server()


def chat(server, seed: int) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="none", max_retries=0,
                      timeout=clients.TIMEOUT, seed=seed)


@pytest.mark.parametrize("tool_choice", ["any", "GetTime"])
def test_bound_tools_forced(server, tool_choice):
    def check(seed):
        message = chat(server, seed).bind_tools([GetWeather, GetTime], tool_choice=tool_choice).invoke(ASK_WEATHER)
        assert message.tool_calls and not message.invalid_tool_calls, (message.content, message.invalid_tool_calls,
                                                                        message.response_metadata)
        for call in message.tool_calls:
            if tool_choice != "any":
                assert call["name"] == tool_choice, message.tool_calls
            validated_call(call["name"], call["args"])

    over_seeds(check)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output(server, method):
    def check(seed):
        out = chat(server, seed).with_structured_output(Order, method=method, include_raw=True).invoke(ASK_ORDER)
        raw = out["raw"]
        assert out["parsing_error"] is None, (out["parsing_error"], raw.content, raw.additional_kwargs,
                                              raw.response_metadata)
        assert isinstance(out["parsed"], Order), (raw.content, raw.additional_kwargs)
        if method == "function_calling":  # a named tool, one call (parallel_tool_calls false)
            assert [c["name"] for c in raw.tool_calls] == ["Order"] and not raw.invalid_tool_calls, raw.tool_calls
            validated_call("Order", raw.tool_calls[0]["args"])
        else:
            validated_json(raw.content)

    over_seeds(check)
