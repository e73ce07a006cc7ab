"""What a model looks like over HTTP: its id, how messages become tokens, how tokens become the answer (Frontend),
and the web page that shows it."""

from __future__ import annotations

import json
from pathlib import Path

from dglocal.errors import ConfigError
from dglocal.generation import channels
from dglocal.generation.chat import ChatTemplate
from dglocal.generation.events import Completion
from dglocal.runtime.vision import load_image
from dglocal.serving.errors import ApiError


class Frontend:
    """What a model looks like over HTTP: its id, how messages become tokens, how tokens become the answer."""

    sudoku = False  # the built-in Sudoku model's frontend (serving.sudoku) says True

    def __init__(self, model, model_id: str, defaults: dict, image_files=None):
        self.model, self.id, self.defaults = model, model_id, defaults
        self.template = ChatTemplate.of(model)
        self.image_files = Path(image_files).resolve() if image_files is not None else None  # serve --image-files

    def chat_prompt(self, messages: list[dict], tools=None, **kwargs) -> tuple[list[int], dict]:
        if self.template is None:
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        extra = {"tools": tools} if tools else {}
        try:
            messages = [self._with_images(m) for m in messages]
        except ConfigError as e:  # not an image, too large, truncated
            raise ApiError(400, str(e), param="messages") from None
        prompt, images = self.template.prompt(self.model, channels.template_messages(messages), **extra, **kwargs)
        if not images:
            return prompt, {}
        if getattr(self.model, "vision", None) is None:
            raise ApiError(400, "this model takes no images: serve it with --mmproj", param="messages")
        return prompt, {"images": images}

    def _with_images(self, message: dict) -> dict:
        """A message's image parts decoded (runtime.vision.load_image): a bad image is a 400 before anything runs.
        Safe on worker threads: nothing shared is written."""
        if not isinstance(message.get("content"), list):
            return message
        parts = [{"type": "image", "image": self._image(p)} if p.get("type") == "image" else p
                 for p in message["content"]]
        return dict(message, content=parts)

    def _image(self, part: dict):
        name = _named(part["file"]) if "file" in part else None  # never the path it resolved to
        return load_image(self._image_source(part), name=name)

    def _image_source(self, part: dict):
        """The bytes of a data: URL, or a local file under --image-files (never anything outside it). Errors name
        the request's own value: a client never sees the server's paths."""
        if "file" not in part:
            return part["image"]
        value = part["file"]
        if self.image_files is None:
            raise ApiError(400, "local image files are off: serve with --image-files DIR, or send a data: URL",
                           param="messages")
        if "\0" in value:
            raise ApiError(400, f"{_named(value)}: a file path has no NUL character", param="messages")
        try:
            path = (self.image_files / value).resolve()  # a relative path is under the image directory
        except RuntimeError:  # a symlink loop (Python < 3.13; an OSError after)
            raise ApiError(400, f"{_named(value)}: a symlink loop", param="messages") from None
        except OSError as e:
            raise ApiError(400, f"{_named(value)}: {e.strerror or 'not a usable path'}", param="messages") from None
        if not path.is_relative_to(self.image_files):
            raise ApiError(400, f"{_named(value)}: outside the image directory (serve --image-files)", param="messages")
        return path

    def text_prompt(self, prompt: str) -> tuple[list[int], dict]:
        return self.model.tokenize(prompt, add_special=True, parse_special=True), {}

    def request_options(self, body: dict, options: dict) -> dict:
        """The request's options, merged with what its prompt adds, as this model runs them; a body field the model
        cannot use is an ApiError naming it (serving.sudoku has both)."""
        return options

    def finish(self, completion: Completion, prompt: list[int], calls=None) -> str:
        """The OpenAI finish_reason of `completion`; `prompt`: the request's token ids."""
        return "tool_calls" if calls else "length" if completion.finish_reason == "length" else "stop"

    def extra(self, completion: Completion, prompt: list[int]) -> dict:
        """What the model adds to a response's `dglocal` object."""
        return {}

    def answer(self, completion: Completion) -> str:
        return completion.text

    def pieces(self, ids: list[int]) -> list[str]:
        """Each canvas position's text, for the live canvas."""
        return [self.model.detokenize([t]) for t in ids]


def _named(value: str) -> str:
    """A request's path as its errors name it: quoted (a NUL shows as \\x00), its middle cut when long."""
    r = repr(value)
    return r if len(r) <= 80 else r[:38] + "..." + r[-39:]


def chat_page(frontend: Frontend) -> str:
    """The web page at /: a chat (or, for the Sudoku model, a board) beside the live canvas; its requests are the
    API's own, streamed with include_drafts."""
    from importlib.resources import files

    settings = {"model": frontend.id, "sudoku": getattr(frontend, "sudoku", False),
                "canvas": frontend.model.canvas_length}
    html = files("dglocal.serving").joinpath("page.html").read_text(encoding="utf-8")
    return html.replace("/*DGLOCAL*/{}", json.dumps(settings).replace("<", "\\u003c"))
