"""Structured output on a canvas: a grammar (JSON schema, regex, Lark or GBNF) enforced while it denoises.

The grammar engine is llguidance (the one llama.cpp, vLLM and SGLang build in): it computes the set of tokens a
grammar allows after a prefix lazily, in tens of microseconds, it can check a whole draft at once
(`validate_tokens`) and roll back what it consumed, which is what a canvas needs: the text is not written left
to right, every position changes at every step.

Per step, before the pass: the previous draft is walked left to right; each position's mask is what the grammar
allows after the draft's prefix, up to the first position the draft breaks (that one included). The masks go to
the device as bias rows (0 / -inf), deduplicated. After the pass: the new draft is checked; its valid prefix
ends at the first position that breaks the grammar, and from there on the canvas is re-noised (the guide
mechanism). At the step cap a canvas that still breaks it is repaired: its valid prefix is pinned, so every
further pass makes at least one more position valid. See docs/structured-output.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..runtime.filters import Filters

# compact separators, no free whitespace: a canvas is filled in parallel, and whitespace the grammar allows
# anywhere is what noise fills it with
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf")


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match: `kind` one of KINDS, `source` the schema (a dict or JSON text) or grammar."""

    kind: str
    source: object = None

    def compile(self) -> str:
        import llguidance

        M = llguidance.LLMatcher
        if self.kind == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "json_schema":
            schema = self.source
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ConfigError(f"json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ConfigError(f"json_schema must be a JSON object, got {type(schema).__name__}")
            return M.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"a {self.kind} grammar is a non-empty string")
        if self.kind == "regex":
            return M.grammar_from_regex(self.source)
        if self.kind == "lark":
            return M.grammar_from_lark(self.source)
        if self.kind == "gbnf":
            try:
                from llguidance.gbnf_to_lark import gbnf_to_lark

                return M.grammar_from_lark(gbnf_to_lark(self.source))
            except Exception as e:  # the converter raises on what it cannot parse
                raise ConfigError(f"the GBNF grammar does not parse: {e}") from None
        raise ConfigError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def check(self) -> str:
        """The compiled grammar, once the engine has parsed it (no model needed): a schema, regex or grammar it
        cannot use is a ConfigError that quotes the engine's message."""
        import llguidance

        grammar = self.compile()
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if failed:
            raise ConfigError(f"unsupported {self.kind}: {' '.join(m.strip() for m in messages)}")
        return grammar


def grammar_options(options: dict) -> dict:
    """`options` with the API's shorthands as one `grammar` GrammarSpec: json_schema= (a dict or JSON text),
    regex=, grammar= (a GrammarSpec, or Lark text; GBNF when it has `::=`)."""
    options = dict(options)
    given = {k: options.pop(k) for k in ("json_schema", "regex") if options.get(k) is not None}
    if options.get("grammar") is not None:
        given["grammar"] = options.pop("grammar")
    if len(given) > 1:
        raise ConfigError(f"one output grammar at a time, got {', '.join(sorted(given))}")
    for key, value in given.items():
        if key == "grammar" and isinstance(value, str):
            value = GrammarSpec("gbnf" if "::=" in value else "lark", value)
        elif key != "grammar":
            value = GrammarSpec(key, value)
        options["grammar"] = value
    return options


def tokenizer(model):
    """The model's vocabulary as llguidance sees it (built once per model: O(n_vocab) pieces)."""
    cached = getattr(model, "_ll_tokenizer", None)
    if cached is not None:
        return cached
    import llguidance

    pieces = [b"\xff" + model.token_piece(t, special=True) if model.is_control(t) else model.token_piece(t)
              for t in range(model.n_vocab)]
    by_bytes = {p: t for t, p in reversed(list(enumerate(pieces))) if p and p[0] != 0xFF}
    longest = max(map(len, by_bytes), default=1)

    class Vocab:  # llguidance's TokenizerWrapper protocol
        eos_token_id = model.eos_ids[0] if model.eos_ids else 0
        bos_token_id = None
        tokens = pieces
        special_token_ids = [t for t in range(model.n_vocab) if model.is_control(t)]

        def __call__(self, data: bytes) -> list[int]:
            # greedy longest pieces: the grammar engine needs ids whose bytes are exactly `data` (llama.cpp's own
            # tokenizer may spell a character through byte tokens of another one, e.g. ' ' as the bytes of U+2581)
            out, i = [], 0
            while i < len(data):
                for n in range(min(longest, len(data) - i), 0, -1):
                    t = by_bytes.get(data[i:i + n])
                    if t is not None:
                        out.append(t)
                        i += n
                        break
                else:
                    raise ConfigError(f"the vocabulary cannot spell byte {data[i]:#04x}")
            return out

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocab()), n_vocab=model.n_vocab,
                                 eos_token=list(model.eos_ids) or None)
    model._ll_tokenizer = tok
    return tok


class CanvasGrammar:
    """One generation's grammar: its matcher follows the committed output; each block's canvas is masked and
    checked against it."""

    def __init__(self, model, spec: GrammarSpec, eos_ids):
        import llguidance

        self.n_vocab, self.eos = model.n_vocab, np.asarray(sorted(eos_ids), dtype=np.int64)
        self.matcher = llguidance.LLMatcher(tokenizer(model), spec.compile(), log_level=0)
        if self.matcher.is_error():
            raise ConfigError(f"unsupported {spec.kind}: {self.matcher.get_error()}")

    def valid_prefix(self, draft: np.ndarray) -> int:
        """Positions of `draft` from its start that the grammar allows (an EOS it allows ends the check: what
        follows is cut off)."""
        tokens = [int(t) for t in draft]
        n = self.matcher.validate_tokens(tokens)
        hits = np.flatnonzero(np.isin(draft[:n], self.eos))
        return len(tokens) if len(hits) else n

    def filters(self, draft: np.ndarray, base: Filters | None) -> Filters:
        """`base` with a mask per position, from walking `draft`: what the grammar allows after its prefix, up to
        and including the first position the draft breaks; positions past that are left free."""
        rows: dict[bytes, int] = {}
        index = np.full(len(draft), -1, dtype=np.int32)
        masks = []
        consumed = 0
        for i, t in enumerate(draft):
            bits = self.matcher.compute_bitmask()
            row = rows.get(bits)
            if row is None:
                row = rows[bits] = len(masks)
                masks.append(bits)
            index[i] = row
            t = int(t)
            # a token the mask refuses is never consumed: a matcher that consumed one stays in error for good
            if not (bits[t >> 3] >> (t & 7)) & 1 or t in self.eos or not self.matcher.consume_token(t):
                break
            consumed += 1
        self.matcher.rollback(consumed)
        bias = np.stack([self._row(b) for b in masks])
        k, p, m = (base.top_k, base.top_p, base.min_p) if base is not None else (0, 1.0, 0.0)
        return Filters(k, p, m, bias, index)

    def _row(self, bits: bytes) -> np.ndarray:
        allowed = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")[: self.n_vocab]
        return np.where(allowed.astype(bool), np.float32(0), np.float32(-np.inf)).astype(np.float32)

    def commit(self, tokens) -> None:
        """A finished block's tokens (up to an EOS): the matcher moves past them."""
        tokens = [int(t) for t in tokens]
        self.matcher.consume_tokens(tokens[: self.matcher.validate_tokens(tokens)])

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()
