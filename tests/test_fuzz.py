"""Fuzzing the file boundary: 200 seeded GGUF mutants through `info` and load + denoise, 40 mutated checkpoints
through `convert`. Zero signals, zero hangs, zero tracebacks that are not DglocalErrors, nothing left behind, and
no mutant that loads but computes something else than the original file.

The mutants run in child processes (tests/fuzz_worker.py), two at a time; a child that dies or hangs is
recorded against the mutant it was on and a new child goes on from the next one.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.backend

WORKER = Path(__file__).parent / "fuzz_worker.py"
N_GGUF, N_CHECKPOINT = 200, 40
PER_MUTANT_S = 60


def _lines(proc, out: queue.Queue):
    for line in proc.stdout:
        out.put(line.rstrip("\n"))
    out.put(None)


def run_range(args: list[str], first: int, last: int) -> dict[int, str]:
    """Results of mutants first..last-1: the worker's line, or `signal N` / `hang` for a child that died."""
    results: dict[int, str] = {}
    nxt = first
    while nxt < last:
        proc = subprocess.Popen([sys.executable, str(WORKER), *args, str(nxt), str(last)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(proc, lines), daemon=True).start()
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain llama.cpp's log
        budget = PER_MUTANT_S + 30  # the first mutant also pays for imports and the base run
        while True:
            try:
                line = lines.get(timeout=budget)
            except queue.Empty:
                proc.kill()
                results[nxt] = "hang"
                nxt += 1
                break
            budget = PER_MUTANT_S
            if line is None:  # the child ended: normally after `last`, else by a signal or a crash
                rc = proc.wait()
                if nxt < last:
                    results[nxt] = f"signal {-rc}" if rc < 0 else f"exit {rc}"
                    nxt += 1
                break
            index, outcome = line.split(" ", 1)
            results[int(index)] = outcome
            nxt = int(index) + 1
        proc.wait()
    return results


def run_all(args: list[str], n: int) -> dict[int, str]:
    half = n // 2
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda r: run_range(args, *r), [(0, half), (half, n)]))
    return {**parts[0], **parts[1]}


def test_gguf_mutants(tiny_f32_gguf, tmp_path):
    t0 = time.perf_counter()
    results = run_all(["gguf", str(tiny_f32_gguf), str(tmp_path)], N_GGUF)
    assert sorted(results) == list(range(N_GGUF))
    bad = {i: r for i, r in results.items() if not r.startswith(("error", "same"))}
    assert not bad, "\n".join(f"mutant {i}: {r}" for i, r in sorted(bad.items()))
    refused = sum(r.startswith("error") for r in results.values())
    print(f"{N_GGUF} GGUF mutants in {time.perf_counter() - t0:.0f} s: {refused} refused, "
          f"{N_GGUF - refused} equal to the original")
    assert refused >= N_GGUF * 0.8  # nearly every structural mutation breaks the file


def test_checkpoint_mutants(tiny_checkpoint, tiny_vocab, tmp_path):
    results = run_all(["checkpoint", str(tiny_checkpoint), str(tiny_vocab), str(tmp_path)], N_CHECKPOINT)
    assert sorted(results) == list(range(N_CHECKPOINT))
    bad = {i: r for i, r in results.items() if not r.startswith(("error", "converted"))}
    assert not bad, "\n".join(f"mutant {i}: {r}" for i, r in sorted(bad.items()))
    # every safetensors-level mutation (offsets, dtype, shape, header length, truncation) must be refused
    header_level = {i: r for i, r in results.items() if i % 8 < 5}
    assert all(r.startswith("error") for r in header_level.values()), header_level
    assert not any(p.suffix in (".gguf", ".partial") for p in tmp_path.iterdir())
