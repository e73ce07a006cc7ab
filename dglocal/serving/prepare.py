"""A request body made ready for the engine, once, on a worker thread (never the event loop, never the engine's):
its fields checked (dglocal.serving.schema), the chat template rendered, the prompt tokenized, its images decoded
and encoded by the tower, its grammar compiled, its plan made. The engine then only attaches the Prepared to a
slot (prefix reuse, then its first pass).

    prepared = prepare(model, frontend, "chat", raw_body)   # ApiError / schema.FieldError: a 4xx, nothing queued
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dglocal.errors import ConfigError, ContextError
from dglocal.generation import calls, driver
from dglocal.generation.request import derive_seed
from dglocal.generation.editing import edit_request, infill_request
from dglocal.generation.grammar import GrammarSpec
from dglocal.serving import logprobs, schema
from dglocal.serving.errors import ApiError


@dataclass
class Prepared:
    request: driver.Prepared  # what the engine attaches to a slot (the first choice)
    stream: bool = False
    stream_options: dict = field(default_factory=dict)
    shape: dict = field(default_factory=dict)  # how the answer is shaped: chat, calls, layout, llama
    more: list = field(default_factory=list)  # the other choices of `n` > 1, each with its own seed

    @property
    def choices(self) -> list:
        return [self.request, *self.more]


def prepare(model, frontend, route: str, raw: bytes) -> Prepared:
    """`route`: "chat", "completions", "infill" or "edit"."""
    body = schema.parse_body(raw)
    return ROUTES[route](model, frontend, body)


def parse_options(body: dict, frontend, route: tuple[str, ...], where: str) -> tuple[dict, bool, dict]:
    """(generation options, stream?, stream_options) from a request body; schema.FieldError (a 400) names the
    field. `route`: the fields the route takes (schema.CHAT, ...), `where` its path."""
    schema.check_fields(body, route, where)
    if body.get("model") not in (None, frontend.id):
        raise ApiError(404, f"the model {schema.short(body['model'])} does not exist; this server has "
                            f"'{frontend.id}'", param="model", code="model_not_found")
    options = dict(frontend.defaults)
    for name in schema.DIFFUSION:
        value = schema.number(body, name)
        if value is not None:
            options[name] = value
    n = schema.number(body, "n")
    if n is not None and n > 1:
        if frontend.sudoku:  # its guide races attempts of one puzzle: one grid is the answer
            raise schema.FieldError("the Sudoku model answers one grid: n must be 1", "n")
        options["n"] = n
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
    options.update(schema.vllm_xargs(body, frontend, options))  # vLLM's diffusion keys as the fields above
    return options, bool(schema.flag(body, "stream")), schema.stream_options(body)


def tool_options(body: dict, options: dict) -> tuple[list[dict] | None, bool]:
    """(the tools the template declares, whether replies are parsed for calls). The reply is held to the tools'
    call syntax and parameter schemas (generation.calls): tool_choice required or a named function, calls alone
    (a response_format does not apply then); auto, free text or calls, or with a response_format, calls or that
    answer. A raw grammar field (grammar, json_schema, guided_*, ...) is the whole reply's, as before."""
    tools = schema.tools(body)
    choice = schema.tool_choice(body, tools)
    if not tools or choice == "none":
        return None, False
    forced = choice not in (None, "auto")
    fmt = body.get("response_format")
    answer = options.get("grammar") if isinstance(fmt, dict) and fmt.get("type") != "text" else None
    if "grammar" in options and answer is None:
        if forced:
            raise ApiError(400, "tool_choice forces a tool call: it cannot be combined with a grammar field",
                           param="tool_choice")
        return tools, True
    try:  # auto: a tool whose schema the converter cannot express takes any arguments, not a 400
        options["grammar"] = calls.reply_grammar(
            tools, choice or "auto", parallel=schema.flag(body, "parallel_tool_calls") is not False,
            answer=None if forced else answer, thinking=bool(schema.template_kwargs(body).get("enable_thinking")),
            loose=not forced)
    except ConfigError as e:
        raise ApiError(400, str(e), param=getattr(e, "param", "tools")) from None
    return tools, True


def _chat(model, frontend, body: dict) -> Prepared:
    options, stream, stream_options = parse_options(body, frontend, schema.CHAT, "/v1/chat/completions")
    _logprobs(body, frontend, options, chat=True)
    tools, calls = tool_options(body, options)
    prompt, extra = frontend.chat_prompt(schema.messages(body), tools, **schema.template_kwargs(body))
    _to_context(body, frontend, options)
    field = next((name for name in schema.GRAMMARS if body.get(name) is not None), "tool_choice")
    options = frontend.request_options(body, _merged(options, extra))
    return planned(model, prompt, options, stream, stream_options, field, shape={"chat": True, "calls": calls})


def _completions(model, frontend, body: dict) -> Prepared:
    options, stream, stream_options = parse_options(body, frontend, schema.COMPLETIONS, "/v1/completions")
    _logprobs(body, frontend, options, chat=False)
    if body.get("suffix") is not None:  # OpenAI's infilling: the text between prompt and suffix
        if "logprobs" in options:
            raise schema.FieldError("a completion with a 'suffix' is a fixed layout: it returns no logprobs",
                                    "logprobs")
        if options.get("n", 1) > 1:
            raise schema.FieldError("a completion with a 'suffix' has one middle: n must be 1", "n")
        if "grammar" in options or body.get("stop") is not None:
            raise schema.FieldError("a completion with a 'suffix' is a fixed layout: it takes no structured "
                                    "output or stop strings", "suffix")
        layout = _infill(model, frontend, schema.text(body.get("prompt"), "prompt"),
                         schema.text(body["suffix"], "suffix"), options, "max_tokens")
        return planned(model, layout.prompt, layout.options, stream, stream_options,
                       shape={"chat": False, "layout": layout})
    prompt, extra = frontend.text_prompt(schema.text(body.get("prompt"), "prompt"))
    _to_context(body, frontend, options)
    field = next((name for name in schema.GRAMMARS if body.get(name) is not None), "grammar")
    options = frontend.request_options(body, _merged(options, extra))
    return planned(model, prompt, options, stream, stream_options, field, shape={"chat": False})


def _infill_route(model, frontend, body: dict) -> Prepared:
    """llama-server's /infill: the middle between input_prefix and input_suffix, as `content`."""
    options, stream, stream_options = parse_options(body, frontend, schema.INFILL, "/infill")
    extra = body.get("input_extra")
    if extra is not None and extra != []:
        raise schema.FieldError("'input_extra' (other files' chunks) is not supported: put what the model should "
                                "see in input_prefix", "input_extra")
    prefix = schema.text(body.get("input_prefix", ""), "input_prefix") + \
        schema.text(body.get("prompt", ""), "prompt")  # llama-server's prompt: text the middle starts after
    n_predict = schema.number(body, "n_predict")
    if n_predict is not None:
        options["max_new_tokens"] = n_predict
    field = "n_predict" if n_predict is not None else "max_tokens"
    layout = _infill(model, frontend, prefix, schema.text(body.get("input_suffix", ""), "input_suffix"), options,
                     field)
    return planned(model, layout.prompt, layout.options, stream, stream_options, length=field,
                   shape={"chat": False, "layout": layout, "llama": True})


def _edit(model, frontend, body: dict) -> Prepared:
    """`input` with its character `spans` re-noised and denoised, the rest pinned (docs/editing.md)."""
    options, _, _ = parse_options(body, frontend, schema.EDIT, "/v1/edits")
    _no_layout_for(frontend)
    context = schema.text(body["prompt"], "prompt") if body.get("prompt") is not None else None
    try:
        layout = edit_request(model, schema.text(body.get("input"), "input"), schema.spans(body), prompt=context,
                              room=schema.number(body, "room") or 0, **options)
    except ConfigError as e:
        raise ApiError(400, str(e), param="spans") from None
    return planned(model, layout.prompt, layout.options, shape={"chat": False, "layout": layout})


ROUTES = {"chat": _chat, "completions": _completions, "infill": _infill_route, "edit": _edit}


def _infill(model, frontend, prefix: str, suffix: str, options: dict, field: str):
    _no_layout_for(frontend)
    max_middle = options.pop("max_new_tokens", None)
    try:
        return infill_request(model, prefix, suffix, max_middle=max_middle, **options)
    except ConfigError as e:  # the layout's own names are the request's fields here
        raise ApiError(400, str(e).replace("max_middle", field), param=field) from None


def _no_layout_for(frontend) -> None:
    if frontend.sudoku:
        raise ApiError(400, "the Sudoku model takes puzzles: send one to /v1/chat/completions or /v1/completions")


def planned(model, prompt, options: dict, stream: bool = False, stream_options: dict | None = None,
            field: str = "grammar", *, shape: dict, length: str = "max_tokens") -> Prepared:
    """driver.prepare (the one fit rule: the prompt and every canvas max_tokens may take; the grammar compiled
    once): an unusable request is a 400 now, naming `field` for its grammar and `length` for its length, not a
    failed stream later."""
    n = options.pop("n", 1)
    try:
        request = driver.prepare(model, prompt, seeds=model.seeds, **options)
        # choice k of n draws its noise from (the request's seed, k): its answer does not depend on n
        seed = request.plan.config.seed
        more = [driver.prepare(model, prompt, **{**options, "seed": derive_seed(seed, k)}) for k in range(1, n)]
    except ContextError as e:
        raise ApiError(400, str(e), param=length, code="context_length_exceeded") from None
    except ConfigError as e:
        raise ApiError(400, str(e), param=field if getattr(e, "param", None) == "grammar" else None) from None
    return Prepared(request, stream, stream_options or {}, shape, more)


def _logprobs(body: dict, frontend, options: dict, *, chat: bool) -> None:
    wanted = logprobs.requested(body, chat)
    if wanted is None:
        return
    if frontend.sudoku:  # its guide restates the grid: its passes' distributions are not the answer's positions
        raise schema.FieldError("the Sudoku model returns no logprobs", "logprobs")
    options["logprobs"] = wanted


def _to_context(body: dict, frontend, options: dict) -> None:
    """A request without max_tokens runs to its end or to its slot's context (the canvas is a unit of work, not
    a limit), unless the server's defaults give a length."""
    given = any(body.get(name) is not None for name in ("max_tokens", "max_completion_tokens"))
    if not given and "max_new_tokens" not in frontend.defaults and not frontend.sudoku:
        options["to_context"] = True


def _merged(options: dict, extra: dict) -> dict:
    """The request's options with what its frontend adds (a puzzle's guide, say); the frontend's unset (None)
    fields leave the request's own in place."""
    return {**options, **{k: v for k, v in extra.items() if v is not None}}
