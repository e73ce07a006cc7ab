"""The OpenAI request body, checked field by field before anything else sees it. Each field is either supported
(its type and range checked here, then the generation settings' own checks) or refused with a 400 that names it:
nothing is silently ignored. docs/serving.md lists the same fields.

Numbers are checked without float conversion first (an integer of hundreds of digits is a 400, not an overflow),
strings for lone surrogates (they cannot be encoded for the tokenizer), and bodies nested too deeply for the JSON
parser are refused whole.
"""

from __future__ import annotations

import json
import math

from dglocal.generation.config import MAX_STEPS
from dglocal.runtime.checks import MAX_TEMPERATURE

MAX_TOKENS = 2**31 - 1

# supported fields: (type, lowest, highest)
NUMBERS = {
    "max_tokens": (int, 1, MAX_TOKENS), "max_completion_tokens": (int, 1, MAX_TOKENS), "seed": (int, -1, 2**64 - 1),
    "n": (int, 1, 1),
    # the diffusion sampler's settings (extra body fields)
    "max_denoising_steps": (int, 1, MAX_STEPS), "stability_threshold": (int, 0, MAX_STEPS),
    "entropy_bound": (float, 0, 1e9), "confidence_threshold": (float, 0, 1e9),
    "t_min": (float, 0, MAX_TEMPERATURE), "t_max": (float, 0, MAX_TEMPERATURE),
}
DIFFUSION = ("max_denoising_steps", "stability_threshold", "entropy_bound", "confidence_threshold", "t_min", "t_max")
FLAGS = ("stream", "ignore_eos", "cache_prompt")
OTHER = ("model", "messages", "prompt", "stop", "stream_options", "user")
STREAM_OPTIONS = ("include_usage", "include_drafts")
# fields with one accepted value, the value OpenAI means by default; any other is refused with the reason
NEUTRAL = {
    "temperature": (1, "this sampler's temperatures are t_min / t_max (and entropy_bound sets how much is kept)"),
    "top_p": (1, "the diffusion sampler draws from the whole distribution"),
    "frequency_penalty": (0, "penalties over earlier tokens do not apply to a canvas denoised in parallel"),
    "presence_penalty": (0, "penalties over earlier tokens do not apply to a canvas denoised in parallel"),
    "logprobs": (False, "log-probabilities are not returned"),
}
REFUSED = {
    "tools": "tool calls are not supported yet", "tool_choice": "tool calls are not supported yet",
    "functions": "function calls are not supported", "function_call": "function calls are not supported",
    "response_format": "structured output is not supported yet", "logit_bias": "logit_bias is not supported",
    "top_logprobs": "log-probabilities are not returned", "top_k": "top_k is not supported yet",
    "min_p": "min_p is not supported yet", "suffix": "suffix (infilling) is not supported yet",
    "echo": "echo is not supported", "best_of": "best_of is not supported", "audio": "audio is not supported",
    "modalities": "only text is supported", "parallel_tool_calls": "tool calls are not supported yet",
    "reasoning_effort": "reasoning is not supported yet",
}
ACCEPTED = {*NUMBERS, *FLAGS, *OTHER, *NEUTRAL}
ROLES = ("system", "user", "assistant", "developer")


class FieldError(ValueError):
    """A 400: the message names the field (param)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FieldError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise FieldError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise FieldError("the request body must be a JSON object")
    return body


def number(body: dict, name: str):
    """A NUMBERS field of the body, checked; None when absent."""
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


def check_fields(body: dict) -> None:
    """Unknown fields, refused fields and fields with only their neutral value accepted."""
    for name, reason in REFUSED.items():
        if name in body:
            raise FieldError(f"'{name}' is not supported: {reason}", name)
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        raise FieldError(f"unknown field(s) {unknown}", unknown[0])
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


def messages(body: dict) -> list[dict]:
    """The chat messages as {role, content} with text content; other message shapes and content types are
    refused (naming the message)."""
    items = body.get("messages")
    if not isinstance(items, list) or not items:
        raise FieldError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            hint = ": tool messages are not supported yet" if role == "tool" else ""
            raise FieldError(f"{where} needs a role (system, user, assistant or developer){hint}", "messages")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise FieldError(f"{where} has field(s) {extra} this server does not support", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content(m.get("content"),
                                                                                                    where)})
    return out


def content(value, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
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
        if kind != "text":
            raise FieldError(f"{at}: content parts of type {short(kind)} are not supported (text only)", "messages")
        if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
            raise FieldError(f"{at} must be {{\"type\": \"text\", \"text\": a string}}", "messages")
        parts.append(text(part["text"], "messages"))
    return "".join(parts)


def short(value) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."
