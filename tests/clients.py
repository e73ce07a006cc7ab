"""What the client-library tests share (tests/test_client_*.py, issue 40): a random-weight model with the Gemma 4
tokenizer and chat template, a server over it, the schemas the clients send, and a loop over seeds.

The model is `dglocal synth`'s tiny preset (2 layers, 32-token canvases; q8_0, seconds to write) over the first
VOCAB tokens of the real vocabulary: every special token (the tool-call and string-quote tokens), the 256 bytes, and
the merged tokens that straddle JSON's structure (`",` `":` `"]` `"}` ...). The whole 262144-token vocabulary makes
each step about 5x slower on 2 cores (its output head is the model's cost). The model's free text is noise: only the
server's constraints make an answer parse, so every answer over SEEDS must parse and validate. The server runs at most
4 denoising steps a canvas (--steps; the model's default is 48): that bounds a canvas's time, not an answer's length.
No test sets max_tokens unless its client always does.
"""

from __future__ import annotations

import json
import traceback
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import jsonschema
import openai
import pytest
from pydantic import BaseModel
from test_server import Server

MODEL = "synth"
SEEDS = range(20)
VOCAB = 16384
SLOT_CTX = 768  # one slot: an answer that never closes stops at the context's end (most prompts take up to 549)
TIMEOUT = 600


def synth_model(tmp_path_factory) -> Path:
    """The tiny synth GGUF over the vocabulary's first VOCAB tokens, written once per session."""
    import dataclasses

    from dglocal.convert.synth import preset_params, write_synthetic

    path = tmp_path_factory.getbasetemp() / f"synth-tiny-v{VOCAB}-q8_0.gguf"
    if not path.exists():
        write_synthetic(dataclasses.replace(preset_params("tiny"), vocab_size=VOCAB), "q8_0", path, name="tiny")
    return path


def serve(tmp_path_factory, n_ctx: int = SLOT_CTX) -> Server:
    return Server(str(synth_model(tmp_path_factory)), "-np", "1", "-c", str(n_ctx), "--alias", MODEL,
                  "--seed", "1", "--steps", "4")


def module_server(n_ctx: int = SLOT_CTX):
    """A module-scoped fixture of `serve`'s server: a client module's `server = clients.module_server()`. The slot
    holds n_ctx tokens: free text runs to its end, so a larger one costs every answer more."""
    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        s = serve(tmp_path_factory, n_ctx)
        yield s
        s.stop()

    return server


def openai_client(server: Server, kind=openai.OpenAI):
    """The openai client (or AsyncOpenAI) the libraries wrap: no retry (a retried answer would hide a failed one), a
    long timeout (an answer that never closes runs to the slot's context)."""
    return kind(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


# -- what the clients ask for: a nested answer (enums, lists, optionals, a nested object; no maxLength) and tools --

class Priority(str, Enum):
    low = "low"
    normal = "normal"
    urgent = "urgent"


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Line(BaseModel):
    product: str
    quantity: int
    colour: Colour
    tags: list[str]


class Address(BaseModel):
    street: str
    city: str
    postcode: Optional[str] = None


class Order(BaseModel):
    """An order to ship."""

    customer: str
    priority: Priority
    lines: list[Line]
    ship_to: Optional[Address] = None
    gift: bool
    discount: Optional[float] = None


class Unit(str, Enum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class GetWeather(BaseModel):
    """Look up the weather forecast of a city."""

    city: str
    unit: Unit
    days: Optional[int] = None


class GetTime(BaseModel):
    """Look up the local time of a city."""

    city: str
    zones: list[str]


TOOLS = {m.__name__: m for m in (GetWeather, GetTime, Order)}  # what a call may name
ASK_ORDER = [{"role": "user", "content": "Ann orders two red mugs and a blue teapot, to 1 Main St, Springfield."}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}]


def openai_tool(model: type[BaseModel]) -> dict:
    """A chat-completions function tool whose parameters are the model's JSON schema."""
    return {"type": "function", "function": {"name": model.__name__, "description": model.__doc__,
                                             "parameters": model.model_json_schema()}}


def parsed(text: str):
    """JSON text read as json.loads does, but only JSON: NaN and Infinity (which json.loads takes) are refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON: {text[:200]!r}")

    return json.loads(text, parse_constant=refuse)


def validated_call(name: str, arguments: str | dict) -> BaseModel:
    """A tool call's arguments (JSON text, or as a client parsed it), checked against the tool's JSON schema and then
    its pydantic model."""
    args = parsed(arguments if isinstance(arguments, str) else json.dumps(arguments))  # json.dumps writes inf as such
    assert name in TOOLS, f"a call of an unknown tool {name!r}: {arguments!r}"
    jsonschema.validate(args, TOOLS[name].model_json_schema())
    return TOOLS[name].model_validate(args)


def validated_json(text: str, model: type[BaseModel] = Order) -> BaseModel:
    """An answer's text, parsed, checked against the model's JSON schema, then validated by the model."""
    value = parsed(text)
    jsonschema.validate(value, model.model_json_schema())
    return model.model_validate(value)


def over_seeds(check: Callable[[int], object], seeds=SEEDS) -> None:
    """Run check(seed) for every seed; fail with every seed's failure, not only the first's."""
    failures = []
    for seed in seeds:
        try:
            check(seed)
        except Exception as e:  # noqa: BLE001 -- a failed answer, whatever the client raised
            failures.append(f"seed {seed}: {described(e)}")
    assert not failures, f"{len(failures)} of {len(seeds)} seeds failed:\n" + "\n".join(failures)


def described(e: BaseException) -> str:
    """An exception, where it was raised, and the exceptions it was raised from (a client's wrapper says little)."""
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" at {Path(last.filename).name}:{last.lineno}" if last else ""
    text = f"{type(e).__name__}{where}: {str(e)[:1500]}"
    cause = e.__cause__ or e.__context__
    return text + (f"\n  from {described(cause)}" if cause is not None else "")
