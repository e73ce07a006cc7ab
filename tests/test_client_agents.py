"""openai-agents against `dglocal serve` (issue 40), with both of its models: the default OpenAIResponsesModel
(POST /v1/responses) and OpenAIChatCompletionsModel. An agent with an output_type (a strict json_schema answer) and
an agent whose tool runs once (a forced call, its result the run's output) — every answer and every call parses and
validates, over 20 seeds at the default max_tokens (the SDK sends none)."""

from __future__ import annotations

import asyncio

import agents
import openai
import pytest

import clients
from clients import ASK_ORDER, ASK_WEATHER, MODEL, GetWeather, Order, over_seeds, validated_call

pytestmark = [pytest.mark.backend, pytest.mark.slow]
server = clients.module_server()

MODELS = {"responses": agents.OpenAIResponsesModel, "chat": agents.OpenAIChatCompletionsModel}
agents.set_tracing_disabled(True)  # else the SDK posts traces to OpenAI's servers


def model(server, kind: str):
    return MODELS[kind](model=MODEL, openai_client=clients.openai_client(server, openai.AsyncOpenAI))


def run(agent, text: str):
    return asyncio.run(asyncio.wait_for(agents.Runner.run(agent, text, max_turns=2), clients.TIMEOUT))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_an_output_type(server, kind):
    def check(seed):
        agent = agents.Agent(name="orders", instructions="Take the order.", output_type=Order,
                             model=model(server, kind), model_settings=agents.ModelSettings(extra_body={"seed": seed}))
        out = run(agent, ASK_ORDER[0]["content"]).final_output
        assert isinstance(out, Order), out
        clients.validated_json(out.model_dump_json())

    over_seeds(check)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_tool_round_trip(server, kind):
    seen = []

    @agents.function_tool
    def get_weather(city: str, unit: str, days: int | None = None) -> str:
        """Look up the weather forecast of a city."""
        seen.append({"city": city, "unit": unit, "days": days})
        return "sunny"

    schema = GetWeather.model_json_schema()
    get_weather.params_json_schema = schema  # the enum the clients' GetWeather has
    get_weather.strict_json_schema = False

    def check(seed):
        seen.clear()
        settings = agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                        extra_body={"seed": seed})
        agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather],
                             model=model(server, kind), model_settings=settings,
                             tool_use_behavior="stop_on_first_tool")
        assert run(agent, ASK_WEATHER[0]["content"]).final_output == "sunny"
        assert len(seen) == 1
        validated_call("GetWeather", {k: v for k, v in seen[0].items() if v is not None or k != "days"})

    over_seeds(check)
