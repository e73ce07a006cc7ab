"""The built-in Sudoku model: the puzzle as tokens and the rules (core), one puzzle denoised on one model
(stream), solving and evaluating through the generation API (solve), a puzzle's attempts raced on several contexts
(race). Imports dglocal.generation and dglocal.runtime."""

from .solve import (EvalResult, bad_cells, evaluate, load_model, load_models, read_puzzles, solve, solve_stream,
                    write_grids)
from .stream import GUIDE_RESTARTS, Solved, puzzle_options

__all__ = ["GUIDE_RESTARTS", "EvalResult", "Solved", "bad_cells", "evaluate", "load_model", "load_models",
           "puzzle_options", "read_puzzles", "solve", "solve_stream", "write_grids"]
