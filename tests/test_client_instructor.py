"""instructor against `dglocal serve` (issue 40): a nested answer (enums, lists, optionals, a nested object) in
TOOLS mode (a forced call of the model's tool) and JSON_SCHEMA mode (response_format json_schema), validated by
instructor's own parsing with no retry, over 20 seeds at the default max_tokens."""

from __future__ import annotations

import instructor
import pytest

import clients
from clients import ASK_ORDER, MODEL, Order, over_seeds, validated_json

pytestmark = [pytest.mark.backend, pytest.mark.slow]
server = clients.module_server()


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA], ids=["tools", "json_schema"])
def test_a_nested_answer_parses_and_validates(server, mode):
    client = instructor.from_openai(clients.openai_client(server), mode=mode)

    def check(seed):
        order, completion = client.chat.completions.create_with_completion(
            model=MODEL, messages=ASK_ORDER, response_model=Order, max_retries=0, seed=seed)
        assert isinstance(order, Order)
        choice = completion.choices[0]
        if mode == instructor.Mode.TOOLS:  # instructor names the tool and reads the first call: every call counts
            assert choice.finish_reason == "tool_calls", choice
            for call in choice.message.tool_calls:
                assert call.function.name == "Order", choice.message
                validated_json(call.function.arguments)
        else:
            assert choice.finish_reason == "stop", choice
            validated_json(choice.message.content)

    over_seeds(check)
