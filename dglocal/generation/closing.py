"""How few tokens finish a grammar from where its matcher stands, and an answer's token budget held with it: a
grammar-constrained answer always ends within max_tokens (dglocal.generation.grammar.CanvasGrammar).

llguidance says which tokens may come next, not how far the end is. A closing is found by a walk over the grammar's
own masks: the tokens it forces first (compute_ff_tokens), then at each choice the first allowed byte in CLOSING
order (closing brackets and quotes, separators, digits, letters, opening brackets last), re-spelt at the end in
the longest tokens (`"}` may be one). Inside a free text (a string) a byte after which it goes on as before is
content, no step towards the end, and gives way to the next; where no byte ends it, a token of punctuation that
does (<|"|>). The walk takes the end of a closing found for a nearby state where one fits. What it finds is a real
closing, so an upper bound on the shortest; `shortest` tightens it by trying the other choices along the way,
for the check before a request runs (a budget no answer fits is a ConfigError then).

`Budget` holds the bound on a canvas: see its docstring.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

# the order choices are tried in: what ends a bracket or a string first, then separators, then content (which a
# free text takes without end), what opens a bracket last
CLOSING = (b")]}>\"'`,;:|/=*!?@#$%&^~_.0123456789-+abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
           b" \n\t([{<\\")
LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PLAIN = re.compile(rb"[A-Za-z0-9 ]+")
MARKS = re.compile(rb"[!-/:-@\[-`{-~]+")  # ASCII punctuation
MAX_WALK = 4096  # tokens: a closing longer is none found (a walk lost in a free text without letters)


def _kind(byte: int) -> int:
    """Bytes that do the same for a closing (any digit, any lowercase, any uppercase letter) share a kind."""
    return 1 if 48 <= byte <= 57 else 2 if 97 <= byte <= 122 else 3 if 65 <= byte <= 90 else byte + 4


@dataclass(frozen=True)
class Spelling:
    """What the walk needs of a vocabulary: each byte's token, each token's bytes, the longest-match speller, and
    which tokens are letters, digits and spaces alone (content that rarely moves an end further away)."""

    single: dict  # byte -> the token of that byte alone
    pieces: list  # token -> its bytes (control tokens start with 0xff)
    lengths: np.ndarray  # token -> how many bytes
    spell: object  # bytes -> token ids, longest pieces first
    by_bytes: dict  # bytes -> token
    plain: np.ndarray  # uint8 bits (little bit order) over the vocabulary: tokens of PLAIN bytes only
    eos: tuple
    order: tuple  # (token, kind) of the CLOSING bytes the vocabulary spells alone, in that order
    letters: tuple  # the tokens of single letters
    marks: np.ndarray  # tokens of 2 to 8 ASCII punctuation bytes, shortest first (<|"|>, "}, -->)

    @classmethod
    def of(cls, pieces: list, by_bytes: dict, spell, eos) -> Spelling:
        single = {p[0]: t for p, t in by_bytes.items() if len(p) == 1}
        plain = np.array([PLAIN.fullmatch(p) is not None for p in pieces], dtype=bool)
        order = tuple((single[b], _kind(b)) for b in CLOSING if b in single)
        marks = sorted((len(p), t) for p, t in by_bytes.items() if 2 <= len(p) <= 8 and MARKS.fullmatch(p))
        return cls(single=single, pieces=pieces, lengths=np.array([len(p) for p in pieces], dtype=np.int64),
                   spell=spell, by_bytes=by_bytes, plain=np.packbits(plain, bitorder="little"), eos=tuple(eos),
                   order=order, letters=tuple(single[b] for b in LETTERS if b in single),
                   marks=np.array([t for _, t in marks], dtype=np.int64))


def allowed(bits: bytes, t: int) -> bool:
    return bool((bits[t >> 3] >> (t & 7)) & 1)


def with_token(bits: bytes, t: int) -> bytes:
    out = bytearray(bits)
    out[t >> 3] |= 1 << (t & 7)
    return bytes(out)


def closes(matcher, path: list[int], eos: int) -> bool:
    """Whether `path` takes the matcher (not moved) to where the grammar may end."""
    if not path:
        return matcher.is_accepting()
    return matcher.validate_tokens(path + [eos]) == len(path) + 1


class Lost(Exception):
    """The walk found no way out of a free text (it ends in a sequence its bytes one by one do not show)."""


LOST = "lost"  # what a Budget holds for a state whose closing the walk cannot find


def greedy(matcher, spelling: Spelling, limit: int, hints: list = ()) -> list[int] | None:
    """A closing of at most `limit` tokens from the matcher's state (the matcher is not moved), or None where the
    walk finds none that short; Lost where it finds none at all. `hints`: closings of nearby states, whose ends
    the walk takes where they fit (a string's end, then what `shortest` chose for the rest)."""
    path = _walk(matcher.deep_copy(), spelling, limit + 8, hints=hints)  # re-spelt, a little longer may fit
    if path is None:
        return None
    path = respelt(matcher, spelling, path)
    return path if len(path) <= limit else None


def tail(matcher, hints: list, eos: int) -> list[int] | None:
    """The shortest end of one of the closings `hints` that closes from the matcher's state."""
    best = None
    for hint in hints:
        for k in range(len(hint), -1, -1):
            if best is not None and len(hint) - k >= len(best):
                break
            if closes(matcher, hint[k:], eos):
                best = hint[k:]
                break
    return best


def _walk(m, spelling: Spelling, limit: int, choices: list | None = None, hints: list = ()) -> list[int] | None:
    """Moves `m` along a closing of at most `limit` tokens and returns it (None where it takes more); `choices`
    collects (position, state, token) at each choice, for `shortest`."""
    path, bits, stuck = [], None, 0
    while len(path) <= limit:
        if m.is_accepting():
            return path
        end = tail(m, hints, spelling.eos[0]) if hints and len(path) < 8 else None
        if end is not None and len(path) + len(end) <= limit:
            return path + end
        forced = m.compute_ff_tokens()
        if forced:
            if not m.consume_tokens(forced):
                raise Lost
            path += forced
            bits = None
            continue
        bits = m.compute_bitmask() if bits is None else bits
        if m.is_error():
            raise Lost
        before = m.deep_copy() if choices is not None else None
        t, bits, progress = _choose(m, bits, spelling)
        stuck = 0 if progress else stuck + 1
        if stuck > 16:  # a free text that no byte, and no run of punctuation, is seen to end
            raise Lost
        if choices is not None:
            choices.append((len(path), before, t))
        path.append(t)
    return None


def _choose(m, bits: bytes, spelling: Spelling) -> tuple[int, bytes, bool]:
    """Consumes the choice at `m` (a mask of `bits`): (token, the mask after it, whether it is a step towards the
    end). Inside a free text (letters allowed) a token after which both a letter and itself may follow is its
    content (a `)` in a string), no step: two validations, where comparing masks costs one each (ms where a
    string has a maxLength)."""
    candidates = _candidates(bits, spelling)
    letter = next((t for t in spelling.letters if allowed(bits, t)), None)
    t = next((t for t in candidates if m.validate_tokens([t, spelling.eos[0]]) == 2), None)  # it ends here
    t = t if t is not None else next((t for t in candidates if letter is None or m.validate_tokens([t, letter]) < 2
                                      or m.validate_tokens([t, t]) < 2), None)
    progress = t is not None
    if t is None and letter is not None:
        t = _delimiter(m, bits, spelling, letter)
        progress = t is not None
    if t is None:
        t = candidates[0] if candidates else _shortest_token(bits, spelling)
        progress = len(candidates) <= 1  # one kind allowed (a run of letters a regex needs): no choice
    if t is None or not m.consume_token(t):
        raise Lost
    return t, m.compute_bitmask(), progress


def _candidates(bits: bytes, spelling: Spelling) -> list[int]:
    """The allowed bytes in CLOSING order: the first of each kind, or each one of a kind where few are allowed (the
    letters of keywords or of an enum's values: which one may end it sooner)."""
    by_kind: dict[int, list[int]] = {}
    for t, kind in spelling.order:
        if allowed(bits, t):
            by_kind.setdefault(kind, []).append(t)
    return [t for ts in by_kind.values() for t in (ts if len(ts) <= 4 else ts[:1])]


def _delimiter(m, bits: bytes, spelling: Spelling, letter: int) -> int | None:
    """A token of punctuation alone (shortest first) after which the free text's letters are no longer allowed:
    one that ends it, such as <|"|>."""
    mask = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little").astype(bool)
    for t in spelling.marks[mask[spelling.marks]][:4096]:
        if m.validate_tokens([int(t), letter]) == 1:
            return int(t)
    return None


def _shortest_token(bits: bytes, spelling: Spelling) -> int | None:
    """No single byte allowed (llguidance allows only the longest token of forced text): the shortest one."""
    mask = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")[: len(spelling.pieces)].astype(bool)
    mask[[e for e in spelling.eos if e < len(mask)]] = False
    ids = np.flatnonzero(mask)
    return int(ids[np.argmin(spelling.lengths[ids])]) if len(ids) else None


def respelt(matcher, spelling: Spelling, path: list[int]) -> list[int]:
    """`path`'s bytes in the longest tokens (a walk goes byte by byte), where the grammar takes them so."""
    if len(path) < 2:
        return path
    data = b"".join(spelling.pieces[t] for t in path)
    try:
        merged = spelling.spell(data)
    except ConfigError:  # a byte only a control token spells: keep the walk's tokens
        return path
    if len(merged) < len(path) and closes(matcher, merged, spelling.eos[0]):
        return merged
    return path


def shortest(matcher, spelling: Spelling, limit: int, effort: int = 64) -> list[int] | None:
    """The shortest closing found, trying harder than `greedy` where its walk takes more than `limit` tokens: the
    other choices along the walk (every allowed byte where few are, one of each kind where many are; the choices
    with fewest first: an optional key, an enum's value), each followed by a greedy walk, up to `effort` walks.
    None where no walk ends within 4 * limit + 256 tokens (or MAX_WALK); Lost where the first finds no way out."""
    found = _walk_from(matcher, spelling, min(4 * limit + 256, MAX_WALK))
    if found is None:
        return None
    walk, choices = found
    best = respelt(matcher, spelling, walk)
    walks = 1
    while len(best) > limit and walks < effort:
        tries = sorted((len(alts), at, state, alts) for at, state, taken in choices
                       for alts in [_alternatives(state, spelling, taken)] if alts)
        tries = [(at, state, t) for _, at, state, alts in tries for t in alts][: effort - walks]
        for at, state, t in tries:
            walks += 1
            m = state.deep_copy()
            try:
                rest = _walk_from(m, spelling, len(walk) - at + 8) if m.consume_token(t) else None
            except Lost:
                continue
            other = None if rest is None else respelt(matcher, spelling, walk[:at] + [t] + rest[0])
            if other is not None and len(other) < len(best):
                walk, best = walk[:at] + [t] + rest[0], other
                choices = [c for c in choices if c[0] < at] + [(at + 1 + i, s, x) for i, s, x in rest[1]]
                break
        else:
            break  # no other choice shortens it
    return best


def first_steps(spelling: Spelling, path: list[int], room: int) -> list[tuple[int, list[int]]]:
    """(token, the rest) for each token that spells a beginning of `path`'s bytes and leaves the rest spelt in at
    most `room` - 1 tokens: what a position may hold that keeps the end within `room`."""
    data = b"".join(spelling.pieces[t] for t in path)
    out = []
    for n in range(1, min(len(data), 16) + 1):  # a token of more bytes is rare
        t = spelling.by_bytes.get(data[:n])
        if t is None:
            continue
        try:
            rest = spelling.spell(data[n:])
        except ConfigError:  # the rest begins inside a character no token spells alone
            continue
        if 1 + len(rest) <= room:
            out.append((t, rest))
    return out


def _walk_from(matcher, spelling: Spelling, limit: int):
    """(a greedy closing, its choices) from a copy of `matcher`, or None."""
    choices: list = []
    path = _walk(matcher.deep_copy(), spelling, limit, choices)
    return None if path is None else (path, choices)


def _alternatives(state, spelling: Spelling, taken: int) -> list[int]:
    bits = state.compute_bitmask()
    ids = [t for t, _ in spelling.order if t != taken and allowed(bits, t)]
    if len(ids) <= 24:
        return ids
    kinds, out = set(), []
    for t, kind in spelling.order:
        if t != taken and kind not in kinds and allowed(bits, t):
            kinds.add(kind)
            out.append(t)
    return out


# -- an answer's budget on a canvas ----------------------------------------------------------------------------

TIGHT = 8  # slack (positions left beyond a closing and its EOS) at which a position's mask starts to hold the end
LOOKAHEAD = 16  # how much further from the end than TIGHT a position's closing is worth looking for


class Budget:
    """The tokens an answer may take (max_tokens, or the context's room), held on one generation's matcher.

    Position i of a canvas has `room - i` positions left, itself included. A state is in time when a closing and
    an EOS fit in them (the EOS is left out when the budget has no room for it). Before a pass, positions within
    TIGHT of that bound allow only tokens that keep it: a beginning of the closing, EOS, the draft's own token
    where it was in time, and inside a string letters, digits and spaces while there is slack. After a pass, the
    valid prefix ends where the draft stops being in time, and that position, re-noised, allows only a beginning
    of the closing (its rest remembered), so a repair pass moves the end on as the grammar's own repair does.
    Closings are cached per draft prefix for the canvas: a settling draft asks for few new walks. A state whose
    closing the walk cannot find (LOST) counts as in time: there the grammar alone is held, as without a budget."""

    def __init__(self, matcher, spelling: Spelling, tokens: int, what: str):
        self.matcher, self.spelling, self.tokens = matcher, spelling, tokens
        self.eos = spelling.eos[0]
        self.used = 0  # output tokens committed
        size = len(matcher.compute_bitmask())  # the engine's masks: whole u32 words, a word more than n_vocab needs
        self.plain = np.concatenate([spelling.plain, np.zeros(size, dtype=np.uint8)])[:size]
        try:
            best = shortest(matcher, spelling, tokens)
        except Lost:
            best = LOST
        best = LOST if best is None else best  # no end within reach of the walk (a recursion it keeps taking)
        if best is not LOST and len(best) > tokens:
            e = ConfigError(f"{what} cannot end within max_tokens ({tokens}): the shortest answer found takes "
                            f"{len(best)} tokens")
            e.param = "max_tokens"
            raise e
        self.reserve = 1 if _fits(best, tokens - 1) else 0
        self._begin(best)

    def _begin(self, start) -> None:
        self.start = start  # a closing from the committed state (None: none found within reach, or LOST)
        self.last = start  # the closing the last check found, tried first by the next
        self.cache: dict[bytes, tuple] = {b"": (start, MAX_WALK)}  # prefixes -> (a closing, the cap searched)
        self.judged = None  # (draft, valid, whether it ends for the budget) of the last check
        self.steps: dict[tuple, list] = {}  # closing -> its first_steps

    @property
    def room(self) -> int:
        return self.tokens - self.used

    def committed(self, n: int) -> None:
        """A block of `n` output tokens was committed (the matcher has moved past what was valid of them)."""
        self.used += n
        limit = max(self.room - self.reserve, 0)
        hints = [self.last] if isinstance(self.last, list) else []
        start = tail(self.matcher, hints, self.eos)
        try:
            if not _fits(start, limit):
                start = greedy(self.matcher, self.spelling, limit + LOOKAHEAD, hints)
            if not _fits(start, limit):  # once a canvas: worth a harder look
                found = shortest(self.matcher, self.spelling, limit)
                start = found if found is not None and (start is None or len(found) < len(start)) else start
        except Lost:
            start = LOST
        self._begin(start)

    def closing_here(self, draft: np.ndarray, i: int, limit: int, hint: list[int] | None = None):
        """A closing from the matcher's state, which is after draft[:i], found among up to limit + LOOKAHEAD
        tokens (cached per prefix); None where none is, LOST where the walk finds no way out. `hint`: a closing of
        the state before, whose end may fit here too."""
        key = draft[:i].tobytes()
        path, cap = self.cache.get(key, (None, -1))
        if path is not None or cap >= limit + LOOKAHEAD:
            return path
        if len(self.cache) > 4096:
            self.cache.clear()
        before = self.cache.get(draft[:i - 1].tobytes(), (None,))[0] if i else None
        shifted = before[1:] if isinstance(before, list) and before and before[0] == draft[i - 1] else None
        hints = [h for h in (shifted, hint, self.last, self.start) if isinstance(h, list)]
        path = tail(self.matcher, hints, self.eos)
        if not _fits(path, limit):
            try:
                found = greedy(self.matcher, self.spelling, max(limit, 0) + LOOKAHEAD, hints)
            except Lost:
                found = LOST
            path = found if found is not None else path
        self.cache[key] = (path, limit + LOOKAHEAD)
        return path

    def check(self, draft: np.ndarray, n: int) -> int:
        """Of draft's first `n` positions (those the grammar allows, before any EOS, within the room), how many
        stay in time: n, or fewer, the prefix a closing still fits after (the matcher is left as it was)."""
        j = self._in_time(draft, n)
        self.judged = (draft.tobytes(), j, j < n)
        return j

    def _in_time(self, draft: np.ndarray, n: int) -> int:
        m, room, reserve = self.matcher, self.room, self.reserve
        hint = self.last  # the last check's closing: where the draft's end did not change, no walk at all
        if n and isinstance(hint, list) and len(hint) <= room - n - reserve and \
                m.validate_tokens(draft[:n].tolist() + hint + [self.eos]) == n + len(hint) + 1:
            return n
        m.consume_tokens(draft[:n].tolist())
        j, path = n, None
        try:
            while True:
                limit = room - j - reserve
                path = self.closing_here(draft, j, limit)
                if path is LOST or _fits(path, limit) or j == 0:
                    break
                # back by as much as the closing overshoots (a string's end is as far from each of its
                # characters), or to a prefix found in time before: a repair pass's pinned prefix stays valid
                step = min(j, max(1, len(path) - limit if path is not None else LOOKAHEAD))
                step = next((k for k in range(1, step) if self._cached_fit(draft, j - k)), step)
                m.rollback(step)
                j -= step
        finally:
            m.rollback(j)
        if isinstance(path, list):
            self.last = path
        return j

    def _cached_fit(self, draft: np.ndarray, i: int) -> bool:
        return _fits(self.cache.get(draft[:i].tobytes(), (None,))[0], self.room - i - self.reserve)

    def walk(self, draft: np.ndarray) -> Walk:
        return Walk(self, draft)

    def first_steps(self, path: list[int], room: int) -> list[tuple[int, list[int]]]:
        key = tuple(path)
        if key not in self.steps:
            self.steps[key] = first_steps(self.spelling, path, MAX_WALK)
        return [(t, rest) for t, rest in self.steps[key] if 1 + len(rest) <= room]


def _fits(path, limit: int) -> bool:
    return isinstance(path, list) and len(path) <= limit


class Walk:
    """The budget's part in one walk of a draft (CanvasGrammar.filters): at each position, with the matcher
    there, the mask that keeps the answer in time."""

    def __init__(self, budget: Budget, draft: np.ndarray):
        self.budget, self.draft = budget, draft
        judged = budget.judged if budget.judged is not None and budget.judged[0] == draft.tobytes() else None
        # the last check's verdict on this draft: its tokens before `valid` are in time; at `valid` it broke
        self.valid, self.broke = (judged[1], judged[2]) if judged is not None else (0, False)
        start = budget.start if isinstance(budget.start, list) else None
        self.path, self.sure = start, True  # a closing from the current position; checked there
        self.near = len(start) if start is not None else 0  # the last closing's length

    def mask(self, i: int, bits: bytes) -> bytes:
        """Position i's mask (`bits`, the grammar's) less what would not leave time to end."""
        b = self.budget
        left = b.room - i - b.reserve  # tokens a closing may take from position i on
        path = self._closing(i, left)
        strict = self.broke and i == self.valid  # the draft's token here did not leave time: close from here
        if path is None or (left - len(path) > TIGHT and not strict):
            return bits
        mask = np.frombuffer(bits, dtype=np.uint8)
        free = left - len(path) >= 1 and not strict and self._free(bits, path)
        out = mask & b.plain if free else np.zeros_like(mask)
        keep = [int(self.draft[i])] if i < self.valid else []  # in time: the draft's own token stays possible
        ends = list(b.spelling.eos) if not path else []
        for t in self._closers(i, path, left) + keep + ends:
            if t < 8 * len(out) and allowed(bits, t):
                out[t >> 3] |= np.uint8(1 << (t & 7))
        return out.tobytes() if out.any() else bits

    def _free(self, bits: bytes, path: list[int]) -> bool:
        """Inside a free text (a string): a letter leaves the closing as it was, so plain content costs one
        position of slack and no more; at a key or a keyword a letter begins something that needs its own end."""
        b = self.budget
        letter = next((t for t in b.spelling.letters if allowed(bits, t)), None)
        return letter is not None and b.matcher.validate_tokens([letter] + path + [b.eos]) == len(path) + 2

    def _closers(self, i: int, path: list[int], left: int) -> list[int]:
        """The first steps of `path` the grammar takes from here, each with its rest of the closing remembered for
        the prefix it makes: the next check finds the end in time after whichever the pass picks."""
        b, out = self.budget, []
        prefix = self.draft[:i].tobytes()
        for t, rest in b.first_steps(path, left):
            if b.matcher.validate_tokens([t] + rest + [b.eos]) == len(rest) + 2:
                b.cache[prefix + np.int64(t).tobytes()] = (rest, left + LOOKAHEAD)
                out.append(t)
        return out

    def _closing(self, i: int, left: int) -> list[int] | None:
        """A closing from position i (None: unknown, or far enough from the end not to matter)."""
        b, path, before = self.budget, self.path, self.path
        if path is not None and not self.sure and not closes(b.matcher, path, b.eos):
            path = None
        near = left - TIGHT - LOOKAHEAD <= (self.near if path is None else len(path))
        if near and (path is None or len(path) > left - TIGHT):  # near the end: the shortest closing known
            found = b.closing_here(self.draft, i, left, before)
            found = found if isinstance(found, list) else None
            path = found if path is None or (found is not None and len(found) < len(path)) else path
        if path is not None:
            self.near = len(path)
        self.path, self.sure = path, True
        return path

    def step(self, t: int) -> None:
        """The draft's token `t` was consumed: the closing follows when it began with it, else is checked anew."""
        if self.path and self.path[0] == t:
            self.path = self.path[1:]
        else:
            self.sure = False
