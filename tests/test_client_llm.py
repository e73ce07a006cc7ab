"""simonw's llm against `dglocal serve` (issue 40): the server as an OpenAI-compatible model of
extra-openai-models.yaml (in a temporary LLM_USER_PATH), and `model.prompt(schema=...)`, the Python form of
`llm --schema`: response_format json_schema, streamed as llm streams by default; every answer parses and validates,
over 20 seeds at the default max_tokens (llm sends none)."""

from __future__ import annotations

import json

import llm
import pytest

import clients
from clients import ASK_ORDER, MODEL, Order, over_seeds, validated_json

pytestmark = [pytest.mark.backend, pytest.mark.slow]
server = clients.module_server()


@pytest.fixture(scope="module")
def model(server, tmp_path_factory):
    home = tmp_path_factory.mktemp("llm_user_path")
    config = [{"model_id": MODEL, "model_name": MODEL, "api_base": server.url + "/v1", "supports_schema": True}]
    (home / "extra-openai-models.yaml").write_text(json.dumps(config))  # JSON is YAML
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_USER_PATH", str(home))
        yield llm.get_model(MODEL)


def test_a_prompt_with_a_schema(model):
    def check(seed):
        response = model.prompt(ASK_ORDER[0]["content"], schema=Order, seed=seed)
        validated_json(response.text())
        assert response.response_json["finish_reason"] == "stop", response.response_json

    over_seeds(check)
