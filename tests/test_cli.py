"""`dglocal` as users run it: in a real terminal (tmux), through pipes, and its --help, on the tiny model.

The terminal tests need tmux (`apt-get install -y tmux`): without it they fail, they never skip.
Generation options stay tiny (-c 1024, a few steps, -n 16..32) so every program run takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from dglocal import cli
from dglocal.convert import hub
from dglocal.errors import ConfigError, ModelError

pytestmark = pytest.mark.backend

_script = Path(sys.executable).with_name("dglocal")
DGLOCAL = [str(_script)] if _script.is_file() else [sys.executable, "-m", "dglocal.cli"]
SMALL = ["-c", "1024", "-t", "1", "--seed", "1"]
STAT = re.compile(r"(\d+) tokens · (\d+) canvases · (\d+) steps · [\d.]+ tok/s · first token [\d.]+ s")
ESC = "\x1b"


def program_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DGLOCAL_DEBUG"}
    env.update(extra)
    return env


def piped(*args, input=None, **env) -> subprocess.CompletedProcess:
    """The program with stdin and stdout not a terminal."""
    return subprocess.run([*DGLOCAL, *map(str, args)], input=input, stdin=None if input else subprocess.DEVNULL,
                          capture_output=True, text=True, env=program_env(**env), timeout=300)


# -- a real terminal --------------------------------------------------------------------------------------

class Tmux:
    """One program in a tmux pane on a private server; the screen read back as text."""

    def __init__(self, width: int = 120, height: int = 40):
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed: the chat is tested in a real terminal (CI: apt-get install -y tmux)")
        self.base = ["tmux", "-L", f"dglocal-test-{uuid.uuid4().hex[:8]}", "-f", "/dev/null"]
        self.size = (width, height)

    def tmux(self, *args) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True, timeout=30).stdout

    def start(self, *argv) -> None:
        w, h = self.size
        self.tmux("new-session", "-d", "-s", "t", "-x", str(w), "-y", str(h), *argv, ";",
                  "set", "-g", "remain-on-exit", "on")

    def send(self, *keys) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def type(self, line: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", line)
        self.send("Enter")

    def screen(self, escapes: bool = False) -> str:
        """Scrollback and screen, wrapped lines joined; with escapes, the SGR codes too."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-500", "-t", "t", *(["-e"] if escapes else []))

    def dead(self) -> tuple[bool, int]:
        parts = self.tmux("display", "-p", "-t", "t", "#{pane_dead} #{pane_dead_status}").split()
        return parts[0] == "1", int(parts[1]) if len(parts) > 1 else 0

    def wait(self, ready, what: str, timeout: float = 120, escapes: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen(escapes)
            if ready(text):
                return text
            if time.monotonic() > deadline or (self.dead()[0] and not ready(self.screen(escapes))):
                pytest.fail(f"timed out waiting for {what}; the terminal shows:\n{self.screen()}")
            time.sleep(0.1)

    def wait_prompt(self, what: str = "the prompt", timeout: float = 120) -> str:
        return self.wait(lambda s: _last_line(s) == ">", what, timeout)

    def close(self) -> None:
        socket = subprocess.run([*self.base, "display", "-p", "#{socket_path}"], capture_output=True, text=True)
        subprocess.run([*self.base, "kill-server"], capture_output=True)
        if socket.returncode == 0 and socket.stdout.strip():
            Path(socket.stdout.strip()).unlink(missing_ok=True)  # tmux leaves the socket file behind


def _last_line(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture
def term():
    t = Tmux()
    yield t
    t.close()


def _stats(screen: str) -> dict[str, int]:
    """The numbers of the last /stats table on the screen."""
    table = screen[screen.rindex("last answer"):]
    return {key: int(re.search(rf"^{key}\s+(\d+)", table, re.M).group(1))
            for key in ("prompt tokens", "prefilled tokens", "generated tokens")}


def test_chat_two_turns_reuse_the_cache(term, tiny_f32_gguf):
    term.start(*DGLOCAL, "run", tiny_f32_gguf, *SMALL, "--steps", "4", "-n", "16")
    term.wait_prompt("the chat prompt")

    term.type("hello")
    first = term.wait(lambda s: len(STAT.findall(s)) == 1 and _last_line(s) == ">", "the first answer")
    answer = first[first.index("> hello") + len("> hello"):STAT.search(first).start()]
    assert answer.strip(), f"no answer text between the question and the stat line:\n{first}"
    assert int(STAT.search(first).group(1)) > 0

    term.type("/stats")
    s1 = _stats(term.wait(lambda s: s.count("last answer") == 1 and _last_line(s) == ">", "/stats"))
    assert s1["prefilled tokens"] == s1["prompt tokens"] > 0  # a fresh cache: the whole prompt encoded

    term.type("again")
    second = term.wait(lambda s: len(STAT.findall(s)) == 2 and _last_line(s) == ">", "the second answer")
    answer = second[second.index("> again") + len("> again"):list(STAT.finditer(second))[-1].start()]
    assert answer.strip(), f"no second answer:\n{second}"

    term.type("/stats")
    s2 = _stats(term.wait(lambda s: s.count("last answer") == 2 and _last_line(s) == ">", "/stats"))
    assert s2["prompt tokens"] > s1["prompt tokens"] + s1["generated tokens"] - 1  # the history is in the prompt
    assert 0 < s2["prefilled tokens"] < s2["prompt tokens"], s2  # ... and came from the cache

    term.send("C-d")
    term.wait(lambda s: term.dead()[0], "the program to exit on Ctrl-D", timeout=30)
    assert term.dead() == (True, 0)


def test_stats_of_a_model_without_a_chat_template(term, tiny_f32_gguf, tmp_path):
    """Each message a raw prompt; /stats after the answer shows the context it holds and the answer's seed."""
    from test_robustness import _rewrite

    raw = _rewrite(tiny_f32_gguf, tmp_path / "raw.gguf", drop_keys=("tokenizer.chat_template",))
    term.start(*DGLOCAL, "run", raw, "-c", "1024", "-t", "1", "--steps", "2", "-n", "16")
    term.wait_prompt("the chat prompt")
    term.type("hello")
    term.wait(lambda s: len(STAT.findall(s)) == 1 and _last_line(s) == ">", "the answer")
    term.type("/stats")
    screen = term.wait(lambda s: "last answer" in s and _last_line(s) == ">", "/stats")
    table = screen[screen.rindex("last answer"):]
    stats = _stats(screen)
    held = int(re.search(r"^context\s+(\d+) / 1024 tokens", table, re.M).group(1))
    assert held == stats["prompt tokens"] > 0  # one canvas: nothing committed after the prompt
    assert re.search(r"^seed\s+\d+\s*$", table, re.M), table
    assert "Error" not in screen and "Traceback" not in screen
    term.type("/exit")
    term.wait(lambda s: term.dead()[0], "the program to exit", timeout=30)
    assert term.dead() == (True, 0)


def test_two_launches_without_a_seed_answer_differently(tiny_f32_gguf):
    """No --seed: each launch draws its own (llama.cpp's, ollama's rule); --seed repeats an answer exactly."""
    args = ["run", tiny_f32_gguf, "-c", "1024", "-t", "1", "--steps", "4", "-n", "32", "-p", "hello"]
    first, second = piped(*args), piped(*args)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.strip() and first.stdout != second.stdout
    again = [piped(*args, "--seed", "7").stdout for _ in range(2)]
    assert again[0] == again[1] and again[0].strip()


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(term, tiny_f32_gguf):
    # a long answer (many steps, early stop off); entropy bound ~0: one position accepted per step, the rest noisy
    term.start(*DGLOCAL, "run", tiny_f32_gguf, *SMALL, "--steps", "2000", "--confidence", "1e-9",
               "--entropy-bound", "1e-6", "-n", "64")
    term.wait_prompt()
    term.type("hello")
    live = term.wait(lambda s: re.search(r"canvas \d+ · step \d+", s) is not None, "the live canvas", escapes=True)
    # the draft is drawn between the question and its status line
    canvas = live[live.rindex("hello"):re.search(r"canvas \d+ · step \d+", live).start()]
    assert re.search(r"\x1b\[(0;)?1m", canvas), f"no accepted (bold) position drawn: {canvas!r}"
    assert re.search(r"\x1b\[(0;)?2m\x1b\[35m", canvas), f"no noisy (dim magenta) position drawn: {canvas!r}"

    term.send("C-c")
    stopped = term.wait(lambda s: "[stopped]" in s and _last_line(s) == ">", "the prompt after Ctrl-C", timeout=30)
    assert not term.dead()[0]
    assert not re.search(r"canvas \d+ · step \d+", stopped), "the live canvas was left on the screen"

    term.type("/set steps 4")
    term.type("/set n 16")
    term.type("again")
    term.wait(lambda s: STAT.search(s) is not None and _last_line(s) == ">", "an answer after Ctrl-C")
    term.type("/exit")
    term.wait(lambda s: term.dead()[0], "the program to exit on /exit", timeout=30)
    assert term.dead() == (True, 0)


# -- pipes: plain text ------------------------------------------------------------------------------------

def test_one_shot_without_a_terminal_prints_just_the_answer(tiny_f32_gguf):
    import dglocal

    with dglocal.load(tiny_f32_gguf, n_ctx=1024, n_threads=1) as model:
        expected = model.chat().send("hello", max_denoising_steps=4, max_new_tokens=32, seed=1).text
    assert expected.strip() and ESC not in expected  # else this test would prove nothing

    out = piped("run", tiny_f32_gguf, *SMALL, "--steps", "4", "-n", "32", "-p", "hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    assert ESC not in out.stdout + out.stderr


def test_one_shot_with_a_draft_starts_from_it(tiny_f32_gguf, tmp_path):
    import dglocal

    draft = tmp_path / "draft.txt"
    draft.write_text("Once upon a time, in a land far away")
    with dglocal.load(tiny_f32_gguf, n_ctx=1024, n_threads=1) as model:
        expected = model.chat().send("hello", max_denoising_steps=4, max_new_tokens=32, seed=1,
                                     draft=draft.read_text()).text
    out = piped("run", tiny_f32_gguf, *SMALL, "--steps", "4", "-n", "32", "-p", "hello", "--draft", draft)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    cold = piped("run", tiny_f32_gguf, *SMALL, "--steps", "4", "-n", "32", "-p", "hello")
    assert cold.stdout != out.stdout
    missing = piped("run", tiny_f32_gguf, "-p", "hello", "--draft", tmp_path / "nope.txt")
    assert missing.returncode == 1 and "--draft" in missing.stderr and "nope.txt" in missing.stderr


def test_piped_chat_is_plain_text(tiny_f32_gguf):
    out = piped("run", tiny_f32_gguf, *SMALL, "--steps", "4", "-n", "16", input="hello\n/stats\n/set steps x\n")
    assert out.returncode == 0, out.stderr
    assert ESC not in out.stdout + out.stderr
    assert re.search(r"^prompt tokens\s+\d+$", out.stdout, re.M), out.stdout
    assert "error: steps needs a number, got 'x'" in out.stderr



def test_sampling_flags_are_the_set_commands(tiny_f32_gguf):
    """--temp, --top-k, --top-p and --min-p (llama.cpp's spellings) set what /set temp, top-k, top-p and min-p set:
    the same seed gives the same answer either way, and not the answer without them."""
    common = ["--seed", "5", "-n", "24", "--steps", "8"]
    flags = piped("run", tiny_f32_gguf, *common, "--temp", "2.5", "--top-k", "4", "--top-p", "0.9", "--min-p",
                  "0.01", input="hello\n")
    typed = piped("run", tiny_f32_gguf, *common, input="/set temp 2.5\n/set top-k 4\n/set top-p 0.9\n"
                                                       "/set min-p 0.01\nhello\n")
    plain = piped("run", tiny_f32_gguf, *common, input="hello\n")
    assert flags.returncode == typed.returncode == plain.returncode == 0, flags.stderr + typed.stderr
    answer = flags.stdout.strip()
    assert answer and typed.stdout.strip().endswith(answer), (flags.stdout, typed.stdout)
    assert ["temperature = 2.5", "top_k = 4", "top_p = 0.9", "min_p = 0.01"] == typed.stdout.splitlines()[:4]
    assert plain.stdout.strip() != answer
    for flag, value, message in (("--temp", "-1", "temperature must be a number >= 0.0, got -1.0"),
                                 ("--top-p", "2", "top_p must be a number in (0, 1], got 2.0"),
                                 ("--min-p", "nan", "min_p must be a number in [0, 1], got nan")):
        out = piped("run", tiny_f32_gguf, flag, value, "-p", "hi")
        assert (out.returncode, out.stderr.strip()) == (1, f"error: {message}"), out.stderr


def test_a_line_that_is_not_utf8_is_said_and_the_chat_goes_on(tiny_f32_gguf):
    """Bytes the pipe cannot decode reached the tokenizer as surrogates: 'error: UnicodeEncodeError: ...'."""
    r = subprocess.run([*DGLOCAL, "run", str(tiny_f32_gguf), *SMALL, "--steps", "4", "-n", "8"],
                       input=b"\x00\x01\xff\nhello\n", capture_output=True, env=program_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().strip().splitlines() == [
        "error: the line is not UTF-8 text (an undecodable byte at character 3)"]
    assert r.stdout.strip()  # the next line was answered

def test_one_shot_with_a_schema_or_a_grammar_prints_what_it_allows(tiny_f32_gguf, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"enum": ["yes", "no"]}},
              "required": ["n", "s"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.gbnf").write_text('root ::= "Answer: " [a-z]{3,12} "."\n')
    common = (*SMALL, "--steps", "6", "-n", "64", "--seed", "3", "-p", "hello")
    out = piped("run", tiny_f32_gguf, *common, "--json-schema", tmp_path / "s.json")
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), schema)
    out = piped("run", tiny_f32_gguf, *common, "--grammar", tmp_path / "g.gbnf")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"Answer: [a-z]{3,12}\.\n", out.stdout), out.stdout
    out = piped("run", tiny_f32_gguf, *common, "--think", "--hide-thinking")
    assert out.returncode == 0, out.stderr

    (tmp_path / "bad.json").write_text("{nope")
    for args, message in [(("--json-schema", tmp_path / "bad.json"), "bad.json"),
                          (("--json-schema", tmp_path / "absent.json"), "absent.json"),
                          (("--grammar", tmp_path / "s.json"), "grammar"),
                          (("--json-schema", tmp_path / "s.json", "--grammar", tmp_path / "g.gbnf"), "one")]:
        out = piped("run", tiny_f32_gguf, *common, *args)
        assert out.returncode == 1 and len(out.stderr.splitlines()) == 1 and message in out.stderr, out.stderr


def _limit_memory():  # the child: a read without a bound fails in seconds, not after the machine's memory
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def test_option_files_are_read_within_a_bound(tiny_f32_gguf, tmp_path):
    """--grammar, --json-schema and --draft read /dev/zero until memory ran out; now at most 16 MiB of any file."""
    def run(*args):
        return subprocess.run([*DGLOCAL, "run", str(tiny_f32_gguf), "-p", "hi", *map(str, args)],
                              capture_output=True, text=True, env=program_env(), timeout=120,
                              stdin=subprocess.DEVNULL, preexec_fn=_limit_memory)

    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    for option in ("--grammar", "--json-schema", "--draft"):
        out = run(option, "/dev/zero")
        assert out.returncode == 1, out.stderr[-2000:]
        assert out.stderr.splitlines() == [f"error: {option} /dev/zero: more than 16 MiB, the most it reads"]
        out = run(option, tmp_path)
        assert out.returncode == 1 and out.stderr.splitlines() == [
            f"error: {option} {tmp_path}: cannot read it (Is a directory)"], out.stderr
        out = run(option, tmp_path / "latin1.txt")
        assert out.returncode == 1 and "latin1.txt: not UTF-8 text (byte 3 is 0xe9)" in out.stderr, out.stderr
    piped_schema = subprocess.run([*DGLOCAL, "run", str(tiny_f32_gguf), *SMALL, "--steps", "4", "-n", "32", "-p", "hi",
                                   "--json-schema", "/dev/stdin"], input='{"enum": ["yes", "no"]}',
                                  capture_output=True, text=True, env=program_env(), timeout=300)
    assert piped_schema.returncode == 0 and piped_schema.stdout in ('"yes"\n', '"no"\n'), piped_schema


def test_a_grammar_no_answer_can_match_is_an_error(tiny_f32_gguf, tmp_path):
    """They printed nothing and exited 0 (the engine's mask allowed the end alone), or crashed (5,000 rules)."""
    chain = "root ::= r0\n" + "".join(f'r{i} ::= "a" r{i + 1}\n' for i in range(5000)) + 'r5000 ::= "b"\n'
    cases = [("loop.lark", 'start: a\na: ("x" | "y") a\n', "the Lark grammar has no finite instance: 'a'"),
             ("empty.lark", "start: /[^\\x00-\\x{10FFFF}]/\n", "no text matches the Lark grammar"),
             ("long.lark", 'start: "ab"{300}\n', "the Lark grammar cannot end within max_tokens (64)"),
             ("deep.gbnf", chain, "the GBNF grammar nests more than 500 rules deep"),
             ("big.json", '{"type": "string", "maxLength": 1' + "0" * 400 + "}", "/maxLength is an integer of")]
    for name, text, words in cases:
        (tmp_path / name).write_text(text)
        option = "--json-schema" if name.endswith(".json") else "--grammar"
        out = piped("run", tiny_f32_gguf, *SMALL, "--steps", "4", "-n", "64", "-p", "hi", option, tmp_path / name)
        lines = out.stderr.splitlines()
        assert out.returncode == 1 and out.stdout == "" and len(lines) == 1, (name, out.returncode, out.stderr[-2000:])
        assert lines[0].startswith(f"error: {tmp_path / name}: ") and words in lines[0], (name, lines)


@pytest.mark.slow
def test_model_from_an_offline_hf_cache(tiny_f32_gguf, tmp_path):
    """An HF repo id holding GGUFs, picked with --quant, found in the hub cache with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--dgtest--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("tiny-F32.gguf", "tiny-Q8_0.gguf"):
        (snapshot / name).symlink_to(tiny_f32_gguf)
    env = dict(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))

    by_path = piped("run", tiny_f32_gguf, *SMALL, "--steps", "2", "-n", "16", "-p", "hi")
    by_repo = piped("run", "dgtest/tiny", "--quant", "f32", *SMALL, "--steps", "2", "-n", "16", "-p", "hi", **env)
    assert by_repo.returncode == 0, by_repo.stderr
    assert by_repo.stdout == by_path.stdout

    wrong = piped("run", "dgtest/tiny", "--quant", "Q4_K_M", *SMALL, "-p", "hi", **env)
    assert wrong.returncode == 1
    assert "no GGUF for --quant Q4_K_M; the repo has: tiny-F32.gguf, tiny-Q8_0.gguf" in wrong.stderr
    missing = piped("run", "dgtest/absent", *SMALL, "-p", "hi", **env)
    assert missing.returncode == 1 and "HF_HUB_OFFLINE" in missing.stderr


# -- errors -----------------------------------------------------------------------------------------------

def test_errors_are_one_red_line_and_exit_1(tmp_path):
    out = piped("run", tmp_path / "absent.gguf", "-p", "hi")
    assert out.returncode == 1
    absent = tmp_path / "absent.gguf"
    assert out.stderr.splitlines() == [f"error: {absent}: no such file, and not an HF repo id (owner/name)"]

    debug = piped("run", tmp_path / "absent.gguf", "-p", "hi", DGLOCAL_DEBUG="1")
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback") and debug.stderr.splitlines()[-1].startswith("error: ")


def test_bad_generation_option_fails_before_loading(tiny_f32_gguf):
    out = piped("run", tiny_f32_gguf, "--t-min", "0.9", "--t-max", "0.5", "-p", "hi")
    assert out.returncode == 1
    assert out.stderr.splitlines() == ["error: t_max must be > t_min, got t_max=0.5 and t_min=0.9"]


def test_no_default_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "DEFAULT_MODEL", tmp_path / "sudoku.gguf")
    with pytest.raises(ModelError, match="no default model shipped yet"):
        hub.resolve_model(None)


@pytest.mark.parametrize("command,module", [("bench", "dglocal.tools.bench"), ("sudoku", "dglocal.cli.sudoku")])
def test_missing_plugin_module_is_a_clear_error(command, module, monkeypatch, tiny_f32_gguf):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError
    monkeypatch.setattr(hub, "DEFAULT_MODEL", tiny_f32_gguf)
    args = [command, str(tiny_f32_gguf)] if command == "bench" else [command]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1
    assert f"`dglocal {command}` is not available in this build (module {module} is missing)" in result.output


def _recorder(monkeypatch, module, name, returns=None):
    """Replace module.name by a recorder that checks the call against the real signature."""
    import inspect

    real, calls = getattr(module, name), []

    def record(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)  # TypeError on a wrong name
        return returns

    monkeypatch.setattr(module, name, record)
    return calls


def test_bench_and_synth_get_their_options_by_their_own_names(monkeypatch, tiny_f32_gguf, tmp_path):
    import dglocal.tools.bench
    import dglocal.convert.synth

    import dglocal.cli.render

    calls = _recorder(monkeypatch, dglocal.tools.bench, "bench", returns={})
    monkeypatch.setattr(dglocal.cli.render, "show_bench", lambda result: None)
    args = ["bench", str(tiny_f32_gguf), "--steps", "8", "--steps", "16", "--no-adaptive", "--adaptive-steps", "4",
            "--canvases", "2", "--prompt-tokens", "8", "--ar-tokens", "9", "-c", "512", "-ngl", "0", "-t", "1",
            "--flash-attn", "--kv-type", "f32", "--seed", "3", "--json", "--rpc", "10.0.0.1:50052,h:1",
            "-ot", "exps=CPU", "-ot", "a=CPU,b=CPU", "--n-cpu-moe", "2"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    placement = dict(rpc=["10.0.0.1:50052", "h:1"], tensor_overrides=["exps=CPU", "a=CPU,b=CPU"], n_cpu_moe=2)
    flat = [{**{k: v for k, v in c.items() if k != "run_options"}, **c.get("run_options", {})} for c in calls]
    assert flat == [dict(path=tiny_f32_gguf, steps=(8, 16), adaptive=False, adaptive_steps=4, canvases=2,
                         prompt_tokens=8, ar_tokens=9, n_ctx=512, n_gpu_layers=0, threads=1, flash_attn=True,
                         kv_type="f32", seed=3, placement=placement)]
    assert CliRunner().invoke(cli.app, ["bench", str(tiny_f32_gguf)]).exit_code == 0
    assert calls[1] == dict(path=tiny_f32_gguf, n_gpu_layers=-1, placement={})  # the rest: bench's own defaults

    from types import SimpleNamespace

    written = SimpleNamespace(path=tmp_path / "s.gguf", type="f16", n_tensors=7, size=4096)
    calls = _recorder(monkeypatch, dglocal.convert.synth, "synth", returns=written)
    result = CliRunner().invoke(cli.app, ["synth", str(tmp_path / "s.gguf"), "--preset", "tiny", "--type", "f16"])
    assert result.exit_code == 0 and "wrote" in result.output, result.output
    assert calls and {k: v for k, v in calls[0].items() if k != "progress"} == dict(
        preset="tiny", type="f16", output=tmp_path / "s.gguf", seed=0, force=False, shapes_only=False)


def test_pick_gguf():
    files = ["m-Q4_K_M.gguf", "m-q8_0.gguf", "m-Q4_K_S.gguf", "big-Q6_K-00002-of-00002.gguf",
             "big-Q6_K-00001-of-00002.gguf"]
    assert hub.pick_gguf(files, "q4_k_m") == ["m-Q4_K_M.gguf"]
    assert hub.pick_gguf(files, "Q8_0") == ["m-q8_0.gguf"]
    assert hub.pick_gguf(files, "Q6_K") == ["big-Q6_K-00001-of-00002.gguf", "big-Q6_K-00002-of-00002.gguf"]
    with pytest.raises(ModelError, match="no GGUF for --quant Q4_K"):  # no prefix match: Q4_K is not Q4_K_M
        hub.pick_gguf(files, "Q4_K")
    assert hub.pick_gguf(["only-F16.gguf"], "Q4_K_M", explicit=False) == ["only-F16.gguf"]


# -- convert and info through the CLI ---------------------------------------------------------------------

def test_convert_and_info(tiny_checkpoint, tiny_vocab, tmp_path):
    out = tmp_path / "t.gguf"
    done = piped("convert", tiny_checkpoint, out, "--type", "f32", "--tokenizer-from", tiny_vocab)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and out.is_file()
    again = piped("convert", tiny_checkpoint, out, "--type", "f32", "--tokenizer-from", tiny_vocab)
    assert again.returncode == 1 and "already exists (use --force to overwrite)" in again.stderr

    import json

    info = json.loads(piped("info", out, "--json").stdout)
    assert info["architecture"] == "diffusion-gemma" and info["diffusion"]["canvas_length"] == 16
    assert "diffusion-gemma" in piped("info", out).stdout

    plan = piped("convert", tiny_checkpoint, "--dry-run", "--type", "q8_0", "--vram", "1G", "--context", "1024")
    assert plan.returncode == 0 and "fits" in plan.stdout, plan.stdout + plan.stderr
    usage = piped("convert", tiny_checkpoint)
    assert usage.returncode == 2 and "OUTPUT is required" in usage.stderr


# -- --help documents every option ------------------------------------------------------------------------

def _words(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.slow
def test_every_option_is_documented():
    group = typer.main.get_command(cli.app)
    assert set(group.commands) == {"run", "convert", "info", "bench", "synth", "sudoku", "rpc-server", "serve",
                                   "plan"}
    top = piped("--help", COLUMNS="200").stdout
    for name in group.commands:
        assert name in top
    for name, command in group.commands.items():
        shown = _words(piped(name, "--help", COLUMNS="200").stdout)
        assert command.help and _words(command.help)[:40] in shown, name
        for param in command.params:
            assert getattr(param, "help", None), f"dglocal {name}: {param.name} has no help"
            assert " ".join(_words(param.help).split()[:4]) in shown, f"dglocal {name}: help of {param.name}"
            if param.param_type_name == "option":
                for flag in param.opts + param.secondary_opts:
                    assert flag in shown, f"dglocal {name} --help does not show {flag}"
    run_flags = {f for p in group.commands["run"].params for f in getattr(p, "opts", [])}
    assert {"-c", "--ctx-size", "-ngl", "--n-gpu-layers", "-t", "--threads", "--seed", "-p", "--prompt", "-n",
            "--steps", "--entropy-bound", "--t-min", "--t-max", "--temp", "--top-k", "--top-p", "--min-p",
            "--stability", "--confidence", "--quant",
            "--rpc", "-ot", "--override-tensor", "--n-cpu-moe", "--cache-type", "--fit"} <= run_flags


# -- the chat loop without a terminal ---------------------------------------------------------------------

class RecordingView:
    """Records what the loop asks the view to show; `interrupt_at` raises Ctrl-C at that Step."""

    def __init__(self, lines=(), interrupt_at=None):
        self.lines, self.interrupt_at, self.calls = list(lines), interrupt_at, []

    def read(self):
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))

    def step(self, event):
        self.calls.append(("step", (event,), {}))
        if self.interrupt_at is not None and event.step == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture(scope="module")
def small_model(tiny_f32_gguf):
    import dglocal

    m = dglocal.load(tiny_f32_gguf, n_ctx=1024, n_threads=1)
    yield m
    m.close()


def test_chat_loop_commands(small_model):
    from dglocal.cli.chat import ChatLoop

    view = RecordingView(["/set steps 3", "/set t-min 5", "/set bogus 1", "/set", "/help", "/nope", "hello", "/stats",
                          "/reset", "/exit", "never read"])
    loop = ChatLoop(small_model, view, max_new_tokens=16, seed=1)
    loop.run()
    assert view.lines == ["never read"]  # /exit ended the loop
    errors = [c[1][0] for c in view.calls if c[0] == "error"]
    assert errors[0] == "t_max must be > t_min, got t_max=0.9 and t_min=5.0"
    assert errors[1].startswith("unknown setting 'bogus'") and errors[2].startswith("unknown command /nope")
    assert loop.options == {"max_new_tokens": 16, "seed": 1, "max_denoising_steps": 3}  # the bad /set changed nothing
    settings = dict(next(c[1][1] for c in view.calls if c[0] == "table" and c[1][0] == "settings"))
    assert settings["max_denoising_steps"] == "3" and settings["t_min"] == "0.3"  # 0.3: the model's metadata
    steps = [c[1][0] for c in view.calls if c[0] == "step"]
    assert len(steps) == 3 and {s.step for s in steps} == {1, 2, 3}
    end = next(c for c in view.calls if c[0] == "end_answer")
    assert end[1][0].stats.generated_tokens > 0 and end[2] == {"stopped": False}
    assert loop.last is None  # /reset
    assert loop.session.messages == []  # /reset
    with pytest.raises(ConfigError):
        ChatLoop(small_model, RecordingView(), t_min=2.0)


def test_chat_loop_ctrl_c_keeps_the_session(small_model):
    from dglocal.cli.chat import ChatLoop

    view = RecordingView(["hello", "hello"], interrupt_at=2)
    loop = ChatLoop(small_model, view, max_new_tokens=32, max_denoising_steps=4, seed=1)
    loop.run()
    ends = [c for c in view.calls if c[0] == "end_answer"]
    assert ends[0][1][0] is None and ends[0][2] == {"stopped": True}
    assert ends[1][1][0] is loop.last and loop.last.stats.generated_tokens > 0
    assert [m["role"] for m in loop.session.messages] == ["user", "assistant"]  # only the finished turn
    fresh = small_model.chat().send("hello", max_new_tokens=32, max_denoising_steps=4, seed=1)
    assert loop.last.text == fresh.text and np.array_equal(loop.last.tokens, fresh.tokens)


def test_chat_edit_renoises_lines_or_matches_of_the_last_answer(small_model):
    from dglocal.cli.chat import ChatLoop, edit_spans

    text = "one two\nthree four\nfive"
    assert edit_spans(text, "2") == ([(8, 18)], 0)
    assert edit_spans(text, "1-2 +4") == ([(0, 18)], 4)
    assert edit_spans(text, "3") == ([(19, 23)], 0)
    assert edit_spans(text, "/o+/") == ([(0, 1), (6, 7), (15, 16)], 0)
    for bad, words in [("4", "the last answer has 3"), ("/x/", "matches nothing"), ("/(/", "not a regular"),
                       ("two", "line numbers")]:
        with pytest.raises(ConfigError, match=words):
            edit_spans(text, bad)

    view = RecordingView(["/edit 1", "hello", "/edit /[a-z]+/ +2", "/exit"])
    loop = ChatLoop(small_model, view, max_new_tokens=32, max_denoising_steps=4, seed=1)
    loop.run()
    errors = [c[1][0] for c in view.calls if c[0] == "error"]
    assert errors == ["/edit needs an answer to edit: ask something first"]
    ends = [c[1][0] for c in view.calls if c[0] == "end_answer"]
    assert len(ends) == 2 and ends[1] is not None
    changed = next(c[1][1] for c in view.calls if c[0] == "table" and c[1][0] == "changed")
    assert changed, "the edit reports its changes"
    # the history now holds the edited answer, whose text outside the matches is unchanged
    assert loop.session.messages[-1] == {"role": "assistant", "content": loop.last.text}


def test_bench_names_a_bad_batch_itself(tiny_f32_gguf):
    """--batch multiplies the context; a bad one used to be reported as n_ctx 0."""
    for value in ("0", "-2", "100000"):
        out = piped("bench", tiny_f32_gguf, "--batch", value, "--steps", "2")
        assert (out.returncode, out.stderr.strip()) == (1, f"error: --batch must be in 1..256, got {value}")


def test_the_fast_sampler_flags_are_the_set_commands(tiny_f32_gguf):
    """--sampler fast --fast-k 24 set what /set sampler fast and /set fast-k 24 set: the same answer either way;
    a sampler the CLI does not know is one line naming it."""
    common = ["--seed", "5", "-n", "24", "--steps", "8"]
    flags = piped("run", tiny_f32_gguf, *common, "--sampler", "fast", "--fast-k", "24", input="hello\n")
    typed = piped("run", tiny_f32_gguf, *common, input="/set sampler fast\n/set fast-k 24\nhello\n")
    assert flags.returncode == typed.returncode == 0, flags.stderr + typed.stderr
    answer = flags.stdout.strip()
    assert answer and typed.stdout.strip().endswith(answer), (flags.stdout, typed.stdout)
    assert ["sampler = fast", "fast_k = 24"] == typed.stdout.splitlines()[:2]
    out = piped("run", tiny_f32_gguf, "--sampler", "turbo", "-p", "hi")
    assert (out.returncode, out.stderr.strip()) == (1, "error: sampler must be one of ['reference', 'fast'], got "
                                                       "'turbo'"), out.stderr
