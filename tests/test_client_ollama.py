"""The official `ollama` package against `dglocal serve` (issue 40): tags and show, then `format` with a pydantic
model's schema on /api/chat (whole and streamed) and /api/generate, and tools on /api/chat (ollama has no
tool_choice: a call the model starts is held to its tool's schema) — every structured answer and every call parses
and validates, over 20 seeds at the default length (the client sends no num_predict)."""

from __future__ import annotations

import ollama
import pytest

import clients
from clients import ASK_ORDER, ASK_WEATHER, MODEL, GetTime, GetWeather, Order, over_seeds, validated_call, \
    validated_json

pytestmark = [pytest.mark.backend, pytest.mark.slow]
server = clients.module_server()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=clients.TIMEOUT)


def test_tags_and_show(client):
    [listed] = client.list().models
    assert listed.model.split(":")[0] == MODEL
    shown = client.show(MODEL)
    assert shown.details.family and "completion" in (shown.capabilities or [])


def test_chat_format_whole_and_streamed(client):
    def check(seed):
        whole = client.chat(MODEL, ASK_ORDER, format=Order.model_json_schema(), options={"seed": seed})
        assert whole.done_reason == "stop", whole
        validated_json(whole.message.content)
        parts = list(client.chat(MODEL, ASK_ORDER, format=Order.model_json_schema(), options={"seed": seed},
                                 stream=True))
        assert "".join(p.message.content or "" for p in parts) == whole.message.content and parts[-1].done

    over_seeds(check)


def test_generate_format(client):
    def check(seed):
        out = client.generate(MODEL, ASK_ORDER[0]["content"], format=Order.model_json_schema(),
                              options={"seed": seed})
        assert out.done_reason == "stop", out
        validated_json(out.response)

    over_seeds(check)


def test_chat_tools(client):
    tools = [clients.openai_tool(GetWeather), clients.openai_tool(GetTime)]

    def check(seed):
        out = client.chat(MODEL, ASK_WEATHER, tools=tools, options={"seed": seed, "num_predict": 96})
        for call in out.message.tool_calls or []:  # arguments come as an object in ollama's shape
            validated_call(call.function.name, dict(call.function.arguments))
        assert "<|tool_call>" not in (out.message.content or ""), out.message

    over_seeds(check)
