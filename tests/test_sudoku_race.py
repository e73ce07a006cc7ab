"""A puzzle's attempts raced on several contexts (dglocal.sudoku.race), with the shipped Sudoku model: the outcome
against each worker's own solo run, stopping (a solve, the caller, an error), and the command's --workers."""

from __future__ import annotations

import threading
import time

import pytest
from test_sudoku import HELDOUT, VERDICT, dglocal_cli

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
    baseline = threading.active_count()
    t0 = time.monotonic()
    done = sudoku.solve(models, UNSOLVABLE, seed=0, steps=4, time_limit=1.0)
    assert not done.solved and done.steps > 0 and time.monotonic() - t0 < 10
    events = sudoku.solve_stream(models, UNSOLVABLE, seed=0, steps=4, time_limit=60.0)
    t0 = time.monotonic()
    for n, event in enumerate(events):
        if n == 3:
            break
    events.close()  # the caller stops: every worker ends after its step, within a moment
    assert time.monotonic() - t0 < 10 and threading.active_count() == baseline
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
