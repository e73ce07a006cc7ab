"""litellm against `dglocal serve` (issue 40): `completion` with the openai/ prefix and api_base, tools forced
(tool_choice "required" and a named function) and response_format json_schema; every call and answer parses and
validates, over 20 seeds at the default max_tokens."""

from __future__ import annotations

import os

import pytest

import clients
from clients import ASK_ORDER, ASK_WEATHER, GetTime, GetWeather, Order, openai_tool, over_seeds, validated_call, \
    validated_json

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else its import fetches a price list from the network
import litellm  # noqa: E402

pytestmark = [pytest.mark.backend, pytest.mark.slow]
server = clients.module_server()


def completion(server, seed, **kw):
    return litellm.completion(model=f"openai/{clients.MODEL}", api_base=server.url + "/v1", api_key="none",
                              seed=seed, timeout=clients.TIMEOUT, num_retries=0, **kw)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "GetWeather"}}],
                         ids=["required", "named"])
def test_forced_tool_calls(server, tool_choice):
    def check(seed):
        r = completion(server, seed, messages=ASK_WEATHER, tools=[openai_tool(GetWeather), openai_tool(GetTime)],
                       tool_choice=tool_choice)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            if tool_choice != "required":
                assert call.function.name == "GetWeather", choice.message
            validated_call(call.function.name, call.function.arguments)

    over_seeds(check)


def test_response_format_json_schema(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "Order", "schema": Order.model_json_schema()}}

    def check(seed):
        r = completion(server, seed, messages=ASK_ORDER, response_format=fmt)
        assert r.choices[0].finish_reason == "stop", r.choices[0]
        validated_json(r.choices[0].message.content)

    over_seeds(check)
