"""Sudoku: parse, format, check, solve, and the token format of the Sudoku DiffusionGemma model.

Pure Python (no numpy, no torch) so the runtime, the training recipe and the tests share one definition.
A grid is a list of 81 ints, row-major, 0 for a blank and 1-9 for a digit.

Token format (defined here only; `scripts/sudoku_train.py` and the runtime both import it):

    prompt = <bos> <r..>*81 <c..>*81 <b..>*81 cell*81 <sep>      (PROMPT_LENGTH = 326 tokens)
    canvas = digit*81                                          (CANVAS_LENGTH = 81 tokens)

The three constant blocks give cell i its row, column and box as tokens at a fixed distance from
canvas cell i and from prompt cell i: rotary positions only encode distances, and "same row" or
"same box" is not a function of distance, so the model reads its coordinates instead of deriving them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from dglocal.errors import ConfigError
from dglocal.runtime.checks import is_integer

# --- vocabulary -------------------------------------------------------------------------------

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
DIGIT_BASE = 2  # digit d (1-9) is token d + DIGIT_BASE: ids 3..11
BLANK_ID = 12  # '.', a blank cell of the puzzle
SEP_ID = 13  # ends the prompt
ROW_BASE, COL_BASE, BOX_BASE = 14, 23, 32  # <rK>, <cK>, <bK> (K = 1..9) are BASE + K - 1
VOCAB_SIZE = 41

PROMPT_LENGTH = 1 + 4 * 81 + 1
MIN_GIVENS = 17  # the fewest givens a puzzle with one solution can have; the model was trained on 17 and more
CANVAS_LENGTH = 81

TOKENS = (
    ["<pad>", "<eos>", "<bos>"]
    + [str(d) for d in range(1, 10)]
    + [".", "<sep>"]
    + [f"<r{k}>" for k in range(1, 10)]
    + [f"<c{k}>" for k in range(1, 10)]
    + [f"<b{k}>" for k in range(1, 10)]
)
assert len(TOKENS) == VOCAB_SIZE


def row_of(i: int) -> int:
    return i // 9


def col_of(i: int) -> int:
    return i % 9


def box_of(i: int) -> int:
    return (i // 27) * 3 + (i % 9) // 3


# The constant part of the prompt: bos, then each cell's row, column and box token.
STRUCTURE_IDS: tuple[int, ...] = (
    (BOS_ID,)
    + tuple(ROW_BASE + row_of(i) for i in range(81))
    + tuple(COL_BASE + col_of(i) for i in range(81))
    + tuple(BOX_BASE + box_of(i) for i in range(81))
)

# --- parse / format ---------------------------------------------------------------------------


def parse_grid(text: str) -> list[int]:
    """Parse 81 cells: digits 1-9, '.' or '0' for a blank. Surrounding whitespace is ignored."""
    s = text.strip()
    if len(s) != 81:
        raise ConfigError(f"a Sudoku puzzle has 81 cells, got {len(s)} characters: {s[:90]!r}")
    cells = []
    for pos, ch in enumerate(s):
        if ch in "123456789":
            cells.append(ord(ch) - 48)
        elif ch in ".0":
            cells.append(0)
        else:
            raise ConfigError(f"invalid Sudoku cell {ch!r} at position {pos + 1}: use 1-9, '.' or '0'")
    return cells


def format_grid(cells: Sequence[int]) -> str:
    """81 characters, '.' for a blank."""
    if len(cells) != 81:
        raise ConfigError(f"a Sudoku grid has 81 cells, got {len(cells)}")
    return "".join(str(c) if c else "." for c in cells)


def _as_cells(grid: str | Sequence[int]) -> list[int]:
    return parse_grid(grid) if isinstance(grid, str) else [int(c) for c in grid]


# --- rules ------------------------------------------------------------------------------------

UNITS: tuple[tuple[int, ...], ...] = (
    tuple(tuple(r * 9 + c for c in range(9)) for r in range(9))
    + tuple(tuple(r * 9 + c for r in range(9)) for c in range(9))
    + tuple(tuple(i for i in range(81) if box_of(i) == b) for b in range(9))
)
# the 20 cells that share a row, column or box with each cell: the solver's candidates and the guide's rule breaks
PEERS: tuple[tuple[int, ...], ...] = tuple(
    tuple(sorted({j for unit in UNITS if i in unit for j in unit} - {i})) for i in range(81))


def check_grid(puzzle: str | Sequence[int], grid: str | Sequence[int]) -> bool:
    """True iff `grid` is a complete valid Sudoku solution that keeps every given of `puzzle`."""
    p, g = _as_cells(puzzle), _as_cells(grid)
    if len(p) != 81 or len(g) != 81:
        return False
    if any(not 1 <= v <= 9 for v in g):
        return False
    if any(pv and pv != gv for pv, gv in zip(p, g)):
        return False
    return all(len({g[i] for i in unit}) == 9 for unit in UNITS)


def first_conflict(cells: Sequence[int]) -> str | None:
    """The first digit a grid repeats in a row, column or box, in words ("5 twice in row 1"); None if it repeats
    none (blanks allowed)."""
    for k, unit in enumerate(UNITS):
        seen = set()
        for d in (cells[i] for i in unit):
            if d in seen:
                return f"{d} twice in {('row', 'column', 'box')[k // 9]} {k % 9 + 1}"
            if d:
                seen.add(d)
    return None


def is_consistent(cells: Sequence[int]) -> bool:
    """No digit repeats in a row, column or box (blanks allowed)."""
    return first_conflict(cells) is None


def check_puzzle(puzzle: str | Sequence[int]) -> list[int]:
    """A puzzle as 81 checked cells: a string as parse_grid reads it, else 81 integers 0-9 (0 a blank). ConfigError
    names what is wrong, also when the givens already break a rule: no grid solves such a puzzle, and the guide,
    which checks only the cells that are not given, would find nothing to re-noise."""
    if isinstance(puzzle, str):
        cells = parse_grid(puzzle)
    else:
        try:
            cells = list(puzzle)
        except TypeError:
            raise ConfigError(f"a Sudoku puzzle is 81 cells (a string, or integers 0-9), got "
                              f"{type(puzzle).__name__}") from None
        if len(cells) != 81:
            raise ConfigError(f"a Sudoku puzzle has 81 cells, got {len(cells)}")
        for i, c in enumerate(cells):
            if not is_integer(c) or not 0 <= c <= 9:
                raise ConfigError(f"Sudoku cell {i + 1} must be an integer 0-9 (0: a blank), got {c!r:.20}")
        cells = [int(c) for c in cells]
    conflict = first_conflict(cells)
    if conflict is not None:
        raise ConfigError(f"the puzzle has no solution: its givens break a rule ({conflict})")
    return cells


# --- solver: bitmask candidates, most-constrained cell first ------------------------------------

_ALL = 0x3FE  # bits 1..9
_BITS = {1 << d: d for d in range(1, 10)}


def _search(cells: list[int], limit: int, rng: random.Random | None, out: list[list[int]]) -> None:
    # Find the blank cell with the fewest candidates; a cell with none means a dead end.
    best, best_mask, best_n = -1, 0, 10
    for i in range(81):
        if cells[i]:
            continue
        used = 0
        for j in PEERS[i]:
            used |= 1 << cells[j]
        mask = _ALL & ~used
        n = bin(mask).count("1")
        if n < best_n:
            best, best_mask, best_n = i, mask, n
            if n <= 1:
                break
    if best < 0:
        out.append(cells.copy())
        return
    digits = [d for d in range(1, 10) if best_mask >> d & 1]
    if rng is not None:
        rng.shuffle(digits)
    for d in digits:
        cells[best] = d
        _search(cells, limit, rng, out)
        if len(out) >= limit:
            break
    cells[best] = 0


def solve(puzzle: str | Sequence[int], limit: int = 1, rng: random.Random | None = None) -> list[list[int]]:
    """Up to `limit` solutions of `puzzle` (an inconsistent puzzle has none); `rng` shuffles the search."""
    cells = _as_cells(puzzle)
    if not is_consistent(cells):
        return []
    out: list[list[int]] = []
    _search(cells, limit, rng, out)
    return out


def count_solutions(puzzle: str | Sequence[int], limit: int = 2) -> int:
    """Number of solutions, counted up to `limit` (2 is enough to test uniqueness)."""
    return len(solve(puzzle, limit))


# --- token format -----------------------------------------------------------------------------


def encode_prompt(puzzle: str | Sequence[int]) -> list[int]:
    """Prompt token ids for a puzzle (PROMPT_LENGTH ids)."""
    cells = _as_cells(puzzle)
    return list(STRUCTURE_IDS) + [c + DIGIT_BASE if c else BLANK_ID for c in cells] + [SEP_ID]


def decode_prompt(ids: Sequence[int]) -> list[int]:
    """The puzzle an encode_prompt prompt holds (0 for a blank); ConfigError for ids of another shape."""
    ids = list(ids)
    if len(ids) != PROMPT_LENGTH or tuple(ids[:len(STRUCTURE_IDS)]) != STRUCTURE_IDS or ids[-1] != SEP_ID:
        raise ConfigError(f"not a Sudoku prompt: expected {PROMPT_LENGTH} ids as encode_prompt writes them")
    return decode_canvas(ids[len(STRUCTURE_IDS):-1])


def encode_canvas(solution: str | Sequence[int]) -> list[int]:
    """The clean canvas (CANVAS_LENGTH ids) the model is trained to produce."""
    return [c + DIGIT_BASE for c in _as_cells(solution)]


def decode_canvas(ids: Sequence[int]) -> list[int]:
    """Canvas token ids to cells; a non-digit token becomes 0 (the grid then fails `check_grid`)."""
    return [i - DIGIT_BASE if DIGIT_BASE < i <= DIGIT_BASE + 9 else 0 for i in ids]


# --- symmetries -----------------------------------------------------------------------------------


def random_symmetry(rng: random.Random) -> tuple[list[int], list[int]]:
    """A random Sudoku symmetry as (cell map of 81, digit map of 10 with 0 -> 0): new[i] = digit_map[old[cell_map[i]]].
    Digit relabelling, band and stack permutations, row and column permutations inside them, transpose: each keeps
    a grid valid, and a puzzle's givens and number of solutions."""
    def lines() -> list[int]:
        return [3 * band + i for band in rng.sample(range(3), 3) for i in rng.sample(range(3), 3)]

    rows, cols = lines(), lines()
    cell_map = [r * 9 + c for r in rows for c in cols]
    if rng.random() < 0.5:
        cell_map = [cell_map[(i % 9) * 9 + i // 9] for i in range(81)]
    return cell_map, [0] + rng.sample(range(1, 10), 9)


# --- the guide: rule-guided re-noising ----------------------------------------------------------


def rule_breaks(puzzle: Sequence[int], cells: Sequence[int]) -> list[int]:
    """Cells of a draft that an outside check can tell are wrong: a given that was changed, and every non-given
    cell that is not a digit or repeats a digit of its row, column or box."""
    bad = []
    for i, (p, v) in enumerate(zip(puzzle, cells)):
        if p:
            if v != p:
                bad.append(i)
        elif not 1 <= v <= 9 or any(cells[j] == v for j in PEERS[i]):
            bad.append(i)
    return bad


class Guide:
    """The Sudoku guide for the driver: `guide(draft canvas ids, accepted)` -> canvas positions to re-noise (the
    cells that break a rule), and `guide.restart(last draft, attempt)` -> the positions a new attempt keeps of the
    last one. It checks the rules only: it says which cells break one, never which digit goes where.

    `keep` chooses what a restart keeps: "fresh" nothing (fresh noise); "consistent" the cells of the last attempt
    that break no rule, less the peers of those that do (each with probability 1/2) and a share of the rest that
    grows with the attempt; "consensus" the cells that break no rule and hold the same digit as in the attempt
    before (what two attempts agree on), every other attempt fresh. Random choices are seeded by the draft and the
    attempt: runs repeat. Fresh noise is the default: on hard puzzles it solved more than either way of keeping
    (docs/sudoku.md has the figures); a model that failed from a canvas tends to fail again from what it kept."""

    KEEPS = ("fresh", "consistent", "consensus")
    # The first attempt is the model alone, at its own sampler settings: a hot schedule that solves most puzzles
    # in a few steps. The guided attempts after it run cooler: re-noising works from confident drafts, and at the
    # model's hot schedule the same restarts solved far fewer hard puzzles (docs/sudoku.md has both figures).
    TEMPERATURES = (0.3, 0.7)
    # ... and shorter: a guided attempt that has not solved the grid in a few steps rarely does later, and in the
    # same time more short attempts solved more hard puzzles than fewer long ones (docs/sudoku.md)
    STEPS = 16
    # ... and each pair of them sees the puzzle turned and relabelled another way (a symmetry: the same puzzle to
    # the rules, not to the model), from the third guided attempt on: a model that keeps failing a puzzle from
    # fresh noise often solves it at once in another orientation (docs/sudoku.md)
    VIEW_ATTEMPTS = 2

    def __init__(self, puzzle: str | Sequence[int], keep: str = "fresh", *, first_alone: bool = True,
                 temperatures: tuple[float, float] | None = TEMPERATURES, steps: int | None = STEPS,
                 view_attempts: int | None = VIEW_ATTEMPTS):
        if keep not in self.KEEPS:
            raise ConfigError(f"keep must be one of {', '.join(self.KEEPS)}, got {keep!r}")
        if view_attempts is not None and (not is_integer(view_attempts) or view_attempts < 1):
            raise ConfigError(f"view_attempts must be a positive integer or None, got {view_attempts!r:.40}")
        self.puzzle, self.keep, self.view_attempts = _as_cells(puzzle), keep, view_attempts
        # read by the generation loop
        self.first_alone, self.temperatures, self.steps = first_alone, temperatures, steps
        self.previous: list[int] | None = None  # the draft of the attempt before the last
        if keep == "fresh":
            self.restart = None
        if view_attempts is None:
            self.view = None

    def __call__(self, draft, accepted):
        return rule_breaks(self.puzzle, decode_canvas(draft.tolist()))

    def view(self, attempt: int, seed: int):
        """A random symmetry of the puzzle for guided attempts 1 + k*n + 1 (k = view_attempts, n >= 1), seeded by
        the generation's seed and the attempt; None (the attempt keeps the last one's) otherwise."""
        from dglocal.generation.views import View

        k = self.view_attempts
        if attempt <= k or (attempt - 1) % k:
            return None
        cell_map, digit_map = random_symmetry(random.Random(f"{seed}:{attempt}"))
        tokens = list(range(VOCAB_SIZE))  # the model's digit digit_map[d] is the puzzle's d
        for d in range(1, 10):
            tokens[digit_map[d] + DIGIT_BASE] = d + DIGIT_BASE
        return View(encode_prompt([digit_map[self.puzzle[j]] for j in cell_map]), cell_map, tokens)

    def restart(self, draft, attempt: int) -> list[int]:
        cells = decode_canvas(draft.tolist())
        broken = set(rule_breaks(self.puzzle, cells))
        previous, self.previous = self.previous, cells
        if self.keep == "consensus":
            if previous is None or attempt % 2 == 0:
                return []
            return [i for i in range(81) if i not in broken and (self.puzzle[i] or cells[i] == previous[i])]
        if attempt % 4 == 0:
            return []
        rng = random.Random(hash((tuple(cells), attempt)) & 0xFFFFFFFF)
        near = {j for i in broken for j in PEERS[i]} - broken
        share = min(0.5, 0.1 * attempt)
        return [i for i in range(81) if i not in broken and
                (self.puzzle[i] or rng.random() >= (0.5 if i in near else share))]


def guide_for(puzzle: str | Sequence[int], keep: str = "fresh", **options) -> Guide:
    """The Sudoku guide of `puzzle` (see Guide)."""
    return Guide(puzzle, keep, **options)
