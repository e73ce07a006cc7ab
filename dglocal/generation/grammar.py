"""Structured output on a canvas: a grammar (JSON schema, regex, Lark or GBNF) enforced while it denoises.

The grammar engine is llguidance (the one llama.cpp, vLLM and SGLang build in): it computes the set of tokens a
grammar allows after a prefix lazily, in tens of microseconds, it can check a whole draft at once
(`validate_tokens`) and roll back what it consumed, which is what a canvas needs: the text is not written left
to right, every position changes at every step.

Per step, before the pass: the previous draft is walked left to right; each position's mask is what the grammar
allows after the draft's prefix, up to the first position the draft breaks (that one included). The masks go to
the device as packed bit rows (llguidance's own, 1 bit a token), deduplicated; the device expands them. After the pass: the new draft is checked; its valid prefix
ends at the first position that breaks the grammar, and from there on the canvas is re-noised (the guide
mechanism). At the step cap a canvas that still breaks it is repaired: its valid prefix is pinned, so every
further pass makes at least one more position valid. With an answer budget (max_tokens, or the context's room),
the masks near its end keep a way to close the grammar within it, and a draft that leaves none is cut back to where
it still had one (dglocal.generation.closing). See docs/structured-output.md.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from urllib.parse import unquote

import numpy as np

from ..errors import ConfigError
from ..runtime.filters import Filters
from . import closing

# compact separators, no free whitespace: a canvas is filled in parallel, and whitespace the grammar allows
# anywhere is what noise fills it with
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf")
WHAT = {"json_schema": "the JSON schema", "json_object": "the JSON object", "regex": "the regex",
        "lark": "the Lark grammar", "gbnf": "the GBNF grammar"}

# Bounds on what reaches the grammar engine, checked before it sees a grammar: past them llguidance overflows its
# stack (a chain of ~2,000 nested rules, ~1,000 nested $refs: SIGSEGV), spends seconds per mask, or is handed a
# grammar no answer can complete.
MAX_SOURCE_BYTES = 256 * 1024  # a grammar's text, a JSON schema's JSON
MAX_RULES = 10_000             # rules and terminals of a Lark or GBNF grammar
MAX_NESTING = 500              # rules inside rules, or schema levels through $refs (recursion aside)
MAX_JSON_DEPTH = 100           # objects and arrays inside each other in a schema or tools (jinja recurses on them)
MAX_FORCED_TOKENS = 8192       # tokens a grammar may force before its first choice, without a max_tokens
# the lexer's fuel also bounds the forced text a mask expands (~4 units a byte): llguidance's 1,000,000 let
# ((((a{20}){20}){20}){20}) hold a mask ~1 s; a quarter still reaches ~60,000 bytes, far past any answer
LEXER_FUEL = 250_000


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match: `kind` one of KINDS, `source` the schema (a dict or JSON text) or grammar."""

    kind: str
    source: object = None

    def compile(self) -> str:
        """The engine's grammar, once the source is within the bounds above (ConfigError names the bound)."""
        import llguidance

        M = llguidance.LLMatcher
        if self.kind == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "json_schema":
            return M.grammar_from_json_schema(json_schema_text(self.source), overrides=JSON_OPTIONS)
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"a {self.kind} grammar is a non-empty string")
        if self.kind not in ("regex", "lark", "gbnf"):
            raise ConfigError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        _check_size(len(self.source.encode("utf-8", "surrogatepass")), WHAT[self.kind])
        if self.kind == "regex":
            return M.grammar_from_regex(self.source)
        if self.kind == "lark":
            check_lark(self.source, WHAT["lark"])
            return M.grammar_from_lark(self.source)
        check_gbnf(self.source)  # before the converter, which takes seconds on a long chain of rules
        try:
            from llguidance.gbnf_to_lark import gbnf_to_lark

            lark = gbnf_to_lark(self.source)
        except Exception as e:  # the converter raises on what it cannot parse
            raise ConfigError(f"the GBNF grammar does not parse: {e}") from None
        check_lark(lark, WHAT["gbnf"])
        return M.grammar_from_lark(lark)

    def check(self) -> str:
        """The compiled grammar, once the engine has parsed it (no model needed): a schema, regex or grammar it
        cannot use is a ConfigError that quotes the engine's message."""
        import llguidance

        grammar = self.compile()
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, limits=limits())
        if failed:
            raise ConfigError(f"unsupported {self.kind}: {' '.join(m.strip() for m in messages)}")
        return grammar


@functools.cache
def limits():
    """The engine's resource limits (llguidance.LLParserLimits): its defaults, less lexer fuel, short errors."""
    import llguidance

    return llguidance.LLParserLimits(initial_lexer_fuel=LEXER_FUEL, verbose_errors=False)


def _check_size(n: int, what: str) -> None:
    if n > MAX_SOURCE_BYTES:
        raise ConfigError(f"{what} is {n:,} bytes, more than the {MAX_SOURCE_BYTES:,} a grammar may have")


# -- JSON schemas: bounds, 64-bit numbers, a finite instance ------------------------------------------------

def json_schema_text(source) -> str:
    """A json_schema (a dict, a bool, or JSON text) as the JSON text the engine reads, once it is within the bounds:
    its size and nesting (here and through its $refs), numbers the engine can hold (64-bit integers, finite), and
    an instance of finite size (a required property or item that contains itself has none)."""
    schema = source
    if isinstance(schema, str):
        _check_size(len(schema.encode("utf-8", "surrogatepass")), WHAT["json_schema"])
        try:
            schema = json.loads(schema)
        except RecursionError:
            raise ConfigError(f"json_schema nests more than {MAX_JSON_DEPTH} objects and arrays deep") from None
        except ValueError as e:
            raise ConfigError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ConfigError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    check_depth(schema, MAX_JSON_DEPTH, "json_schema")  # closed() recurses
    text = check_schema(closed(schema), "json_schema")
    _check_size(len(text), WHAT["json_schema"])
    return text


# where a schema holds subschemas: one, a list of them, or a map of names to them
_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_EXTRA = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed(schema):
    """A copy of `schema` in which every object schema with properties that says nothing of extra keys allows none
    (additionalProperties: false), as llama.cpp's and xgrammar's converters read a schema: on a canvas the noise
    fills any key it is allowed, with strings that never end. A schema that allows extra keys keeps them, and an
    object schema without properties ({"type": "object"}) stays any object, as there."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and not any(k in out for k in _EXTRA):
        out["additionalProperties"] = False
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(s) for name, s in out[key].items()}
    return out


def check_schema(schema, what: str, finite: bool = True) -> str:
    """A parsed JSON schema within the bounds (see json_schema_text), as JSON text; `finite`: also that it has a
    finite instance."""
    _walk_json(schema, what, MAX_JSON_DEPTH, values=True)
    formulas, edges, own, root = _schema_graph(schema)
    _analyse(what, "schema levels", formulas if finite else None, edges, own, root)
    return json.dumps(schema)


def check_depth(value, limit: int = MAX_JSON_DEPTH, what: str = "the value") -> None:
    """`value` (dicts and lists, as from JSON) nests at most `limit` of them deep: what walks it recursively (a chat
    template's macros rendering tools, the engine's JSON parser) overflows on deeper ones."""
    _walk_json(value, what, limit, values=False)


def _walk_json(value, what: str, limit: int, values: bool) -> None:
    """Iterative (a deep value must not overflow this check itself); with `values`, also JSON's own types."""
    stack = [(value, 1, "")]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            if depth > limit:
                at = path if len(path) <= 60 else f"{path[:30]}…{path[-25:]}"
                raise ConfigError(f"{what} nests more than {limit} objects and arrays deep (at {at})")
            for k, x in v.items() if isinstance(v, dict) else enumerate(v):
                if values and isinstance(v, dict) and not isinstance(k, str):
                    raise ConfigError(f"{what}: the key {k!r:.40} at {path or '/'} is not a string")
                stack.append((x, depth + 1, f"{path}/{k}"))
        elif values and not (v is None or isinstance(v, (bool, str))):
            if isinstance(v, int) and not -2**63 <= v < 2**63:
                raise ConfigError(f"{what}: {path or '/'} is an integer of {v.bit_length()} bits; the grammar "
                                  "engine reads at most 64")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{what}: {path or '/'} is {v}; a JSON number is finite")
            if not isinstance(v, (int, float)):
                raise ConfigError(f"{what}: {path or '/'} is a {type(v).__name__}, not a JSON value")


def _resolve(root, ref):
    """The subschema a local $ref ('#', '#/$defs/x', any JSON pointer) names; None for others (the engine's call)."""
    if not isinstance(ref, str) or not ref.startswith("#") or (len(ref) > 1 and ref[1] != "/"):
        return None
    node = root
    for part in unquote(ref[2:]).split("/") if len(ref) > 1 else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _schema_graph(root):
    """The schema as _analyse reads it: a node per $ref target ('#' the root) with its formula, its own depth, and
    its $refs at the depth they sit."""
    nodes, formulas, own, edges = {"#": root}, {}, {}, {}
    todo = ["#"]
    while todo:
        key = todo.pop()
        formulas[key], own[key], edges[key] = _schema_formula(root, nodes[key]), 0, []
        stack = [(nodes[key], 1)]
        while stack:
            v, depth = stack.pop()
            if not isinstance(v, (dict, list)):
                continue
            own[key] = max(own[key], depth)
            if isinstance(v, dict) and _resolve(root, v.get("$ref")) is not None:
                edges[key].append((v["$ref"], depth - 1))
                if v["$ref"] not in nodes:
                    nodes[v["$ref"]] = _resolve(root, v["$ref"])
                    todo.append(v["$ref"])
            children = [x for k, x in v.items() if k not in ("$defs", "definitions")] if isinstance(v, dict) else v
            stack += [(x, depth + 1) for x in children]
    return formulas, edges, own, "#"


OK, NO = ("ok",), ("no",)


def _schema_formula(root, s):
    """When `s` has an instance, as a formula over the $refs it needs (an over-approximation: what it cannot
    prove impossible is possible): required properties, the first minItems items, allOf; one of anyOf/oneOf/type."""
    if s is False:
        return NO
    if not isinstance(s, dict):
        return OK
    parts = [("ref", s["$ref"])] if _resolve(root, s.get("$ref")) is not None else []
    for key, kind in (("allOf", "all"), ("anyOf", "any"), ("oneOf", "any")):
        if isinstance(s.get(key), list) and s[key]:
            parts.append((kind, [_schema_formula(root, x) for x in s[key]]))
    types = [s["type"]] if isinstance(s.get("type"), str) else s.get("type")
    if isinstance(types, list) and types and "enum" not in s and "const" not in s:
        parts.append(("any", [_type_formula(root, s, t) for t in types]))
    return ("all", parts)


def _type_formula(root, s, t):
    def get(key, kind, default):
        return s[key] if isinstance(s.get(key), kind) and not isinstance(s.get(key), bool) else default

    if t == "object":
        props, required = get("properties", dict, {}), [k for k in get("required", list, []) if isinstance(k, str)]
        other = True if "patternProperties" in s else s.get("additionalProperties", True)
        return ("all", [_schema_formula(root, props.get(k, other)) for k in required])
    if t == "array":
        n, prefix, items = get("minItems", int, 0), get("prefixItems", list, []), s.get("items", True)
        if isinstance(items, list):  # drafts 4-7: a tuple of items, then additionalItems
            prefix, items = items, s.get("additionalItems", True)
        return ("all", [_schema_formula(root, x) for x in prefix[:n]] + ([_schema_formula(root, items)]
                                                                        if n > len(prefix) else []))
    return OK


# -- Lark and GBNF grammars: their rules as a graph ------------------------------------------------------------

_LARK_TOKEN = re.compile(r"""
    (?P<skip>[ \t\f\r]+ | \\\r?\n | (?://|\#)[^\n]*)
  | (?P<nl>\n)
  | (?P<str>"(?:[^"\\\n]|\\.)*"i?)
  | (?P<re>/(?!/)(?:[^/\\\n]|\\.)*/[imslux]*)
  | (?P<tok><[^<>\n]+>)
  | (?P<dir>%[A-Za-z_]+)
  | (?P<name>@?[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<num>\d+)
  | (?P<op>\.\.|->|[-:|()\[\]?*+~{},.&=!])
""", re.X)


class _Unread(Exception):
    """A construct this reading of Lark does not follow (a template, say): the engine alone checks the grammar."""


def check_lark(text: str, what: str = WHAT["lark"]) -> None:
    """A Lark grammar within MAX_RULES and MAX_NESTING, whose `start` derives some finite text."""
    for m in re.finditer(r"%json\s*", text):  # inline schemas: the engine compiles them as it does a json_schema
        try:
            schema = json.JSONDecoder().raw_decode(text, m.end())[0]
        except RecursionError:
            raise ConfigError(f"a %json schema of {what} nests more than {MAX_JSON_DEPTH} objects and arrays deep") \
                from None
        except ValueError:  # not JSON (or %json inside a string): the engine's to say
            continue
        # bounds only: the grammar may not need an instance of it (one alternative among others)
        check_schema(schema, f"the %json schema at character {m.start()} of {what}", finite=False)
    rules = _lark_rules(text)
    if rules is None:
        return
    if len(rules) > MAX_RULES:
        raise ConfigError(f"{what} has {len(rules):,} rules and terminals, more than {MAX_RULES:,}")
    formulas, edges = {}, {}
    try:
        for name, bodies in rules.items():
            readers = [_LarkBody(tokens, rules) for tokens in bodies]
            formulas[name] = ("any", [r.read() for r in readers])
            edges[name] = [(ref, 1) for ref in set().union(*(r.refs for r in readers))]
    except _Unread:
        return
    _analyse(what, "rules", formulas, edges, dict.fromkeys(rules, 1), "start")


def check_gbnf(text: str) -> None:
    """A GBNF grammar within MAX_RULES and MAX_NESTING (what it derives is checked on its Lark form)."""
    body = re.sub(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|#[^\n]*', " ", text)
    parts = re.split(r"^[ \t]*([A-Za-z0-9_-]+)[ \t]*::=", body, flags=re.M)
    rules: dict[str, set] = {}
    for name, rhs in zip(parts[1::2], parts[2::2]):
        rules.setdefault(name, set()).update(re.findall(r"[A-Za-z0-9_-]+", rhs))
    if len(rules) > MAX_RULES:
        raise ConfigError(f"{WHAT['gbnf']} has {len(rules):,} rules, more than {MAX_RULES:,}")
    edges = {name: [(ref, 1) for ref in refs if ref in rules] for name, refs in rules.items()}
    _analyse(WHAT["gbnf"], "rules", None, edges, dict.fromkeys(rules, 1), "root")


def _lark_rules(text: str) -> dict[str, list] | None:
    """{name: [the tokens of each definition's body]}, or None where a character is not Lark's."""
    lines, line, pos = [], [], 0
    while pos < len(text):
        m = _LARK_TOKEN.match(text, pos)
        if m is None:
            return None
        pos = m.end()
        if m.lastgroup == "nl":
            lines.append(line)
            line = []
        elif m.lastgroup != "skip":
            line.append((m.lastgroup, m.group()))
    rules, current = {}, None
    for line in lines + [line]:
        if not line:
            continue
        header = _definition(line)
        if header is not None:
            name, start = header
            current = line[start:]
            rules.setdefault(name, []).append(current)
        elif line[0][0] == "dir":
            current = []  # %import, %ignore, %llguidance {...}: its continuation lines go with it
        elif current is None:
            return None
        else:
            current.extend(line)
    return rules


def _definition(line) -> tuple[str, int] | None:
    """(the name, where the body starts) of a definition line (`?name[options].priority: body`), or None for a
    continuation line."""
    i = 1 if line[0] in (("op", "?"), ("op", "!")) else 0
    if i >= len(line) or line[i][0] != "name" or line[i][1].startswith("@"):
        return None
    name, i = line[i][1], i + 1
    if i < len(line) and line[i] == ("op", "["):
        while i < len(line) and line[i] != ("op", "]"):
            i += 1
        i += 1
    if i + 1 < len(line) and line[i] == ("op", ".") and line[i + 1][0] == "num":
        i += 2
    return (name, i + 1) if i < len(line) and line[i] == ("op", ":") else None


class _LarkBody:
    """A rule's body as a formula (when it derives finite text) and the names of `defined` it refers to."""

    def __init__(self, tokens, defined):
        self.tokens, self.defined, self.i, self.refs = tokens, defined, 0, set()

    def read(self):
        formula = self._alternatives(0)
        if self.i != len(self.tokens):
            raise _Unread
        return formula

    def _peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, "")

    def _take(self, want=None):
        token = self._peek()
        if token[0] is None or (want is not None and token != want):
            raise _Unread
        self.i += 1
        return token

    def _alternatives(self, depth: int):
        if depth > 50:  # the engine allows fewer; beyond, its own error says so
            raise _Unread
        alternatives = [self._sequence(depth)]
        while self._peek() == ("op", "|"):
            self.i += 1
            alternatives.append(self._sequence(depth))
        return ("any", alternatives)

    def _sequence(self, depth: int):
        items = []
        while self._peek()[0] is not None and self._peek() not in (("op", "|"), ("op", ")"), ("op", "]")):
            if self._peek() == ("op", "->"):  # an alias
                self.i += 1
                self._take()
            elif self._peek() == ("op", "&"):  # terminals' intersection: both needed
                self.i += 1
            else:
                items.append(self._item(depth))
        return ("all", items)

    def _item(self, depth: int):
        formula = self._atom(depth)
        while True:
            token = self._peek()
            if token in (("op", "?"), ("op", "*")):
                self.i, formula = self.i + 1, OK
            elif token == ("op", "+"):
                self.i += 1
            elif token in (("op", "~"), ("op", "{")):  # x ~ n[..m], x{n[,m]}
                self.i += 1
                least = int(self._take()[1]) if self._peek()[0] == "num" else 0
                while self._peek()[0] == "num" or self._peek() in (("op", ","), ("op", "..")):
                    self.i += 1
                if token == ("op", "{"):
                    self._take(("op", "}"))
                formula = OK if least == 0 else formula
            else:
                return formula

    def _atom(self, depth: int):
        kind, text = self._take()
        if kind in ("str", "re", "tok"):
            if kind == "str" and self._peek() == ("op", ".."):  # "a".."z"
                self.i += 1
                self._take()
            return OK
        if kind == "name":
            if text.startswith("@") or text not in self.defined:  # another grammar; an import (or a typo)
                return OK
            self.refs.add(text)
            return ("ref", text)
        if (kind, text) in (("dir", "%json"), ("dir", "%regex")):
            self._take(("op", "{"))
            level = 1
            while level:
                level += {"{": 1, "[": 1, "}": -1, "]": -1}.get(self._take()[1], 0)
            return OK
        if (kind, text) == ("op", "~"):  # a terminal's complement
            self._atom(depth + 1)
            return OK
        if (kind, text) in (("op", "("), ("op", "[")):
            formula = self._alternatives(depth + 1)
            self._take(("op", ")" if text == "(" else "]"))
            return formula if text == "(" else OK
        raise _Unread


# -- the graph: nesting depth, and whether the root derives anything finite ----------------------------------

def _analyse(what: str, unit: str, formulas, edges: dict, own: dict, root) -> None:
    """ConfigError when the nodes nest deeper than MAX_NESTING from `root` (recursion aside: a cycle counts once),
    or when `formulas` (None: not checked) show that `root` derives nothing finite."""
    if root not in edges:
        return
    order, comp = _components(edges, root)
    value = {}
    for k, members in enumerate(order):  # sinks first: every edge leaving a component points to an earlier one
        value[k] = max(max(own[m] for m in members),
                       max((d + value[comp[t]] for m in members for t, d in edges[m] if comp[t] != k), default=0))
        if value[k] > MAX_NESTING:
            raise ConfigError(f"{what} nests more than {MAX_NESTING} {unit} deep (from {members[0]!r} down); "
                              "the grammar engine overflows its stack on deeper ones")
    if formulas is None:
        return
    productive, budget = set(), 200_000  # evaluations; an adversarial grammar past it is left to the engine
    for members in order:
        grew = True
        while grew and budget > 0:
            grew, budget = False, budget - len(members)
            for m in members:
                if m not in productive and _holds(formulas[m], productive):
                    productive.add(m)
                    grew = True
    if budget > 0 and root not in productive:
        stuck = [n for n in comp if n not in productive]
        raise ConfigError(f"{what} has no finite instance: {', '.join(map(repr, stuck[:3]))} cannot end (every way "
                          f"through {'it leads back into itself' if len(stuck) == 1 else 'them leads back into them'})")


def _holds(formula, productive: set) -> bool:
    kind = formula[0]
    if kind in ("ok", "no"):
        return kind == "ok"
    if kind == "ref":
        return formula[1] in productive
    parts = (_holds(f, productive) for f in formula[1])
    return all(parts) if kind == "all" else any(parts)


def _components(edges: dict, root):
    """The strongly connected components reachable from `root`, sinks first (Tarjan's, without recursion), and
    each node's component."""
    index, low, on_stack, stack, order, comp = {root: 0}, {root: 0}, {root}, [root], [], {}
    work = [(root, iter(edges[root]))]
    while work:
        v, it = work[-1]
        for w, _ in it:
            if w not in index:
                index[w] = low[w] = len(index)
                stack.append(w)
                on_stack.add(w)
                work.append((w, iter(edges[w])))
                break
            if w in on_stack:
                low[v] = min(low[v], index[w])
        else:
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                members = []
                while not members or members[-1] != v:
                    members.append(stack.pop())
                    on_stack.discard(members[-1])
                    comp[members[-1]] = len(order)
                order.append(members)
    return order, comp


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

    def spell(data: bytes) -> list[int]:
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

    class Vocab:  # llguidance's TokenizerWrapper protocol
        eos_token_id = model.eos_ids[0] if model.eos_ids else 0
        bos_token_id = None
        tokens = pieces
        special_token_ids = [t for t in range(model.n_vocab) if model.is_control(t)]

        def __call__(self, data: bytes) -> list[int]:
            return spell(data)

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocab()), n_vocab=model.n_vocab,
                                 eos_token=list(model.eos_ids) or None)
    model._ll_spelling = closing.Spelling.of(pieces, by_bytes, spell, model.eos_ids or (Vocab.eos_token_id,))
    model._ll_tokenizer = tok
    return tok


def spelling(model) -> closing.Spelling:
    """What the closing walk needs of the model's vocabulary (built with `tokenizer`)."""
    tokenizer(model)
    return model._ll_spelling


class CanvasGrammar:
    """One generation's grammar: its matcher follows the committed output; each block's canvas is masked and
    checked against it.

    A grammar no answer can complete is a ConfigError here, before any generation work: one the engine fails on at
    the start (a $ref that only refers to itself, an empty character class), one that allows no first token, one
    that forces more tokens than `max_tokens` (default MAX_FORCED_TOKENS) before any choice (a{1000000}, a huge
    literal, a rule that only recurses), and, with `max_tokens`, one whose shortest answer is longer (its `param` is
    "max_tokens"). One the engine fails on part-way (a resource limit) is a ConfigError then, never a silently cut
    answer. With `max_tokens` every answer ends within it (dglocal.generation.closing.Budget)."""

    def __init__(self, model, spec: GrammarSpec, eos_ids, max_tokens: int | None = None):
        import llguidance

        self.kind, self.n_vocab = spec.kind, model.n_vocab
        self.eos = np.asarray(sorted(eos_ids), dtype=np.int64)
        self.committed = 0  # output tokens the matcher has moved past
        self.matcher = llguidance.LLMatcher(tokenizer(model), spec.compile(), log_level=0, limits=limits())
        if self.matcher.is_error():
            raise ConfigError(f"unsupported {spec.kind}: {_engine_error(self.matcher)}")
        self._check_start(MAX_FORCED_TOKENS if max_tokens is None else max_tokens, max_tokens is not None)
        # the answer's budget: masks keep a closing within it (None: no budget given, only the grammar is held)
        self.budget = None if max_tokens is None else closing.Budget(self.matcher, spelling(model), max_tokens,
                                                                      WHAT[self.kind])

    def _check_start(self, bound: int, given: bool) -> None:
        m, kind = self.matcher, self.kind
        allowed = self._allowed(m.compute_bitmask())
        if m.is_error():
            raise ConfigError(f"no text matches {WHAT[kind]} (a $ref that only refers to itself, an empty character "
                              f"class, ...): the grammar engine says {_engine_error(m)}")
        allowed[self.eos[self.eos < self.n_vocab]] = False
        if not allowed.any() and not m.is_accepting():
            raise ConfigError(f"no text matches {WHAT[kind]}: it allows no first token")
        forced = m.compute_ff_tokens()
        if m.is_error():
            raise ConfigError(f"the grammar engine cannot follow {WHAT[kind]}: {_engine_error(m)}")
        if len(forced) > bound:
            within = f"max_tokens ({bound})" if given else f"{bound} tokens, the most a grammar may force"
            raise ConfigError(f"{WHAT[kind]} cannot end within {within}: it forces at least {len(forced)} tokens "
                              "before any choice (a literal or repetition that long, or a recursion with no way out)")

    def _failed(self, offset: int) -> ConfigError:
        return ConfigError(f"the grammar engine gave up on {WHAT[self.kind]} after {self.committed + offset} tokens "
                           f"of output: {_engine_error(self.matcher)}")

    def valid_prefix(self, draft: np.ndarray) -> int:
        """Positions of `draft` from its start that the grammar allows (an EOS it allows ends the check: what
        follows is cut off), and, with a budget, that leave time to end: past the answer's last position the rest
        is cut off, so a draft that ends there (or at an EOS before) is valid whole."""
        draft = np.asarray(draft, dtype=np.int64)
        tokens = draft.tolist()
        n = self.matcher.validate_tokens(tokens)
        if self.matcher.is_error():
            raise self._failed(n)
        if n == 0 and tokens and tokens[0] in self.eos and self.matcher.is_accepting():
            n = 1  # the last block ended the grammar: a stopped matcher validates nothing, not even its EOS
        hits = np.flatnonzero(np.isin(draft[:n], self.eos))
        room = len(tokens) if self.budget is None else self.budget.room
        if len(hits) and hits[0] < room:
            return len(tokens)
        if self.budget is None:
            return n
        valid = self.budget.check(draft, min(n, room))
        return len(tokens) if valid >= min(len(tokens), room) else valid

    def filters(self, draft: np.ndarray, base: Filters | None) -> Filters:
        """`base` with a mask per position, from walking `draft`: what the grammar allows after its prefix (less,
        near the budget's end, what would leave no time to end), up to and including the first position the draft
        breaks; positions past that, or past the answer's last position, are left free."""
        draft = np.asarray(draft, dtype=np.int64)
        rows: dict[bytes, int] = {}
        index = np.full(len(draft), -1, dtype=np.int32)
        masks = []
        consumed = 0
        walk = self.budget.walk(draft) if self.budget is not None else None
        end = len(draft) if self.budget is None else min(len(draft), max(self.budget.room, 0))
        for i, t in enumerate(draft[:end]):
            bits = self.matcher.compute_bitmask()
            if self.matcher.is_error():  # a limit hit part-way: its mask would allow the end alone
                raise self._failed(consumed)
            t = int(t)
            # of forced text the engine's mask allows only the longest token, yet takes a shorter spelling too
            # (validate_tokens, as valid_prefix reads the draft): the draft's own spelling stays allowed, or the walk
            # would stop short of the prefix the check found valid, and a repair would never reach the next position
            valid = t not in self.eos and (closing.allowed(bits, t) or self.matcher.validate_tokens([t]) == 1)
            if valid and not closing.allowed(bits, t):
                bits = closing.with_token(bits, t)
            if walk is not None:
                bits = walk.mask(i, bits)
            row = rows.get(bits)
            if row is None:
                row = rows[bits] = len(masks)
                masks.append(bits)
            index[i] = row
            # a token the matcher refuses is never consumed: a matcher that consumed one stays in error for good
            if not valid or not closing.allowed(bits, t):
                break
            if not self.matcher.consume_token(t):
                raise self._failed(consumed + 1)
            consumed += 1
            if walk is not None:
                walk.step(t)
        self.matcher.rollback(consumed)
        k, p, m = (base.top_k, base.top_p, base.min_p) if base is not None else (0, 1.0, 0.0)
        if not masks:
            return base
        # the engine's masks are the backend's packed rows (bit v % 32 of word v // 32), less a spare word
        words = (self.n_vocab + 31) // 32
        allow = np.frombuffer(b"".join(bits[: 4 * words] for bits in masks), dtype="<u4").reshape(len(masks), words)
        return Filters(k, p, m, allow=allow, allow_row=index)

    def _allowed(self, bits: bytes) -> np.ndarray:
        return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")[: self.n_vocab].astype(bool)

    def commit(self, tokens) -> None:
        """A finished block's tokens (up to an EOS): the matcher moves past them."""
        tokens = [int(t) for t in tokens]
        valid = tokens[: self.matcher.validate_tokens(tokens)]
        if self.matcher.is_error() or not self.matcher.consume_tokens(valid):
            raise self._failed(len(valid))
        self.committed += len(valid)
        if self.budget is not None:
            self.budget.committed(len(tokens))

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def ended(self) -> bool:
        """The committed output is complete and the grammar allows nothing after it but an EOS."""
        return self.matcher.is_stopped() and self.matcher.is_accepting() and not self.matcher.is_error()


def _engine_error(matcher) -> str:
    """The engine's message, its first line (with verbose_errors off the rest is a placeholder)."""
    return (matcher.get_error() or "unknown error").strip().splitlines()[0]
