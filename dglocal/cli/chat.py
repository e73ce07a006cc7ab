"""The chat loop of `dglocal run`: turns, slash commands and settings over a model's chat session. It never
touches rich: it talks to a view (dglocal.cli.views), and dispatches a generation's events by their kind."""

from __future__ import annotations

import dataclasses
import shlex
from contextlib import closing

from dglocal.errors import ConfigError, DglocalError
from dglocal.generation.config import GenerationConfig
from dglocal.generation.channels import StreamSplitter, split
from dglocal.generation.editing import edit_request
from dglocal.generation.events import BlockText, Completion
from dglocal.runtime.vision import MARKER, load_image

# CLI spellings accepted by /set, besides the GenerationConfig field names themselves
SET_ALIASES = {
    "n": "max_new_tokens", "steps": "max_denoising_steps", "stability": "stability_threshold",
    "confidence": "confidence_threshold", "temp": "temperature",
}
INT_FIELDS = {"max_new_tokens", "max_denoising_steps", "stability_threshold", "seed", "top_k", "fast_k"}
FLOAT_FIELDS = {"entropy_bound", "t_min", "t_max", "confidence_threshold", "temperature", "top_p", "min_p"}

COMMANDS = [
    ("/reset", "forget the conversation and empty the cache"),
    ("/stats", "statistics of the last answer"),
    ("/set", "show the generation settings; /set <param> <value> changes one: a name /set shows, or steps, "
             "n, stability, confidence, t-min, t-max, entropy-bound, temp, top-k, top-p, min-p, sampler, fast-k "
             "(e.g. /set steps 16, /set sampler fast)"),
    ("/edit", "re-noise part of the last answer, the rest kept: /edit 2-3 (lines), /edit /REGEX/ (its matches), "
              "/edit /REGEX/ +8 (room for 8 more tokens in each)"),
    ("/image", "attach an image to the next message: /image PATH (needs --mmproj)"),
    ("/help", "this list"),
    ("/exit", "quit (also Ctrl-D); Ctrl-C stops an answer"),
]


class RawSession:
    """A model without a chat template: each message is a raw prompt (the cache still reuses common prefixes)."""

    def __init__(self, model):
        self.model, self.last_prompt, self.last_images = model, None, []

    def stream(self, content, *, images=(), **options):
        if images and MARKER not in content:  # a raw prompt: the images first
            content = MARKER * len(images) + content
        self.last_prompt, self.last_images = content, list(images)
        return self.model.stream(content, images=images, **options)

    def answer_context(self):
        """What the last answer followed (prompt, images), and where an edited answer is kept (nowhere)."""
        return self.last_prompt, self.last_images, lambda text: None

    def reset(self) -> None:
        pass

    def stream_prompt(self, prompt, **options):
        return self.model.stream(prompt, **options)

    @property
    def seq(self):
        return self.model.session_sequence


def parse_setting(name: str, value: str) -> tuple[str, object]:
    """`/set` arguments -> (GenerationConfig field, value); ConfigError names a bad name or value."""
    field = SET_ALIASES.get(name, name.replace("-", "_"))
    try:
        if field in INT_FIELDS:
            return field, int(value)
        if field in FLOAT_FIELDS:
            return field, float(value)
        if field == "stop":
            return field, tuple(shlex.split(value))
        if field == "sampler":
            return field, value
        if field == "eos_token_id":
            return field, tuple(int(t) for t in value.replace(",", " ").split())
    except ValueError:
        raise ConfigError(f"{name} needs a number, got {value!r}") from None
    known = sorted(INT_FIELDS | FLOAT_FIELDS | {"stop", "eos_token_id", "sampler"} | set(SET_ALIASES))
    raise ConfigError(f"unknown setting {name!r}; known: {', '.join(known)}")


class ChatLoop:
    """Turns and slash commands over a model's chat session; renders only through `view`."""

    def __init__(self, model, view, *, grammar=None, draft=None, template_kwargs=None, show_thinking: bool = True,
                 **options):
        self.model, self.view, self.grammar, self.show_thinking = model, view, grammar, show_thinking
        self.draft = draft  # --draft: each answer's canvases start from it
        self.options = {k: v for k, v in options.items() if v is not None}
        self.config = GenerationConfig.from_metadata(model.metadata, **self.options)  # validates the options
        self.session = model.chat(template_kwargs=template_kwargs) if model.chat_template else RawSession(model)
        self.last: Completion | None = None
        self.images: list = []  # attached with /image (or --image): they go with the next message

    def run(self) -> None:
        """Read and answer until /exit or end of input (Ctrl-D)."""
        while True:
            try:
                line = self.view.read()
            except EOFError:
                self.view.end_of_input()
                return
            except KeyboardInterrupt:  # at the prompt: drop the line, stay
                self.view.cancelled_input()
                continue
            if not self.handle(line):
                return

    def handle(self, line: str) -> bool:
        """One input line; False when the loop should end."""
        text = line.strip()
        if not text:
            return True
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the terminal or pipe could not decode, kept as surrogates
            self.view.error(f"the line is not UTF-8 text (an undecodable byte at character {e.start + 1})")
            return True
        if text.startswith("/"):
            return self.command(text)
        try:
            self.ask(text)
        except DglocalError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            self.view.error(str(e))
        return True

    def ask(self, content: str) -> Completion | None:
        """One turn, drawn by the view; None when Ctrl-C stopped it (the session stays usable)."""
        self.view.begin_answer()
        done, stopped = None, False
        channels = StreamSplitter(tools=False)  # the thinking block apart from the answer
        extra = {k: v for k, v in (("grammar", self.grammar), ("draft", self.draft)) if v is not None}
        if self.images:
            extra["images"], self.images = self.images, []
        try:
            with closing(self.session.stream(content, **self.options, **extra)) as events:
                for event in events:
                    if event.kind == "done":
                        thought, text, _ = channels.finish()
                        self._show(event, thought, text)
                        done = self.last = event
                    elif event.kind == "block":
                        self._show(event, *channels.feed(event.text))
                    else:
                        self.view.step(event)
        except KeyboardInterrupt:
            stopped = True
        finally:
            self.view.end_answer(done, stopped=stopped)
        return done

    def _show(self, event, thought: str, text: str) -> None:
        """A block (or the end of the reply) as the view draws it: its thinking apart, then its answer text."""
        if thought and self.show_thinking:
            self.view.thinking(thought)
        if event.kind == "block":
            self.view.block(dataclasses.replace(event, text=text))
        elif text:  # held back until the reply ended
            self.view.block(BlockText(-1, [], text, 0))

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.view.table("commands", COMMANDS)
        elif name == "/reset":
            self.session.reset()
            self.last = None
            self.view.notice("conversation cleared")
        elif name == "/stats":
            self.view.table("last answer", self.stats_rows())
        elif name == "/set":
            self.set(arg)
        elif name == "/edit":
            try:
                self.edit(arg)
            except DglocalError as e:
                self.view.error(str(e))
        elif name == "/image":
            try:
                self.attach(arg)
            except DglocalError as e:
                self.view.error(str(e))
        else:
            self.view.error(f"unknown command {name}; /help lists them")
        return True

    def attach(self, path: str, *, announce: bool = True) -> None:
        """/image PATH (and --image): the image goes with the next message."""
        vision = getattr(self.model, "vision", None)
        if vision is None:
            raise ConfigError("/image needs a vision tower: start with --mmproj FILE")
        if not path:
            raise ConfigError("/image takes a path: /image cat.png")
        image = load_image(path.strip().strip("'\""))
        n_tokens = vision.n_tokens(image)  # one the tower cannot place is refused now, not with every later message
        self.images.append(image)
        if announce:
            w, h = image.size
            self.view.notice(f"image attached: {w}x{h}, {n_tokens} tokens; it goes with your next message")

    def edit(self, arg: str) -> Completion | None:
        """/edit: the last answer's lines or pattern matches re-noised and denoised in place, drawn as an answer."""
        if self.last is None:
            raise ConfigError("/edit needs an answer to edit: ask something first")
        text = self.last.text
        shown = split(text, tools=False).content  # the answer as drawn: its lines, not the thinking before them
        hidden = len(text) - len(shown) if text.endswith(shown) else 0
        spans, room = edit_spans(text[hidden:], arg)
        spans = [(a + hidden, b + hidden) for a, b in spans]
        prompt, images, keep = self.session.answer_context()
        options = {k: v for k, v in self.options.items() if k != "max_new_tokens"}
        req = edit_request(self.model, text, spans, prompt=prompt, room=room, images=images, **options)
        self.view.begin_answer()
        done, stopped = None, False
        try:
            # on the conversation's own sequence: its history is the edit's prompt, cached, and stays so for the
            # next turn
            with closing(self.session.stream_prompt(req.prompt, **req.options)) as events:
                for event in events:
                    if event.kind == "step":
                        self.view.step(event)
                    elif event.kind == "done":
                        done = event
        except KeyboardInterrupt:
            stopped = True
        if done is not None:
            edited = req.result(done)
            self.view.block(BlockText(-1, [], edited.text, 0))
            keep(edited.text)
            self.last = dataclasses.replace(done, text=edited.text)
        self.view.end_answer(done, stopped=stopped)
        if done is not None:
            self.view.table("changed", [(repr(c.old), repr(c.new)) for c in edited.changes])
        return done

    def set(self, arg: str) -> None:
        if not arg:
            rows = [(f.name, _fmt(getattr(self.config, f.name))) for f in dataclasses.fields(self.config)]
            self.view.table("settings", rows)
            return
        name, _, value = arg.partition(" ")
        try:
            if not value.strip():
                raise ConfigError(f"/set {name} needs a value")
            field, parsed = parse_setting(name, value.strip())
            options = {**self.options, field: parsed}
            self.config = GenerationConfig.from_metadata(self.model.metadata, **options)
        except ConfigError as e:
            self.view.error(str(e))
            return
        self.options = options
        self.view.notice(f"{field} = {_fmt(getattr(self.config, field))}")

    def stats_rows(self) -> list[tuple[str, str]]:
        seq = getattr(self.session, "seq", None)
        rows = [("context", f"{seq.n_past if seq is not None and seq.live else 0} / {self.model.n_ctx} tokens")]
        if self.last is None:
            return rows + [("answer", "none yet")]
        s = self.last.stats
        return rows + [
            ("prompt tokens", str(s.prompt_tokens)),
            ("prefilled tokens", f"{s.prefilled_tokens} (the rest came from the cache)"),
            ("generated tokens", f"{s.generated_tokens} ({self.last.finish_reason})"),
            ("canvases", str(s.canvases)),
            ("steps per canvas", " ".join(map(str, s.steps_per_canvas))),
            ("tokens per forward", f"{s.tokens_per_forward:.2f}"),
            ("ms per step", f"{s.ms_per_step:.1f}"),
            ("tokens per second", f"{s.tokens_per_second:.1f}"),
            ("time to first token", f"{s.time_to_first_token:.2f} s"),
            ("prefill", f"{s.prefill_seconds:.2f} s"),
            ("total", f"{s.total_seconds:.2f} s"),
            ("seed", str(s.seed)),  # --seed N with the same settings repeats the answer
        ]


def edit_spans(text: str, arg: str) -> tuple[list[tuple[int, int]], int]:
    """/edit's argument -> (character spans of `text`, room): `A` or `A-B` (lines, from 1) or `/REGEX/`, then an
    optional `+N` of extra room per span."""
    import re

    arg, room = arg.strip(), 0
    head, _, tail = arg.rpartition(" +")
    if head and tail.isdigit():
        arg, room = head.strip(), int(tail)
    if len(arg) >= 2 and arg[0] == arg[-1] == "/":
        try:
            spans = [m.span() for m in re.finditer(arg[1:-1], text) if m.end() > m.start()]
        except re.error as e:
            raise ConfigError(f"/edit: {arg} is not a regular expression: {e}") from None
        if not spans:
            raise ConfigError(f"/edit: {arg} matches nothing in the last answer")
        return spans, room
    lines = re.fullmatch(r"(\d+)(?:-(\d+))?", arg)
    if not lines:
        raise ConfigError("/edit takes line numbers (2 or 2-4) or /REGEX/, then optionally +N for more room")
    first, last = int(lines[1]), int(lines[2] or lines[1])
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    if not 1 <= first <= last <= len(starts):
        raise ConfigError(f"/edit: lines {first}-{last}, the last answer has {len(starts)}")
    end = starts[last] - 1 if last < len(starts) else len(text)
    return [(starts[first - 1], end)], room


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return " ".join(repr(v) if isinstance(v, str) else str(v) for v in value) or "()"
    return str(value)


