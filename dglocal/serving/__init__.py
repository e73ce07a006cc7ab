"""`dglocal serve`: the engine that owns the model and its slots (engine) and the OpenAI-compatible HTTP API over
it (app). Imports dglocal.generation, dglocal.runtime and, for the built-in model, dglocal.sudoku."""
