"""The built-in Sudoku model behind `dglocal serve` (serving.sudoku.SudokuFrontend), at its edges: a request's seed and
step cap honoured, fields the model cannot use refused by name, and the verdict on the grid in finish_reason and
the `dglocal` object. A real server process (test_server.Server) and the official `openai` client."""

from __future__ import annotations

import json

import openai
import pytest
from test_server import Server
from test_sudoku import attempt_lengths, easy_puzzle

from dglocal.sudoku import core as sc

pytestmark = pytest.mark.backend

# no solution, though the givens keep every rule: row 1 needs a 9 where column 9 has one
UNSOLVABLE = "12345678.........9...........2......9.7...6..53..4..9...1........5..........9...."
PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
       "RU5ErkJggg==")  # one pixel


@pytest.fixture(scope="module")
def server():
    s = Server("-np", "2")  # no MODEL: the built-in Sudoku model
    yield s
    s.stop()


def chat(server: Server, **fields) -> tuple[int, dict]:
    """POST /v1/chat/completions with `fields` (a puzzle message by default): (status, JSON reply)."""
    body = {"model": "sudoku", "messages": [{"role": "user", "content": easy_puzzle()[0]}], **fields}
    code, reply, _ = server.post("/v1/chat/completions", json.dumps(body))
    return code, reply


def drafts(server: Server, puzzle: str, **extra) -> tuple[list[dict], dict]:
    """A streamed request's live-canvas drafts and its last chunk."""
    stream = server.client().chat.completions.create(
        model="sudoku", messages=[{"role": "user", "content": puzzle}], stream=True,
        stream_options={"include_drafts": True}, extra_body=extra)
    chunks = [c.model_dump() for c in stream]
    return [c["dglocal_draft"] for c in chunks if c.get("dglocal_draft")], chunks[-1]


def test_a_request_seed_repeats_its_drafts(server):
    """The same seed, the same drafts (on either slot, whatever ran before), and the seed in the statistics."""
    for puzzle in (easy_puzzle()[0], UNSOLVABLE):
        runs = [drafts(server, puzzle, seed=123, max_denoising_steps=6) for _ in range(2)]
        (first, last), (again, _) = runs
        assert last["dglocal"]["seed"] == 123, last
        n = min(len(first), len(again), 6)  # the first attempt: an unsolvable puzzle's later ones depend on time
        assert [d["text"] for d in first[:n]] == [d["text"] for d in again[:n]] and n
    other, _ = drafts(server, UNSOLVABLE, seed=124, max_denoising_steps=6)
    assert [d["text"] for d in other[:6]] != [d["text"] for d in first[:6]]  # the seed is the noise


def test_a_request_step_cap_bounds_every_attempt(server):
    """max_denoising_steps caps each attempt, the model's own and the guide's restarts (16 steps by default); the
    restarts ran 16 steps whatever the request said, so a small cap did not make an attempt shorter."""
    shown, last = drafts(server, UNSOLVABLE, seed=0, max_denoising_steps=3)
    attempts = attempt_lengths((d["guided"], d["temperature"]) for d in shown)
    assert len(attempts) > 2 and max(attempts) == 3 and shown[0]["guided"] is None, attempts
    assert last["dglocal"]["steps"] == len(shown), last


def test_an_image_is_a_400_not_a_500(server):
    """A message of an image alone (or an image beside text) has no puzzle to read: a 400 naming messages."""
    for content in ([{"type": "image_url", "image_url": {"url": PNG}}],
                    [{"type": "text", "text": easy_puzzle()[0]}, {"type": "image_url", "image_url": {"url": PNG}}]):
        code, reply = chat(server, messages=[{"role": "user", "content": content}])
        assert code == 400 and reply["error"]["param"] == "messages", reply
        assert "puzzle as text" in reply["error"]["message"], reply


@pytest.mark.parametrize("fields,param", [
    ({"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),
    ({"json_schema": {"type": "object"}}, "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "g", "schema": {"type": "object"}}}},
     "response_format"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"grammar": 'root ::= "1"'}, "grammar"),
    ({"draft": "1" * 81}, "draft"),
])
def test_fields_the_sudoku_model_cannot_use_are_refused_by_name(server, fields, param):
    code, reply = chat(server, **fields)
    assert code == 400 and reply["error"]["param"] == param, reply
    assert "Sudoku model" in reply["error"]["message"], reply


def test_finish_reason_and_verdict_say_whether_the_grid_solves(server):
    """finish_reason "stop" and solved for a solved grid; "length" (its attempts ran out) and the cells that break
    a rule for one that is not, whole and streamed, in both routes."""
    c = server.client()
    puzzle, solution = easy_puzzle()
    r = c.chat.completions.create(model="sudoku", messages=[{"role": "user", "content": puzzle}], seed=0)
    assert "".join(r.choices[0].message.content.split()) == solution
    assert r.choices[0].finish_reason == "stop" and r.model_extra["dglocal"]["solved"] is True, r
    assert r.model_extra["dglocal"]["broken_cells"] == 0

    r = c.completions.create(model="sudoku", prompt=UNSOLVABLE, seed=0, extra_body={"max_denoising_steps": 2})
    grid = "".join(r.choices[0].text.split())
    verdict = r.model_extra["dglocal"]
    assert r.choices[0].finish_reason == "length" and verdict["solved"] is False, r
    assert verdict["broken_cells"] == len(sc.rule_breaks(sc.parse_grid(UNSOLVABLE), sc.parse_grid(grid))) > 0

    _, last = drafts(server, UNSOLVABLE, seed=0, max_denoising_steps=2)
    assert last["choices"][0]["finish_reason"] == "length" and last["dglocal"]["solved"] is False, last
    _, last = drafts(server, puzzle, seed=0)
    assert last["choices"][0]["finish_reason"] == "stop" and last["dglocal"]["solved"] is True, last
    with pytest.raises(openai.BadRequestError):  # and the server keeps serving after the errors above
        c.chat.completions.create(model="sudoku", messages=[{"role": "user", "content": "hi"}])
