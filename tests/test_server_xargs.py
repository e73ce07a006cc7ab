"""vLLM's `vllm_xargs` through a real `dglocal serve` and the official openai client: each diffusion key answers as
dglocal's own field does (the Python API given the same seed), a key whose meaning differs is a 400 naming it and
the difference. And docs/serving.md's lists of every route's fields, compared with the code's sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import tiny
from test_server import Server
from test_server import reference as api  # noqa: F401 (the tiny GGUF through the Python API)
from test_server import tiny_server as server  # noqa: F401

PROMPT = "Tell me a story"
C = tiny.CANVAS
STEPS = {"max_denoising_steps": 4, "cache_prompt": False}
FRESH = {"max_new_tokens": C, "cache_prompt": False, "max_denoising_steps": 4}


def seed_canvas(seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(10, tiny.VOCAB, C)]


def xargs(**keys) -> dict:
    return {"cache_prompt": False, "vllm_xargs": keys}


@pytest.mark.backend
def test_a_seed_canvas_is_a_draft_and_its_pins_hold(server, api):
    """diffusion_seed_canvas is `draft` (the first canvas starts from it), diffusion_pinned the positions that keep
    their seed token (`constraints`), diffusion_max_steps max_denoising_steps: the answer is the Python API's."""
    client, seed, pins = server.client(), seed_canvas(1), [0, 1, 2, 5, 8, 13]
    mine = api.generate(PROMPT, draft=seed, seed=3, **FRESH)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=C, seed=3, extra_body=xargs(
        diffusion_seed_canvas=seed, diffusion_max_steps=4))
    drafted = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=C, seed=3,
                                        extra_body={"draft": seed, **STEPS})
    assert out.choices[0].text == drafted.choices[0].text == mine.text
    held = api.generate(PROMPT, draft=seed, constraints={p: seed[p] for p in pins}, eos_token_id=(), seed=3, **FRESH)
    assert [held.tokens[p] for p in pins] == [seed[p] for p in pins]
    assert held.tokens != api.generate(PROMPT, draft=seed, eos_token_id=(), seed=3, **FRESH).tokens  # pins acted
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=C, seed=3, extra_body={
        "ignore_eos": True, **xargs(diffusion_seed_canvas=seed, diffusion_pinned=pins, diffusion_max_steps=4)})
    assert out.choices[0].text == held.text


@pytest.mark.backend
def test_max_steps_are_clamped_to_the_servers_and_samples_are_n(server, api):
    """vLLM clamps diffusion_max_steps to the served steps: an integer of thirty digits runs the server's own.
    diffusion_samples is `n`: the same choices, each with its own noise."""
    from dglocal.generation.config import GenerationConfig

    client = server.client()
    served = GenerationConfig.from_metadata(api.metadata).max_denoising_steps
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=C, seed=4,
                                      extra_body={"cache_prompt": False})
    big = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=C, seed=4,
                                    extra_body=xargs(diffusion_max_steps=10**30))
    assert big.choices[0].text == plain.choices[0].text
    assert max(big.model_extra["dglocal"]["steps_per_canvas"]) <= served
    two = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=C, seed=4,
                                    extra_body=xargs(diffusion_max_steps=2))
    assert max(two.model_extra["dglocal"]["steps_per_canvas"]) <= 2
    samples = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=C, seed=6, extra_body=xargs(diffusion_samples=3,
                                                                                    diffusion_max_steps=2))
    n = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=C,
                                       seed=6, n=3, extra_body={"max_denoising_steps": 2, "cache_prompt": False})
    assert [c.message.content for c in samples.choices] == [c.message.content for c in n.choices]


@pytest.mark.backend
def test_neutral_values_change_nothing(server):
    client = server.client()
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=C, seed=5, extra_body=STEPS)
    same = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=C, seed=5, extra_body={
        **STEPS, "vllm_xargs": {"diffusion_read_only": False, "diffusion_constrained": 0,
                               "diffusion_canvas_length": C, "diffusion_pinned": None}})
    assert same.choices[0].text == plain.choices[0].text


READ = "log-probabilities"


@pytest.mark.backend
@pytest.mark.parametrize("where, body, key, words", [
    ("/v1/completions", {"vllm_xargs": "x"}, "vllm_xargs", "must be an object"),
    ("/v1/completions", {"vllm_xargs": {"kv_transfer_params": {}}}, "kv_transfer_params", "not supported"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_read_only": True}}, "diffusion_read_only", READ),
    ("/v1/completions", {"vllm_xargs": {"diffusion_read_only": 1}}, "diffusion_read_only", READ),
    ("/v1/completions", {"vllm_xargs": {"diffusion_read_only": "yes"}}, "diffusion_read_only", "boolean"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_constrained": True}}, "diffusion_constrained",
     "logprob_token_ids"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_canvas_length": 8}}, "diffusion_canvas_length", "narrower"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_seed_canvas": [1] * (C - 1)}}, "diffusion_seed_canvas",
     f"exactly {C} ids"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_seed_canvas": [1] * (C - 1) + [tiny.VOCAB]}},
     "diffusion_seed_canvas", f"[{C - 1}] must be an integer in [0, {tiny.VOCAB})"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_seed_canvas": [True] * C}}, "diffusion_seed_canvas",
     "[0] must be an integer"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_seed_canvas": "1 2 3"}}, "diffusion_seed_canvas",
     "list of token ids"),
    ("/v1/completions", {"draft": "x", "vllm_xargs": {"diffusion_seed_canvas": [1] * C}}, "diffusion_seed_canvas",
     "not both"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_pinned": [0]}}, "diffusion_pinned", "needs a diffusion_seed"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_seed_canvas": [1] * C, "diffusion_pinned": [C]}},
     "diffusion_pinned", f"in [0, {C}) (canvas positions)"),
    ("/v1/completions", {"max_tokens": 2 * C, "vllm_xargs": {"diffusion_seed_canvas": [1] * C,
                                                             "diffusion_pinned": [0]}},
     "diffusion_pinned", "positions of one canvas"),
    ("/v1/completions", {"max_tokens": None, "vllm_xargs": {"diffusion_seed_canvas": [1] * C,
                                                            "diffusion_pinned": [0]}},
     "diffusion_pinned", "got none"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_max_steps": 0}}, "diffusion_max_steps", "positive integer"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_max_steps": True}}, "diffusion_max_steps", "positive integer"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_max_steps": "4"}}, "diffusion_max_steps", "positive integer"),
    ("/v1/completions", {"max_denoising_steps": 4, "vllm_xargs": {"diffusion_max_steps": 4}},
     "diffusion_max_steps", "not both"),
    ("/v1/completions", {"vllm_xargs": {"diffusion_samples": 17}}, "diffusion_samples", "at most 16"),
    ("/v1/completions", {"n": 2, "vllm_xargs": {"diffusion_samples": 2}}, "diffusion_samples", "cannot both"),
    ("/v1/completions", {"suffix": "y", "vllm_xargs": {"diffusion_seed_canvas": [1] * C}},
     "diffusion_seed_canvas", "fixed layout"),
    ("/infill", {"input_prefix": "x", "vllm_xargs": {"diffusion_max_steps": 2}}, None, "a field of another route"),
    ("/v1/responses", {"input": "x", "vllm_xargs": {"diffusion_max_steps": 2}}, None, "vllm_xargs"),
])
def test_what_differs_is_a_400_naming_the_key(server, where, body, key, words):
    body = {"prompt": "x", "max_tokens": C, **body} if where == "/v1/completions" else body
    status, answer, _ = server.post(where, json.dumps({k: v for k, v in body.items() if v is not None}))
    assert status == 400, answer
    error = answer["error"]
    if key is not None:
        assert error["param"] == (key if key == "vllm_xargs" else f"vllm_xargs.{key}"), error
        assert key in error["message"], error
    assert words in error["message"], error


@pytest.mark.backend
def test_the_sudoku_model_takes_the_step_cap_alone():
    """Its guide owns the canvas: a seed canvas, pins or samples are refused by name; diffusion_max_steps runs."""
    from test_sudoku import easy_puzzle

    s = Server("-np", "1")
    try:
        puzzle = [{"role": "user", "content": easy_puzzle()[0]}]
        for key, value in (("diffusion_seed_canvas", [0] * 81), ("diffusion_samples", 2)):
            status, answer, _ = s.post("/v1/chat/completions", json.dumps({"messages": puzzle,
                                                                           "vllm_xargs": {key: value}}))
            assert status == 400 and answer["error"]["param"] == f"vllm_xargs.{key}", answer
            assert "Sudoku" in answer["error"]["message"]
        status, answer, _ = s.post("/v1/chat/completions", json.dumps({"messages": puzzle, "seed": 1,
                                                                       "vllm_xargs": {"diffusion_max_steps": 8}}))
        assert status == 200, answer
    finally:
        s.stop()


# -- docs/serving.md's "Fields by route" against the code's sets ----------------------------------------------------

DOC = Path(__file__).parent.parent / "docs" / "serving.md"
S, E, N, R = "supported", "without effect", "neutral", "refused"


def route_lists() -> dict[str, dict[str, set[str]]]:
    """{heading: {list: the names in backticks}} of the doc's "Fields by route"; the lists are the bullets
    "- supported:", "- accepted without effect:", "- only its (their) neutral value:", "- refused:"."""
    section = DOC.read_text(encoding="utf-8").split("\n## Fields by route\n")[1].split("\n## ")[0]
    out = {}
    for block in section.split("\n### ")[1:]:
        heading, _, body = block.partition("\n")
        lists = out.setdefault(heading.strip(), {})
        for item in re.split(r"\n- ", "\n" + body)[1:]:
            label, _, names = item.split("\n\n")[0].partition(":")
            kind = {"supported": S, "accepted without effect": E, "refused": R}.get(label) or \
                (N if label.startswith("only") and label.endswith("neutral value") else label)
            assert kind in (S, E, N, R) and kind not in lists, (heading, label)
            lists[kind] = set(re.findall(r"`([a-z][a-z0-9_]*)`", names))
        named = [n for names in lists.values() for n in names]
        assert len(named) == len(set(named)), f"{heading}: a name in two lists"
    return out


def test_the_docs_list_every_field_of_every_route():
    """Each route's lists in docs/serving.md are exactly the code's: a field added, moved or dropped in schema.py
    (or responses.py, ollama.py) fails here until the doc says so."""
    from dglocal.serving import ollama, responses, schema

    docs = route_lists()
    for heading, route in (("`POST /v1/chat/completions`", schema.CHAT), ("`POST /v1/completions`",
                                                                            schema.COMPLETIONS),
                           ("`POST /infill`", schema.INFILL), ("`POST /v1/edits`", schema.EDIT)):
        lists = docs[heading]
        assert set(lists) <= {S, N}, heading  # the shared lists are below, under "The four routes above"
        assert lists[S] | lists.get(N, set()) == set(route) - set(schema.NO_EFFECT), heading
    assert docs["The four routes above"] == {E: set(schema.NO_EFFECT), N: set(schema.NEUTRAL),
                                             R: set(schema.REFUSED)}
    assert docs["`vllm_xargs`"] == {S: set(schema.XARGS), N: set(schema.XARGS_NEUTRAL)}
    assert docs["`POST /tokenize`"] == {S: set(schema.TOKENIZE)}
    assert docs["`POST /detokenize`"] == {S: set(schema.DETOKENIZE)}
    for heading, taken, refused in (("`POST /v1/responses`", {*responses.PASSED, *responses.READ}, responses.REFUSED),
                                    ("`POST /api/chat`", set(ollama.CHAT), ollama.REFUSED),
                                    ("`POST /api/generate`", set(ollama.GENERATE), ollama.REFUSED)):
        lists = docs[heading]
        assert lists[S] | lists.get(E, set()) | lists.get(N, set()) == taken, heading
        assert lists[R] == set(refused), heading
    options = docs["ollama's `options`"]
    assert options == {S: ollama.KNOWN_OPTIONS - {*ollama.RUNTIME, *ollama.INERT, *ollama.NEUTRAL, "num_ctx"},
                       E: {*ollama.RUNTIME, *ollama.INERT}, N: {*ollama.NEUTRAL, "num_ctx"}}
    assert {*schema.GRAMMARS, "tool_choice", "draft", "tools", "chat_template_kwargs", "n", "suffix",
            "diffusion_seed_canvas", "diffusion_pinned", "diffusion_samples"} == docs["The Sudoku model"][R]


def test_the_docs_table_of_vllm_keys_names_each_key():
    from dglocal.serving import schema

    table = DOC.read_text(encoding="utf-8").split("\n## vLLM's `vllm_xargs`\n")[1].split("\n## ")[0]
    keys = {m for row in table.splitlines() if row.startswith("| `") for m in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert keys == {*schema.XARGS, *schema.XARGS_NEUTRAL}
