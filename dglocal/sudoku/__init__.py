"""The built-in Sudoku model: the puzzle as tokens and the rules (core), solving and evaluating through the
generation API (solve), a puzzle's attempts raced on several contexts (race). Imports dglocal.generation and
dglocal.runtime."""

from .solve import (
    GUIDE_RESTARTS, EvalResult, Solved, bad_cells, evaluate, load_model, load_models, puzzle_options, read_puzzles,
    solve, solve_stream, write_grids,
)

__all__ = ["GUIDE_RESTARTS", "EvalResult", "Solved", "bad_cells", "evaluate", "load_model", "load_models",
           "puzzle_options", "read_puzzles", "solve", "solve_stream", "write_grids"]
