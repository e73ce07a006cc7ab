"""The built-in Sudoku model: the puzzle as tokens and the rules (core), solving and evaluating through the
generation API (solve). Imports dglocal.generation and dglocal.runtime."""

from .solve import GUIDE_RESTARTS, EvalResult, Solved, evaluate, load_model, puzzle_options, solve, solve_stream

__all__ = ["GUIDE_RESTARTS", "EvalResult", "Solved", "evaluate", "load_model", "puzzle_options", "solve",
           "solve_stream"]
