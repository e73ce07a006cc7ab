"""The OpenAI request body, checked field by field before anything else sees it. Each field is either supported
(its type and range checked here, then the generation settings' own checks) or refused with a 400 that names it:
nothing is silently ignored. docs/serving.md lists the same fields. vLLM's `vllm_xargs` keys for DiffusionGemma
become dglocal's own fields (vllm_xargs), and a key whose meaning differs is a 400 that says how.

Numbers are checked without float conversion first (an integer of hundreds of digits is a 400, not an overflow),
strings for lone surrogates (they cannot be encoded for the tokenizer), and bodies nested too deeply for the JSON
parser are refused whole.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from urllib.parse import unquote, urlsplit

from dglocal.errors import ConfigError
from dglocal.generation.config import MAX_FAST_K, MAX_STEPS, SAMPLERS, GenerationConfig
from dglocal.generation.editing import MAX_ROOM
from dglocal.generation.grammar import MAX_JSON_DEPTH, check_depth
from dglocal.runtime.checks import MAX_TEMPERATURE

MAX_TOKENS = 2**31 - 1

# supported fields: (type, lowest, highest)
NUMBERS = {
    "max_tokens": (int, 1, MAX_TOKENS), "max_completion_tokens": (int, 1, MAX_TOKENS), "seed": (int, -1, 2**64 - 1),
    "n_predict": (int, 1, MAX_TOKENS), "room": (int, 0, MAX_ROOM),
    "n": (int, 1, 16),  # choices, each its own generation: they share the slots' forwards
    # the diffusion sampler's settings (extra body fields)
    "max_denoising_steps": (int, 1, MAX_STEPS), "stability_threshold": (int, 0, MAX_STEPS),
    "entropy_bound": (float, 0, 1e9), "confidence_threshold": (float, 0, 1e9),
    "t_min": (float, 0, MAX_TEMPERATURE), "t_max": (float, 0, MAX_TEMPERATURE),
    # sampling (docs/sampler.md): temperature scales the t_min..t_max schedule (0: the argmax); top_k -1 is off
    "temperature": (float, 0, 2), "top_p": (float, 1e-9, 1), "top_k": (int, -1, 2**31 - 1), "min_p": (float, 0, 1),
    "fast_k": (int, 1, MAX_FAST_K),  # the fast sampler's ids a position (docs/sampler.md#the-fast-sampler)
}
DIFFUSION = ("max_denoising_steps", "stability_threshold", "entropy_bound", "confidence_threshold", "t_min", "t_max",
             "temperature", "top_p", "min_p", "fast_k", "sampler")  # sampler: a string (sampler_name), the rest numbers
FLAGS = ("stream", "ignore_eos", "cache_prompt", "parallel_tool_calls", "store")
# structured output: OpenAI's response_format, llama-server's json_schema / grammar (GBNF), vLLM's
# structured_outputs and its older guided_* fields
GRAMMARS = ("response_format", "json_schema", "grammar", "structured_outputs", "guided_json", "guided_regex",
            "guided_grammar", "guided_choice")
# each route's fields: the sampler's everywhere; a fixed layout (an infill's suffix, an edit's pinned text) takes
# no stop strings, grammar, draft or ignore_eos (they would act on text the request pinned), an edit no length
# OpenAI fields about storage, billing or routing: accepted, without effect on the answer (docs/serving.md)
NO_EFFECT = ("user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier")
SAMPLER = ("model", "seed", "lora", "cache_prompt", "top_k", *NO_EFFECT, *DIFFUSION)
GENERATE = (*SAMPLER, "stream", "stream_options", "stop", "ignore_eos", "draft", "max_tokens",
            "max_completion_tokens", "n", "vllm_xargs", *GRAMMARS)
CHAT = (*GENERATE, "messages", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "logprobs",
        "top_logprobs")
COMPLETIONS = (*GENERATE, "prompt", "suffix", "logprobs")
INFILL = (*SAMPLER, "stream", "stream_options", "input_prefix", "input_suffix", "input_extra", "prompt", "n_predict",
          "max_tokens")
EDIT = (*SAMPLER, "input", "spans", "room", "prompt")
STREAM_OPTIONS = ("include_usage", "include_drafts")
# fields with one accepted value, the value OpenAI means by default; any other is refused with the reason
NEUTRAL = {
    "frequency_penalty": (0, "penalties over earlier tokens do not apply to a canvas denoised in parallel"),
    "presence_penalty": (0, "penalties over earlier tokens do not apply to a canvas denoised in parallel"),
}
REFUSED = {
    "functions": "use 'tools' (the legacy function fields are not supported)",
    "function_call": "use 'tool_choice' (the legacy function fields are not supported)",
    "logit_bias": "logit_bias is not supported",
    "echo": "echo is not supported", "best_of": "best_of is not supported", "audio": "audio is not supported",
    "modalities": "only text is supported",
    "reasoning_effort": "Gemma 4 thinks or does not: chat_template_kwargs {\"enable_thinking\": true}",
    "verbosity": "the model has no verbosity setting: ask for a shorter or longer answer in the prompt",
}
ROLES = ("system", "user", "assistant", "developer", "tool")
ALL = {*CHAT, *COMPLETIONS, *INFILL, *EDIT, *NEUTRAL}  # every field some route takes
# llama-server's own routes (serving.llamacpp)
TOKENIZE = ("content", "add_special", "parse_special", "with_pieces")
DETOKENIZE = ("tokens",)

# vLLM's `vllm_xargs` keys for DiffusionGemma's structured reads (vllm#57250, its examples/features/diffusion_reads),
# each dglocal's own field: the seed canvas a `draft` of one canvas, its pins `constraints`, the step cap
# max_denoising_steps (at most the server's, as vLLM clamps it), the samples `n`
XARGS = ("diffusion_seed_canvas", "diffusion_pinned", "diffusion_max_steps", "diffusion_samples")
# keys accepted with their neutral value only (false, or the model's canvas); another is refused with what differs
XARGS_NEUTRAL = {
    "diffusion_read_only": "vLLM's read returns temperature-1 log-probabilities at every position of its one canvas "
                           "as it was given; dglocal's logprobs are those of the tokens it generates (the same "
                           "temperature-1 distribution, at each canvas' last pass): ask for logprobs with max_tokens "
                           "at most the canvas and ignore_eos",
    "diffusion_constrained": "vLLM restricts every position's distribution to the request's logprob_token_ids; "
                             "dglocal takes no logprob_token_ids and no token set per request: a grammar field "
                             "(guided_choice, grammar) constrains the text instead",
    "diffusion_canvas_length": "dglocal's canvas is the model's: a narrower one per request is not supported",
}


class FieldError(ValueError):
    """A 400: the message names the field (param)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def parse_body_any(raw: bytes):
    """A request body as JSON of any shape."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise FieldError("the request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
        raise FieldError(f"the request body is not valid JSON: {str(e)[:200]}") from None


def parse_body(raw: bytes) -> dict:
    body = parse_body_any(raw)
    if not isinstance(body, dict):
        raise FieldError("the request body must be a JSON object")
    return body


def sampler_name(body: dict):
    """The body's `sampler`: "reference" or "fast"; None when absent."""
    value = body.get("sampler")
    if value is not None and value not in SAMPLERS:
        raise FieldError(f"'sampler' must be one of {list(SAMPLERS)}, got {short(value)}", "sampler")
    return value


def number(body: dict, name: str):
    """A NUMBERS field of the body, checked; None when absent."""
    if name == "sampler":
        return sampler_name(body)
    kind, low, high = NUMBERS[name]
    return checked_number(body.get(name), name, kind, low, high)


def checked_number(value, name: str, kind, low, high):
    if value is None:
        return None
    what = "an integer" if kind is int else "a number"
    bad = FieldError(f"'{name}' must be {what} in [{low}, {high}], got {short(value)}", name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if isinstance(value, float) and not math.isfinite(value):
        raise bad
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise bad
        value = int(value)
    elif isinstance(value, int) and abs(value) > 1e300:  # compared as an int: no float conversion overflows
        raise bad
    if not low <= value <= high:
        raise bad
    return kind(value)


def flag(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise FieldError(f"'{name}' must be a boolean, got {short(value)}", name)
    return value


def text(value, name: str) -> str:
    """A string the tokenizer can take: no lone surrogates."""
    if not isinstance(value, str):
        raise FieldError(f"'{name}' must be a string, got {type(value).__name__}", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(f"'{name}' holds a lone surrogate at character {e.start}: not valid Unicode text",
                         name) from None
    return value


def check_names(body: dict, accepted, refused: dict, where: str) -> None:
    """A body of another API's routes: its refused fields (with their reasons) and unknown ones are 400s naming
    them."""
    for name, reason in refused.items():
        if body.get(name) is not None:
            raise FieldError(f"'{name}' is not supported: {reason}", name)
    unknown = sorted(set(body) - set(accepted) - set(refused))
    if unknown:
        raise FieldError(f"{where} does not take {unknown}", unknown[0])


def check_fields(body: dict, route: tuple[str, ...], where: str) -> None:
    """Unknown fields, refused fields and fields with only their neutral value accepted; `route`: the fields of
    the route's body (CHAT, COMPLETIONS, INFILL, EDIT), `where` its path."""
    for name, reason in REFUSED.items():
        if name in body:
            raise FieldError(f"'{name}' is not supported: {reason}", name)
    unknown = sorted(set(body) - set(route) - set(NEUTRAL))
    if unknown:
        known = "a field of another route" if set(unknown) & ALL else "unknown"
        raise FieldError(f"{where} does not take {unknown} ({known})", unknown[0])
    for name in FLAGS:
        flag(body, name)
    for name in ("user", "service_tier", "prompt_cache_key", "safety_identifier"):
        if body.get(name) is not None:
            text(body[name], name)
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise FieldError(f"'metadata' must be an object, got {short(body['metadata'])}", "metadata")
    for name, (neutral, reason) in NEUTRAL.items():
        value = body.get(name)
        if value is None:
            continue
        ok = value is neutral if isinstance(neutral, bool) else (
            not isinstance(value, bool) and isinstance(value, (int, float)) and value == neutral)
        if not ok:
            raise FieldError(f"'{name}' must be {neutral!r} (or absent), got {short(value)}: {reason}", name)
    number(body, "n")


def stops(body: dict) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not 1 <= len(items) <= 4 or not all(isinstance(s, str) and s for s in items):
        raise FieldError("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    return tuple(text(s, "stop") for s in items)


def draft(body: dict):
    """`draft`: the text (or token ids) the first canvases start from instead of noise."""
    value = body.get("draft")
    if value is None or isinstance(value, str):
        return None if value is None else text(value, "draft")
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise FieldError("'draft' must be a string or a list of token ids (-1 for noise)", "draft")
    return value


def vllm_xargs(body: dict, frontend, options: dict) -> dict:
    """vLLM's `vllm_xargs` as dglocal's options, each key checked as vLLM checks it; a key dglocal does not know, or
    one whose meaning differs here, is a 400 that names it and says how. `options`: the request's so far (its
    max_new_tokens, n and the server's defaults)."""
    xargs = body.get("vllm_xargs")
    if xargs is None:
        return {}
    if not isinstance(xargs, dict):
        raise FieldError(f"'vllm_xargs' must be an object, got {short(xargs)}", "vllm_xargs")
    unknown = sorted(set(xargs) - set(XARGS) - set(XARGS_NEUTRAL))
    if unknown:
        raise FieldError(f"'vllm_xargs.{unknown[0]}' is not supported: dglocal maps {[*XARGS, *XARGS_NEUTRAL]} onto "
                         "its own fields", f"vllm_xargs.{unknown[0]}")
    model = frontend.model
    given = {k: v for k, v in xargs.items() if v is not None}  # a null is the key left out, as vLLM reads it
    for name, reason in XARGS_NEUTRAL.items():
        if name in given:
            _xargs_neutral(name, given[name], model.canvas_length, reason)
    canvas_keys = sorted(set(given) & {"diffusion_seed_canvas", "diffusion_pinned", "diffusion_samples"})
    if canvas_keys and frontend.sudoku:
        raise FieldError(f"'vllm_xargs.{canvas_keys[0]}' does not apply to the Sudoku model: its guide owns the "
                         "canvas", f"vllm_xargs.{canvas_keys[0]}")
    if canvas_keys and body.get("suffix") is not None:
        raise FieldError(f"'vllm_xargs.{canvas_keys[0]}' does not apply to a completion with a 'suffix': a fixed "
                         "layout's canvases hold the text the request pinned", f"vllm_xargs.{canvas_keys[0]}")
    out = _seeded(given, body, options, model.canvas_length, model.n_vocab)
    if "diffusion_max_steps" in given:
        cap = _xargs_count(given, "diffusion_max_steps")
        if body.get("max_denoising_steps") is not None:
            raise FieldError("give max_denoising_steps or vllm_xargs.diffusion_max_steps, not both",
                             "vllm_xargs.diffusion_max_steps")
        served = options.get("max_denoising_steps") or \
            GenerationConfig.from_metadata(model.metadata).max_denoising_steps
        out["max_denoising_steps"] = min(cap, served)  # vLLM's cap: the served steps at most
    if "diffusion_samples" in given:
        samples = _xargs_count(given, "diffusion_samples")
        if samples > NUMBERS["n"][2]:
            raise FieldError(f"'vllm_xargs.diffusion_samples' must be at most {NUMBERS['n'][2]} (dglocal's n), got "
                             f"{samples}", "vllm_xargs.diffusion_samples")
        if options.get("n", 1) > 1:
            raise FieldError("n and vllm_xargs.diffusion_samples cannot both be set", "vllm_xargs.diffusion_samples")
        if samples > 1:
            out["n"] = samples  # each choice holds the same seed canvas and pins, with noise of its own
    return out


def _seeded(given: dict, body: dict, options: dict, C: int, n_vocab: int) -> dict:
    """diffusion_seed_canvas as the `draft` of the first canvas (vLLM's seed replaces the first canvas after the
    prompt), diffusion_pinned as `constraints` holding the seed's tokens there."""
    seed, pins = given.get("diffusion_seed_canvas"), given.get("diffusion_pinned")
    out = {}
    if seed is not None:
        seed = _xargs_ids(seed, "diffusion_seed_canvas", "token ids", n_vocab)
        if len(seed) != C:
            raise FieldError(f"'vllm_xargs.diffusion_seed_canvas' must hold exactly {C} ids (the model's canvas), got "
                             f"{len(seed)}", "vllm_xargs.diffusion_seed_canvas")
        if body.get("draft") is not None:
            raise FieldError("give draft or vllm_xargs.diffusion_seed_canvas, not both: each is where the first canvas "
                             "starts", "vllm_xargs.diffusion_seed_canvas")
        out["draft"] = seed
    if pins is not None:
        pins = _xargs_ids(pins, "diffusion_pinned", "canvas positions", C)
        if seed is None:
            raise FieldError("'vllm_xargs.diffusion_pinned' needs a diffusion_seed_canvas to hold",
                             "vllm_xargs.diffusion_pinned")
        length = options.get("max_new_tokens")
        if length is None or length > C:  # what vLLM pins in the canvases after the first is not said
            raise FieldError(f"'vllm_xargs.diffusion_pinned' holds positions of one canvas: give max_tokens at most "
                             f"{C} (the canvas), got {length if length is not None else 'none'}",
                             "vllm_xargs.diffusion_pinned")
        out["constraints"] = {p: seed[p] for p in pins}
    return out


def _xargs_count(xargs: dict, name: str) -> int:
    value = xargs[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FieldError(f"'vllm_xargs.{name}' must be a positive integer, got {short(value)}", f"vllm_xargs.{name}")
    return value


def _xargs_ids(value, name: str, what: str, end: int) -> list[int]:
    """A list of integers in [0, end): token ids or canvas positions."""
    if not isinstance(value, list):
        raise FieldError(f"'vllm_xargs.{name}' must be a list of {what}, got {short(value)}", f"vllm_xargs.{name}")
    for k, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < end:
            raise FieldError(f"'vllm_xargs.{name}'[{k}] must be an integer in [0, {end}) ({what}), got {short(v)}",
                             f"vllm_xargs.{name}")
    return value


def _xargs_neutral(name: str, value, canvas: int, reason: str) -> None:
    """A key of XARGS_NEUTRAL: its type as vLLM checks it (its OpenAI server passes JSON booleans as 0/1), then only
    its neutral value."""
    if name == "diffusion_canvas_length":
        neutral, ok = canvas, _xargs_count({name: value}, name) == canvas
    elif not isinstance(value, int) or value not in (0, 1):
        raise FieldError(f"'vllm_xargs.{name}' must be a boolean (or 0/1), got {short(value)}", f"vllm_xargs.{name}")
    else:
        neutral, ok = False, not value
    if not ok:
        raise FieldError(f"'vllm_xargs.{name}' must be {json.dumps(neutral)} (or absent), got {short(value)}: {reason}",
                         f"vllm_xargs.{name}")


def lora(value, name: str = "lora") -> list[dict]:
    """llama-server's LoRA scales: [{"id": N, "scale": S}, ...] (checked against the model's adapters later)."""
    if not isinstance(value, list) or not all(
            isinstance(e, dict) and set(e) == {"id", "scale"} and isinstance(e["id"], int) and
            not isinstance(e["id"], bool) for e in value):
        raise FieldError(f"'{name}' must be a list of {{\"id\": adapter id, \"scale\": number}}", name)
    for e in value:
        checked_number(e["scale"], name, float, -1e4, 1e4)
    return value


def spans(body: dict) -> list[tuple[int, int]]:
    """/v1/edits' `spans`: [[start, end], ...] character offsets into `input`."""
    value = body.get("spans")
    if not isinstance(value, list) or not value or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
            for s in value):
        raise FieldError("'spans' must be a non-empty list of [start, end] character offsets", "spans")
    return [(s[0], s[1]) for s in value]


def stream_options(body: dict) -> dict:
    opts = body.get("stream_options")
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise FieldError("'stream_options' must be an object", "stream_options")
    unknown = sorted(set(opts) - set(STREAM_OPTIONS))
    if unknown:
        raise FieldError(f"unknown stream option(s) {unknown}; known: {list(STREAM_OPTIONS)}", "stream_options")
    for name in STREAM_OPTIONS:
        if name in opts and not isinstance(opts[name], bool):
            raise FieldError(f"'stream_options.{name}' must be a boolean", "stream_options")
    return opts


MESSAGE_FIELDS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id", "name"}}
# a message's author name (langchain sends it for a named message): accepted, the template does not show it
NAMED = ("system", "user", "assistant", "developer")
# what an assistant message carries when a client sends back a reply it got (model_dump()): accepted when null,
# the reply had none
NULL_ONLY = ("refusal", "annotations", "audio", "function_call")


def messages(body: dict) -> list[dict]:
    """The chat messages as {role, content} with text content, assistant tool calls and tool results; other
    message shapes and content types are refused (naming the message)."""
    items = body.get("messages")
    if not isinstance(items, list) or not items:
        raise FieldError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise FieldError(f"{where} needs a role ({', '.join(ROLES)})", "messages")
        allowed = {"role", "content"} | MESSAGE_FIELDS.get(m["role"], set()) | ({"name"} if m["role"] in NAMED else set())
        if m["role"] == "assistant":
            allowed |= {k for k in NULL_ONLY if m.get(k) is None}
        extra = sorted(set(m) - allowed)
        if extra:
            raise FieldError(f"{where} has field(s) {extra} this server does not support for role "
                             f"{m['role']!r}", "messages")
        msg = {"role": "system" if m["role"] == "developer" else m["role"]}
        calls = m.get("tool_calls")
        msg["content"] = "" if m.get("content") is None and calls else content(m.get("content"), where)
        if calls is not None:
            msg["tool_calls"] = [tool_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(_list(calls, where))]
        for name in ("tool_call_id", "name"):
            if m.get(name) is not None:
                value = text(m[name], "messages")
                if m["role"] == "tool":  # what the template reads; an author's name is checked, then left out
                    msg[name] = value
        out.append(msg)
    return out


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise FieldError(f"{where}.tool_calls must be a list", "messages")
    return value


def tool_call(call, where: str) -> dict:
    """An assistant message's call: {id, type: function, function: {name, arguments: JSON text of an object}}."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
        raise FieldError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                         f"\"arguments\": a JSON string}}}}", "messages")
    try:
        args = json.loads(fn["arguments"] or "{}")
    except (ValueError, RecursionError):
        args = None
    if not isinstance(args, dict):
        raise FieldError(f"{where}.function.arguments must be the JSON text of an object", "messages")
    return {"id": str(call.get("id") or ""), "type": "function",
            "function": {"name": text(fn["name"], "messages"), "arguments": fn["arguments"]}}


def tools(body: dict) -> list[dict] | None:
    """The `tools` list: functions with a name, an optional description and JSON-schema parameters."""
    items = body.get("tools")
    if items is None:
        return None
    if not isinstance(items, list):
        raise FieldError("'tools' must be a list", "tools")
    try:  # the chat template recurses on the parameters' nesting
        check_depth(items, MAX_JSON_DEPTH, "tools")
    except ConfigError as e:
        raise FieldError(str(e), "tools") from None
    out = []
    for k, t in enumerate(items):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name.replace("_", "a").replace("-", "a").replace(".", "a").isalnum():
            raise FieldError(f"tools[{k}] must be {{\"type\": \"function\", \"function\": {{\"name\": letters, "
                             f"digits, _ . or -, ...}}}}", "tools")
        if not isinstance(fn.get("parameters", {}), dict) or not isinstance(fn.get("description", ""), str):
            raise FieldError(f"tools[{k}].function: parameters must be an object, description a string", "tools")
        out.append({"type": "function", "function": {"description": "", **fn}})
    return out


def tool_choice(body: dict, listed: list[dict] | None) -> str | None:
    """'auto', 'none', 'required' or the name of the function that must be called (None: auto)."""
    choice = body.get("tool_choice")
    names = [t["function"]["name"] for t in listed or ()]
    if choice is None or choice in ("auto", "none", "required"):
        if choice == "required" and not names:
            raise FieldError("'tool_choice' 'required' needs 'tools'", "tool_choice")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in names:
        raise FieldError(f"'tool_choice' must be auto, none, required or {{\"type\": \"function\", \"function\": "
                         f"{{\"name\": one of {names}}}}}, got {short(choice)}", "tool_choice")
    return name


def template_kwargs(body: dict) -> dict:
    """`chat_template_kwargs`: values the chat template reads (enable_thinking, say)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise FieldError("'chat_template_kwargs' must be an object of named values", "chat_template_kwargs")
    reserved = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "bos_token"})
    if reserved:
        raise FieldError(f"'chat_template_kwargs' may not set {reserved}", "chat_template_kwargs")
    return kwargs


def output_grammar(body: dict):
    """The one structured-output constraint of the request as (kind, source), or None."""
    found = [(name, body[name]) for name in GRAMMARS if body.get(name) is not None]
    specs = [spec for name, value in found if (spec := _grammar(name, value)) is not None]
    if len(specs) > 1:
        raise FieldError(f"one structured-output field at a time, got {[n for n, _ in found]}", found[1][0])
    return specs[0] if specs else None


def _grammar(name: str, value):
    if name == "response_format":
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return ("json_object", None)
        schema = value.get("json_schema", {}).get("schema") if kind == "json_schema" and \
            isinstance(value.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise FieldError("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                             "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                             name)
        return ("json_schema", schema)
    if name == "structured_outputs":
        keys = sorted(set(value) & {"json", "regex", "grammar", "choice"}) if isinstance(value, dict) else []
        if len(keys) != 1 or set(value) - set(keys):
            raise FieldError("'structured_outputs' takes one of json, regex, grammar or choice", name)
        return _grammar("guided_" + keys[0], value[keys[0]])
    if name in ("json_schema", "guided_json"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise FieldError(f"'{name}' must be a JSON schema", name) from None
        if not isinstance(value, dict):
            raise FieldError(f"'{name}' must be a JSON schema object", name)
        return ("json_schema", value)
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise FieldError(f"'{name}' must be a non-empty list of strings", name)
        return ("regex", "|".join(_regex_literal(text(c, name)) for c in value))
    if not isinstance(value, str) or not value:
        raise FieldError(f"'{name}' must be a non-empty string", name)
    if name == "guided_regex":
        return ("regex", text(value, name))
    return ("gbnf" if "::=" in value else "lark", text(value, name))


def _regex_literal(choice: str) -> str:
    """`choice` matched literally by a regex (the grammar engine's syntax: Rust's, which refuses escaped spaces)."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~" else c for c in choice)


def content(value, where: str) -> str | list:
    """A message's content: a string, or a list of text parts (joined); with image_url parts, a list of
    {"type": "image", "image": bytes or "file": a path} and {"type": "text", "text": ...} parts in their order."""
    if isinstance(value, str):
        return text(value, "messages")
    if not isinstance(value, list):
        raise FieldError(f"{where}.content must be a string or a list of content parts", "messages")
    parts = []
    for k, part in enumerate(value):
        at = f"{where}.content[{k}]"
        if not isinstance(part, dict):
            raise FieldError(f"{at} must be an object like {{\"type\": \"text\", \"text\": \"...\"}}", "messages")
        kind = part.get("type")
        if kind == "image_url":
            parts.append(image_url(part, at))
            continue
        if kind != "text":
            raise FieldError(f"{at}: content parts of type {short(kind)} are not supported (text, image_url)",
                             "messages")
        if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
            raise FieldError(f"{at} must be {{\"type\": \"text\", \"text\": a string}}", "messages")
        parts.append(text(part["text"], "messages"))
    if all(isinstance(p, str) for p in parts):
        return "".join(parts)
    return [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]


def file_path(url: str) -> str:
    """A file:// URL's path, percent-decoded (file:///a%20b.png is "/a b.png"; the host may be empty or localhost);
    a bare absolute path as it is."""
    if not url.startswith("file://"):
        return url
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FieldError(f"{short(url)}: a file URL names no other host than localhost", "messages")
    return unquote(parts.path)


def image_url(part: dict, at: str) -> dict:
    """An image_url part as an image part: the bytes of a data: URL (base64), or the path of a local file
    (file:// or an absolute path; the server reads it only under `serve --image-files DIR`). Nothing is ever
    fetched from a network."""
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise FieldError(f"{at} must be {{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}", "messages")
    if url.startswith(("file://", "/")):
        return {"type": "image", "file": file_path(url)}
    head, sep, data = url.partition(",")
    if not (url.startswith("data:") and sep and head.endswith(";base64")):
        raise FieldError(f"{at}: image URLs are data: URLs (data:image/png;base64,...) or local files; this server "
                         "fetches nothing", "messages")
    try:
        return {"type": "image", "image": base64.b64decode(data, validate=True)}
    except (binascii.Error, ValueError):
        raise FieldError(f"{at}: the data: URL is not valid base64", "messages") from None


def short(value) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."
