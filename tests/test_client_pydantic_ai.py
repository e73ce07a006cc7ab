"""pydantic-ai against `dglocal serve` (issue 40): an agent with one function tool and a structured output_type
(pydantic-ai's default tool output: a `final_result` tool beside the function tool, tool_choice "required"),
with no retries, so that every call the model makes must parse and validate, over 20 seeds at the default
max_tokens."""

from __future__ import annotations

from enum import Enum

import openai
import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse, ToolCallPart
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

import clients
from clients import ASK_ORDER, MODEL, Order, Unit, over_seeds, validated_json

pytestmark = [pytest.mark.backend, pytest.mark.slow]
server = clients.module_server(1024)  # an agent's prompt with a tool and an output type is 822 tokens


class City(str, Enum):
    paris = "Paris"
    springfield = "Springfield"


def test_an_agent_with_a_tool_and_an_output_type(server):
    """The tool takes enums alone: a random model's strings run to the end of the room they have (only the server's
    closing ends them), so a call with a string would leave the next turn's prompt no room in the context."""
    provider = OpenAIProvider(openai_client=clients.openai_client(server, openai.AsyncOpenAI))
    model = OpenAIChatModel(MODEL, provider=provider)
    agent = Agent(model, output_type=Order, retries=0,
                  instructions="Take the order; look up the weather at its address if it helps.")
    looked_up: list[tuple[City, Unit]] = []

    @agent.tool_plain
    def get_weather(city: City, unit: Unit) -> str:
        """Look up the weather forecast of a city."""
        looked_up.append((city, unit))
        return f"sunny, 21 degrees {unit.value}"

    def check(seed):
        result = agent.run_sync(ASK_ORDER[0]["content"], model_settings=ModelSettings(seed=seed))
        assert isinstance(result.output, Order)
        calls = [p for m in result.all_messages() if isinstance(m, ModelResponse) for p in m.parts
                 if isinstance(p, ToolCallPart)]
        names = {p.tool_name for p in calls}
        assert "final_result" in names and names <= {"get_weather", "final_result"}, calls
        for call in calls:  # the answer's arguments as the server sent them (pydantic-ai's parser takes NaN)
            if call.tool_name == "final_result":
                validated_json(call.args_as_json_str())

    over_seeds(check)
    assert all(isinstance(city, City) and isinstance(unit, Unit) for city, unit in looked_up), looked_up
