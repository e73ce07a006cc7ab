"""The built-in Sudoku model: the puzzle as tokens and the rules (core), solving and evaluating through the
generation API (solve). Imports dglocal.generation and dglocal.runtime."""

from .solve import (
    GUIDE_RESTARTS, EvalResult, Solved, bad_cells, evaluate, load_model, puzzle_options, read_puzzles, solve,
    solve_stream, write_grids,
)

__all__ = ["GUIDE_RESTARTS", "EvalResult", "Solved", "bad_cells", "evaluate", "load_model", "puzzle_options",
           "read_puzzles", "solve", "solve_stream", "write_grids"]
