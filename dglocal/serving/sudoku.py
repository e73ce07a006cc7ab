"""The built-in Sudoku model over HTTP: a puzzle in, the grid out, and whether the grid solves it."""

from __future__ import annotations

from dglocal.errors import ConfigError
from dglocal.serving import schema
from dglocal.serving.errors import ApiError
from dglocal.serving.frontend import Frontend
from dglocal.sudoku import core as sc
from dglocal.sudoku.stream import TIME_LIMIT, guide_steps, puzzle_options


class SudokuFrontend(Frontend):
    """The built-in Sudoku model: a message holding a puzzle (81 cells, '.' or '0' blank) gets the model's grid.
    It has no chat template, no tools and no tokenizer worth a grammar: a field meant for those is a 400 that names
    it, never silently dropped (schema.py's rule)."""

    sudoku = True

    def request_options(self, body: dict, options: dict) -> dict:
        """The request's options, merged with the prompt's, as a puzzle runs them: its step cap bounds the guide's
        restarts too (sudoku.stream.guide_steps), and a field that never reaches chat_prompt or text_prompt and does
        not apply to a puzzle is refused by name."""
        for name in (*schema.GRAMMARS, "tool_choice", "draft"):  # tool_choice "none" keeps tools from chat_prompt
            value = body.get(name)
            if value is not None and not (name == "response_format" and isinstance(value, dict) and
                                          value.get("type") == "text"):  # OpenAI's default, nothing asked
                raise ApiError(400, f"'{name}' does not apply to the Sudoku model: it answers the 81 cells",
                               param=name)
        if options.get("guide") is not None:  # the puzzle's own guide, made for this request by text_prompt
            options["guide"].steps = guide_steps(options.get("max_denoising_steps"))
        return options

    def chat_prompt(self, messages, tools=None, **kwargs):
        if tools:
            raise ApiError(400, "'tools' do not apply to the Sudoku model: it answers a puzzle", param="tools")
        if kwargs:  # enable_thinking, say: the model has no chat template to read them
            raise ApiError(400, f"'chat_template_kwargs' {sorted(kwargs)} do not apply to the Sudoku model: it has "
                                "no chat template", param="chat_template_kwargs")
        content = messages[-1]["content"]
        if not isinstance(content, str):  # schema.content keeps a list only for image parts
            raise ApiError(400, "the Sudoku model takes a puzzle as text, not images", param="messages")
        return self.text_prompt(content)

    def text_prompt(self, prompt):
        try:
            cells = sc.check_puzzle("".join(prompt.split()))
        except ConfigError as e:
            raise ApiError(400, f"send a Sudoku puzzle: {e}", param="messages") from None
        # seed and max_denoising_steps are left None: the request's own stay (_merged keeps a field this leaves None)
        return sc.encode_prompt(cells), puzzle_options(cells, time_limit=TIME_LIMIT)

    def grid(self, completion) -> list[int]:
        # the output stops before an EOS; the rest of the canvas is blank, as in sudoku.stream.outcome
        return sc.decode_canvas(completion.tokens + [sc.PAD_ID] * (sc.CANVAS_LENGTH - len(completion.tokens)))

    def answer(self, completion):
        cells = self.grid(completion)
        return "\n".join("".join(str(c) for c in cells[r * 9:r * 9 + 9]) for r in range(9))

    def finish(self, completion, prompt, calls=None) -> str:
        """The finish_reason: "stop" for a grid that solves the puzzle, else "length": the attempts or the time ran
        out before a grid kept every rule, as a reply cut at max_tokens ran out of room. `prompt`: the request's
        token ids (the puzzle's givens)."""
        return "stop" if sc.check_grid(sc.decode_prompt(prompt), self.grid(completion)) else "length"

    def extra(self, completion, prompt) -> dict:
        """The response's `dglocal` verdict: solved (sudoku.core.check_grid), and how many cells break a rule
        (rule_breaks: a changed given, a blank, a repeated digit), 0 for a solved grid."""
        puzzle, grid = sc.decode_prompt(prompt), self.grid(completion)
        return {"solved": sc.check_grid(puzzle, grid), "broken_cells": len(sc.rule_breaks(puzzle, grid))}

    def pieces(self, ids):
        return [str(c) if c else "" for c in sc.decode_canvas(ids)]
