"""OpenAI's Responses API over the same engine: POST /v1/responses (streamed or not).

A Responses body becomes a chat body (`instructions` a system message first; `input` items messages, assistant
tool calls and tool results; `text.format` the response_format; `reasoning.effort` the template's enable_thinking)
and is prepared as /v1/chat/completions prepares one: the same checks, template, grammar and 4xx errors. The reply
is split the same way (generation.channels) into output items: the thinking as a `reasoning` item, the answer as a
`message`, each call as a `function_call`. `previous_response_id` continues a conversation this process keeps
(History); the slot's prefix cache then reuses the tokens its earlier turns encoded. docs/serving.md has the fields.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import Request as HttpRequest
from fastapi.responses import Response, StreamingResponse

from dglocal.generation import channels
from dglocal.serving import app as http  # app imports this module too: its names are read when a request runs
from dglocal.serving import schema
from dglocal.serving.errors import ApiError

KEPT = 256  # responses a previous_response_id may name: the newest ones, the least recently used forgotten first
# fields handed to the chat body as they are (checked there): OpenAI's, and the server's extensions
PASSED = ("model", "parallel_tool_calls", "seed", "top_k", "lora", "cache_prompt", "ignore_eos", "draft", "stop",
          "chat_template_kwargs", *schema.NO_EFFECT, *schema.DIFFUSION,
          *(name for name in schema.GRAMMARS if name != "response_format"))  # response_format: from text.format
READ = ("input", "instructions", "previous_response_id", "tools", "tool_choice", "text", "max_output_tokens",
        "reasoning", "stream", "stream_options", "truncation", "include", "background", "max_tool_calls",
        "prompt_cache_retention")
REFUSED = {
    "conversation": "conversations are not stored: continue one with previous_response_id",
    "prompt": "stored prompts are not supported: send instructions and input",
    "top_logprobs": "log-probabilities are returned on /v1/chat/completions and /v1/completions",
    "context_management": "the history is not compacted: a request over the context is refused",
}
# a chat field named in an error is the Responses field it came from
RENAMED = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text"}
ROLES = ("user", "assistant", "system", "developer")  # a message item's; tool results are function_call_output
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")  # "none" turns thinking off, the others on
ITEM_FIELDS = {"message": {"type", "role", "content", "id", "status", "phase"},
               "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
               "function_call_output": {"type", "call_id", "output", "id", "status"}}


def add_routes(app, service) -> None:
    """Register the routes on `app`; each generating one goes through `service` (serving.app.Service)."""
    history = History()

    @app.post("/v1/responses")
    async def create(request: HttpRequest):
        if service.frontend.sudoku:
            raise ApiError(400, "the Sudoku model takes puzzles: send one to /v1/chat/completions")
        turn = translate(schema.parse_body(await http.read_body(request)), history)
        try:
            prepared = await service.prepare("chat", turn.chat)
        except (ApiError, schema.FieldError) as e:
            e.param = RENAMED.get(e.param, e.param)
            raise
        req, events = service.submit(request, prepared.request)
        shape = http.Shape(req, service.frontend, metrics=service.metrics, **prepared.shape)
        reply = Reply(turn, shape, history)
        if turn.stream:
            return StreamingResponse(reply.sse(events), media_type="text/event-stream")
        completion = await http.collect(shape, events)
        if completion is None:  # the client left: nobody reads this
            return Response(status_code=499)
        return reply.whole(completion)


class History:
    """What previous_response_id may continue: each response's messages (its input without the instructions,
    which a follow-up does not inherit, then its answer), the KEPT most recently used. Read and written on the
    event loop alone, so it needs no lock."""

    def __init__(self, size: int = KEPT):
        self.size, self.kept = size, OrderedDict()

    def get(self, response_id) -> list[dict]:
        if not isinstance(response_id, str) or response_id not in self.kept:
            raise ApiError(400, f"previous_response_id {schema.short(response_id)} is not held here: the server keeps "
                                f"the {self.size} most recently used responses (not those with store false) until "
                                "it restarts", param="previous_response_id", code="previous_response_not_found")
        self.kept.move_to_end(response_id)
        return self.kept[response_id]

    def put(self, response_id: str, messages: list[dict]) -> None:
        self.kept[response_id] = messages
        while len(self.kept) > self.size:
            self.kept.popitem(last=False)


@dataclass
class Turn:
    chat: dict  # the chat body service.prepare takes
    messages: list[dict]  # the conversation without the instructions: what History keeps, with the answer
    echo: dict  # the request's settings, as a response object repeats them
    stream: bool
    store: bool


def translate(body: dict, history: History) -> Turn:
    """The Responses body as a chat body; schema.FieldError or ApiError (a 400) names the field."""
    schema.check_names(body, {*PASSED, *READ}, REFUSED, "/v1/responses")
    _check_neutral(body)
    previous = body.get("previous_response_id")
    messages = input_messages(body.get("input"), history.get(previous) if previous is not None else [])
    instructions = body.get("instructions")
    if instructions is not None:
        schema.text(instructions, "instructions")
    system = [{"role": "system", "content": instructions}] if instructions else []
    chat = {name: body[name] for name in PASSED if body.get(name) is not None}
    chat["messages"] = system + messages
    listed = tools(body.get("tools"))
    if listed:
        chat["tools"] = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                           if t.get(k) is not None}} for t in listed]
    choice = body.get("tool_choice")
    if choice is not None:
        chat["tool_choice"] = tool_choice(choice)
    fmt = text_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    limit = schema.checked_number(body.get("max_output_tokens"), "max_output_tokens", int, 1, schema.MAX_TOKENS)
    if limit is not None:
        chat["max_tokens"] = limit
    effort = reasoning(body.get("reasoning"))
    if effort is not None:
        kwargs = schema.template_kwargs(chat)
        if "enable_thinking" in kwargs:
            raise schema.FieldError("'reasoning' and chat_template_kwargs.enable_thinking both turn thinking on or "
                                    "off: give one", "reasoning")
        chat["chat_template_kwargs"] = {**kwargs, "enable_thinking": effort != "none"}
    store = schema.flag(body, "store") is not False
    echo = {"instructions": instructions, "previous_response_id": previous, "tools": listed,
            "tool_choice": choice if choice is not None else "auto",
            "parallel_tool_calls": schema.flag(body, "parallel_tool_calls") is not False,
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "temperature": body.get("temperature"), "top_p": body.get("top_p"), "max_output_tokens": limit,
            "reasoning": body.get("reasoning") or {"effort": None, "summary": None}, "truncation": "disabled",
            "metadata": body.get("metadata"), "store": store, "user": body.get("user")}
    return Turn(chat, messages, echo, bool(schema.flag(body, "stream")), store)


def _check_neutral(body: dict) -> None:
    """The fields with only the value that changes nothing here accepted."""
    if body.get("truncation") not in (None, "disabled"):
        raise schema.FieldError("'truncation' must be 'disabled': the history is not cut, a request over the "
                                "context is refused (context_length_exceeded)", "truncation")
    if body.get("include") not in (None, []):
        raise schema.FieldError(f"'include' must be empty, got {schema.short(body['include'])}: no logprobs, "
                                "encrypted reasoning or built-in tool results are returned", "include")
    if schema.flag(body, "background"):
        raise schema.FieldError("'background' must be false: responses are answered while the client waits",
                                "background")
    schema.checked_number(body.get("max_tool_calls"), "max_tool_calls", int, 0, schema.MAX_TOKENS)  # no built-ins
    if body.get("prompt_cache_retention") is not None:
        schema.text(body["prompt_cache_retention"], "prompt_cache_retention")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_obfuscation"}):
        raise schema.FieldError("'stream_options' takes include_obfuscation alone (no effect: nothing is "
                                "obfuscated)", "stream_options")


def input_messages(value, earlier: list[dict]) -> list[dict]:
    """`earlier` (a previous response's conversation), then `input` (a string: one user message; or items) as chat
    messages: consecutive function_call items are one assistant message's tool_calls, each function_call_output a
    tool message; reasoning items are dropped (the template shows no earlier thinking)."""
    if isinstance(value, str):
        return [*earlier, {"role": "user", "content": schema.text(value, "input")}]
    if not isinstance(value, list) or not value:
        raise schema.FieldError("'input' must be a string or a non-empty list of items", "input")
    out = list(earlier)  # the kept messages themselves are never changed: one is replaced by a copy instead
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "reasoning":
            continue
        if kind not in ITEM_FIELDS:
            raise schema.FieldError(f"{where}: items of type {schema.short(kind)} are not supported (message, "
                                    "function_call, function_call_output, reasoning)", "input")
        extra = sorted(set(item) - ITEM_FIELDS[kind])
        if extra:
            raise schema.FieldError(f"{where} has field(s) {extra} this server does not support", "input")
        if kind == "message":
            if item.get("role") not in ROLES:
                raise schema.FieldError(f"{where} needs a role ({', '.join(ROLES)})", "input")
            out.append({"role": item.get("role"), "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            if out and out[-1]["role"] == "assistant":  # the answer's text and its calls: one assistant turn
                out[-1] = {**out[-1], "tool_calls": [*out[-1].get("tool_calls", []), call]}
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                        "content": _output(item.get("output"), where)})
    return out


def _string(item: dict, name: str, where: str) -> str:
    if not isinstance(item.get(name), str):
        raise schema.FieldError(f"{where}.{name} must be a string", "input")
    return item[name]


def _content(value, where: str):
    """A message item's content as a chat message's: the text parts as text, input_image as an image_url part."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise schema.FieldError(f"{where}.content must be a string or a list of content parts", "input")
    parts = []
    for k, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_image":
            raise schema.FieldError(f"{where}.content[{k}]: an input_image needs an image_url (a data: URL or a "
                                    "local file): there is no Files API here", "input")
        else:
            raise schema.FieldError(f"{where}.content[{k}]: parts of type {schema.short(kind)} are not supported "
                                    "(input_text, output_text, input_image)", "input")
    return parts


def _output(value, where: str) -> str:
    """A function_call_output's output: a string, or input_text parts joined."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "input_text" and
                                       isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise schema.FieldError(f"{where}.output must be a string or a list of input_text parts", "input")
    return value


def tools(value) -> list[dict]:
    """Function tools in the Responses shape ({type, name, description, parameters, strict}); any other tool
    type is refused: this server runs no built-in tools."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise schema.FieldError("'tools' must be a list", "tools")
    for k, t in enumerate(value):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise schema.FieldError(f"tools[{k}]: tools of type {schema.short(kind)} are not supported: only "
                                    "function tools (this server runs no built-in tools)", "tools")
        extra = sorted(set(t) - {"type", "name", "description", "parameters", "strict"})
        if extra or not isinstance(t.get("name"), str):
            raise schema.FieldError(f"tools[{k}] must be {{\"type\": \"function\", \"name\": ..., \"description\", "
                                    f"\"parameters\", \"strict\"}}" + (f", not {extra}" if extra else ""), "tools")
    return value


def tool_choice(value):
    """"auto", "none", "required" or {"type": "function", "name"} as chat's tool_choice."""
    if value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise schema.FieldError(f"'tool_choice' must be auto, none, required or {{\"type\": \"function\", \"name\": ...}}, "
                            f"got {schema.short(value)}", "tool_choice")


def text_format(value) -> dict | None:
    """`text` ({"format": text, json_object or json_schema {name, schema, strict}}) as chat's response_format."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"format", "verbosity"}:
        raise schema.FieldError("'text' must be {\"format\": {...}}", "text")
    if value.get("verbosity") not in (None, "medium"):
        raise schema.FieldError("'text.verbosity' is not supported: the model has no verbosity setting, ask for a "
                                "shorter or longer answer in the prompt", "text")
    fmt = value.get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise schema.FieldError("'text.format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                            "{\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}}", "text")


def reasoning(value) -> str | None:
    """`reasoning.effort`: "none" turns Gemma's thinking off, any other effort on (it thinks or it does not);
    None leaves the template's default. `summary` is accepted: the thinking comes back whole, not summarised."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"effort", "summary", "generate_summary"} or \
            value.get("effort") not in (None, *EFFORTS):
        raise schema.FieldError(f"'reasoning' must be {{\"effort\": one of {list(EFFORTS)}, \"summary\"}}, got "
                                f"{schema.short(value)}", "reasoning")
    return value.get("effort")


# -- the answer --------------------------------------------------------------------------------------------------

class Reply:
    """One response object and its output items: whole, or as the stream events that build it."""

    def __init__(self, turn: Turn, shape, history: History):
        self.turn, self.shape, self.history = turn, shape, history
        self.id = "resp_" + shape.req.id
        self.created = int(time.time())
        self.seq = itertools.count()
        self.output: list[dict] = []  # the items streamed and closed
        self.open, self.open_text = None, ""  # the text item being streamed

    def whole(self, c) -> dict:
        self.shape.log(c)
        out = channels.split(self.shape.text(c), tools=self.shape.calls)
        status = self.status(c, out.tool_calls)
        if out.reasoning:
            self.output.append(_item("reasoning", _id("rs"), out.reasoning, "completed"))
        if out.content or not out.tool_calls:
            self.output.append(_item("message", _id("msg"), out.content, status))
        self.output += [_call_item(t, "completed") for t in out.tool_calls]
        self.remember(out.content, out.tool_calls)
        return self.response(status, c)

    def status(self, c, calls) -> str:
        return "incomplete" if self.shape.finish(c, calls) == "length" else "completed"

    def response(self, status: str, c=None) -> dict:
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": self.shape.frontend.id, "output": list(self.output),
                "usage": self.usage(c) if c is not None else None, **self.turn.echo,
                **({"dglocal": self.shape.stats(c)} if c is not None else {})}

    def usage(self, c) -> dict:
        n_in, n_out, cached = len(self.shape.req.plan.tokens), len(c.tokens), self.shape.req.cached
        # reasoning tokens are not counted apart: the thinking is text split from the reply afterwards
        return {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": cached,
                                                               "cache_write_tokens": n_in - cached},
                "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": n_in + n_out}

    def remember(self, content: str, calls) -> None:
        """The conversation with this answer, for a follow-up's previous_response_id (unless store is false)."""
        if not self.turn.store:
            return
        answer = {"role": "assistant", "content": content}
        if calls:
            answer["tool_calls"] = [{"id": t.id, "type": "function",
                                     "function": {"name": t.name, "arguments": t.arguments}} for t in calls]
        self.history.put(self.id, [*self.turn.messages, answer])

    # -- streaming ---------------------------------------------------------------------------------------------

    async def sse(self, events):
        """The events in the SDK's order: created, in_progress; each text item added, its deltas (one per
        committed canvas), done; each call added, its arguments, done; then completed (or incomplete)."""
        yield self.event("response.created", response=self.response("in_progress"))
        yield self.event("response.in_progress", response=self.response("in_progress"))
        splitter = channels.StreamSplitter(tools=self.shape.calls)
        async for item in events:
            if isinstance(item, BaseException):
                for chunk in self.failed(item):
                    yield chunk
                return
            self.shape.observe(item)
            if item.kind == "block" and item.text:
                for chunk in self.deltas(*splitter.feed(item.text)):
                    yield chunk
                for call in splitter.new_calls():  # a call as the canvas that closes it commits
                    for chunk in self.call(call):
                        yield chunk
            elif item.kind == "done":
                for chunk in self.finished(item, splitter):
                    yield chunk

    def finished(self, c, splitter):
        self.shape.log(c)
        sent = len(splitter.sent_calls)
        reasoning, content, out = splitter.finish()
        yield from self.deltas(reasoning, content)
        status = self.status(c, out.tool_calls)
        streamed = [*self.output, *([self.open] if self.open else [])]
        # an empty answer is still a message, as whole() has it
        if not out.tool_calls and not any(i["type"] == "message" for i in streamed):
            yield from self.switch("message")
        if self.open is not None:
            yield from self.close(status)
        for call in out.tool_calls[sent:]:
            yield from self.call(call)
        self.remember(splitter.sent_content, out.tool_calls)
        yield self.event("response." + status, response=self.response(status, c))

    def deltas(self, reasoning: str, content: str):
        for kind, text in (("reasoning", reasoning), ("message", content)):
            if text:
                yield from self.switch(kind)
                self.open_text += text
                yield self.event(DELTA[kind], **self.at(), delta=text, **_logprobs(kind))

    def switch(self, kind: str):
        """The text item of `kind` open: the other kind's closed, this one added with an empty part."""
        if self.open is not None and self.open["type"] != kind:
            yield from self.close("completed")
        if self.open is None:
            self.open, self.open_text = _item(kind, _id("rs" if kind == "reasoning" else "msg"), None,
                                              "in_progress"), ""
            yield self.event("response.output_item.added", output_index=len(self.output), item=self.open)
            yield self.event("response.content_part.added", **self.at(), part=_part(kind, ""))

    def close(self, status: str):
        kind, text = self.open["type"], self.open_text
        yield self.event(DONE[kind], **self.at(), text=text, **_logprobs(kind))
        yield self.event("response.content_part.done", **self.at(), part=_part(kind, text))
        item = _item(kind, self.open["id"], text, status)
        yield self.event("response.output_item.done", output_index=len(self.output), item=item)
        self.output.append(item)
        self.open = None

    def call(self, call: channels.ToolCall):
        if self.open is not None:  # the text before the call is done
            yield from self.close("completed")
        at = {"item_id": _call_item(call, "")["id"], "output_index": len(self.output)}
        yield self.event("response.output_item.added", output_index=at["output_index"],
                         item={**_call_item(call, "in_progress"), "arguments": ""})
        yield self.event("response.function_call_arguments.delta", **at, delta=call.arguments)
        yield self.event("response.function_call_arguments.done", **at, arguments=call.arguments)
        item = _call_item(call, "completed")
        yield self.event("response.output_item.done", output_index=at["output_index"], item=item)
        self.output.append(item)

    def failed(self, e: BaseException):
        """An error after the stream began: an `error` event, then the response failed."""
        error = http.as_api_error(e)
        yield self.event("error", code=error.code, message=str(error), param=error.param)
        yield self.event("response.failed", response={**self.response("failed"), "error": {
            "code": "server_error", "message": str(error)}})

    def at(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.output), "content_index": 0}

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": next(self.seq), **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


DELTA = {"reasoning": "response.reasoning_text.delta", "message": "response.output_text.delta"}
DONE = {"reasoning": "response.reasoning_text.done", "message": "response.output_text.done"}


def _item(kind: str, item_id: str, text: str | None, status: str) -> dict:
    """A reasoning or message output item; `text` None: added, its content part not yet."""
    content = [] if text is None else [_part(kind, text)]
    if kind == "reasoning":
        return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}


def _part(kind: str, text: str) -> dict:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": []}


def _logprobs(kind: str) -> dict:
    return {"logprobs": []} if kind == "message" else {}  # output_text events carry the list, always empty here


def _call_item(call: channels.ToolCall, status: str) -> dict:
    # the item's id follows from the call's, so the streamed item and the final response's agree
    return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": status}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"
