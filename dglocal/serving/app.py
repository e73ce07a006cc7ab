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

import functools
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from dglocal.errors import ConfigError, ContextError, DglocalError
from dglocal.generation.chat import ChatTemplate
from dglocal.generation.editing import edit_request, infill_request
from dglocal.generation import channels
from dglocal.generation.events import Completion, Step
from dglocal.generation.grammar import CanvasGrammar, GrammarSpec
from dglocal.generation.loop import split_options
from dglocal.generation.request import plan
from dglocal.runtime.vision import load_image
from dglocal.serving import schema
from dglocal.serving.engine import END, Engine, Request, ShuttingDown
from dglocal.serving.metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger("dglocal.server")
GRACE_SECONDS = 3  # what uvicorn still waits for connections once the open streams were ended


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class Frontend:
    """What a model looks like over HTTP: its id, how messages become tokens, how tokens become the answer."""

    def __init__(self, model, model_id: str, defaults: dict, image_files=None):
        self.model, self.id, self.defaults = model, model_id, defaults
        self.template = ChatTemplate.of(model)
        self.image_files = Path(image_files).resolve() if image_files is not None else None  # serve --image-files

    def chat_prompt(self, messages: list[dict], tools=None, **kwargs) -> tuple[list[int], dict]:
        if self.template is None:
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        extra = {"tools": tools} if tools else {}
        try:
            messages = [self._with_images(m) for m in messages]
        except ConfigError as e:  # not an image, too large, truncated
            raise ApiError(400, str(e), param="messages") from None
        prompt, images = self.template.prompt(self.model, channels.template_messages(messages), **extra, **kwargs)
        if not images:
            return prompt, {}
        if getattr(self.model, "vision", None) is None:
            raise ApiError(400, "this model takes no images: serve it with --mmproj", param="messages")
        return prompt, {"images": images}

    def _with_images(self, message: dict) -> dict:
        """A message's image parts decoded (runtime.vision.load_image): a bad image is a 400 before anything runs."""
        if not isinstance(message.get("content"), list):
            return message
        parts = [{"type": "image", "image": load_image(self._image_source(p))} if p.get("type") == "image" else p
                 for p in message["content"]]
        return dict(message, content=parts)

    def _image_source(self, part: dict):
        """The bytes of a data: URL, or a local file under --image-files (never anything outside it)."""
        if "file" not in part:
            return part["image"]
        if self.image_files is None:
            raise ApiError(400, "local image files are off: serve with --image-files DIR, or send a data: URL",
                           param="messages")
        path = Path(part["file"]).resolve()
        if not path.is_relative_to(self.image_files):
            raise ApiError(400, f"{part['file']}: outside the image directory {self.image_files}", param="messages")
        return path

    def text_prompt(self, prompt: str) -> tuple[list[int], dict]:
        return self.model.tokenize(prompt, add_special=True, parse_special=True), {}

    def answer(self, completion: Completion) -> str:
        return completion.text

    def pieces(self, ids: list[int]) -> list[str]:
        """Each canvas position's text, for the live canvas."""
        return [self.model.detokenize([t]) for t in ids]


class SudokuFrontend(Frontend):
    """The built-in Sudoku model: a message holding a puzzle (81 cells, '.' or '0' blank) gets the solved grid."""

    def chat_prompt(self, messages, tools=None, **kwargs):
        return self.text_prompt(messages[-1]["content"])

    def text_prompt(self, prompt):
        from dglocal.sudoku import core as sc
        from dglocal.sudoku.solve import TIME_LIMIT, puzzle_options

        try:
            cells = sc.check_puzzle("".join(prompt.split()))
        except ConfigError as e:
            raise ApiError(400, f"send a Sudoku puzzle: {e}", param="messages") from None
        return sc.encode_prompt(cells), puzzle_options(cells, time_limit=TIME_LIMIT)

    def answer(self, completion):
        from dglocal.sudoku import core as sc

        cells = sc.decode_canvas(completion.tokens + [sc.PAD_ID] * (sc.CANVAS_LENGTH - len(completion.tokens)))
        return "\n".join("".join(str(c) for c in cells[r * 9:r * 9 + 9]) for r in range(9))

    def pieces(self, ids):
        from dglocal.sudoku import core as sc

        return [str(c) if c else "" for c in sc.decode_canvas(ids)]


def chat_page(frontend: Frontend) -> str:
    """The web page at /: a chat (or, for the Sudoku model, a board) beside the live canvas; its requests are the
    API's own, streamed with include_drafts."""
    from importlib.resources import files

    settings = {"model": frontend.id, "sudoku": isinstance(frontend, SudokuFrontend),
                "canvas": frontend.model.canvas_length}
    html = files("dglocal.serving").joinpath("page.html").read_text(encoding="utf-8")
    return html.replace("/*DGLOCAL*/{}", json.dumps(settings).replace("<", "\\u003c"))


# -- request parsing (the fields: dglocal.serving.schema) ---------------------------------------------------------

def parse_options(body: dict, frontend: Frontend, route: tuple[str, ...] = ()) -> tuple[dict, bool, dict]:
    """(generation options, stream?, stream_options) from an OpenAI request body; schema.FieldError (a 400) names
    the field. `route`: the fields of the route's own body (schema.INFILL, schema.EDIT)."""
    schema.check_fields(body, route)
    if body.get("model") not in (None, frontend.id):
        raise ApiError(404, f"the model {schema.short(body['model'])} does not exist; this server has "
                            f"'{frontend.id}'", param="model", code="model_not_found")
    options = dict(frontend.defaults)
    for name in schema.DIFFUSION:
        value = schema.number(body, name)
        if value is not None:
            options[name] = value
    max_tokens = schema.number(body, "max_completion_tokens") or schema.number(body, "max_tokens")
    seed = schema.number(body, "seed")
    options.update({k: v for k, v in (("max_new_tokens", max_tokens), ("seed", seed), ("stop", schema.stops(body)))
                    if v is not None})
    if schema.flag(body, "ignore_eos"):  # llama-server's field: generate to max_tokens
        options["eos_token_id"] = ()
    if schema.flag(body, "cache_prompt") is False:  # llama-server's field: no reuse of the slot's cached prefix
        options["cache_prompt"] = False
    top_k = schema.number(body, "top_k")
    if top_k is not None:
        options["top_k"] = max(top_k, 0)  # -1: off, as vLLM
    grammar = schema.output_grammar(body)
    if grammar is not None:
        options["grammar"] = GrammarSpec(*grammar)
    draft = schema.draft(body)
    if draft is not None:
        options["draft"] = draft
    if body.get("lora") is not None:  # llama-server's per-request adapter scales
        changes = schema.lora(body["lora"])
        try:
            frontend.model.adapters.scales(changes)  # ids and scales checked now: a 400, not a failed stream
        except ConfigError as e:
            raise schema.FieldError(str(e), "lora") from None
        options["lora"] = changes
    return options, bool(schema.flag(body, "stream")), schema.stream_options(body)


def tool_options(body: dict, options: dict) -> tuple[list[dict] | None, bool]:
    """(the tools the template declares, whether replies are parsed for calls); tool_choice required or a named
    function constrains the reply to calls (a grammar, which a structured-output field would contradict)."""
    tools = schema.tools(body)
    choice = schema.tool_choice(body, tools)
    if not tools or choice == "none":
        return None, False
    if choice not in (None, "auto"):
        if "grammar" in options:
            raise ApiError(400, "tool_choice forces a tool call: it cannot be combined with a structured-output "
                                "field", param="tool_choice")
        forced = tools if choice == "required" else [t for t in tools if t["function"]["name"] == choice]
        parallel = schema.flag(body, "parallel_tool_calls") is not False
        options["grammar"] = GrammarSpec("lark", channels.call_grammar(forced, parallel=parallel))
    return tools, True


# -- the app -----------------------------------------------------------------------------------------------------

def create_app(engine: Engine, frontend: Frontend, *, api_key: str | None = None):
    app = FastAPI(title="dglocal", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(schema.FieldError)
    async def field_error(_, e: schema.FieldError):
        return JSONResponse(ApiError(400, str(e), param=e.param).body(), status_code=400)

    @app.middleware("http")
    async def auth(request: HttpRequest, call_next):
        if api_key and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            e = ApiError(401, "invalid or missing API key", type="authentication_error", code="invalid_api_key")
            metrics.requests.labels("401").inc()
            return JSONResponse(e.body(), status_code=401)
        response = await call_next(request)
        if request.url.path in ("/v1/chat/completions", "/v1/completions", "/infill", "/v1/edits"):
            metrics.requests.labels(str(response.status_code)).inc()
        return response

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

    @app.get("/lora-adapters")
    async def lora_adapters():
        return engine.model.adapters.info()

    @app.post("/lora-adapters")
    async def set_lora_adapters(request: HttpRequest):
        """llama-server's: new scales for the requests that give none ([{"id", "scale"}]; ids left out keep theirs)."""
        changes = schema.lora(schema.parse_body_any(await request.body()), "body")
        try:
            engine.model.adapters.set_default(changes)
        except ConfigError as e:
            raise ApiError(400, str(e), param="lora") from None
        return engine.model.adapters.info()

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    page = chat_page(frontend)

    @app.get("/")
    async def index():
        return HTMLResponse(page)

    async def answer(request: HttpRequest, *, chat: bool):
        body = schema.parse_body(await request.body())
        options, stream, stream_options = parse_options(body, frontend)
        calls = False
        if chat:
            tools, calls = tool_options(body, options)
            prompt, extra = frontend.chat_prompt(schema.messages(body), tools, **schema.template_kwargs(body))
        else:
            for name in ("messages", "tools", "tool_choice", "chat_template_kwargs"):
                if body.get(name) is not None:
                    raise schema.FieldError(f"'{name}' is a chat field: use /v1/chat/completions", name)
            if body.get("suffix") is not None:  # OpenAI's infilling: the text between prompt and suffix
                layout = infill(frontend, schema.text(body.get("prompt"), "prompt"),
                                schema.text(body["suffix"], "suffix"), options)
                return await run(request, layout.prompt, layout.options, stream, stream_options, chat=False,
                                 layout=layout)
            prompt, extra = frontend.text_prompt(schema.text(body.get("prompt"), "prompt"))
        if body.get("suffix") is not None:
            raise schema.FieldError("'suffix' is a field of /v1/completions", "suffix")
        options = _merged(options, extra)
        if options.get("grammar") is not None:  # from a structured-output field, or a forced tool call
            field = next((name for name in schema.GRAMMARS if body.get(name) is not None), "tool_choice")
            check_grammar(engine.model, options["grammar"], field)
        return await run(request, prompt, options, stream, stream_options, chat=chat, calls=calls)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await answer(request, chat=False)

    @app.post("/infill")
    async def infill_route(request: HttpRequest):
        """llama-server's /infill: the middle between input_prefix and input_suffix, as `content`."""
        body = schema.parse_body(await request.body())
        options, stream, stream_options = parse_options(body, frontend, schema.INFILL)
        if body.get("input_extra"):
            raise schema.FieldError("'input_extra' (other files' chunks) is not supported: put what the model "
                                    "should see in input_prefix", "input_extra")
        prefix = schema.text(body.get("input_prefix", ""), "input_prefix") + \
            schema.text(body.get("prompt", ""), "prompt")  # llama-server's prompt: text the middle starts after
        n_predict = schema.number(body, "n_predict")
        if n_predict is not None:
            options["max_new_tokens"] = n_predict
        layout = infill(frontend, prefix, schema.text(body.get("input_suffix", ""), "input_suffix"), options)
        return await run(request, layout.prompt, layout.options, stream, stream_options, chat=False, layout=layout,
                         llama=True)

    @app.post("/v1/edits")
    async def edits(request: HttpRequest):
        """`input` with its character `spans` re-noised and denoised, the rest pinned (docs/editing.md)."""
        body = schema.parse_body(await request.body())
        options, stream, stream_options = parse_options(body, frontend, schema.EDIT)
        if stream:
            raise schema.FieldError("/v1/edits does not stream", "stream")
        _no_layout_for(frontend)
        options.pop("max_new_tokens", None)  # the layout's length is the edit's
        context = schema.text(body["prompt"], "prompt") if body.get("prompt") is not None else None
        try:
            layout = edit_request(engine.model, schema.text(body.get("input"), "input"), schema.spans(body),
                                  prompt=context, room=schema.number(body, "room") or 0, **options)
        except ConfigError as e:
            raise ApiError(400, str(e), param="spans") from None
        return await run(request, layout.prompt, layout.options, False, {}, chat=False, layout=layout)

    def infill(frontend, prefix: str, suffix: str, options: dict):
        _no_layout_for(frontend)
        max_middle = options.pop("max_new_tokens", None)
        try:
            return infill_request(engine.model, prefix, suffix, max_middle=max_middle, **options)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None

    async def run(request, prompt, options, stream, stream_options, *, chat, calls=False, layout=None, llama=False):
        import asyncio

        settings, extras = split_options(options)
        try:  # the one fit rule: the prompt and every canvas max_tokens may take
            planning = functools.partial(plan, engine.model, prompt, seeds=engine.model.seeds, **settings)
            # images: the tower encodes them, off the event loop, which serves the other requests meanwhile
            planned = await asyncio.to_thread(planning) if settings.get("images") else planning()
        except ContextError as e:
            raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        req = Request(planned, extras, asyncio.get_running_loop())
        if not engine.submit(req):
            raise ApiError(503, "the server is busy: every slot is taken and the queue is full", type="server_error",
                           headers={"Retry-After": "1"})
        shape = Shape(req, frontend, chat, calls, metrics, layout, llama)
        if stream:
            return StreamingResponse(shape.sse(request, engine, stream_options), media_type="text/event-stream")
        completion = None
        try:
            while (item := await req.events.get()) is not END:
                if isinstance(item, BaseException):
                    raise _as_api_error(item)
                shape.observe(item)
                if item.kind == "done":
                    completion = item
        except asyncio.CancelledError:
            engine.cancel(req)
            raise
        return shape.whole(completion)

    return app


def _no_layout_for(frontend: Frontend) -> None:
    if isinstance(frontend, SudokuFrontend):
        raise ApiError(400, "the Sudoku model takes puzzles: send one to /v1/chat/completions or /v1/completions")


def check_grammar(model, spec: GrammarSpec, field: str) -> None:
    """A grammar the engine cannot compile (an unsupported schema feature, say) is a 400 naming `field` now, not
    a failed stream later."""
    try:
        CanvasGrammar(model, spec, model.eos_ids)
    except ConfigError as e:
        raise ApiError(400, str(e), param=field) from None


def _merged(options: dict, extra: dict) -> dict:
    """The request's options with what its frontend adds (a puzzle's guide, say); the frontend's unset (None)
    fields leave the request's own in place."""
    return {**options, **{k: v for k, v in extra.items() if v is not None}}


def _as_api_error(e: BaseException) -> ApiError:
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

    def __init__(self, req: Request, frontend: Frontend, chat: bool, calls: bool, metrics: Metrics, layout=None,
                 llama: bool = False):
        self.req, self.frontend, self.chat, self.calls, self.metrics = req, frontend, chat, calls, metrics
        self.layout, self.llama = layout, llama  # an edit or infill; llama: /infill's llama-server shape
        self.id = ("chatcmpl-" if chat else "cmpl-") + req.id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def text(self, c: Completion) -> str:
        """The answer's text: an infill's middle, an edit's whole new text, or the frontend's reading."""
        if self.layout is None:
            return self.frontend.answer(c)
        result = self.layout.result(c)
        return result.middle if self.layout.kind == "infill" else result.text

    def observe(self, event) -> None:
        self.metrics.event(event)
        if event.kind == "done":
            self.metrics.finished(event, self.req.cached)

    def _base(self, chunk: bool) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.frontend.id}

    def _choice(self, text: str | None, finish: str | None, *, first: bool = False, reasoning: str = "",
                calls: list | None = None) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = ({"role": "assistant"} if first else {}) | ({"reasoning_content": reasoning} if reasoning else {}) \
            | ({"content": text} if text else {})
        if calls:
            delta["tool_calls"] = [{"index": k, **_call(c)} for k, c in enumerate(calls)]
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
    def finish(c: Completion, calls=None) -> str:
        return "tool_calls" if calls else "length" if c.finish_reason == "length" else "stop"

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
        if not self.chat:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish(c)}
        else:
            out = channels.split(text, tools=self.calls) if self.frontend.template is not None else \
                channels.Output(text)
            message = {"role": "assistant", "content": out.content or (None if out.tool_calls else "")}
            if out.reasoning is not None:
                message["reasoning_content"] = out.reasoning
            if out.tool_calls:
                message["tool_calls"] = [_call(t) for t in out.tool_calls]
            choice = {"index": 0, "message": message, "finish_reason": self.finish(c, out.tool_calls)}
        return {**self._base(False), "choices": [choice], "usage": self.usage(c), "dglocal": self.stats(c)}

    def llama_shape(self, c: Completion, text: str) -> dict:
        """llama-server's /infill answer."""
        return {"content": text, "stop": True, "stop_type": "limit" if c.finish_reason == "length" else "eos",
                "model": self.frontend.id, "tokens_predicted": len(self.frontend.model.tokenize(
                    text, add_special=False, parse_special=False)), "tokens_evaluated": len(self.req.plan.tokens),
                "dglocal": self.stats(c)}

    async def sse(self, request, engine: Engine, stream_options: dict):
        import asyncio

        drafts, usage = bool(stream_options.get("include_drafts")), bool(stream_options.get("include_usage"))
        first, sudoku = True, isinstance(self.frontend, SudokuFrontend)
        splitter = channels.StreamSplitter(tools=self.calls) if self.chat and not sudoku else None
        try:
            while (item := await self.req.events.get()) is not END:
                if await request.is_disconnected():
                    engine.cancel(self.req)
                    return
                if isinstance(item, BaseException):
                    yield _sse({"error": _as_api_error(item).body()["error"]})
                    return
                self.observe(item)
                if item.kind == "step" and drafts:
                    yield _sse({**self._base(True), "choices": [], "dglocal_draft": self._draft(item)})
                elif item.kind == "block" and item.text and not sudoku and self.layout is None:
                    reasoning, text = splitter.feed(item.text) if splitter else ("", item.text)
                    if reasoning or text:
                        yield _sse({**self._base(True), "choices": [self._choice(text, None, first=first,
                                                                                 reasoning=reasoning)]})
                        first = False
                elif item.kind == "done" and self.llama:
                    self.log(item)
                    yield _sse(self.llama_shape(item, self.text(item)))
                elif item.kind == "done":
                    self.log(item)
                    text, reasoning, calls = self.text(item) if sudoku or self.layout else None, "", []
                    if splitter:
                        reasoning, text, out = splitter.finish()
                        calls = out.tool_calls
                    yield _sse({**self._base(True), "choices": [self._choice(
                        text, self.finish(item, calls), first=first, reasoning=reasoning, calls=calls)],
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
    engine = Engine(model, parallel, queue_size if queue_size is not None else 4 * parallel)
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
