"""`dglocal serve`: the OpenAI-compatible HTTP API (FastAPI + uvicorn) over the serving engine.

    POST /v1/chat/completions   messages through the GGUF chat template; SSE streaming, a chunk per committed block
    POST /v1/completions        a raw prompt
    GET  /v1/models, /health, /slots, /metrics
    GET  /                      the web page: a chat beside the live canvas

Extensions, ignored by plain OpenAI clients: the diffusion settings as extra body fields (max_denoising_steps,
entropy_bound, t_min, t_max, stability_threshold, confidence_threshold), llama-server's ignore_eos and cache_prompt;
`stream_options.include_drafts` adds a `dglocal_draft` chunk per denoising step (the live canvas); every response
carries `dglocal` statistics.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
import json
import logging
import time
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from dglocal.errors import ConfigError, ContextError, DglocalError
from dglocal.generation import channels
from dglocal.generation.events import Completion, Step
from dglocal.serving import llamacpp, logprobs, ollama, responses, schema
from dglocal.serving.engine import END, QUEUE, Engine, Request, ShuttingDown
from dglocal.serving.errors import ApiError
from dglocal.serving.frontend import Frontend, chat_page
from dglocal.serving.prepare import prepare
from dglocal.serving.sudoku import SudokuFrontend
from dglocal.serving.metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger("dglocal.server")
GRACE_SECONDS = 3  # what uvicorn still waits for connections once the open streams were ended


# -- the app -----------------------------------------------------------------------------------------------------

def create_app(engine: Engine, frontend: Frontend, *, api_key: str | None = None):
    app = FastAPI(title="dglocal", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    model = engine.model

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(schema.FieldError)
    async def field_error(_, e: schema.FieldError):
        return JSONResponse(ApiError(400, str(e), param=e.param).body(), status_code=400)

    app.add_middleware(Guard, api_key=api_key, metrics=metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    def model_card() -> dict:
        return {"id": frontend.id, "object": "model", "created": int(time.time()), "owned_by": "dglocal"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_by_id(model_id: str):
        if model_id != frontend.id:
            raise ApiError(404, f"the model {schema.short(model_id)} does not exist; this server has "
                                f"'{frontend.id}'", param="model", code="model_not_found")
        return model_card()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HttpRequest, e: StarletteHTTPException):
        """Routes that do not exist (or a method a route does not take), in OpenAI's error shape."""
        what = "no such route" if e.status_code == 404 else str(e.detail)
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {what}",
                                     code="not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.get("/slots")
    async def slots():
        return engine.slot_info()

    @app.get("/lora-adapters")
    async def lora_adapters():
        return model.adapters.info()

    @app.post("/lora-adapters")
    async def set_lora_adapters(request: HttpRequest):
        """llama-server's: new scales for the requests that give none ([{"id", "scale"}]; ids left out keep theirs)."""
        changes = schema.lora(schema.parse_body_any(await read_body(request)), "body")
        try:
            model.adapters.set_default(changes)
        except ConfigError as e:
            raise ApiError(400, str(e), param="lora") from None
        return model.adapters.info()

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    page = chat_page(frontend)

    @app.get("/")
    async def index():
        return HTMLResponse(page)

    service = Service(engine, frontend, metrics)

    async def run(request: HttpRequest, route: str):
        """Prepared on a worker thread (the event loop answers /health and streams meanwhile), attached by the
        engine thread, answered here."""
        prepared = await service.prepare(route, await read_body(request))
        if prepared.more:
            return await several(request, prepared)
        req, events = service.submit(request, prepared.request)
        shape = Shape(req, frontend, metrics=metrics, **prepared.shape)
        if prepared.stream:
            return StreamingResponse(shape.sse(events, prepared.stream_options), media_type="text/event-stream")
        completion = await collect(shape, events)
        if completion is None:  # the client left: nobody reads this
            return Response(status_code=499)
        return shape.whole(completion)

    async def several(request: HttpRequest, prepared):
        """`n` > 1: a generation per choice, queued together (the engine steps them in the same forwards), answered
        as one response whose choices are indexed; one choice's error ends them all."""
        subs = [service.submit(request, choice) for choice in prepared.choices]
        first = subs[0][0]
        shapes = [Shape(req, frontend, metrics=metrics, index=k, id=f"{'chatcmpl-' if prepared.shape['chat'] else 'cmpl-'}"
                        f"{first.id}", **prepared.shape) for k, (req, _) in enumerate(subs)]
        if prepared.stream:
            return StreamingResponse(merged_sse(shapes, [events for _, events in subs], prepared.stream_options),
                                     media_type="text/event-stream")
        try:
            done = await asyncio.gather(*(collect(shape, events) for shape, (_, events) in zip(shapes, subs)))
        except BaseException:
            for req, _ in subs:
                engine.cancel(req)
            raise
        if any(c is None for c in done):
            return Response(status_code=499)
        body = shapes[0].whole(done[0])
        body["choices"] = [shape.whole(c)["choices"][0] for shape, c in zip(shapes, done)]
        body["usage"] = usage_of(shapes, done)
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await run(request, "completions")

    @app.post("/infill")
    async def infill_route(request: HttpRequest):
        return await run(request, "infill")

    # routes that speak other APIs: each module turns its bodies into an OpenAI one for `service`
    responses.add_routes(app, service)
    ollama.add_routes(app, service)
    llamacpp.add_routes(app, service)

    @app.post("/v1/edits")
    async def edits(request: HttpRequest):
        return await run(request, "edit")

    return app


@dataclass
class Service:
    """What every route that generates goes through (the OpenAI routes here; routes speaking other APIs in their
    own modules, translating their bodies into an OpenAI one): a body prepared off the event loop, queued, and its
    events read until END or until its client leaves."""

    engine: Engine
    frontend: Frontend
    metrics: Metrics

    async def prepare(self, route: str, body: bytes | dict):
        """serving.prepare on a worker thread; `route` "chat", "completions", "infill" or "edit"."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await asyncio.to_thread(prepare, self.engine.model, self.frontend, route, raw)

    def submit(self, request: HttpRequest, choice) -> tuple[Request, AsyncIterator]:
        """One prepared generation (a driver.Prepared: a Prepared's `request`, or one of its `choices`) queued (a 503
        when the queue is full): the engine's Request and its events (until_gone)."""
        req = Request(choice, asyncio.get_running_loop())
        if not self.engine.submit(req):
            raise ApiError(503, "the server is busy: every slot is taken and the queue is full", type="server_error",
                           headers={"Retry-After": "1"})
        return req, until_gone(request, self.engine, req)

    def observe(self, req: Request, event) -> None:
        """The metrics of one event of `req`."""
        self.metrics.event(event)
        if event.kind == "done":
            self.metrics.finished(event, req.cached)


GENERATING = ("/v1/chat/completions", "/v1/completions", "/infill", "/v1/edits", "/v1/responses", "/api/chat",
              "/api/generate")
PUBLIC = ("/health", "/v1/models", "/")  # open under --api-key, as llama-server leaves health and models (the page
# asks for the key and sends it)
MAX_BODY = 64 << 20  # bytes of a request body (a few large images as data: URLs fit)
POLL_SECONDS = 0.25  # how often a request waiting for its events asks whether its client is still there


class Guard:
    """Every request passes here first (a plain ASGI middleware: the handlers keep the server's own `receive`, so
    they notice a client that disconnects): refused ones are answered at once, generating ones counted."""

    def __init__(self, app, *, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = refusal(HttpRequest(scope), self.api_key)
        if refused is not None:
            self.metrics.requests.labels(str(refused.status)).inc()
            return await JSONResponse(refused.body(), status_code=refused.status)(scope, receive, send)
        status = []

        async def sending(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if scope["path"] in GENERATING:
                self.metrics.requests.labels(str(status[0] if status else 499)).inc()


def refusal(request: HttpRequest, api_key: str | None) -> ApiError | None:
    """Why a request is refused before any handler runs: a body over MAX_BODY by its header (413), a
    cross-site browser POST (a page elsewhere cannot drive the model or change the adapters' scales: a plain
    form or text/plain POST needs no CORS preflight), a missing or wrong key (every route but PUBLIC)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        return ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB", code="request_too_large")
    origin = request.headers.get("origin")
    if request.method not in ("GET", "HEAD", "OPTIONS") and origin is not None and \
            urlsplit(origin).netloc != request.headers.get("host"):
        return ApiError(403, f"cross-origin requests are refused (from {schema.short(origin)})",
                        type="permission_error", code="cross_origin")
    path = request.url.path.rstrip("/") or "/"
    if api_key and path not in PUBLIC and not path.startswith("/v1/models/") and \
            not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {api_key}".encode()):
        return ApiError(401, "invalid or missing API key", type="authentication_error", code="invalid_api_key")
    return None


async def read_body(request: HttpRequest) -> bytes:
    """The body, refused (413) once it passes MAX_BODY: a chunked upload without a length is not read whole."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def until_gone(request: HttpRequest, engine: Engine, req: Request):
    """A request's events until END; a client that disconnects (noticed within POLL_SECONDS, waiting in the
    queue or generating, streaming or not) cancels it: its slot is free within one step."""
    ended, checked = False, time.monotonic()
    try:
        while True:
            try:
                item = await asyncio.wait_for(req.events.get(), POLL_SECONDS)
            except asyncio.TimeoutError:
                item = None
            if time.monotonic() - checked >= POLL_SECONDS:  # a step's events may come faster than the poll
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if item is END:
                ended = True
                return
            if item is not None:
                yield item
    finally:  # gone, cancelled, or the reader stopped early: the engine drops it at its next tick
        if not ended:
            engine.cancel(req)


async def collect(shape: "Shape", events) -> Completion | None:
    """A choice's Completion (None when the client left); its error raised as an ApiError."""
    completion = None
    async for item in events:
        if isinstance(item, BaseException):
            raise as_api_error(item)
        shape.observe(item)
        if item.kind == "done":
            completion = item
    return completion


def usage_of(shapes: list, completions: list) -> dict:
    """One usage for the choices of a request: the prompt once, the completions' tokens summed."""
    n_prompt = len(shapes[0].req.plan.tokens)
    n_out = sum(shape.usage(c)["completion_tokens"] for shape, c in zip(shapes, completions))
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


async def merged_sse(shapes: list, streams: list, stream_options: dict):
    """The chunks of every choice's stream as they come (each names its index), one [DONE] at the end, and with
    include_usage one usage chunk for them all."""
    queue: asyncio.Queue = asyncio.Queue()
    own = {k: v for k, v in stream_options.items() if k != "include_usage"}

    async def pump(shape, events):
        try:
            async for chunk in shape.sse(events, own):
                if chunk != "data: [DONE]\n\n":
                    await queue.put(chunk)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(shape, events)) for shape, events in zip(shapes, streams)]
    try:
        for _ in tasks:
            while (chunk := await queue.get()) is not None:
                yield chunk
        done = [getattr(shape, "completion", None) for shape in shapes]
        if stream_options.get("include_usage") and all(done):
            yield _sse({**shapes[0]._base(True), "choices": [], "usage": usage_of(shapes, done)})
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()


def as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ShuttingDown):
        return ApiError(503, str(e), type="server_error", code="shutting_down")
    if isinstance(e, ContextError):
        return ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, DglocalError):
        return ApiError(400 if isinstance(e, ConfigError) else 500, str(e))
    return ApiError(500, f"{type(e).__name__}: {e}", type="server_error")


class Shape:
    """OpenAI response objects for one request."""

    def __init__(self, req: Request, frontend: Frontend, *, metrics: Metrics, chat: bool, calls: bool = False,
                 layout=None, llama: bool = False, index: int = 0, id: str | None = None):
        self.req, self.frontend, self.chat, self.calls, self.metrics = req, frontend, chat, calls, metrics
        self.layout, self.llama = layout, llama  # an edit or infill; llama: /infill's llama-server shape
        self.index = index  # the choice of `n` it shapes
        self.id = id or ("chatcmpl-" if chat else "cmpl-") + req.id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.offset = 0  # characters of the token pieces streamed with log-probabilities so far

    def text(self, c: Completion) -> str:
        """The answer's text: an infill's middle, an edit's whole new text, or the frontend's reading."""
        if self.layout is None:
            return self.frontend.answer(c)
        result = self.layout.result(c)
        return result.middle if self.layout.kind == "infill" else result.text

    def observe(self, event) -> None:
        Service.observe(self, self.req, event)
        if event.kind == "done":
            self.completion = event

    def _base(self, chunk: bool) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.frontend.id}

    def _choice(self, text: str | None, finish: str | None, *, first: bool = False, reasoning: str = "",
                calls: list | None = None, call_index: int = 0) -> dict:
        if not self.chat:
            return {"index": self.index, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = ({"role": "assistant"} if first else {}) | ({"reasoning_content": reasoning} if reasoning else {}) \
            | ({"content": text} if text else {})
        if calls:
            delta["tool_calls"] = [{"index": k, **_call(c)} for k, c in enumerate(calls, call_index)]
        return {"index": self.index, "delta": delta, "finish_reason": finish}

    def _with_logprobs(self, choice: dict, entries) -> dict:
        """A stream chunk's choice with the log-probabilities of the block it carries (every token of the block,
        whatever part of its text a stop string or a marker holds back)."""
        if entries is None:
            return choice
        model = self.frontend.model
        if self.chat:
            return {**choice, "logprobs": {"content": logprobs.chat_content(model, entries), "refusal": None}}
        out = logprobs.completion(model, entries, self.offset)
        self.offset += sum(map(len, out["tokens"]))  # text_offset counts from the completion's start
        return {**choice, "logprobs": out}

    def usage(self, c: Completion) -> dict:
        n_prompt = len(self.req.plan.tokens)
        n_out = len(c.tokens) if self.layout is None else self.layout.generated(c)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def stats(self, c: Completion) -> dict:
        s = c.stats
        return {"slot": self.req.slot, "prompt_tokens_cached": self.req.cached, "prompt_tokens_encoded":
                s.prefilled_tokens, "steps": sum(s.steps_per_canvas), "steps_per_canvas": s.steps_per_canvas,
                "ms_per_step": round(s.ms_per_step, 2), "tokens_per_second": round(s.tokens_per_second, 2),
                "seed": s.seed, **self.frontend.extra(c, self.req.plan.tokens)}

    def finish(self, c: Completion, calls=None) -> str:
        return self.frontend.finish(c, self.req.plan.tokens, calls)

    def whole(self, c: Completion) -> dict:
        self.log(c)
        text = self.text(c)
        if self.llama:
            return self.llama_shape(c, text)
        if self.layout is not None and self.layout.kind == "edit":
            changes = [vars(ch) for ch in self.layout.result(c).changes]
            return {"id": "edit-" + self.req.id, "object": "edit", "created": self.created, "model": self.frontend.id,
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop"}], "changes": changes,
                    "usage": self.usage(c), "dglocal": self.stats(c)}
        model = self.frontend.model
        if not self.chat:
            choice = {"index": self.index, "text": text, "logprobs": logprobs.completion(model, c.logprobs),
                      "finish_reason": self.finish(c)}
        else:
            out = channels.split(text, tools=self.calls) if self.frontend.template is not None else \
                channels.Output(text)
            message = {"role": "assistant", "content": out.content or (None if out.tool_calls else "")}
            if out.reasoning is not None:
                message["reasoning_content"] = out.reasoning
            if out.tool_calls:
                message["tool_calls"] = [_call(t) for t in out.tool_calls]
            choice = {"index": self.index, "message": message, "logprobs": logprobs.chat(model, c.logprobs),
                      "finish_reason": self.finish(c, out.tool_calls)}
        return {**self._base(False), "choices": [choice], "usage": self.usage(c), "dglocal": self.stats(c)}

    def llama_shape(self, c: Completion, text: str) -> dict:
        """llama-server's /infill answer."""
        return {"content": text, "stop": True, "stop_type": "limit" if c.finish_reason == "length" else "eos",
                "model": self.frontend.id, "tokens_predicted": len(self.frontend.model.tokenize(
                    text, add_special=False, parse_special=False)), "tokens_evaluated": len(self.req.plan.tokens),
                "dglocal": self.stats(c)}

    async def sse(self, events, stream_options: dict):
        drafts, usage = bool(stream_options.get("include_drafts")), bool(stream_options.get("include_usage"))
        first, sudoku = True, isinstance(self.frontend, SudokuFrontend)
        splitter = channels.StreamSplitter(tools=self.calls) if self.chat and not sudoku else None
        async for item in events:
            if isinstance(item, BaseException):
                yield _sse({"error": as_api_error(item).body()["error"]})
                return
            self.observe(item)
            if item.kind == "step" and drafts:
                yield _sse({**self._base(True), "choices": [], "dglocal_draft": self._draft(item)})
            elif item.kind == "block" and (item.text or item.logprobs) and not sudoku and self.layout is None:
                reasoning, text = splitter.feed(item.text) if splitter else ("", item.text)
                sent = len(splitter.sent_calls) if splitter else 0
                calls = splitter.new_calls() if splitter else []  # each call as the canvas that closes it commits
                if reasoning or text or calls or item.logprobs is not None:
                    choice = self._choice(text, None, first=first, reasoning=reasoning, calls=calls, call_index=sent)
                    yield _sse({**self._base(True), "choices": [self._with_logprobs(choice, item.logprobs)]})
                    first = False
            elif item.kind == "done" and self.llama:
                self.log(item)
                yield _sse(self.llama_shape(item, self.text(item)))
            elif item.kind == "done":
                self.log(item)
                text, reasoning, calls = self.text(item) if sudoku or self.layout else None, "", []
                sent = len(splitter.sent_calls) if splitter else 0
                if splitter:
                    reasoning, text, out = splitter.finish()
                    calls = out.tool_calls
                yield _sse({**self._base(True), "choices": [self._choice(
                    text, self.finish(item, calls), first=first, reasoning=reasoning, calls=calls[sent:],
                    call_index=sent)], "dglocal": self.stats(item)})
                if usage:
                    yield _sse({**self._base(True), "choices": [], "usage": self.usage(item)})
        yield "data: [DONE]\n\n"

    def _draft(self, step: Step) -> dict:
        ids = step.argmax.tolist()
        return {"block": step.block, "step": step.step, "text": self.frontend.model.detokenize(ids),
                "pieces": self.frontend.pieces(ids),
                "accepted": step.accepted.astype(int).tolist(), "mean_entropy": round(step.mean_entropy, 5),
                "temperature": round(step.temperature, 4),
                "guided": None if step.guided is None else step.guided.astype(int).tolist()}

    def log(self, c: Completion) -> None:
        s = c.stats
        log.info("%s slot %s: prompt %d (cached %d) + %d tokens, %d steps, %.1f ms/step, %.1f canvas tok/s",
                 self.id, self.req.slot, len(self.req.plan.tokens), self.req.cached, len(c.tokens),
                 sum(s.steps_per_canvas), s.ms_per_step, s.tokens_per_second)


def _call(call: channels.ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(model, *, model_id: str, host: str, port: int, parallel: int, api_key: str | None,
          defaults: dict, sudoku: bool = False, queue_size: int | None = None, image_files=None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    frontend = SudokuFrontend(model, model_id, defaults) if sudoku else \
        Frontend(model, model_id, defaults, image_files)
    if not sudoku:
        # the grammar engine's view of the vocabulary, built once before the first request: O(n_vocab) pieces in
        # Python (~1 s for 262,144 tokens), which inside a request's preparation held the GIL while /health waited
        from dglocal.generation.grammar import tokenizer

        tokenizer(model)
    engine = Engine(model, parallel, queue_size if queue_size is not None else QUEUE)
    engine.start()
    app = create_app(engine, frontend, api_key=api_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # uvicorn waits for open connections before it shuts down: end the open streams first (each with an error
    # event, within one denoising step), so Ctrl-C or SIGTERM exits in seconds, as llama-server does
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=GRACE_SECONDS))
    exit_on_signal = server.handle_exit

    def handle_exit(sig, frame):
        engine.shutdown()
        exit_on_signal(sig, frame)

    server.handle_exit = handle_exit
    try:
        server.run()
    finally:
        engine.stop()
