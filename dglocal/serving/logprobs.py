"""Log-probabilities in OpenAI's shapes: a request's fields read, and a generation's TokenLogprob entries written as
chat's `logprobs.content` or the legacy completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`.

The values are the model's own distribution at each output position (softcapped logits at temperature 1, no filter
or mask: llama-server's n_probs and vLLM's raw logprobs), from the last pass of the token's canvas, selected on the
device (dglocal.generation.events.TokenLogprob). A value JSON cannot carry (-inf: a probability that underflows)
or one not known is written as -9999.0, the number OpenAI uses.
"""

from __future__ import annotations

import math

from ..generation.events import TokenLogprob
from ..generation.loop import MAX_LOGPROBS
from . import schema

FLOOR = -9999.0


def requested(body: dict, chat: bool) -> int | None:
    """How many of the most likely ids each token lists (0: the token's own only), or None: no logprobs. Chat:
    `logprobs` true and `top_logprobs` 0 to 20; completions: `logprobs` 0 to 20 (OpenAI's 5, vLLM's 20)."""
    if not chat:
        value = body.get("logprobs")
        if value is None:
            return None
        return schema.checked_number(value, "logprobs", int, 0, MAX_LOGPROBS)
    wanted = schema.flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        top = schema.checked_number(top, "top_logprobs", int, 0, MAX_LOGPROBS)
        if not wanted:
            raise schema.FieldError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def _value(lp: float | None) -> float:
    return FLOOR if lp is None or not math.isfinite(lp) else max(lp, FLOOR)


def _token(model, token: int) -> tuple[str, list[int]]:
    piece = model.token_piece(token, special=True)
    return piece.decode("utf-8", "replace"), list(piece)


def chat_content(model, entries: list[TokenLogprob]) -> list[dict]:
    """`choices[].logprobs.content`: one object a token, with its `top_logprobs`."""
    out = []
    for e in entries:
        text, raw = _token(model, e.token)
        top = [dict(zip(("token", "bytes"), _token(model, t)), logprob=_value(lp)) for t, lp in e.top]
        out.append({"token": text, "logprob": _value(e.logprob), "bytes": raw, "top_logprobs": top})
    return out


def chat(model, entries: list[TokenLogprob] | None) -> dict | None:
    return None if entries is None else {"content": chat_content(model, entries), "refusal": None}


def completion(model, entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """The legacy completions object; `offset`: the text's length before these tokens (text_offset counts from
    the completion's start)."""
    if entries is None:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text, _ = _token(model, e.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(_value(e.logprob))
        out["top_logprobs"].append({_token(model, t)[0]: _value(lp) for t, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
