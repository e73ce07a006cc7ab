"""Everything that draws on the terminal, and the chat loop it serves.

`ChatLoop` is the chat's logic (turns, slash commands, settings) and never touches rich: it talks to a
view. `RichView` draws on a terminal: committed text streams, the active canvas redraws live as it denoises
(accepted positions bold, still-noisy ones dim), a one-line stat closes each answer. `PlainView` reads and
writes plain lines for pipes and files: no control codes. The other `show_*`/`print_*` helpers render the
results of `dglocal convert` / `info` and errors for the CLI.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
import time
from contextlib import closing, contextmanager

import numpy as np

from .config import GenerationConfig
from .errors import ConfigError, DglocalError
from .generate import BlockText, Completion, Step

# -- the chat loop (no terminal code) ---------------------------------------------------------------------

# CLI spellings accepted by /set, besides the GenerationConfig field names themselves
SET_ALIASES = {
    "n": "max_new_tokens", "steps": "max_denoising_steps", "stability": "stability_threshold",
    "confidence": "confidence_threshold",
}
INT_FIELDS = {"max_new_tokens", "max_denoising_steps", "stability_threshold", "seed"}
FLOAT_FIELDS = {"entropy_bound", "t_min", "t_max", "confidence_threshold"}

COMMANDS = [
    ("/reset", "forget the conversation and empty the cache"),
    ("/stats", "statistics of the last answer"),
    ("/set", "show the generation settings; /set <param> <value> changes one: a name /set shows, or steps, "
             "n, stability, confidence, t-min, t-max, entropy-bound (e.g. /set steps 16)"),
    ("/help", "this list"),
    ("/exit", "quit (also Ctrl-D); Ctrl-C stops an answer"),
]


class RawSession:
    """A model without a chat template: each message is a raw prompt (the cache still reuses common prefixes)."""

    def __init__(self, model):
        self.model = model

    def stream(self, content, **options):
        return self.model.stream(content, **options)

    def reset(self) -> None:
        pass

    @property
    def seq(self):
        return (self.model._default or (None,))[0]


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
        if field == "eos_token_id":
            return field, tuple(int(t) for t in value.replace(",", " ").split())
    except ValueError:
        raise ConfigError(f"{name} needs a number, got {value!r}") from None
    known = sorted(INT_FIELDS | FLOAT_FIELDS | {"stop", "eos_token_id"} | set(SET_ALIASES))
    raise ConfigError(f"unknown setting {name!r}; known: {', '.join(known)}")


class ChatLoop:
    """Turns and slash commands over a model's chat session; renders only through `view`."""

    def __init__(self, model, view, **options):
        self.model, self.view = model, view
        self.options = {k: v for k, v in options.items() if v is not None}
        self.config = GenerationConfig.from_metadata(model.metadata, **self.options)  # validates the options
        self.session = model.chat() if model.chat_template else RawSession(model)
        self.last: Completion | None = None

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
        try:
            with closing(self.session.stream(content, **self.options)) as events:
                for event in events:
                    if isinstance(event, Step):
                        self.view.step(event)
                    elif isinstance(event, BlockText):
                        self.view.block(event)
                    elif isinstance(event, Completion):
                        done = self.last = event
        except KeyboardInterrupt:
            stopped = True
        finally:
            self.view.end_answer(done, stopped=stopped)
        return done

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
        else:
            self.view.error(f"unknown command {name}; /help lists them")
        return True

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
        ]


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return " ".join(repr(v) if isinstance(v, str) else str(v) for v in value) or "()"
    return str(value)


def stat_line(c: Completion) -> str:
    s = c.stats
    parts = [f"{s.generated_tokens} tokens", f"{s.canvases} canvases", f"{sum(s.steps_per_canvas)} steps",
             f"{s.tokens_per_second:.1f} tok/s", f"first token {s.time_to_first_token:.2f} s"]
    if c.finish_reason == "length":
        parts.append("length limit")
    return " · ".join(parts)


# -- views ---------------------------------------------------------------------------------------------------

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


# -- CLI output: errors, status, convert and info -------------------------------------------------------

def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def print_error(message: str, traceback_text: str | None = None) -> None:
    """One red line on stderr (plain when stderr is not a terminal), after the traceback if given."""
    from rich.text import Text

    if traceback_text:
        sys.stderr.write(traceback_text)
    _console(stderr=True).print(Text(f"error: {message}", style="bold red"), soft_wrap=True)


def print_status(message: str) -> None:
    """A dim status line on stderr (stdout stays the answer's)."""
    from rich.text import Text

    _console(stderr=True).print(Text(message, style="dim"), soft_wrap=True)


@contextmanager
def status(message: str):
    """A spinner on a terminal while something slow runs (loading a model); nothing otherwise."""
    console = _console(stderr=True)
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


@contextmanager
def byte_progress(description: str):
    """A progress bar over bytes; yields the `progress(name, done, total)` callback convert() takes."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
               TextColumn("[dim]{task.fields[item]}")]
    with Progress(*columns, console=_console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None, item="")

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, item=name)

        yield progress


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def show_converted(result) -> None:
    """A ConvertResult (or synth's SynthResult): the file written and its notes."""
    console = _console()
    console.print(f"wrote [bold]{result.path}[/] ({result.type}, {result.n_tensors} tensors, {_size(result.size)})")
    for note in getattr(result, "notes", ()):
        console.print(f"[dim]note: {note}[/]")


def show_dry_run(plan) -> None:
    from collections import Counter

    from rich.table import Table

    console = _console()
    counts, sizes = Counter(), Counter()
    for row in plan.tensors:
        counts[row.type] += 1
        sizes[row.type] += row.nbytes
    t = Table(title=f"plan: {plan.type}{' (estimated mix)' if plan.estimated else ''}", title_justify="left")
    t.add_column("type")
    t.add_column("tensors", justify="right")
    t.add_column("size", justify="right")
    for name in sorted(counts, key=lambda k: -sizes[k]):
        t.add_row(name, str(counts[name]), _size(sizes[name]))
    console.print(t)
    if plan.placement is not None:  # llama.cpp's own sizes for these shapes, and the placement that fits
        from .plan import render

        render(plan.placement, console)
        return
    rows = [("weights (file)", _size(plan.weights_bytes)),
            (f"KV cache (f16, {plan.context} tokens)", _size(plan.kv_cache_bytes)),
            ("compute (estimate)", _size(plan.compute_bytes)),
            ("total", _size(plan.total_bytes))]
    if plan.vram_bytes is not None:
        verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
        rows.append((f"VRAM {_size(plan.vram_bytes)}", verdict))
    for key, value in rows:
        console.print(f"{key:<32} {value}")
    if plan.generation:
        console.print("[dim]generation config: " + ", ".join(f"{k}={v}" for k, v in plan.generation.items()) + "[/]")


def show_info(info) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{info.path}[/]  {_size(info.file_size)}")
    head = [("architecture", info.architecture), ("name", info.name), ("file type", info.file_type),
            ("tensors", info.n_tensors), ("parameters", f"{info.n_params:,}")]
    for title, rows in (("model", head), ("diffusion", info.diffusion.items()),
                        ("hyperparameters", info.hparams.items()), ("tokenizer", info.tokenizer.items())):
        t = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 2))
        for key, value in rows:
            t.add_row(f"[cyan]{key}[/]", _text(_short(value)))
        console.print(t)
    t = Table(title="tensor types", title_justify="left")
    t.add_column("type")
    t.add_column("tensors", justify="right")
    t.add_column("size", justify="right")
    for name, mix in info.quant_mix.items():
        t.add_row(name, str(mix["tensors"]), _size(mix["bytes"]))
    console.print(t)
    if info.kv_cache:
        console.print(f"KV cache: {info.kv_cache}")


def _short(value, limit: int = 80) -> str:
    value = value.tolist() if hasattr(value, "tolist") else value
    text = f"{value:.7g}" if isinstance(value, float) else str(value)  # GGUF floats are f32: 7 digits
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- dglocal sudoku: the board ----------------------------------------------------------------------------------

def sudoku_board(puzzle, cells, accepted=None, bad=(), guided=()):
    """A 9x9 board as rich Text: givens bold, accepted digits green, still-noisy draft digits dim, cells the guide
    re-noised this step yellow on red, `bad` cells red."""
    from rich.text import Text

    board = Text()
    for r in range(9):
        if r and r % 3 == 0:
            board.append("───────┼───────┼───────\n", style="dim")
        for c in range(9):
            i = r * 9 + c
            if c and c % 3 == 0:
                board.append(" │", style="dim")
            style = ("bold red" if i in bad else "bold yellow on red" if i in guided else "bold" if puzzle[i] else
                     "green" if accepted is None or accepted[i] else "dim magenta")
            board.append(" " + (str(cells[i]) if cells[i] else "·"), style=style)
        board.append("\n")
    return board


@contextmanager
def sudoku_live():
    """Yields draw(puzzle, cells, step): the board redrawn in place on a terminal (at most RichView.FPS a second)."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    console = _console()
    if not console.is_terminal:
        yield lambda puzzle, cells, step: None
        return
    drawn, interventions = [0.0], [0]

    def draw(puzzle, cells, step) -> None:
        guided = set(np.flatnonzero(step.guided).tolist()) if step.guided is not None else set()
        interventions[0] += len(guided)
        now = time.perf_counter()
        if now - drawn[0] >= 1 / RichView.FPS or guided:
            status = Text(f"step {step.step} · T {step.temperature:.2f} · accepted {int(step.accepted.sum())}/81 · "
                          f"entropy {step.mean_entropy:.3f}"
                          + (f" · guide re-noised {interventions[0]}" if step.guided is not None else ""), style="dim")
            live.update(Group(sudoku_board(puzzle, cells, step.accepted.tolist(), guided=guided), status),
                        refresh=True)
            drawn[0] = now

    with Live(console=console, auto_refresh=False, transient=True) as live:
        yield draw


def show_sudoku(result, bad=()) -> None:
    """The final board and its verdict: solved only if check_grid passed."""
    from rich.text import Text

    console = _console()
    console.print(sudoku_board(result.puzzle, result.grid, bad=set(bad)), end="", soft_wrap=True)
    detail = Text(f" · {result.steps} steps · {result.seconds:.2f} s", style="dim")
    if result.solved:
        console.print(Text("solved", style="bold green") + detail, soft_wrap=True)
    else:
        console.print(Text(f"unsolved: {len(bad)} bad cells", style="bold red") + detail, soft_wrap=True)


@contextmanager
def sudoku_progress(total: int):
    """A progress bar over puzzles on stderr (transient); yields advance()."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("solving"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=_console(stderr=True), transient=True) as bar:
        task = bar.add_task("solving", total=total)
        yield lambda: bar.advance(task)


def show_sudoku_eval(result, max_steps) -> None:
    acc = "n/a (no solutions in the file)" if result.blank_acc is None else f"{result.blank_acc:.1%}"
    _console().print(f"{result.n} puzzles: solved {result.solved:.1%}, blank-cell accuracy {acc}, "
                     f"mean steps {result.steps:.1f} (max {max_steps}), {result.seconds:.0f} s", soft_wrap=True)
