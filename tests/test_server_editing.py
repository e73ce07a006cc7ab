"""Infilling, edits and warm starts through a real `dglocal serve`: OpenAI's `suffix`, llama-server's `/infill`
and `/v1/edits` agree with the Python API given the same seed."""

from __future__ import annotations

import json

import pytest

from test_editing import TEXT, _pairs
from test_server import reference as api  # noqa: F401 (the tiny GGUF through the Python API)
from test_server import tiny_server as server  # noqa: F401

pytestmark = pytest.mark.backend

STEPS = {"max_denoising_steps": 4}



def test_suffix_and_infill_agree_with_the_python_api(server, api):
    client = server.client()
    for i, (prefix, suffix) in enumerate(_pairs(100)):
        n = [4, 8, 12, 20][i % 4]
        mine = api.infill(prefix, suffix, max_middle=n, seed=i, **STEPS)
        assert mine.text.endswith(suffix) and mine.text == mine.middle + suffix
        if prefix:  # the OpenAI client refuses an empty prompt; /infill takes it
            out = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=n, seed=i,
                                            extra_body=STEPS)
            assert out.choices[0].text == mine.middle, (i, prefix, suffix)
        status, body, _ = server.post("/infill", json.dumps({"input_prefix": prefix, "input_suffix": suffix,
                                                              "n_predict": n, "seed": i, **STEPS}))
        assert status == 200, body
        assert body["content"] == mine.middle and body["stop"] is True
        assert body["tokens_evaluated"] == len(api.tokenize(prefix))  # BOS alone for an empty prefix


def test_an_edit_through_the_server_equals_the_python_api(server, api):
    spans = [(4, 9), (40, 44)]
    mine = api.edit(TEXT, spans, seed=5, room=2, **STEPS)
    status, body, _ = server.post("/v1/edits", json.dumps({"input": TEXT, "spans": [list(s) for s in spans],
                                                           "room": 2, "seed": 5, **STEPS}))
    assert status == 200, body
    assert body["object"] == "edit" and body["choices"][0]["text"] == mine.text
    assert [(c["start"], c["end"], c["old"], c["new"]) for c in body["changes"]] == \
        [(c.start, c.end, c.old, c.new) for c in mine.changes]
    assert mine.text[:4] == TEXT[:4] and mine.text.endswith(TEXT[44:])


def test_a_draft_field_warm_starts_the_canvas(server, api):
    draft = "Once upon a time there was"
    mine = api.generate("Tell me a story", draft=draft, seed=3, max_new_tokens=16, **STEPS)
    out = server.client().completions.create(model="tiny", prompt="Tell me a story", max_tokens=16, seed=3,
                                             extra_body={"draft": draft, **STEPS})
    assert out.choices[0].text == mine.text
    cold = api.generate("Tell me a story", seed=3, max_new_tokens=16, **STEPS)
    assert cold.tokens != mine.tokens


@pytest.mark.parametrize("path, body, param", [
    ("/v1/edits", {"input": TEXT, "spans": [[5, 2]]}, "spans"),
    ("/v1/edits", {"input": TEXT, "spans": "0-5"}, "spans"),
    ("/v1/edits", {"input": TEXT, "spans": [[0, 5]], "room": -1}, "room"),
    ("/v1/edits", {"input": TEXT, "spans": [[0, 5]], "stream": True}, "stream"),
    ("/v1/edits", {"input": TEXT, "spans": [[0, 5]], "input_prefix": "x"}, "input_prefix"),
    ("/infill", {"input_prefix": "a", "input_suffix": "b", "input_extra": [{"text": "c"}]}, "input_extra"),
    ("/infill", {"input_prefix": "a", "input_suffix": 5}, "input_suffix"),
    ("/infill", {"input_prefix": "a", "n_predict": 0}, "n_predict"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "suffix": "y"}, "suffix"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "input": "y"}, "input"),
    ("/v1/completions", {"prompt": "x", "draft": {"a": 1}}, "draft"),
    ("/v1/completions", {"prompt": "x", "draft": [99999]}, None),
])
def test_misused_fields_are_named_400s(server, path, body, param):
    status, answer, _ = server.post(path, json.dumps(body))
    assert status == 400, answer
    if param is not None:
        assert answer["error"]["param"] == param, answer
    else:
        assert "draft token 99999" in answer["error"]["message"]
