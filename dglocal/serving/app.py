"""`dglocal serve`: the OpenAI-compatible HTTP API (FastAPI + uvicorn) over the serving engine.

    POST /v1/chat/completions   messages through the GGUF chat template; SSE streaming, a chunk per committed block
    POST /v1/completions        a raw prompt
    GET  /v1/models, /health, /slots

Extensions, ignored by plain OpenAI clients: the diffusion settings as extra body fields (max_denoising_steps,
entropy_bound, t_min, t_max, stability_threshold, confidence_threshold), llama-server's ignore_eos and cache_prompt;
`stream_options.include_drafts` adds a `dglocal_draft` chunk per denoising step (the live canvas); every response
carries `dglocal` statistics.
"""

from __future__ import annotations

import json
import logging
import math
import time

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from dglocal.errors import ConfigError, ContextError, DglocalError
from dglocal.generation.chat import ChatTemplate
from dglocal.generation.events import Completion, Step
from dglocal.generation.loop import split_options
from dglocal.generation.request import plan
from dglocal.serving.engine import END, Engine, Request

log = logging.getLogger("dglocal.serving.app")
DIFFUSION_FIELDS = {"max_denoising_steps": int, "entropy_bound": float, "t_min": float, "t_max": float,
                    "stability_threshold": int, "confidence_threshold": float}
ACCEPTED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stop", "seed", "stream",
            "stream_options", "n", "temperature", "top_p", "user", "frequency_penalty", "presence_penalty",
            "ignore_eos", "cache_prompt", *DIFFUSION_FIELDS}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class Frontend:
    """What a model looks like over HTTP: its id, how messages become tokens, how tokens become the answer."""

    def __init__(self, model, model_id: str, defaults: dict):
        self.model, self.id, self.defaults = model, model_id, defaults
        self.template = ChatTemplate.of(model)

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], dict]:
        if self.template is None:
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        return self.template.tokens(self.model, messages), {}

    def text_prompt(self, prompt: str) -> tuple[list[int], dict]:
        return self.model.tokenize(prompt, add_special=True, parse_special=True), {}

    def answer(self, completion: Completion) -> str:
        return completion.text


class SudokuFrontend(Frontend):
    """The built-in Sudoku model: a message holding a puzzle (81 cells, '.' or '0' blank) gets the solved grid."""

    def chat_prompt(self, messages):
        return self.text_prompt(messages[-1]["content"])

    def text_prompt(self, prompt):
        from dglocal.sudoku import core as sc
        from dglocal.sudoku.solve import puzzle_options

        try:
            cells = sc.parse_grid("".join(prompt.split()))
        except ConfigError as e:
            raise ApiError(400, f"send a Sudoku puzzle: {e}", param="messages") from None
        return sc.encode_prompt(cells), puzzle_options(cells)

    def answer(self, completion):
        from dglocal.sudoku import core as sc

        cells = sc.decode_canvas(completion.tokens + [sc.PAD_ID] * (sc.CANVAS_LENGTH - len(completion.tokens)))
        return "\n".join("".join(str(c) for c in cells[r * 9:r * 9 + 9]) for r in range(9))


# -- request parsing ---------------------------------------------------------------------------------------------

def _typed(body: dict, name: str, kind, *, low=None, high=None):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and (kind is float or float(value).is_integer()))
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        span = "" if low is None else f" in [{low}, {high}]" if high is not None else f" >= {low}"
        what = "an integer" if kind is int else "a boolean" if kind is bool else "a number"
        raise ApiError(400, f"'{name}' must be {what}{span}, got {value!r}", param=name)
    return kind(value)


def parse_options(body: dict, frontend: Frontend) -> tuple[dict, bool, dict]:
    """(generation options, stream?, stream_options) from an OpenAI request body; ApiError names the field."""
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}", param=unknown[0])
    if body.get("model") not in (None, frontend.id):
        raise ApiError(404, f"the model '{body['model']}' does not exist; this server has '{frontend.id}'",
                       param="model", code="model_not_found")
    if _typed(body, "n", int, low=1) not in (None, 1):
        raise ApiError(400, "only n = 1 is supported", param="n")
    for name in ("temperature", "top_p"):  # this sampler's temperatures are t_min/t_max; nucleus does not apply
        if _typed(body, name, float, low=0) not in (None, 1.0):
            raise ApiError(400, f"'{name}' does not apply to the diffusion sampler (only 1 is accepted); set "
                                f"t_min / t_max / entropy_bound instead", param=name)
    options = dict(frontend.defaults)
    for name, kind in DIFFUSION_FIELDS.items():
        value = _typed(body, name, kind)
        if value is not None:
            options[name] = value
    max_tokens = _typed(body, "max_completion_tokens", int, low=1) or _typed(body, "max_tokens", int, low=1)
    if max_tokens is not None:
        options["max_new_tokens"] = max_tokens
    seed = _typed(body, "seed", int, low=-1, high=2**64 - 1)
    if seed is not None:
        options["seed"] = seed
    if _typed(body, "ignore_eos", bool):  # llama-server's field: generate to max_tokens
        options["eos_token_id"] = ()
    if _typed(body, "cache_prompt", bool) is False:  # llama-server's field: no reuse of the slot's cached prefix
        options["cache_prompt"] = False
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
        options["stop"] = tuple(stops)
    stream = _typed(body, "stream", bool) or False
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return options, stream, stream_options


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] needs a role (system, user or assistant)", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


# -- the app -----------------------------------------------------------------------------------------------------

def create_app(engine: Engine, frontend: Frontend, *, api_key: str | None = None):
    app = FastAPI(title="dglocal", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def auth(request: HttpRequest, call_next):
        if api_key and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            e = ApiError(401, "invalid or missing API key", type="authentication_error", code="invalid_api_key")
            return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": frontend.id, "object": "model", "created": int(time.time()),
                                            "owned_by": "dglocal"}]}

    @app.get("/slots")
    async def slots():
        return engine.slot_info()

    async def body_of(request: HttpRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body = await body_of(request)
        options, stream, stream_options = parse_options(body, frontend)
        prompt, extra = frontend.chat_prompt(parse_messages(body))
        return await run(request, prompt, _merged(options, extra), stream, stream_options, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await body_of(request)
        options, stream, stream_options = parse_options(body, frontend)
        if not isinstance(body.get("prompt"), str):
            raise ApiError(400, "'prompt' must be a string", param="prompt")
        prompt, extra = frontend.text_prompt(body["prompt"])
        return await run(request, prompt, _merged(options, extra), stream, stream_options, chat=False)

    async def run(request, prompt, options, stream, stream_options, *, chat):
        import asyncio

        settings, extras = split_options({k: v for k, v in options.items() if v is not None})
        try:  # the one fit rule: the prompt and every canvas max_tokens may take
            planned = plan(engine.model, prompt, seeds=engine.model.seeds, **settings)
        except ContextError as e:
            raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        req = Request(planned, extras, asyncio.get_running_loop())
        if not engine.submit(req):
            raise ApiError(503, "the server is busy: every slot is taken and the queue is full", type="server_error",
                           headers={"Retry-After": "1"})
        shape = Shape(req, frontend, chat)
        if stream:
            return StreamingResponse(shape.sse(request, engine, stream_options), media_type="text/event-stream")
        completion = None
        try:
            while (item := await req.events.get()) is not END:
                if isinstance(item, BaseException):
                    raise _as_api_error(item)
                if item.kind == "done":
                    completion = item
        except asyncio.CancelledError:
            engine.cancel(req)
            raise
        return shape.whole(completion)

    return app


def _merged(options: dict, extra: dict) -> dict:
    """The request's options with what its frontend adds (a puzzle's guide, say); the frontend's unset (None)
    fields leave the request's own in place."""
    return {**options, **{k: v for k, v in extra.items() if v is not None}}


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ContextError):
        return ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, DglocalError):
        return ApiError(400 if isinstance(e, ConfigError) else 500, str(e))
    return ApiError(500, f"{type(e).__name__}: {e}", type="server_error")


class Shape:
    """OpenAI response objects for one request."""

    def __init__(self, req: Request, frontend: Frontend, chat: bool):
        self.req, self.frontend, self.chat = req, frontend, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + req.id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _base(self, chunk: bool) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.frontend.id}

    def _choice(self, text: str | None, finish: str | None, *, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "finish_reason": finish}

    def usage(self, c: Completion) -> dict:
        n_prompt = len(self.req.plan.tokens)
        return {"prompt_tokens": n_prompt, "completion_tokens": len(c.tokens), "total_tokens": n_prompt + len(c.tokens)}

    def stats(self, c: Completion) -> dict:
        s = c.stats
        return {"slot": self.req.slot, "prompt_tokens_cached": self.req.cached, "prompt_tokens_encoded":
                s.prefilled_tokens, "steps": sum(s.steps_per_canvas), "steps_per_canvas": s.steps_per_canvas,
                "ms_per_step": round(s.ms_per_step, 2), "tokens_per_second": round(s.tokens_per_second, 2),
                "seed": s.seed}

    @staticmethod
    def finish(c: Completion) -> str:
        return "length" if c.finish_reason == "length" else "stop"

    def whole(self, c: Completion) -> dict:
        self.log(c)
        text = self.frontend.answer(c)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": self.finish(c)}
                  if self.chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish(c)})
        return {**self._base(False), "choices": [choice], "usage": self.usage(c), "dglocal": self.stats(c)}

    async def sse(self, request, engine: Engine, stream_options: dict):
        import asyncio

        drafts, usage = bool(stream_options.get("include_drafts")), bool(stream_options.get("include_usage"))
        first, sudoku = True, isinstance(self.frontend, SudokuFrontend)
        try:
            while (item := await self.req.events.get()) is not END:
                if await request.is_disconnected():
                    engine.cancel(self.req)
                    return
                if isinstance(item, BaseException):
                    yield _sse({"error": _as_api_error(item).body()["error"]})
                    return
                if item.kind == "step" and drafts:
                    yield _sse({**self._base(True), "choices": [], "dglocal_draft": self._draft(item)})
                elif item.kind == "block" and item.text and not sudoku:
                    yield _sse({**self._base(True), "choices": [self._choice(item.text, None, first=first)]})
                    first = False
                elif item.kind == "done":
                    self.log(item)
                    text = self.frontend.answer(item) if sudoku else None
                    yield _sse({**self._base(True), "choices": [self._choice(text, self.finish(item), first=first)],
                                "dglocal": self.stats(item)})
                    if usage:
                        yield _sse({**self._base(True), "choices": [], "usage": self.usage(item)})
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:  # the client went away
            engine.cancel(self.req)
            raise

    def _draft(self, step: Step) -> dict:
        ids = step.argmax.tolist()
        return {"block": step.block, "step": step.step, "text": self.frontend.model.detokenize(ids),
                "accepted": step.accepted.astype(int).tolist(), "mean_entropy": round(step.mean_entropy, 5),
                "temperature": round(step.temperature, 4),
                "guided": None if step.guided is None else step.guided.astype(int).tolist()}

    def log(self, c: Completion) -> None:
        s = c.stats
        log.info("%s slot %s: prompt %d (cached %d) + %d tokens, %d steps, %.1f ms/step, %.1f canvas tok/s",
                 self.id, self.req.slot, len(self.req.plan.tokens), self.req.cached, len(c.tokens),
                 sum(s.steps_per_canvas), s.ms_per_step, s.tokens_per_second)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(model, *, model_id: str, host: str, port: int, parallel: int, api_key: str | None,
          defaults: dict, sudoku: bool = False, queue_size: int | None = None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    frontend = (SudokuFrontend if sudoku else Frontend)(model, model_id, defaults)
    engine = Engine(model, parallel, queue_size if queue_size is not None else 4 * parallel)
    engine.start()
    app = create_app(engine, frontend, api_key=api_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        engine.stop()
