"""Tool calls valid by construction: a Lark grammar (llguidance, as for structured output) of the replies whose
calls are written in Gemma 4's syntax (channels.py) and whose arguments hold to each tool's `parameters` schema.

    spec = reply_grammar(tools, "required")                  # one or more calls, nothing else
    spec = reply_grammar(tools, "auto", parallel=False)      # free text, or text then one call
    spec = reply_grammar(tools, "auto", answer=json_spec)    # calls, or the structured answer

The arguments are Gemma's syntax, not JSON: strings are <|"|>text<|"|>, keys are bare, and the keys of an object
come in the order the chat template writes them (its `dictsort`: by name, case folded), which is the order the
model was trained on. The JSON-schema subset converted is what tools use: type (and lists of types, `nullable`),
properties, required, additionalProperties, enum, const, items, minItems/maxItems, anyOf/oneOf, allOf and $ref
(merged where they combine), $defs/definitions, minLength/maxLength/pattern, and minimum/maximum/multipleOf
(through the engine's own JSON numbers). Anything else that constrains a value is a ConfigError naming the tool;
annotations (description, title, default, format, ...) are ignored, as jsonschema's validator does. Two readings
are looser or stricter than the schema: oneOf is read as anyOf (a value two alternatives match passes), and a string
with a minLength and a bound past SHORT characters holds no "<" in its first minLength characters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import ConfigError
from .channels import CALL_CLOSE, CALL_OPEN, QUOTE, THINK_CLOSE, THINK_OPEN
from .grammar import MAX_JSON_DEPTH, GrammarSpec, check_lark, limits

UNSUPPORTED = ("not", "if", "then", "else", "patternProperties", "propertyNames", "dependentRequired",
               "dependentSchemas", "dependencies", "contains", "minContains", "maxContains", "unevaluatedProperties",
               "unevaluatedItems", "prefixItems", "additionalItems")
NUMERIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
# what a schema keyword combines with: the keywords that constrain a value (the rest are annotations)
VALIDATION = ("$ref", "allOf", "anyOf", "oneOf", "type", "nullable", "enum", "const", "properties", "required",
              "additionalProperties", "items", "minItems", "maxItems", "uniqueItems", "minProperties",
              "maxProperties", "minLength", "maxLength", "pattern", *NUMERIC, *UNSUPPORTED)
MAX_MERGES = 64  # allOf parts and $refs beside other keywords merged into one schema
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")

# a string: the quote, then text that ends at its first quote (a lazy lexeme, which holds no quote by construction)
_QL = json.dumps(QUOTE)
_Q = re.escape(QUOTE)
# text with a count of characters and no quote, for minLength (and maxLength beside it) and patterns: the count
# intersected with "no quote"; past SHORT characters that costs the engine more fuel than it has
_NO_QUOTE = f"~/{_Q}(?s:.*){_Q}(?s:.*){_Q}/"
SHORT = 256
# null: the template writes Python's None, which channels reads as null does.
# 18 digits: every value fits a 64-bit integer, and a canvas filled with noise cannot run a number on for ever
GENERIC = "\n".join([
    f'value: {_QL} chars | NUMBER | "true" | "false" | NULL | obj | arr',
    f"chars[suffix={_QL}]: /(?s:.*)/",
    'obj: "{" [pair ("," pair)*] "}"',
    'pair: KEY ":" value',
    'arr: "[" [value ("," value)*] "]"',
    "KEY: /[A-Za-z_][A-Za-z0-9_]*/",
    "INT: /-?(0|[1-9][0-9]{0,17})/",
    'NULL: "null" | "None"',
    r"NUMBER: /-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][+-]?[0-9]{1,2})?/",
])


@dataclass(frozen=True)
class ReplyGrammar(GrammarSpec):
    """A Lark grammar of the reply; with `answer`, its `@answer` is that grammar (any kind), compiled as the engine
    compiles it alone and joined as a second grammar of the same request."""

    answer: GrammarSpec | None = None

    def compile(self) -> str:
        main = super().compile()
        if self.answer is None:
            return main
        other = self.answer.compile()
        # the engine's JSON (json_schema, regex) holds one grammar; Lark and GBNF compile to Lark text
        other = json.loads(other)["grammars"][0] if other.lstrip().startswith("{") else {"lark_grammar": other}
        return json.dumps({"grammars": [{"name": "reply", "lark_grammar": main}, {**other, "name": "answer"}],
                           "max_tokens": None})


def reply_grammar(tools: list[dict], choice: str = "required", *, parallel: bool = True,
                  answer: GrammarSpec | None = None, thinking: bool = False, loose: bool = False) -> ReplyGrammar:
    """The grammar of a reply to `tools` (OpenAI function tools). `choice`: "required" (one or more calls), a
    function's name (calls to it), or "auto": free text, or text and then calls (a call is held to its schema from
    its first token on); with `answer`, calls or that answer. `parallel` False: at most one call. `thinking`: a
    thought block may come first (the template's enable_thinking; free text already holds one). `loose`: a tool
    whose schema cannot be converted takes any arguments, instead of a ConfigError (whose `param` names it)."""
    named = [t for t in tools if t["function"]["name"] == choice] if choice not in ("auto", "required") else tools
    lines = ["calls: call" + (f' ("{CALL_OPEN}" call)*' if parallel else ""),
             "call: " + " | ".join(f"call{k}" for k in range(len(named)))]
    for k, tool in enumerate(named):
        lines += _tool_rules(tool, k, tools.index(tool), loose)
    thinking = thinking and (choice != "auto" or answer is not None)  # free text already holds a thought
    think = f'["{THINK_OPEN}" thought]' if thinking else ""
    if choice != "auto":
        start = f'start: {think} "{CALL_OPEN}" calls'
    elif answer is not None:
        start = f'start: {think} ("{CALL_OPEN}" calls | @answer)'
    else:  # lazy: the text before a call ends at its first CALL_OPEN (a greedy lexeme would run on through it)
        start = f'start: TEXT | text calls\ntext[suffix="{CALL_OPEN}"]: /(?s:.*)/\n' \
                f"TEXT: /(?s:.*)/ & ~/(?s:.*){re.escape(CALL_OPEN)}(?s:.*)/"
    thought = f'thought[suffix="{THINK_CLOSE}"]: /(?s:.*)/' if thinking else ""
    return ReplyGrammar("lark", "\n".join([start, thought, *lines, GENERIC]), answer)


def _tool_rules(tool: dict, k: int, index: int, loose: bool) -> list[str]:
    """The rule `call{k}` (the call after its CALL_OPEN) and those of its arguments; `index`: the tool's place in
    the request's list, which a ConfigError's `param` names."""
    fn = tool["function"]
    params = fn.get("parameters")
    rules = Rules(params if params is not None else {"type": "object", "properties": {}}, f"t{k}_",
                  f"tools[{index}] ({fn['name']})")
    try:
        body = rules.arguments()
        _engine_reads(f'start: {body}\n' + "\n".join([*rules.lines, GENERIC]), rules.fail)
    except ConfigError as e:
        if not loose:
            e.param = f"tools[{index}].function.parameters"
            raise
        rules, body = Rules({}, f"t{k}_", ""), '[pair ("," pair)*]'
    return [f'call{k}: "call:{fn["name"]}{{" {body} "}}{CALL_CLOSE}"', *rules.lines]


class Rules:
    """The Lark rules of one tool's arguments, from its parameters schema: a rule per object, array, alternation
    and $ref target (a recursive schema is a recursive grammar), leaves inline."""

    def __init__(self, root, prefix: str, where: str):
        self.root, self.prefix, self.where = root, prefix, where
        self.lines: list[str] = []
        self.refs: dict[str, str] = {}
        self.terminals: dict = {}  # a terminal's body, or ("lazy", a body), to its name

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}, so its calls cannot be held to its parameters schema")

    def arguments(self) -> str:
        """The inside of the call's braces: the parameters are an object."""
        s = self.flat(self.root, 0)
        for _ in range(MAX_MERGES):
            if set(s) == {"$ref"}:
                s = self.flat(self.target(s["$ref"]), 0)
        if set(s) == {"$ref"}:
            raise self.fail("its parameters are a $ref that only refers to itself")
        if s.get("type", "object") not in ("object", ["object"]) or {"anyOf", "oneOf", "enum", "const"} & set(s):
            raise self.fail("parameters must be an object schema (properties, required, additionalProperties)")
        return self.members(s, 0)

    def rule(self, body: str) -> str:
        if body == '""':  # nothing: no rule of its own
            return body
        name = f"{self.prefix}{len(self.lines)}"
        self.lines.append(f"{name}: {body}")
        return name

    def value(self, s, depth: int) -> str:
        """The Lark expression of a value that `s` allows."""
        if depth > MAX_JSON_DEPTH:  # only through merged $refs: their own nesting is checked with the tools'
            raise self.fail(f"its parameters nest more than {MAX_JSON_DEPTH} levels deep")
        if s is False:
            raise self.fail("a schema false allows no value")
        s = self.flat(s, depth)
        if set(s) == {"$ref"}:
            return self.ref(s["$ref"], depth)
        alternatives = s.get("anyOf", s.get("oneOf"))
        if alternatives is not None:
            rest = {k: v for k, v in s.items() if k not in ("anyOf", "oneOf")}
            if "anyOf" in s and "oneOf" in s or not isinstance(alternatives, list) or not alternatives:
                raise self.fail("anyOf/oneOf must be one non-empty list")
            return self.rule(" | ".join(self.value(merge(rest, a, self.fail), depth + 1) for a in alternatives))
        if "enum" in s or "const" in s:
            return self.literals(s)
        types = self.types(s)
        parts = [self.typed(s, t, depth) for t in types] if types else ["value"]
        return parts[0] if len(parts) == 1 else f"({' | '.join(parts)})"

    def flat(self, s, depth: int) -> dict:
        """`s` with its annotations dropped, its allOf and a $ref beside other keywords merged into one schema."""
        if s is True:
            return {}
        if depth > MAX_JSON_DEPTH:
            raise self.fail(f"its $refs and allOf merge more than {MAX_JSON_DEPTH} levels deep")
        if not isinstance(s, dict):
            raise self.fail(f"a schema is an object or a boolean, got {json.dumps(s)[:40]}")
        s = {k: v for k, v in s.items() if k in VALIDATION}
        bad = sorted(set(s) & set(UNSUPPORTED)) + (["uniqueItems"] if s.get("uniqueItems") else [])
        if bad:
            raise self.fail(f"{', '.join(bad)} cannot be expressed in its grammar")
        for _ in range(MAX_MERGES):
            if "allOf" in s:
                parts = s.pop("allOf")
                for part in parts if isinstance(parts, list) else [None]:
                    s = merge(s, self.flat(part, depth + 1) if part is not None else None, self.fail)
            elif "$ref" in s and len(s) > 1:
                s = merge({k: v for k, v in s.items() if k != "$ref"}, self.flat(self.target(s["$ref"]), depth + 1),
                          self.fail)
            else:
                return s
        raise self.fail(f"its $refs and allOf merge more than {MAX_MERGES} times")

    def target(self, ref):
        """The subschema a local $ref names ('#', '#/$defs/x', any JSON pointer into the parameters)."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise self.fail(f"$ref {json.dumps(ref)[:60]} is not a local reference")
        node = self.root
        for part in ref[2:].split("/") if ref != "#" else ():
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise self.fail(f"$ref {json.dumps(ref)[:60]} is not a local reference to a subschema")
        return node

    def ref(self, ref: str, depth: int) -> str:
        if ref not in self.refs:
            name = self.refs[ref] = f"{self.prefix}r{len(self.refs)}"
            self.lines.append(f"{name}: {self.value(self.target(ref), depth + 1)}")
        return self.refs[ref]

    def types(self, s: dict) -> list[str]:
        """The types `s` allows, from `type` (a name or a list), `nullable`, or the keywords it has."""
        t = s.get("type")
        types = [t] if isinstance(t, str) else list(t) if isinstance(t, list) else None
        if types is None:
            inferred = [name for name, keys in (
                ("object", ("properties", "required", "additionalProperties", "minProperties", "maxProperties")),
                ("array", ("items", "minItems", "maxItems")), ("string", ("minLength", "maxLength", "pattern")),
                ("number", NUMERIC)) if any(k in s for k in keys)]
            types = inferred or []
        if not all(x in TYPES for x in types):
            raise self.fail(f"type must be one of {', '.join(TYPES)} or a list of them, got {json.dumps(t)[:60]}")
        if s.get("nullable") is True and types and "null" not in types:
            types.append("null")
        return types

    def typed(self, s: dict, t: str, depth: int) -> str:
        if t == "object":
            return self.rule(f'"{{" {self.members(s, depth)} "}}"')
        if t == "array":
            return self.array(s, depth)
        if t == "string":
            return self.string(s)
        if t in ("integer", "number"):
            bounds = {k: s[k] for k in NUMERIC if k in s}
            if bounds:  # the engine's JSON number, which Gemma's syntax writes the same way
                return "%json " + json.dumps({"type": t, **bounds})
            return "INT" if t == "integer" else "NUMBER"
        return '("true" | "false")' if t == "boolean" else "NULL"

    def members(self, s: dict, depth: int) -> str:
        """An object's `key:value,...`: its properties in the template's order, the required ones always, the
        others optional; then extra keys where additionalProperties allows them (schemas with properties that
        say nothing of extra keys allow none, as grammar.closed reads them; one without any is any object)."""
        props = s.get("properties") or {}
        required = s.get("required") or []
        if not isinstance(props, dict) or not isinstance(required, list):
            raise self.fail("properties must be an object and required a list")
        missing = [k for k in required if k not in props]
        extra = s.get("additionalProperties", "properties" not in s)
        if missing and extra is False:
            raise self.fail(f"required {missing} are not among its properties")
        props = {**props, **{k: extra if isinstance(extra, dict) else True for k in missing}}
        least, most = self.count(s, "minProperties", 0), self.count(s, "maxProperties", None)
        if least > len(set(required)) or most is not None and (extra is not False or len(props) > most):
            raise self.fail("minProperties/maxProperties other than what required and properties already fix")
        more = None
        if extra is not False:
            names = [k for k in props if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
            key = self.terminal("KEY", f"/[A-Za-z_][A-Za-z0-9_]*/ & ~/({'|'.join(names)})/" if names else None)
            more = f'{key} ":" {self.value(extra, depth + 1)}'
        # first: nothing written yet; after: each item after a comma
        first, after = (f'[{more} ("," {more})*]', f'("," {more})*') if more else ('""', '""')
        for name in sorted(props, key=lambda k: (k.lower(), k), reverse=True):
            pair = f'{_lark_literal(_key(name, self.fail) + ":")} {self.value(props[name], depth + 1)}'
            tail = self.rule(after)
            if name in required:
                first, after = f"{pair} {tail}", f'"," {pair} {tail}'
            else:
                rest = self.rule(first)
                first, after = f"{pair} {tail} | {rest}", f'"," {pair} {tail} | {tail}'
        return self.rule(first)

    def array(self, s: dict, depth: int) -> str:
        items = s.get("items", True)
        if isinstance(items, list):
            raise self.fail("items as a list (a tuple) cannot be expressed in its grammar")
        least, most = self.count(s, "minItems", 0), self.count(s, "maxItems", None)
        if most is not None and most < least:
            raise self.fail(f"minItems {least} / maxItems {most} allow no array")
        if most == 0:
            return '"[" "]"'
        item = self.rule(self.value(items, depth + 1))
        more = f'("," {item}){{{max(least - 1, 0)},{"" if most is None else most - 1}}}'
        return self.rule(f'"[" {item} {more} "]"' if least else f'"[" [{item} {more}] "]"')

    def string(self, s: dict) -> str:
        least, most, pattern = self.count(s, "minLength", 0), self.count(s, "maxLength", None), s.get("pattern")
        upper = "" if most is None else most
        if pattern is None and least == 0:
            return f"{_QL} " + ("chars" if most is None else self.lazy(f"(?s:.{{0,{most}}})"))
        if pattern is None and (least > SHORT or most is not None and most > SHORT):
            # no "<" in the first minLength characters: then no quote can be inside them
            return f"{_QL} " + self.lazy(f"[^<]{{{least}}}(?s:.{{0,{'' if most is None else most - least}}})")
        parts = [f"/{_Q}(?s:.{{{least},{upper}}}){_Q}/"]
        if pattern is not None:
            if not isinstance(pattern, str):
                raise self.fail("pattern must be a string")
            parts.append(f"/{_Q}{_search(pattern)}{_Q}/")
        return self.terminal("STR", " & ".join([*parts, _NO_QUOTE]))

    def lazy(self, body: str) -> str:
        """A rule of text matching `body` that ends at its first quote, the quote included."""
        key = ("lazy", body)
        if key not in self.terminals:
            self.terminals[key] = f"{self.prefix}s{len(self.terminals)}"
            self.lines.append(f"{self.terminals[key]}[suffix={_QL}]: /{body}/")
        return self.terminals[key]

    def count(self, s: dict, key: str, default):
        value = s.get(key, default)
        if value is not default and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise self.fail(f"{key} must be a count (an integer >= 0), got {json.dumps(value)[:40]}")
        return value

    def terminal(self, stem: str, body: str | None) -> str:
        """A named terminal (`&` and `~` combine terminals only), one per distinct body; None: the generic one."""
        if body is None:
            return stem
        if body not in self.terminals:
            self.terminals[body] = f"{self.prefix.upper()}{stem}{len(self.terminals)}"
            self.lines.append(f"{self.terminals[body]}: {body}")
        return self.terminals[body]

    def literals(self, s: dict) -> str:
        values = [s["const"]] if "const" in s else s["enum"]
        if not isinstance(values, list):
            raise self.fail("enum must be a list")
        types = self.types({k: v for k, v in s.items() if k in ("type", "nullable")})
        kept = [v for v in values if not types or any(_is(v, t) for t in types)]
        if not kept:
            raise self.fail(f"no value of enum/const {json.dumps(values)[:60]} has its type")
        return "(" + " | ".join("NULL" if v is None else _lark_literal(gemma(v, self.fail)) for v in kept) + ")"


def _engine_reads(lark: str, fail) -> None:
    """The grammar engine reads `lark` (a tool's arguments alone): a pattern in a syntax it lacks (a lookahead),
    bounds no number meets, ... are the tool's fault, named, before the reply's grammar is compiled."""
    import llguidance

    try:
        check_lark(lark, "its grammar")  # bounds, and a finite instance (a $ref loop has none)
    except ConfigError as e:
        raise fail(str(e)) from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(lark), limits=limits())
    if failed:  # the line that says what, rather than where
        lines = [line.strip() for m in messages for line in m.splitlines() if line.strip()]
        what = next((line for line in lines if line.startswith("error:")), lines[0] if lines else "unknown error")
        raise fail(f"the grammar engine cannot read it: {what[:300]}")


def merge(a: dict, b, fail) -> dict:
    """Two schemas a value must both satisfy, as one (allOf): their keywords together; properties and required
    joined; a keyword both give differently is a ConfigError (`fail`)."""
    if b is True or b == {}:
        return dict(a)
    if not isinstance(b, dict):
        raise fail("allOf parts and anyOf/oneOf alternatives must be schemas")
    out = dict(a)
    for k, v in b.items():
        if k == "required" and k in out:
            out[k] = [*out[k], *[x for x in v if x not in out[k]]]
        elif k == "properties" and k in out and not set(out[k]) & set(v):
            out[k] = {**out[k], **v}
        elif k in out and out[k] != v:
            raise fail(f"{k} given twice differently (in allOf or beside anyOf/oneOf/$ref) cannot be merged")
        else:
            out[k] = v
    return out


def gemma(value, fail) -> str:
    """A JSON value written as the chat template writes an argument (format_argument)."""
    if isinstance(value, str):
        if QUOTE in value or CALL_CLOSE in value:
            raise fail(f"the value {json.dumps(value)[:40]} holds {QUOTE} or {CALL_CLOSE}, which a call cannot")
        return QUOTE + value + QUOTE
    if isinstance(value, bool) or value is None:  # None: jinja writes Python's None (the reader takes null too)
        return {True: "true", False: "false", None: "None"}[value]
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise fail(f"{value} is not a JSON number")
        return json.dumps(value)
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (k.lower(), k))
        return "{" + ",".join(f"{_key(k, fail)}:{gemma(value[k], fail)}" for k in keys) + "}"
    return "[" + ",".join(gemma(v, fail) for v in value) + "]"


def _key(name: str, fail) -> str:
    """A key as written bare (the template's way) where channels' reader can read it so, else quoted."""
    if QUOTE in name:
        raise fail(f"the key {json.dumps(name)[:40]} holds {QUOTE}")
    return name if re.fullmatch(r"[^:{}\[\],]+", name) else QUOTE + name + QUOTE


def _is(value, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    kinds = {"string": str, "boolean": bool, "object": dict, "array": list}
    return value is None if t == "null" else isinstance(value, kinds[t])


def _lark_literal(text: str) -> str:
    """A Lark string literal; text with control characters other than \\n \\t \\r as a regex (the Lark reader takes
    no \\u escapes)."""
    if not any(ord(c) < 32 and c not in "\n\t\r" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return "/" + "".join(f"\\x{{{ord(c):x}}}" if ord(c) < 32 else "\\" + c if c in _META else c for c in text) + "/"


_META = set("\\.+*?()|[]{}^$#&-~/")


def _search(pattern: str) -> str:
    """A JSON-schema pattern (a search, unanchored) as a regex of the whole text: ^ and $ at its ends dropped,
    any text allowed where they are not."""
    body = pattern.replace("/", "\\/")
    head = body.startswith("^")
    tail = body.endswith("$") and not body.endswith("\\$")
    body = body[1 if head else 0: len(body) - 1 if tail else len(body)]
    return f"{'' if head else '(?s:.*)'}(?:{body}){'' if tail else '(?s:.*)'}"
