"""Gemma 4's output channels: the thinking block, tool calls and the answer, split out of the generated text; and
OpenAI-style messages (tool calls with JSON arguments, `tool` results) put into the shape its chat template reads.

The syntax, as the GGUF's template writes it:

    <|channel>thought\n ... <channel|>                        the thinking block (reasoning)
    <|tool_call>call:NAME{key:value,...}<tool_call|>          a call; values: <|"|>text<|"|>, numbers,
                                                             true/false/null, {key:value}, [value,...]
    <|tool_response>response:NAME{key:value}<tool_response|>  a result, inside the model's turn

A call whose arguments do not parse stays in the text: the caller sees what the model wrote, never an error.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .sampler import stop_holdback

THINK_OPEN, THINK_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
QUOTE = '<|"|>'
_CALL = re.compile(re.escape(CALL_OPEN) + r"call:([A-Za-z_][\w.\-]*)\{")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI's function.arguments
    id: str = ""


@dataclass
class Output:
    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def split(text: str, *, tools: bool = True) -> Output:
    """The reasoning, the tool calls (when `tools`) and the remaining text of a whole reply."""
    reasoning, text = _reasoning(text)
    calls: list[ToolCall] = []
    if tools:
        kept, last = [], 0
        for start, end, name, args in _calls(text):
            kept.append(text[last:start])
            calls.append(_tool_call(name, args))
            last = end
        text = "".join(kept) + text[last:]
    return Output(text.strip() if calls else text, reasoning, calls)


def _tool_call(name: str, args: dict) -> ToolCall:
    return ToolCall(name, json.dumps(args, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")


def _calls(text: str):
    """(start, end, name, arguments) of each call in `text` whose arguments parse; the arguments are read by the
    parser (not up to the first "}<tool_call|>"), so a string argument may hold any text but the quote."""
    i = 0
    while (m := _CALL.search(text, i)) is not None:
        try:
            args, j = _object(text, m.end(), close="}")
        except (ValueError, IndexError):
            args, j = None, m.end()
        if args is None or not text.startswith("}" + CALL_CLOSE, j):
            i = m.end()  # left in the text
            continue
        i = j + 1 + len(CALL_CLOSE)
        yield m.start(), i, m.group(1), args


def _reasoning(text: str) -> tuple[str | None, str]:
    """The thought block and the rest. The template opens it first in the model's turn: a marker further on is
    the reply's own text (a string of a structured answer may hold any token the grammar allows)."""
    if not _thinks(text):
        return None, text
    start = text.find(THINK_OPEN)
    end = text.find(THINK_CLOSE, start)
    inner = text[start + len(THINK_OPEN): end if end >= 0 else len(text)]
    inner = inner[len("thought"):] if inner.startswith("thought") else inner
    rest = text[end + len(THINK_CLOSE):] if end >= 0 else ""  # before the block: whitespace, nothing
    return inner.strip("\n"), rest.lstrip("\n")


def _thinks(text: str) -> bool:
    return text.lstrip().startswith(THINK_OPEN)


class StreamSplitter:
    """`split` over text that arrives in pieces: feed() returns (reasoning, content) deltas that are final; a
    tool call or an open thinking block is held back until it closes. finish() returns the last deltas and the
    whole Output."""

    def __init__(self, *, tools: bool = True):
        self.tools, self.text = tools, ""
        self.sent_reasoning, self.sent_content = "", ""
        self.sent_calls: list[ToolCall] = []  # calls given out before the end (new_calls), in order

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        reasoning, content = self._visible()
        return self._deltas(reasoning, content)

    def finish(self) -> tuple[str, str, Output]:
        """The last deltas and the whole Output; its first len(sent_calls) calls are those given out, ids kept."""
        out = split(self.text, tools=self.tools)
        for call, sent in zip(out.tool_calls, self.sent_calls):
            call.id = sent.id
        r, c = self._deltas(out.reasoning or "", out.content)
        return r, c, out

    def new_calls(self) -> list[ToolCall]:
        """The calls closed since the last look, final already: each one's text ends with its <tool_call|>, and
        no call's start before it is still open (an open call's string may hold what looks like a later call)."""
        if not self.tools:
            return []
        _, text = _reasoning(self.text)  # an open thought: "" (nothing after it yet)
        found, last = [], 0
        for start, end, name, args in _calls(text):
            if CALL_OPEN in text[last:start]:  # a call start skipped: open, or text; decided at the end
                break
            found.append((name, args))
            last = end
        new = [_tool_call(name, args) for name, args in found[len(self.sent_calls):]]
        self.sent_calls += new
        return new

    def _visible(self) -> tuple[str, str]:
        text = self.text
        if self.tools and CALL_OPEN in text:  # nothing after a call's start until the reply ends
            text = text[: text.find(CALL_OPEN)]
        # a tail that may still become a marker waits for the next piece ("<|channel>thou" is not reasoning yet)
        cut = stop_holdback(text, (THINK_OPEN + "thought\n", THINK_CLOSE, CALL_OPEN))
        text = text[: len(text) - cut]
        reasoning, content = _reasoning(text)
        if _thinks(text) and THINK_CLOSE not in text:
            content = ""
        return reasoning or "", content.rstrip() if self.tools else content

    def _deltas(self, reasoning: str, content: str) -> tuple[str, str]:
        r = reasoning[len(self.sent_reasoning):] if reasoning.startswith(self.sent_reasoning) else ""
        c = content[len(self.sent_content):] if content.startswith(self.sent_content) else ""
        self.sent_reasoning += r
        self.sent_content += c
        return r, c


# -- the argument syntax ------------------------------------------------------------------------------------------

def parse_arguments(body: str):
    """`key:value,...` (the inside of a call's braces) as a dict, or None when it does not parse."""
    try:
        value, i = _object(body, 0, close=None)
    except (ValueError, IndexError):
        return None
    return value if i == len(body) else None


def _object(s: str, i: int, close: str | None):
    out = {}
    while i < len(s) and s[i] != close:
        if s.startswith(QUOTE, i):
            key, i = _string(s, i)
        else:
            m = re.compile(r"[^:{}\[\],]+").match(s, i)
            if not m:
                raise ValueError(f"a key at {i}")
            key, i = m.group(0), m.end()
        if s[i] != ":":
            raise ValueError(f"':' at {i}")
        out[key], i = _value(s, i + 1)
        if i < len(s) and s[i] == ",":
            i += 1
    return out, i


def _value(s: str, i: int):
    if s.startswith(QUOTE, i):
        return _string(s, i)
    if s[i] == "{":
        value, i = _object(s, i + 1, "}")
        return value, i + 1
    if s[i] == "[":
        items, i = [], i + 1
        while s[i] != "]":
            item, i = _value(s, i)
            items.append(item)
            if s[i] == ",":
                i += 1
        return items, i + 1
    m = re.compile(r"[^,}\]]+").match(s, i)
    if not m:
        raise ValueError(f"a value at {i}")
    word = m.group(0).strip()
    words = {"true": True, "false": False, "null": None, "None": None, "True": True, "False": False}
    if word in words:
        return words[word], m.end()
    return json.loads(word), m.end()  # a number; anything else does not parse


def _string(s: str, i: int):
    end = s.find(QUOTE, i + len(QUOTE))
    if end < 0:
        raise ValueError("an unclosed string")
    return s[i + len(QUOTE): end], end + len(QUOTE)


# -- OpenAI messages into the template's shape -----------------------------------------------------------------

def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls with their arguments as objects, and each run of `tool` messages folded into the
    assistant message before it as `tool_responses` (the template writes them inside the model's turn)."""
    out: list[dict] = []
    names: dict[str, str] = {}
    for msg in messages:
        msg = dict(msg)
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                fn = dict(call.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    fn["arguments"] = json.loads(fn["arguments"] or "{}")
                names[call.get("id") or ""] = fn.get("name", "")
                calls.append({**call, "function": fn})
            msg["tool_calls"] = calls
        if msg.get("role") == "tool":
            host = out[-1] if out and out[-1].get("role") == "assistant" else None
            if host is None:
                host = {"role": "assistant", "content": ""}
                out.append(host)
            host.setdefault("tool_responses", []).append(
                {"name": names.get(msg.get("tool_call_id") or "", msg.get("name") or "unknown"),
                 "response": _result(msg.get("content"))})
            continue
        out.append(msg)
    return out


def _result(content):
    """A tool's result: a JSON object as itself, anything else as its text."""
    if isinstance(content, list):  # text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if isinstance(content, str):
        try:
            value = json.loads(content)
        except ValueError:
            return content
        return value if isinstance(value, dict) else content
    return content
