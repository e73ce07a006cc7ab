"""A puzzle's attempts raced on several contexts (dglocal.sudoku.race), with the shipped Sudoku model: the outcome
against each worker's own solo run, stopping (a solve, the caller, an error), and the command's --workers."""

from __future__ import annotations

import threading
import time

import pytest
from test_sudoku import HELDOUT, VERDICT, dglocal_cli, easy_puzzle

from dglocal import sudoku
from dglocal.convert.hub import DEFAULT_MODEL
from dglocal.errors import ConfigError, ModelError
from dglocal.sudoku import core as sc
from dglocal.sudoku.race import race, worker_seed

pytestmark = pytest.mark.backend

HARD = HELDOUT.parent / "hard.txt"
# no solution, though the givens keep every rule: row 1 needs a 9 where column 9 has one
UNSOLVABLE = sc.parse_grid("12345678.........9...........2......9.7...6..53..4..9...1........5..........9....")


@pytest.fixture(scope="module")
def models():
    models = sudoku.load_models(DEFAULT_MODEL, 2)
    yield models
    for m in models:
        m.close()


def puzzles(path, n):
    return [puzzle for puzzle, _ in sudoku.read_puzzles(path)[:n]]


def test_race_without_restarts_is_the_closer_of_the_solo_runs(models):
    """The model alone (no guide, one attempt each): the race's grid is a worker's own solo grid, solved if either
    solo run solved, else the one with fewer broken cells; its steps are both workers' when neither stops early,
    and the steps it shows are worker 0's."""
    differ = 0
    for i, puzzle in enumerate(puzzles(HARD, 6)):
        solo = [sudoku.solve(m, puzzle, seed=worker_seed(i, w), guide=False) for w, m in enumerate(models)]
        solo_steps = [e.argmax.tolist() for e in sudoku.solve_stream(models[0], puzzle, seed=i, guide=False)
                      if e.kind == "step"]
        events = list(race(models, puzzle, seed=i, guide=False))
        shown, done = [e.argmax.tolist() for e in events[:-1]], events[-1]
        assert done.grid in [s.grid for s in solo]
        assert done.solved == any(s.solved for s in solo)
        assert shown == solo_steps[:len(shown)] and shown
        if not done.solved:
            assert done.steps == sum(s.steps for s in solo) and shown == solo_steps
            assert len(sc.rule_breaks(puzzle, done.grid)) == min(len(sc.rule_breaks(puzzle, s.grid)) for s in solo)
        differ += solo[0].grid != solo[1].grid
    assert differ  # the workers draw different noise


def test_race_solves_what_one_worker_solves(models):
    """Guided, counted restarts: a puzzle is solved when either worker's own run solves it."""
    for i, puzzle in enumerate(puzzles(HARD, 3)):
        solo = [sudoku.solve(m, puzzle, seed=worker_seed(i, w), time_limit=None) for w, m in enumerate(models)]
        done = sudoku.solve(models, puzzle, seed=i, time_limit=None)
        assert done.solved == any(s.solved for s in solo)
        if done.solved:
            assert sc.check_grid(puzzle, done.grid) and done.grid in [s.grid for s in solo if s.solved]


@pytest.mark.gpu_tier  # contexts racing on one device too
def test_race_stops_at_the_time_limit_and_for_the_caller(models):
    """No attempt starts after the limit, whatever a step costs on this device: the run ends within the limit and
    two attempts (4 steps each) of its own mean step; ignoring the limit would run 1024 attempts a worker."""
    baseline = threading.active_count()
    done = sudoku.solve(models, UNSOLVABLE, seed=0, steps=4, time_limit=1.0)
    step = done.seconds / (done.steps / len(models))  # the workers step side by side
    assert not done.solved and done.steps > 0 and done.seconds < 1.0 + 2 * 4 * step
    events = sudoku.solve_stream(models, UNSOLVABLE, seed=0, steps=4, time_limit=60.0)
    t0 = time.monotonic()
    for n, event in enumerate(events):
        if n == 3:
            break
    events.close()  # the caller stops: every worker ends after its step, within a moment
    assert time.monotonic() - t0 < max(10.0, 4 * step) and threading.active_count() == baseline
    puzzle = puzzles(HELDOUT, 1)[0]  # the models and their sequences are usable afterwards
    assert sudoku.solve(models, puzzle, seed=0).solved


def test_race_misuse_is_a_clear_error(models):
    baseline = threading.active_count()
    with pytest.raises(ConfigError, match="at least one model"):
        list(race([], UNSOLVABLE))
    with pytest.raises(ConfigError, match="entropy_bound"):  # raised by the workers, re-raised here
        sudoku.solve(models, UNSOLVABLE, seed=0, entropy_bound=-1.0)
    with pytest.raises(ConfigError, match="workers must be in 1..8, got 0"):
        sudoku.load_models(DEFAULT_MODEL, 0)
    with pytest.raises(ModelError, match="no such file"):
        sudoku.load_models(DEFAULT_MODEL.with_name("missing.gguf"), 2)
    assert threading.active_count() == baseline  # no worker left behind by the errors
    assert sudoku.solve(models, puzzles(HELDOUT, 1)[0], seed=1).solved


def test_cli_workers(tmp_path):
    puzzle = HARD.read_text().split()[0]
    out = tmp_path / "grid.txt"
    r = dglocal_cli(puzzle, "--workers", "2", "--seed", "0", "--output", out)
    assert r.returncode == 0, r.stderr
    verdict = VERDICT.search(r.stdout)
    assert verdict, r.stdout
    assert (verdict.group(1) == "solved") == sc.check_grid(puzzle, out.read_text().strip().replace("0", "."))
    for args, message in ((["--workers", "0"], "--workers must be in 1..8, got 0"),
                          (["--workers", "2", "--batch", "4", "--eval", HARD],
                           "--batch 4 with --workers 2: racing workers solve one puzzle at a time")):
        r = dglocal_cli(*args) if "--eval" in args else dglocal_cli(puzzle, *args)
        assert r.returncode == 1 and r.stderr.strip() == f"error: {message}", r.stderr


INTERRUPT_CHILD = """
import signal, sys, time
from dglocal import sudoku
from dglocal.sudoku import core as sc
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell without job control starts us with it ignored
models = sudoku.load_models(sys.argv[1], 2)
events = sudoku.solve_stream(models, sc.parse_grid(sys.argv[3]), seed=0, steps=4, time_limit=120.0)
try:
    for n, event in enumerate(events):
        if n == 2:
            print('started', flush=True)
            t0 = time.monotonic()
except KeyboardInterrupt:
    print('interrupted', round(time.monotonic() - t0, 2), flush=True)
print('solved', sudoku.solve(models, sc.parse_grid(sys.argv[2]), seed=0).solved, flush=True)
"""


def test_ctrl_c_stops_every_worker(tmp_path):
    """SIGINT while workers race: the caller gets KeyboardInterrupt at once, every worker stops after its step,
    and the models solve the next puzzle."""
    import signal
    import subprocess
    import sys

    child = tmp_path / "child.py"
    child.write_text(INTERRUPT_CHILD)
    p = subprocess.Popen([sys.executable, str(child), str(DEFAULT_MODEL), HELDOUT.read_text().split()[0],
                          sc.format_grid(UNSOLVABLE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started", p.stderr.read()
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    lines = out.split()
    assert p.returncode == 0 and lines[0] == "interrupted" and float(lines[1]) < 5, (out, err)
    assert lines[2:] == ["solved", "True"], (out, err)


SEED_CHILD = """
import sys, threading
from dglocal import sudoku
from dglocal.errors import ConfigError
from dglocal.sudoku import core as sc
from dglocal.sudoku.race import race
models = sudoku.load_models(sys.argv[1], 2)
puzzle = sc.parse_grid(sys.argv[2])
baseline = threading.active_count()
print('race', list(race(models, puzzle, seed=-1))[-1].solved, flush=True)
print('eval', sudoku.evaluate(models, [(puzzle, None)], seed=-1).solved, flush=True)
try:
    list(race(models, puzzle, seed=-5))
except ConfigError as e:
    print('refused', e, flush=True)
import dglocal.sudoku.race as race_module
def failing_seed(seed, worker):  # a worker that fails before its first step, whatever the reason
    if worker:
        raise RuntimeError(f'worker {worker} failed to start')
    return seed
race_module.worker_seed = failing_seed
try:
    list(race(models, puzzle, seed=0))
except RuntimeError as e:
    print('ended', e, flush=True)
print('threads', threading.active_count() - baseline, flush=True)
"""


def test_seed_minus_one_is_a_random_seed_and_a_worker_s_error_ends_the_race(tmp_path):
    """llama.cpp's -1 (a random seed, as `dglocal run --seed -1`): a race and an evaluation draw one and finish; it
    hung, worker 1's derive_seed(-1, 1) raising outside the worker's try, so its end never reached the caller. Any
    other negative seed is a clear error before a thread starts, and a worker failing before its first step ends
    the race with its error. A child process: a hang fails by the timeout."""
    import subprocess
    import sys

    child = tmp_path / "child.py"
    child.write_text(SEED_CHILD)
    puzzle, _ = easy_puzzle()  # solved whatever the seed
    r = subprocess.run([sys.executable, str(child), str(DEFAULT_MODEL), puzzle], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["race True", "eval 1.0",
                                     "refused seed must be in 0..18446744073709551615, got -5",
                                     "ended worker 1 failed to start", "threads 0"], r.stdout


def test_cli_seed_minus_one_is_a_random_seed(tmp_path):
    """`dglocal sudoku PUZZLE --seed -1` with racing workers solves (it hung for ever); `--seed -2` is refused before
    the model loads."""
    import subprocess

    from test_cli import DGLOCAL, program_env

    puzzle, solution = easy_puzzle()
    out = tmp_path / "grid.txt"

    def run(*args):  # a hang fails by the timeout
        return subprocess.run([*DGLOCAL, "sudoku", puzzle, *args], capture_output=True, text=True, env=program_env(),
                              stdin=subprocess.DEVNULL, timeout=120)

    r = run("--seed", "-1", "--workers", "2", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert VERDICT.search(r.stdout).group(1) == "solved", r.stdout
    assert out.read_text().strip() == solution
    r = run("--seed", "-2", "--workers", "2")
    assert r.returncode == 1 and r.stderr.strip() == "error: seed must be in 0..18446744073709551615, got -2", r.stderr


def test_workers_do_not_share_native_errors(models):
    """What llama.cpp logs while one worker's call fails is that worker's error message, not another's: the log
    was one deque for the process, so a worker failing at the same time reported (and cleared) the first one's
    errors. Worker 0 makes a real failing call (a model file that is not there) on its model's native thread;
    worker 1, none of whose calls failed, then finds no errors, and worker 0 still finds its own."""
    from dglocal.runtime import native as nat

    seen: dict[str, str] = {}

    def worker0():
        missing = str(DEFAULT_MODEL.with_name("no-such-model.gguf")).encode()
        assert not models[0].native(nat.llama_model_load_from_file, missing, nat.llama_model_default_params())
        done.set()
        read.wait(30)
        seen["worker 0"] = nat.last_errors()

    def worker1():
        done.wait(30)
        seen["worker 1"] = nat.last_errors()
        read.set()

    done, read = threading.Event(), threading.Event()
    threads = [threading.Thread(target=worker0), threading.Thread(target=worker1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen["worker 1"] == "", seen
    assert "no-such-model.gguf" in seen["worker 0"], seen
