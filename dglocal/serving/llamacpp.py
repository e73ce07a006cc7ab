"""llama-server's own routes beside the OpenAI ones, in its shapes (tools/server/README.md of the pinned llama.cpp):

    POST /tokenize     {"content", "add_special", "parse_special", "with_pieces"} -> {"tokens": [ids or {id, piece}]}
    POST /detokenize   {"tokens"} -> {"content"}
    GET  /props        the server's settings: default_generation_settings, total_slots, model_path, chat_template, ...

As on every route, a field these do not take is a 400 naming it (llama-server ignores it), and so is a token id
that is not an integer or lies outside the vocabulary (llama-server's behaviour there is undefined).
"""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version as package_version

from fastapi import Request as HttpRequest

from dglocal.generation.config import GenerationConfig
from dglocal.runtime import upstream
from dglocal.serving import schema

MAX_TEXT = 1 << 22  # bytes of text tokenized at once: a 64 MiB body's ids would take gigabytes as Python ints
MAX_IDS = 1 << 20  # token ids in one /detokenize (or one /tokenize content list)


def add_routes(app, service) -> None:
    """Register the routes on `app`; `service` (serving.app.Service) holds the frontend and the engine."""
    from dglocal.serving.app import read_body  # serving.app imports this module

    model = service.frontend.model

    @app.post("/tokenize")
    async def tokenize(request: HttpRequest):
        body = schema.parse_body(await read_body(request))
        return await asyncio.to_thread(tokenized, model, body)  # a few MiB of text: off the event loop

    @app.post("/detokenize")
    async def detokenize(request: HttpRequest):
        body = schema.parse_body(await read_body(request))
        return await asyncio.to_thread(detokenized, model, body)

    @app.get("/props")
    async def get_props():
        return properties(service)  # the adapters' default scales change (POST /lora-adapters)


def tokenized(model, body: dict) -> dict:
    """/tokenize: `content` (text, or a list of texts and token ids, as llama-server's tokenize_mixed) as ids, or
    with `with_pieces` as {"id", "piece"}: the piece's text, or its bytes where they are not valid UTF-8."""
    schema.check_names(body, schema.TOKENIZE, {}, "/tokenize")
    add_special = bool(schema.flag(body, "add_special"))  # llama-server's defaults: false, true, false
    parse_special = schema.flag(body, "parse_special") is not False
    with_pieces = bool(schema.flag(body, "with_pieces"))
    content = body.get("content")
    if content is None:
        raise schema.FieldError("'content' is required: the text to tokenize", "content")
    if not isinstance(content, (str, list)):
        raise schema.FieldError(f"'content' must be a string or a list of strings and token ids, got "
                                f"{schema.short(content)}", "content")
    parts = content if isinstance(content, list) else [content]
    if len(parts) > MAX_IDS:
        raise schema.FieldError(f"'content' holds {len(parts)} items, over {MAX_IDS}", "content")
    tokens, size = [], 0
    for k, part in enumerate(parts):
        where = "content" if isinstance(content, str) else f"content[{k}]"
        if isinstance(part, str):
            size += len(schema.text(part, "content").encode("utf-8"))
            if size > MAX_TEXT:
                raise schema.FieldError(f"'content' holds over {MAX_TEXT} bytes of text: tokenize it in parts",
                                        "content")
            # only a first text gets the BOS, as llama-server
            tokens += model.tokenize(part, add_special=add_special and k == 0, parse_special=parse_special)
        else:
            tokens.append(token_id(part, where, model.n_vocab))
    if len(tokens) > MAX_IDS:
        raise schema.FieldError(f"'content' is {len(tokens)} tokens, over {MAX_IDS}: tokenize it in parts", "content")
    if not with_pieces:
        return {"tokens": tokens}
    return {"tokens": [{"id": t, "piece": piece(model.token_piece(t, special=True))} for t in tokens]}


def detokenized(model, body: dict) -> dict:
    """/detokenize: `tokens` as text, each token's piece (special tokens as their text), as llama-server joins them;
    bytes that are not valid UTF-8 become U+FFFD. No `tokens`: "" (llama-server's)."""
    schema.check_names(body, schema.DETOKENIZE, {}, "/detokenize")
    tokens = body.get("tokens")
    if tokens is None:
        return {"content": ""}
    if not isinstance(tokens, list):
        raise schema.FieldError(f"'tokens' must be a list of token ids, got {schema.short(tokens)}", "tokens")
    if len(tokens) > MAX_IDS:
        raise schema.FieldError(f"'tokens' holds {len(tokens)} ids, over {MAX_IDS}: detokenize them in parts",
                                "tokens")
    ids = [token_id(t, f"tokens[{k}]", model.n_vocab) for k, t in enumerate(tokens)]
    return {"content": model.detokenize(ids, special=True)}


def token_id(value, where: str, n_vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise schema.FieldError(f"{where} must be a token id (an integer), got {schema.short(value)}",
                                where.split("[")[0])
    if not 0 <= value < n_vocab:
        raise schema.FieldError(f"{where} is {schema.short(value)}: outside the vocabulary [0, {n_vocab})",
                                where.split("[")[0])
    return value


def piece(data: bytes) -> str | list[int]:
    """A token's piece as llama-server gives it: its text, or its bytes where they are not valid UTF-8 alone."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


def properties(service) -> dict:
    """GET /props: llama-server's fields that have a meaning here. `params` are what a request that sets nothing
    gets (the server's defaults over the GGUF's): dglocal's names where it has its own, llama-server's where they
    mean the same; -1 for the seed (a fresh one per request) and for the length (to the end or the slot's context)."""
    frontend, model = service.frontend, service.frontend.model
    config = GenerationConfig.from_metadata(model.metadata, **frontend.defaults)
    params = {"seed": -1, "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
              "min_p": config.min_p, "n_predict": -1, "max_tokens": -1, "stop": list(config.stop),
              "ignore_eos": False, "stream": False, "n_probs": 0,
              **{name: getattr(config, name) for name in ("max_denoising_steps", "entropy_bound", "t_min", "t_max",
                                                          "stability_threshold", "confidence_threshold")},
              "lora": [{"id": a["id"], "scale": a["scale"]} for a in model.adapters.info()]}
    vocab = model.metadata.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str:
        i = model.metadata.get(key)
        return str(vocab[i]) if isinstance(i, int) and 0 <= i < len(vocab) else ""

    return {
        "default_generation_settings": {"params": params, "n_ctx": model.n_ctx},
        "total_slots": len(service.engine.slots),
        "model_alias": frontend.id,
        "model_path": str(model.path),
        "modalities": {"vision": getattr(model, "vision", None) is not None, "video": False, "audio": False},
        "endpoint_slots": True, "endpoint_props": False, "endpoint_metrics": True,
        "chat_template": model.chat_template or "",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "build_info": f"dglocal {_version()} on llama.cpp of {upstream.PACKAGE} {upstream.VERSION}, patched",
        "is_sleeping": False,
    }


def _version() -> str:
    try:
        return package_version("dglocal")
    except PackageNotFoundError:
        return "unknown"
