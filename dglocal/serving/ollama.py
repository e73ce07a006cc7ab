"""ollama's API over the same engine: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

    POST /api/chat       messages (images, tool calls, tool results) through the chat template; NDJSON by default
    POST /api/generate   a prompt (with `system` and `images`) through the template, or `raw`; with `suffix`, the middle
    GET  /api/tags, /api/ps, /api/version; POST /api/show

Each body becomes an OpenAI one and goes through serving.prepare, so every field is checked as the OpenAI routes
check it; ollama's own fields (`options`, `format`, `think`, `images`) are translated here or refused by name.
Errors have ollama's shape, {"error": "message"}, with the status the OpenAI routes give.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version as package_version

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dglocal.generation import channels
from dglocal.generation.config import GenerationConfig
from dglocal.serving import logprobs, schema
from dglocal.serving.errors import ApiError

log = logging.getLogger("dglocal.server")

# -- ollama's request fields --------------------------------------------------------------------------------------

COMMON = ("model", "format", "options", "stream", "keep_alive", "think", "logprobs", "top_logprobs",
          "truncate", "shift")  # truncate, shift: a prompt over the context is a 400 here, never cut or shifted
CHAT = (*COMMON, "messages", "tools")
GENERATE = (*COMMON, "prompt", "suffix", "system", "raw", "images", "context")
REFUSED = {
    "template": "a per-request Go template is not supported: the GGUF's chat template renders the prompt (or send "
                "\"raw\": true)",
    "width": "image generation is not supported", "height": "image generation is not supported",
    "steps": "image generation is not supported",
}
MESSAGE = ("role", "content", "images", "thinking", "tool_calls", "tool_name")

# ollama's options that are the OpenAI body's fields under the same names (schema.py checks them), and the extra
# fields the OpenAI routes take too: the diffusion settings, llama-server's cache_prompt and ignore_eos
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "seed", "stop", "cache_prompt", "ignore_eos",
            *schema.DIFFUSION)
# how the model is loaded and run: fixed when the server started, and the answer does not depend on them
# (num_keep: what a context shift keeps; a request over the context is a 400 here, never shifted)
RUNTIME = ("numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap",
           "use_mlock", "embedding_only", "num_thread", "num_keep")
# samplers over earlier tokens, which a canvas denoised in parallel does not have: their neutral value only
NEUTRAL = {"repeat_penalty": 1, "presence_penalty": 0, "frequency_penalty": 0, "typical_p": 1, "tfs_z": 1,
           "mirostat": 0}
INERT = ("repeat_last_n", "penalize_newline", "mirostat_tau", "mirostat_eta")  # act only through NEUTRAL's


def options(value, n_ctx: int) -> dict:
    """ollama's `options` as OpenAI body fields; one that would change the answer and cannot be honoured is a
    FieldError naming it. `n_ctx`: the slot's context, fixed at load."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise schema.FieldError("'options' must be an object", "options")
    out = {}
    for name, v in value.items():
        if v is None or name in RUNTIME or name in INERT:
            continue
        if name in SAMPLING:
            out[name] = v
        elif name == "num_predict":
            if v not in (-1, -2):  # ollama's "until the end" and "until the context is full": both are the default
                out["max_tokens"] = schema.checked_number(v, "options.num_predict", int, 1, schema.MAX_TOKENS)
        elif name == "num_ctx":
            if v != n_ctx:
                raise schema.FieldError(f"options.num_ctx is {schema.short(v)}, but this server's slots hold {n_ctx} "
                                        f"tokens each (set at load: serve -c and -np); send {n_ctx} or leave it out",
                                        "num_ctx")
        elif name in NEUTRAL:
            if isinstance(v, bool) or v != NEUTRAL[name]:
                raise schema.FieldError(f"options.{name} must be {NEUTRAL[name]} (or absent), got {schema.short(v)}: "
                                        "samplers over earlier tokens do not apply to a canvas denoised in parallel",
                                        name)
        else:
            raise schema.FieldError(f"options.{name} is not supported (known: {', '.join(sorted(KNOWN_OPTIONS))})",
                                    name)
    return out


KNOWN_OPTIONS = {*SAMPLING, *RUNTIME, *NEUTRAL, *INERT, "num_predict", "num_ctx"}


def common(body: dict, where: str, fields: tuple[str, ...], n_ctx: int) -> dict:
    """The OpenAI fields of what both generating routes take: the body's fields checked, `options` and `format`
    translated."""
    schema.check_names(body, fields, REFUSED, where)
    for name in ("stream", "raw", "truncate", "shift"):
        schema.flag(body, name)
    keep = body.get("keep_alive")  # a duration ("5m") or seconds: the model stays loaded while the server runs
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (str, int, float))):
        raise schema.FieldError(f"'keep_alive' must be a duration or a number, got {schema.short(keep)}", "keep_alive")
    out = options(body.get("options"), n_ctx)
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise schema.FieldError(f"'format' must be \"json\" or a JSON schema object, got {schema.short(fmt)}",
                                "format")
    if schema.flag(body, "logprobs"):  # the OpenAI chat route's fields (the completions route: generate_body)
        out["logprobs"] = True
    if body.get("top_logprobs") is not None:
        out["top_logprobs"] = body["top_logprobs"]
    return out


def thinking(body: dict, card: Card) -> dict:
    """`think` as the chat template's enable_thinking."""
    think = body.get("think")
    if think is None:
        return {}
    if not isinstance(think, bool):  # "high", "medium", "low": gpt-oss's levels
        raise schema.FieldError(f"'think' must be true or false for this model, got {schema.short(think)}", "think")
    if think and "thinking" not in card.capabilities:
        raise ApiError(400, f"'{card.name}' does not support thinking")
    return {"chat_template_kwargs": {"enable_thinking": think}}


def chat_body(body: dict, card: Card) -> tuple[str, dict] | None:
    """(the OpenAI route, its body); None for no messages (ollama's way to load a model)."""
    out = common(body, "/api/chat", CHAT, card.n_ctx) | thinking(body, card)
    if body.get("messages") in (None, []):
        return None
    tools = body.get("tools")
    if tools:  # the ollama client sends [] for none
        if "tools" not in card.capabilities:
            raise ApiError(400, f"'{card.name}' does not support tools")
        out["tools"] = tools
    return "chat", {"messages": messages(body.get("messages")), **out}


def generate_body(body: dict, card: Card) -> tuple[str, dict] | None:
    """(the OpenAI route, its body); None for no prompt, images or suffix (ollama's way to load a model)."""
    out = common(body, "/api/generate", GENERATE, card.n_ctx)
    if body.get("context"):
        raise schema.FieldError("'context' is not supported: no answer carries one; send the history to /api/chat",
                                "context")
    prompt = schema.text(body.get("prompt") or "", "prompt")
    system, images = body.get("system"), body.get("images")
    if not (prompt or images or body.get("suffix")):
        return None
    if body.get("suffix") is not None or body.get("raw"):  # no template: the prompt is the model's input as is
        for name in ("system", "images", "think"):
            if body.get(name):
                raise schema.FieldError(f"'{name}' needs the chat template: not with 'raw' or 'suffix'", name)
        suffix = {"suffix": body["suffix"]} if body.get("suffix") is not None else {}
        if out.pop("logprobs", None):  # the completions route counts the most likely ids instead
            out["logprobs"] = out.pop("top_logprobs", None) or 0
        elif "top_logprobs" in out:
            raise schema.FieldError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return "completions", {"prompt": prompt, **suffix, **out}
    turns = [{"role": "system", "content": system}] if system is not None else []
    turns.append({"role": "user", "content": prompt, **({"images": images} if images else {})})
    return "chat", {"messages": messages(turns), **out, **thinking(body, card)}


def messages(items) -> list[dict]:
    """ollama's messages as OpenAI's: base64 `images` as data: URL parts before the text, tool calls with their
    arguments as JSON text, `tool_name` as a tool result's name. A result that names no tool answers the next call
    of the turn before it, in order, as ollama's templates pair them."""
    if not isinstance(items, list):
        raise schema.FieldError("'messages' must be a list", "messages")
    out, pending = [], []
    for i, m in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise schema.FieldError(f"{where} must be an object", "messages")
        extra = sorted(set(m) - set(MESSAGE))
        if extra:
            raise schema.FieldError(f"{where} has field(s) {extra} that ollama's messages do not have", "messages")
        msg = {"role": m.get("role"), "content": content(m.get("content"), m.get("images"), where)}
        if m.get("tool_calls"):  # the ids tie the results that follow to their calls
            msg["tool_calls"] = [tool_call(c, f"call_{i}_{k}") for k, c in enumerate(_listed(m["tool_calls"], where))]
            pending = [c["id"] for c in msg["tool_calls"]]
        if m.get("tool_name") is not None and m.get("role") != "tool":
            raise schema.FieldError(f"{where}: 'tool_name' belongs to a message of role 'tool'", "messages")
        if m.get("role") == "tool":
            call_id = pending.pop(0) if pending else None
            if m.get("tool_name") is not None:
                msg["name"] = m["tool_name"]
            elif call_id is not None:
                msg["tool_call_id"] = call_id
        out.append(msg)  # the thinking of an earlier turn is left out: it is not part of the history
    return out


def _listed(value, where: str) -> list:
    if not isinstance(value, list):
        raise schema.FieldError(f"{where}.tool_calls must be a list", "messages")
    return value


def content(text, images, where: str):
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise schema.FieldError(f"{where}.content must be a string", "messages")
    if not images:
        return text
    if not isinstance(images, list):
        raise schema.FieldError(f"{where}.images must be a list of base64 strings", "messages")
    parts = [{"type": "image_url", "image_url": {"url": data_url(v, f"{where}.images[{k}]")}}
             for k, v in enumerate(images)]
    return parts + ([{"type": "text", "text": text}] if text else [])


def data_url(value, where: str) -> str:
    """A base64 image as a data: URL (the image's own bytes say its format: the media type is not read)."""
    value = "".join(value.split()) if isinstance(value, str) else None
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise schema.FieldError(f"{where} must be a base64 string (an image's bytes)", "messages") from None
    return "data:image/png;base64," + value


def tool_call(call, call_id: str) -> dict:
    """ollama's {"function": {"name", "arguments": an object}} as OpenAI's (schema.tool_call checks it)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and not isinstance(fn.get("arguments"), str):
        fn = {**fn, "arguments": json.dumps(fn.get("arguments") if fn.get("arguments") is not None else {})}
    return {"id": call_id, "type": "function", "function": fn}


# -- the answers ---------------------------------------------------------------------------------------------------

class Reply:
    """ollama's objects for one request: /api/chat's message deltas or /api/generate's response deltas, then the
    last object, done, with the statistics (durations in nanoseconds)."""

    def __init__(self, frontend, req, prepared, name: str, *, chat: bool, started: int):
        self.frontend, self.req, self.name, self.chat, self.started = frontend, req, name, chat, started
        self.layout, self.calls = prepared.shape.get("layout"), prepared.shape.get("calls", False)
        # a text known only at the end (a puzzle's grid, an infill's middle) comes whole in the last delta
        self.at_end = frontend.sudoku or self.layout is not None
        self.split = prepared.shape["chat"] and frontend.template is not None and not frontend.sudoku
        self.splitter = channels.StreamSplitter(tools=self.calls) if self.split else None

    def text(self, c) -> str:
        return self.frontend.answer(c) if self.layout is None else self.layout.result(c).middle

    def block(self, text: str, entries=None) -> dict | None:
        """A committed block's delta, with its tokens' log-probabilities when asked for."""
        if self.at_end or not (text or entries):
            return None
        thinking, content = self.splitter.feed(text) if self.splitter else ("", text)
        if not (content or thinking or entries):
            return None
        delta = self._delta(content, thinking)
        return delta | ({"logprobs": logprobs.chat_content(self.frontend.model, entries)} if entries else {})

    def end(self, c) -> list[dict]:
        """The last delta (what the splitter held back: a tool call, a thought's end) and the final object."""
        thinking, content, calls = "", self.text(c) if self.at_end else "", []
        if self.splitter:
            thinking, content, out = self.splitter.finish()
            calls = out.tool_calls
        last = [self._delta(content, thinking, calls)] if content or thinking or calls else []
        return last + [self._final(c, calls)]

    def whole(self, c) -> dict:
        text = self.text(c)
        out = channels.split(text, tools=self.calls) if self.split else channels.Output(text)
        final = self._final(c, out.tool_calls, out.content, out.reasoning or "", out.tool_calls)
        if c.logprobs is not None:
            final["logprobs"] = logprobs.chat_content(self.frontend.model, c.logprobs)
        return final

    def _delta(self, content: str, thinking: str = "", calls=()) -> dict:
        return {**self._head(), **self._body(content, thinking, calls), "done": False}

    def _head(self) -> dict:
        return {"model": self.name, "created_at": rfc3339(time.time())}

    def _body(self, content: str, thinking: str, calls) -> dict:
        if not self.chat:
            return {"response": content} | ({"thinking": thinking} if thinking else {})
        message = {"role": "assistant", "content": content} | ({"thinking": thinking} if thinking else {})
        if calls:
            message["tool_calls"] = [{"id": t.id, "function": {"index": k, "name": t.name,
                                                               "arguments": json.loads(t.arguments)}}
                                     for k, t in enumerate(calls)]
        return {"message": message}

    def _final(self, c, calls, content: str = "", thinking: str = "", shown=()) -> dict:
        """`calls`: the reply's tool calls; `shown`: those this object carries (a stream sent them before)."""
        s, prompt = c.stats, self.req.plan.tokens
        finish = self.frontend.finish(c, prompt, calls)
        n_out = len(c.tokens) if self.layout is None else self.layout.generated(c)
        log.info("ollama %s slot %s: prompt %d (cached %d) + %d tokens, %d steps, %.1f ms/step", self.req.id,
                 self.req.slot, len(prompt), self.req.cached, n_out, sum(s.steps_per_canvas), s.ms_per_step)
        return {**self._head(), **self._body(content, thinking, shown), "done": True,
                "done_reason": "length" if finish == "length" else "stop",  # ollama says stop after tool calls
                "total_duration": time.monotonic_ns() - self.started, "load_duration": 0,  # loaded at start
                "prompt_eval_count": len(prompt), "prompt_eval_duration": _ns(s.prefill_seconds),
                "eval_count": n_out, "eval_duration": _ns(s.total_seconds - s.prefill_seconds)}


def _ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _line(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def failure(e: Exception) -> JSONResponse:
    """An ApiError or a schema.FieldError in ollama's shape."""
    status = e.status if isinstance(e, ApiError) else 400
    return JSONResponse({"error": str(e)}, status_code=status, headers=getattr(e, "headers", None))


# -- the model, as the listing routes show it ------------------------------------------------------------------------

@dataclass
class Card:
    """What ollama's listing routes say about the one model: found once, when the routes are made."""

    name: str
    size: int  # the GGUF's bytes
    digest: str
    modified_at: str
    details: dict
    info: dict  # the GGUF's metadata, long arrays (the vocabulary) as null unless asked for
    capabilities: list[str]
    loaded: int  # bytes of weights, cache and compute buffers
    on_gpu: int  # the part of `loaded` outside the host's memory
    parameters: str  # the sampler's defaults, ollama's "name value" lines
    n_ctx: int


PARAMETERS = ("temperature", "top_k", "top_p", "min_p", "max_denoising_steps", "stability_threshold", "entropy_bound",
              "confidence_threshold", "t_min", "t_max")


def describe(frontend) -> Card:
    from gguf import LlamaFileType

    from dglocal.runtime.diagnostics import memory_breakdown
    from dglocal.runtime.gguf import read_header
    from dglocal.runtime.placement import is_host_buffer

    model = frontend.model.model
    stat = model.path.stat()
    header = read_header(model.path)  # the tensors, for the parameter count
    kv = header.kv
    n_params = kv.get("general.parameter_count") or sum(t.n_elements for t in header.tensors)
    try:
        quant = LlamaFileType(kv.get("general.file_type")).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quant = "unknown"
    family = kv.get("general.architecture", "")
    memory = memory_breakdown(model)  # before any request: nothing else calls into the model yet
    config = GenerationConfig.from_metadata(kv, **frontend.defaults)  # what a request that sets nothing gets
    parameters = [f"{name} {getattr(config, name)}" for name in PARAMETERS if getattr(config, name) is not None]
    parameters += [f"stop {json.dumps(s)}" for s in config.stop] + [f"num_ctx {model.n_ctx}"]
    return Card(
        name=tagged(frontend.id), size=stat.st_size, modified_at=rfc3339(stat.st_mtime),
        digest=hashlib.sha256(f"{model.path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest(),
        details={"parent_model": "", "format": "gguf", "family": family, "families": [family],
                 "parameter_size": human(n_params), "quantization_level": quant},
        info={**{k: v for k, v in kv.items() if k != "tokenizer.chat_template"}, "general.parameter_count": n_params},
        capabilities=capabilities(frontend), loaded=sum(sum(d.values()) for d in memory.values()),
        on_gpu=sum(sum(d.values()) for name, d in memory.items() if not is_host_buffer(name)),
        parameters="\n".join(parameters), n_ctx=model.n_ctx)


def capabilities(frontend) -> list[str]:
    """ollama's words for what the model takes: tools and thinking when its chat template reads them, images with
    a vision tower (serve --mmproj), a suffix (`insert`: the middle between) but for the Sudoku model."""
    source = (frontend.model.chat_template or "") if frontend.template is not None and not frontend.sudoku else ""
    return ["completion", *(["tools"] if "tools" in source else []),
            *(["thinking"] if "enable_thinking" in source else []),
            *(["vision"] if getattr(frontend.model, "vision", None) is not None else []),
            *(["insert"] if not frontend.sudoku else [])]


def human(n: int) -> str:
    """A parameter count as ollama writes it: 270M, 8.0B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return str(n)


def tagged(name: str) -> str:
    """ollama's names carry a tag, ":latest" when none is given: "tiny" and "tiny:latest" are one model."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def model_info(info: dict, verbose: bool) -> dict:
    return info if verbose else {k: None if isinstance(v, list) and len(v) > 64 else v for k, v in info.items()}


# -- the routes ----------------------------------------------------------------------------------------------------

FOREVER = "9999-12-31T23:59:59Z"  # /api/ps' expires_at: the model stays loaded while the server runs
ELSEWHERE = {  # ollama's routes that manage a library of models: this server runs the one it loaded
    "/api/pull": ["POST"], "/api/push": ["POST"], "/api/create": ["POST"], "/api/copy": ["POST"],
    "/api/delete": ["DELETE"], "/api/blobs/{digest}": ["HEAD", "POST"],
    "/api/embed": ["POST"], "/api/embeddings": ["POST"],
}


def add_routes(app, service) -> None:
    """Register the routes on `app`; each generating one goes through `service` (serving.app.Service)."""
    from dglocal.serving.app import as_api_error, read_body  # serving.app imports this module

    frontend = service.frontend
    card = describe(frontend)  # the one model, as the listing routes show it

    def named(body: dict) -> str:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise schema.FieldError("'model' is required")
        if tagged(name) != card.name:
            raise ApiError(404, f"model '{name}' not found")
        return name

    async def generating(request: HttpRequest, translate, chat: bool):
        started = time.monotonic_ns()
        try:
            body = schema.parse_body(await read_body(request))
            name = named(body)
            translated = translate(body, card)
            stream = body.get("stream") is not False  # ollama streams unless asked not to
            if translated is None:
                return loaded(name, chat, stream)
            prepared = await service.prepare(*translated)
            req, events = service.submit(request, prepared.request)
        except (ApiError, schema.FieldError) as e:
            return failure(e)
        reply = Reply(frontend, req, prepared, name, chat=chat, started=started)
        if stream:
            return StreamingResponse(lines(reply, events), media_type="application/x-ndjson")
        done = None
        async for item in events:
            if isinstance(item, BaseException):
                return failure(as_api_error(item))
            service.observe(req, item)
            if item.kind == "done":
                done = item
        if done is None:  # the client left: nobody reads this
            return Response(status_code=499)
        return JSONResponse(reply.whole(done))

    async def lines(reply: Reply, events):
        async for item in events:
            if isinstance(item, BaseException):  # the ollama client raises it as a ResponseError
                yield _line({"error": str(as_api_error(item))})
                return
            service.observe(reply.req, item)
            if item.kind == "block":
                delta = reply.block(item.text, item.logprobs)
                if delta is not None:
                    yield _line(delta)
            elif item.kind == "done":
                for obj in reply.end(item):
                    yield _line(obj)

    def loaded(name: str, chat: bool, stream: bool) -> Response:
        obj = {"model": name, "created_at": rfc3339(time.time()), **(
            {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}),
            "done": True, "done_reason": "load"}
        return Response(_line(obj), media_type="application/x-ndjson" if stream else "application/json")

    @app.post("/api/chat")
    async def chat(request: HttpRequest):
        return await generating(request, chat_body, chat=True)

    @app.post("/api/generate")
    async def generate(request: HttpRequest):
        return await generating(request, generate_body, chat=False)

    def listed() -> dict:
        return {"name": card.name, "model": card.name, "digest": card.digest, "details": card.details}

    @app.get("/api/tags")
    async def tags():
        return {"models": [{**listed(), "modified_at": card.modified_at, "size": card.size}]}

    @app.get("/api/ps")
    async def ps():
        return {"models": [{**listed(), "size": card.loaded, "size_vram": card.on_gpu, "expires_at": FOREVER,
                            "context_length": card.n_ctx}]}

    @app.post("/api/show")
    async def show(request: HttpRequest):
        try:
            body = schema.parse_body(await read_body(request))
            named({"model": body.get("model") or body.get("name")})  # "name": older clients
            verbose = schema.flag(body, "verbose")
        except (ApiError, schema.FieldError) as e:
            return failure(e)
        modelfile = [f"FROM {frontend.model.path.name}"] + [f"PARAMETER {p}" for p in card.parameters.splitlines()]
        return {"modelfile": "# served by dglocal\n" + "\n".join(modelfile) + "\n", "parameters": card.parameters,
                "template": frontend.model.chat_template or "", "details": card.details,
                "model_info": model_info(card.info, bool(verbose)), "capabilities": card.capabilities,
                "modified_at": card.modified_at}

    @app.get("/api/version")
    async def version():
        try:
            return {"version": package_version("dglocal")}  # dglocal's, in ollama's field
        except PackageNotFoundError:  # run from a checkout that was never installed
            return {"version": "unknown"}

    async def elsewhere(request: HttpRequest):
        what = "embeddings are not supported: the model generates text" if "embed" in request.url.path else \
            "this server runs the one model it loaded (dglocal serve MODEL)"
        return JSONResponse({"error": f"{request.url.path}: {what}"}, status_code=501)

    for path, methods in ELSEWHERE.items():
        app.add_api_route(path, elsewhere, methods=methods)
