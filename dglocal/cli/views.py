"""The views of the chat loop. `RichView` draws on a terminal: committed text streams, the active canvas redraws
live as it denoises (accepted positions bold, still-noisy ones dim), a one-line stat closes each answer.
`PlainView` reads and writes plain lines for pipes and files: no control codes. A view has a method per event
kind (step, block) besides its prompts and notices."""

from __future__ import annotations

import re
import sys
import time

from dglocal.generation.events import BlockText, Completion, Step


def stat_line(c: Completion) -> str:
    s = c.stats
    parts = [f"{s.generated_tokens} tokens", f"{s.canvases} canvases", f"{sum(s.steps_per_canvas)} steps",
             f"{s.tokens_per_second:.1f} tok/s", f"first token {s.time_to_first_token:.2f} s"]
    if c.finish_reason == "length":
        parts.append("length limit")
    return " · ".join(parts)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls except \t and \n


def clean(text: str) -> str:
    """Model text made safe for a terminal: control characters (ESC included) become '·'."""
    return _CONTROL.sub("·", text)


class PlainView:
    """Pipes and files: answers as plain text on stdout, one turn per input line, no control codes."""

    def __init__(self, stdin=None, stdout=None, stderr=None):
        self.stdin, self.stdout, self.stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr

    def read(self) -> str:
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def begin_answer(self) -> None:
        self._wrote = False

    def step(self, event: Step) -> None:
        pass

    def block(self, event: BlockText) -> None:
        self.stdout.write(event.text)
        self.stdout.flush()
        self._wrote = True

    def thinking(self, text: str) -> None:
        """The model's thinking: on stderr, so that stdout holds the answer alone."""
        self.stderr.write(text)
        self.stderr.flush()

    def end_answer(self, completion: Completion | None, *, stopped: bool = False) -> None:
        if completion is not None or stopped or self._wrote:
            self.stdout.write("\n")
            self.stdout.flush()
        if stopped:
            print("[stopped]", file=self.stderr, flush=True)

    def end_of_input(self) -> None:
        pass

    def cancelled_input(self) -> None:
        pass

    def notice(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=self.stderr, flush=True)

    def table(self, title: str, rows) -> None:
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            print(f"{key:<{width}}  {value}", file=self.stdout)
        self.stdout.flush()


class RichView:
    """A terminal: live canvas, streamed committed text, stat line, readline prompt."""

    PROMPT = "> "
    FPS = 20  # redraws per second at most: a fast GPU steps far quicker than a terminal can draw

    def __init__(self, piece, console=None):
        from rich.console import Console

        try:
            import readline  # noqa: F401 (line editing and history for input())
        except ImportError:
            pass
        self.console = console or Console(highlight=False)
        self.piece = piece  # token id -> str
        self._pieces: dict[int, str] = {}
        self.live = None
        self.pending = ""  # committed text of the current line, not yet printed above the live area
        self.draft: Step | None = None
        self._drawn = 0.0

    def read(self) -> str:
        return self.console.input(f"[bold green]{self.PROMPT}[/]")

    def banner(self, title: str, detail: str) -> None:
        self.console.print(f"[bold]{title}[/]  [dim]{detail}[/]")
        self.console.print("[dim]/help for commands · Ctrl-C stops an answer · Ctrl-D quits[/]")

    def begin_answer(self) -> None:
        from rich.live import Live

        self.pending, self.draft = "", None
        self.live = Live(self._render(), console=self.console, auto_refresh=False, transient=True,
                         vertical_overflow="crop")
        self.live.start()

    def step(self, event: Step) -> None:
        self.draft = event
        now = time.perf_counter()
        if now - self._drawn >= 1 / self.FPS:
            self._redraw(now)

    def block(self, event: BlockText) -> None:
        from rich.text import Text

        self.draft = None
        lines = (self.pending + clean(event.text)).split("\n")
        for line in lines[:-1]:  # finished lines go above the live area, where the terminal scrolls them
            self.live.console.print(Text(line), soft_wrap=True)
        self.pending = lines[-1]
        self._redraw(time.perf_counter())

    def thinking(self, text: str) -> None:
        """The model's thinking, dimmed, above the live area."""
        from rich.text import Text

        self.live.console.print(Text(clean(text), style="dim italic"), soft_wrap=True, end="")

    def end_answer(self, completion: Completion | None, *, stopped: bool = False) -> None:
        from rich.text import Text

        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.pending or completion is not None or stopped:
            self.console.print(Text(self.pending), soft_wrap=True)
        self.pending, self.draft = "", None
        if stopped:
            self.console.print(Text("[stopped]", style="yellow"))
        elif completion is not None:
            self.console.print(Text(stat_line(completion), style="dim"))

    def end_of_input(self) -> None:
        self.console.print()

    def cancelled_input(self) -> None:
        self.console.print()
        self.notice("(Ctrl-D or /exit quits)")

    def notice(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text(text, style="dim"))

    def error(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text(f"error: {text}", style="bold red"))

    def table(self, title: str, rows) -> None:
        from rich.table import Table

        t = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
        for key, value in rows:
            t.add_row(f"[cyan]{key}[/]", _text(value))
        self.console.print(t)

    # -- the live area: the current line of committed text, then the canvas being denoised
    def _redraw(self, now: float) -> None:
        if self.live is not None:
            self.live.update(self._render(), refresh=True)
            self._drawn = now

    def _render(self):
        from rich.console import Group
        from rich.text import Text

        parts = [Text(self.pending)] if self.pending else []
        ev = self.draft
        if ev is not None:
            canvas = Text()
            for token, accepted in zip(ev.argmax.tolist(), ev.accepted.tolist()):
                canvas.append(self._piece(token), style="bold" if accepted else "dim magenta")
            n = int(ev.accepted.sum())
            status = (f"canvas {ev.block + 1} · step {ev.step} · T {ev.temperature:.2f} · "
                      f"accepted {n}/{len(ev.accepted)} · entropy {ev.mean_entropy:.3f}")
            parts += [canvas, Text(status, style="dim")]
        return Group(*parts)

    def _piece(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:  # drafts show every position on one flow: newlines as ↵
            text = self._pieces[token] = clean(self.piece(token).replace("\n", "↵").replace("\t", " "))
        return text


def _text(value):
    from rich.text import Text

    return Text(str(value))


def make_view(model, *, interactive: bool):
    """RichView when both ends are a terminal, else PlainView."""
    if interactive:
        return RichView(lambda t: model.token_piece(t).decode("utf-8", "replace"))
    return PlainView()


def is_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
