"""A puzzle's attempts raced on several contexts: one llama.cpp context per worker, each on one thread with its
own noise (and so its own views of the puzzle); the first grid that keeps every rule stops the others.

Why workers and not threads or a batch: the Sudoku model's step is compute-bound on one core (a forward of 16
canvases costs about 16 of one) and its matrices are too small to split (two threads on one context: 1.3x the
steps a second), while two contexts on two cores make 1.6-1.8x in a race (scripts/sudoku_workers.py). On hard
puzzles the odds of an attempt depend on the view far more than on the noise, so more attempts at once, each
seeing the puzzle its own way, are what a time budget buys (docs/sudoku.md)."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence

from dglocal.errors import ConfigError
from dglocal.generation.events import Step
from dglocal.generation.request import derive_seed
from dglocal.runtime.checks import seed_value

from . import core as sc
from .stream import Solved, stream_one

MAX_WORKERS = 8  # the most contexts (and threads) one puzzle opens; each worker's host-side Python is ~3% of its
# step, so the one GIL is far from full at 8 (measured on 2 cores only)


def default_workers(threads: int | None = None) -> int:
    """One worker per core this process may run on, `threads` cores each, at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores // max(1, threads or 1)))


def worker_seed(seed: int, worker: int) -> int:
    """Worker 0 draws from the puzzle's seed itself, so one worker is solve_stream."""
    return seed if worker == 0 else derive_seed(seed, worker)


def race(models: Sequence, puzzle: Sequence[int], *, seed: int | None = None,
         **options) -> Iterator[Step | Solved]:
    """stream_one on every model at once, worker w with worker_seed(seed, w): yields worker 0's steps, then one
    Solved, the first solved grid or else the closest (fewest cells breaking a rule); its steps are all the
    workers' together and its seconds the wall time. `options`: stream_one's."""
    if not models:
        raise ConfigError("race needs at least one model")
    t0 = time.perf_counter()
    seed = seed_value(seed)  # llama.cpp's -1 is a random seed; any other bad seed fails here, before the threads
    base = models[0].seeds.next() if seed is None else seed
    stop, inbox = threading.Event(), queue.SimpleQueue()

    def work(w: int, model) -> None:
        # everything inside the try: a worker that dies without its last message leaves the caller waiting
        try:
            events = stream_one(model, puzzle, seed=worker_seed(base, w), **options)
            try:
                for event in events:
                    inbox.put((w, event))
                    if stop.is_set():
                        break
            finally:
                events.close()  # in this thread: the generation's sequence is left consistent
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
            inbox.put((w, e))
        finally:
            inbox.put((w, None))

    workers = [threading.Thread(target=work, args=(w, m), name=f"dglocal-sudoku-{w}", daemon=True)
               for w, m in enumerate(models)]
    finals: list[Solved] = []
    steps, running, error = 0, 0, None
    try:
        for thread in workers:  # inside the try: a thread that cannot start stops those that did
            thread.start()
            running += 1
        while running:
            w, event = inbox.get()
            if event is None:
                running -= 1
            elif isinstance(event, BaseException):
                error = error or event
                stop.set()
            elif event.kind == "step":
                steps += 1
                if w == 0 and not stop.is_set():
                    yield event
            else:
                finals.append(event)
                if event.solved:
                    stop.set()
    finally:  # the caller stopped, an error, or Ctrl-C: each worker ends after its current step
        stop.set()
        for thread in workers:
            if thread.ident is not None:  # started
                thread.join()
    if error is not None:
        raise error
    best = min(finals, key=lambda r: (not r.solved, len(sc.rule_breaks(puzzle, r.grid))))  # the first of equals
    yield Solved(best.puzzle, best.grid, best.solved, steps, time.perf_counter() - t0)
