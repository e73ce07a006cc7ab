"""Sudoku rules, solver, generator, augmentation and token format (pure Python, no model)."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from dglocal.sudoku import core as sc
from dglocal.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from sudoku_data import augment, generate, read_pairs  # noqa: E402

# A well-known puzzle (Wikipedia's example) and its unique solution.
PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
HELDOUT = Path(__file__).resolve().parents[1] / "scripts" / "sudoku" / "heldout.txt"


def test_parse_and_format_round_trip():
    cells = sc.parse_grid(PUZZLE)
    assert len(cells) == 81 and cells[:3] == [5, 3, 0]
    assert sc.format_grid(cells) == PUZZLE
    assert sc.parse_grid(PUZZLE.replace(".", "0")) == cells
    assert sc.parse_grid("  " + PUZZLE + "\n") == cells


@pytest.mark.parametrize("bad", [PUZZLE[:80], PUZZLE + "1", PUZZLE[:10] + "x" + PUZZLE[11:], ""])
def test_parse_rejects_bad_puzzles(bad):
    with pytest.raises(ConfigError):
        sc.parse_grid(bad)


def test_check_grid_accepts_solution():
    assert sc.check_grid(PUZZLE, SOLUTION)
    assert sc.check_grid(sc.parse_grid(PUZZLE), sc.parse_grid(SOLUTION))


def test_check_grid_rejects_rule_breaks_and_changed_givens():
    sol = sc.parse_grid(SOLUTION)
    # swap two cells of a row: the row stays a permutation, two columns break
    broken = sol.copy()
    broken[2], broken[3] = broken[3], broken[2]
    assert not sc.check_grid([0] * 81, broken)
    # incomplete grid
    incomplete = sol.copy()
    incomplete[40] = 0
    assert not sc.check_grid([0] * 81, incomplete)
    # a valid solution that changes a given: relabel digits 1 <-> 2 everywhere
    relabelled = [{1: 2, 2: 1}.get(v, v) for v in sol]
    assert sc.check_grid([0] * 81, relabelled)
    assert not sc.check_grid(PUZZLE, relabelled)
    # out-of-range value
    assert not sc.check_grid([0] * 81, [10] + sol[1:])


def test_solver_and_uniqueness():
    assert sc.solve(PUZZLE) == [sc.parse_grid(SOLUTION)]
    assert sc.count_solutions(PUZZLE) == 1
    # remove givens until ambiguous: the empty grid has many solutions
    assert sc.count_solutions([0] * 81, limit=2) == 2
    # an inconsistent puzzle has none
    assert sc.solve("11" + "." * 79) == []


def test_generator_unique_with_givens_in_range():
    rng = random.Random(7)
    for _ in range(5):
        puzzle, solution = generate(rng, 30, 40)
        givens = sum(1 for c in puzzle if c)
        assert 30 <= givens <= 40
        assert sc.check_grid(puzzle, solution)
        assert sc.count_solutions(puzzle, limit=2) == 1


def test_generator_is_seedable():
    assert generate(random.Random(3)) == generate(random.Random(3))


def test_augmentation_preserves_validity_and_uniqueness():
    rng = np.random.default_rng(0)
    pair = np.array([[sc.parse_grid(PUZZLE), sc.parse_grid(SOLUTION)]] * 8, dtype=np.uint8)
    out = augment(pair, rng)
    assert len({bytes(row[0]) for row in out}) > 1  # the symmetries really vary
    for puzzle, solution in out.tolist():
        assert sc.check_grid(puzzle, solution)
        assert sum(1 for c in puzzle if c) == sum(1 for c in sc.parse_grid(PUZZLE) if c)
        assert sc.count_solutions(puzzle, limit=2) == 1


def test_symmetry_maps_are_permutations():
    cell_map, digit_map = sc.random_symmetry(random.Random(1))
    assert sorted(cell_map) == list(range(81))
    assert digit_map[0] == 0 and sorted(digit_map[1:]) == list(range(1, 10))


def test_token_format():
    prompt = sc.encode_prompt(PUZZLE)
    assert len(prompt) == sc.PROMPT_LENGTH == 326
    assert prompt[0] == sc.BOS_ID and prompt[-1] == sc.SEP_ID
    assert all(0 <= t < sc.VOCAB_SIZE for t in prompt)
    # cell 80 (row 9, column 9, box 9): its coordinate tokens sit 81 apart
    assert [sc.TOKENS[prompt[1 + 80 + 81 * k]] for k in range(3)] == ["<r9>", "<c9>", "<b9>"]
    assert sc.TOKENS[prompt[1 + 243]] == "5" and sc.TOKENS[prompt[1 + 243 + 2]] == "."
    canvas = sc.encode_canvas(SOLUTION)
    assert len(canvas) == sc.CANVAS_LENGTH
    assert sc.decode_canvas(canvas) == sc.parse_grid(SOLUTION)
    assert sc.decode_canvas([sc.SEP_ID, sc.PAD_ID, sc.DIGIT_BASE + 9]) == [0, 0, 9]


def test_decode_prompt_reads_back_the_puzzle():
    """The server judges a grid against the givens its prompt holds (serving.sudoku's finish_reason)."""
    prompt = sc.encode_prompt(PUZZLE)
    assert sc.decode_prompt(prompt) == sc.parse_grid(PUZZLE)
    for bad in (prompt[:-1], [sc.PAD_ID] + prompt[1:], prompt[:-1] + [sc.PAD_ID]):
        with pytest.raises(ConfigError, match="not a Sudoku prompt"):
            sc.decode_prompt(bad)


def test_box_of():
    assert [sc.box_of(i) for i in (0, 8, 30, 80)] == [0, 2, 4, 8]


def test_heldout_file():
    pairs = read_pairs(HELDOUT)
    assert len(pairs) >= 200
    for puzzle, solution in pairs[:20]:
        assert 30 <= sum(1 for c in puzzle if c) <= 40
        assert sc.check_grid(puzzle, solution)
        assert sc.count_solutions(puzzle, limit=2) == 1


# -- the guide ---------------------------------------------------------------------------------------------------

SOLVED = sc.parse_grid("534678912672195348198342567859761423426853791713924856961537284287419635345286179")


def test_rule_breaks_on_a_solved_grid_is_empty():
    puzzle = [v if i % 3 == 0 else 0 for i, v in enumerate(SOLVED)]
    assert sc.rule_breaks(puzzle, SOLVED) == []


def test_rule_breaks_flags_repeats_of_non_given_cells_only():
    puzzle = [v if i % 3 == 0 else 0 for i, v in enumerate(SOLVED)]
    grid = list(SOLVED)
    grid[1], grid[2] = grid[2], grid[1]  # a swap inside row 0 keeps the row valid but breaks columns 1 and 2
    bad = sc.rule_breaks(puzzle, grid)
    assert 1 in bad and 2 in bad and all(not puzzle[i] for i in bad)
    # a repeated digit against a given flags the non-given cell, never the given
    grid = list(SOLVED)
    grid[1] = SOLVED[0]  # cell 1 repeats the given at cell 0 (row 0)
    bad = sc.rule_breaks(puzzle, grid)
    assert 1 in bad and 0 not in bad


def test_rule_breaks_flags_changed_givens_and_non_digits():
    puzzle = [v if i % 3 == 0 else 0 for i, v in enumerate(SOLVED)]
    grid = list(SOLVED)
    grid[0] = 0 if grid[0] != 0 else 1  # a given that is not what the puzzle says
    grid[4] = 0  # a non-digit (pad, eos, ... decode to 0)
    bad = sc.rule_breaks(puzzle, grid)
    assert 0 in bad and 4 in bad


def test_guide_reads_canvas_ids():
    puzzle = [v if i % 3 == 0 else 0 for i, v in enumerate(SOLVED)]
    guide = sc.guide_for(puzzle)
    ids = np.array(sc.encode_canvas(SOLVED))
    assert list(guide(ids, np.ones(81, bool))) == []
    ids[1] = ids[0]
    assert 1 in list(guide(ids, np.ones(81, bool)))


def test_the_guide_s_views_are_symmetries_of_the_puzzle():
    """From the third guided attempt on, every second one sees the puzzle turned and relabelled: the view's prompt
    is a puzzle with one solution, that solution is the world's solution as the view's model holds it, and the
    view maps it back; views depend on the seed and the attempt, and view_attempts=None turns them off."""
    puzzle, solution = sc.parse_grid(PUZZLE), sc.parse_grid(SOLUTION)
    guide = sc.guide_for(puzzle)
    assert [a for a in range(1, 10) if guide.view(a, 7) is not None] == [3, 5, 7, 9]
    view = guide.view(3, 7)
    turned = sc.decode_canvas(view.prompt[1 + 243:1 + 243 + 81])  # the prompt's cells, blanks decode to 0
    assert view.prompt[:244] == sc.encode_prompt(puzzle)[:244] and turned != puzzle
    assert sum(map(bool, turned)) == sum(map(bool, puzzle)) and sc.count_solutions(turned) == 1
    held = view.model(np.array(sc.encode_canvas(solution)))
    assert sc.check_grid(turned, sc.decode_canvas(held.tolist()))
    assert sc.decode_canvas(view.world(held).tolist()) == solution
    assert guide.view(3, 8).prompt != view.prompt and guide.view(5, 7).prompt != view.prompt
    assert guide.view(3, 7).prompt == view.prompt
    assert sc.guide_for(puzzle, view_attempts=None).view is None
    with pytest.raises(ConfigError, match="view_attempts must be a positive integer"):
        sc.guide_for(puzzle, view_attempts=0)
