"""`dglocal bench MODEL`: block-diffusion speed beside autoregressive decode of the same weights (docs/performance.md).

One process, one build, one set of weights, batch size 1:
- fixed-step generations (early stop off, EOS ignored, so every canvas takes exactly N denoise steps);
- an adaptive generation (the GGUF's sampler settings, early stop on; random weights never settle, so on a
  `dglocal synth` file it runs to the step cap);
- the causal encoder run one token at a time with greedy picks: the autoregressive alternative;
- one canvas commit (encoder pass over C tokens), timed on its own: a generation's last canvas is never committed.
- with `sampler="fast"`, every generation again with the fast sampler beside the reference one, and with `active`,
  a step of the fast sampler with N of the canvas' positions run and the rest frozen (their K/V cached), beside a
  whole step of the reference sampler (random weights never settle: this is how the fast sampler's step is timed
  on them).

canvas tok/s = C / (steps x step time + commit time), the steady-state rate of a long generation; the ratio to
autoregressive tok/s is taken in the same run. `run()` works on a loaded Model and returns a plain dict;
`bench()` loads, runs and adds memory figures; `render()` is the only rich code; `main()` is the command.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

PROMPT_TEXT = ("The tide came in over the flats while the gulls argued about the last of the light. "
               "Somewhere past the breakwater a bell buoy kept time for nobody in particular. ")


def prompt_ids(model, n_tokens: int) -> list[int]:
    """Exactly `n_tokens` tokens of plain English (BOS first), whatever the tokenizer."""
    text = PROMPT_TEXT
    while True:
        ids = model.tokenize(text, add_special=True, parse_special=False)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        text += PROMPT_TEXT


def _generation(model, prompt: list[int], **options) -> dict:
    """One generation on a fresh sequence (the prompt is prefilled every time): timings from its events."""
    from dglocal.generation.driver import stream

    step_s: list[float] = []
    for event in stream(model, prompt, **options):
        if event.kind == "step":
            step_s.append(event.seconds)
        elif event.kind == "done":
            stats = event.stats
    return {
        "forward_positions_per_canvas": stats.forward_positions / stats.canvases,
        "canvases": stats.canvases,
        "steps_per_canvas": statistics.fmean(stats.steps_per_canvas),
        "ms_per_step": 1000 * statistics.median(step_s),
        "ttft_s": stats.time_to_first_token,
        "prefill_s": stats.prefill_seconds,
        "tokens": stats.generated_tokens,
        "wall_tok_s": stats.tokens_per_second,
    }


def _floor(model, prompt: list[int], reps: int, seed: int) -> dict:
    """What a denoise step cannot go below on these weights: transformer_ms, a commit of C tokens after the prompt
    (the same transformer, causal, no LM head); lm_head_ms, that pass returning the logits of all C tokens, minus
    the commit. A step is a transformer pass, the LM head and a second contraction of the same size (the soft
    embedding), so its floor is transformer_ms + 2 x lm_head_ms. Medians; the cache is truncated back each time."""
    seq = model.sequence()
    seq.prefill(prompt)
    rng = np.random.default_rng(seed)
    commit, full = [], []
    for _ in range(reps):
        canvas = rng.integers(0, model.n_vocab, model.canvas_length)
        for times, run_pass in ((commit, seq.commit), (full, lambda c: seq.prefill(c, logits_all=True))):
            t0 = time.perf_counter()
            run_pass(canvas)
            times.append(1000 * (time.perf_counter() - t0))
            seq.truncate(len(prompt))
    transformer = statistics.median(commit)
    lm_head = max(statistics.median(full) - transformer, 0.0)
    return {"transformer_ms": transformer, "lm_head_ms": lm_head, "floor_ms": transformer + 2 * lm_head}


def _autoregressive(model, prompt: list[int], n_tokens: int) -> dict:
    """Greedy decode with the causal encoder, one token per forward: the cost of the autoregressive alternative."""
    seq = model.sequence()
    t0 = time.perf_counter()
    logits = seq.prefill(prompt, logits_last=True)
    t1 = time.perf_counter()
    for _ in range(n_tokens):
        logits = seq.prefill([int(np.argmax(logits))], logits_last=True)
    t2 = time.perf_counter()
    return {"tokens": n_tokens, "tok_s": n_tokens / (t2 - t1), "ms_per_token": 1000 * (t2 - t1) / n_tokens,
            "ttft_s": t1 - t0, "prefill_tok_s": len(prompt) / (t1 - t0)}


def _active(model, prompt: list[int], sizes, fast_k: int, reps: int, seed: int) -> list[dict]:
    """A step with N positions run and the others frozen (kept by a first pass), for each N in `sizes`, beside a
    whole step of the reference sampler; medians of `reps`, every step self-conditioned as mid-canvas."""
    from dglocal.runtime.fastpass import FastPass

    C = model.canvas_length
    fast_k = fast_k if fast_k < model.n_vocab else 0  # the whole vocabulary: its own reductions (as generations do)
    rng = np.random.default_rng(seed)
    canvas, u = rng.integers(0, model.n_vocab, C), rng.random(C).astype(np.float32)
    seq = model.sequence()
    try:
        seq.prefill(prompt)

        def median_ms(fast, first=None) -> float:
            if first is not None:  # a new canvas: the first pass caches its frozen positions, the timed ones keep none
                seq.denoise(canvas, temperature=0.6, uniforms=u, self_condition=False, fast=first)
            times = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                seq.denoise(canvas, temperature=0.6, uniforms=u, self_condition=True, fast=fast)
                times.append(1000 * (time.perf_counter() - t0))
            return statistics.median(times[1:])  # the first builds the graph of its shape

        seq.denoise(canvas, temperature=0.6, uniforms=u, self_condition=False)
        full = median_ms(None)
        out = []
        for n in sizes:
            n = min(int(n), C)
            if n == C:
                ms = median_ms(FastPass(fast_k=fast_k))
            else:
                first = FastPass(keep=np.arange(C) >= n, fast_k=fast_k)
                ms = median_ms(FastPass(np.arange(n), np.zeros(n, bool), fast_k, frozen=True), first)
            out.append({"active": n, "ms_per_step": ms, "vs_full_step": ms / full, "full_step_ms": full})
        return out
    finally:
        seq.release()


def _batched(model, prompt: list[int], steps: int, canvases: int, seed: int, **sampler) -> dict:
    """model.n_seq_max generations of the prompt at once, `steps` fixed steps a canvas (dglocal.generation.driver): one
    forward a step for all of them. Wall time from submission to the last token, prefills included."""
    n = model.n_seq_max
    t0 = time.perf_counter()
    outs = model.generate_many([prompt] * n, seed=seed, max_new_tokens=canvases * model.canvas_length,
                               max_denoising_steps=steps, stability_threshold=None, eos_token_id=(), **sampler)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.tokens) for o in outs)
    return {"batch": n, "max_steps": steps, "wall_s": wall, "canvas_tok_s": tokens / wall,
            "per_sequence_tok_s": tokens / wall / n}


def run(model, *, steps=(8, 16, 48), adaptive: bool = True, adaptive_steps: int | None = None, canvases: int = 1,
        prompt_tokens: int = 64, ar_tokens: int = 64, commit_reps: int = 3, seed: int = 0,
        warmup: bool = True, sampler: str = "reference", fast_k: int = 64, active=None) -> dict:
    """Benchmark a loaded model (an LLM); returns a JSON-ready dict (see the module docstring for what is measured)."""
    from dglocal.generation.config import GenerationConfig
    from dglocal.runtime.diagnostics import last_io_bytes

    C = model.canvas_length
    prompt = prompt_ids(model, prompt_tokens)
    common = dict(max_new_tokens=canvases * C, eos_token_id=(), seed=seed)
    if warmup:  # graph allocation and first-touch of the weights stay out of the numbers
        _generation(model, prompt, max_denoising_steps=1, stability_threshold=None, **common)
        _autoregressive(model, prompt, 2)

    ar = _autoregressive(model, prompt, ar_tokens)
    floor = _floor(model, prompt, commit_reps, seed)
    commit = floor["transformer_ms"]
    runs = []
    plan = [("fixed", n) for n in steps]
    if adaptive:
        cap = adaptive_steps or GenerationConfig.from_metadata(model.metadata).max_denoising_steps
        plan.append(("adaptive", cap))
    samplers = ("reference", "fast") if sampler == "fast" else ("reference",)  # side by side, in one run
    for (mode, n), name in ((p, s) for p in plan for s in samplers):
        early = {"stability_threshold": None} if mode == "fixed" else {}
        chosen = {"sampler": "fast", "fast_k": fast_k} if name == "fast" else {}
        r = _generation(model, prompt, max_denoising_steps=n, **early, **common, **chosen)
        canvas_s = (r["steps_per_canvas"] * r["ms_per_step"] + commit) / 1000
        r = {"mode": mode, "sampler": name, "max_steps": n, **r, "commit_ms": commit, "canvas_tok_s": C / canvas_s}
        r["vs_ar"] = r["canvas_tok_s"] / ar["tok_s"]
        r["step_vs_floor"] = r["ms_per_step"] / floor["floor_ms"] if floor["floor_ms"] > 0 else None
        runs.append(r)
    to_backend, to_host = last_io_bytes(model)  # of the last step run
    batched = _batched(model, prompt, steps[0], canvases, seed) if model.n_seq_max > 1 else None
    batched_fast = _batched(model, prompt, steps[0], canvases, seed, sampler="fast", fast_k=fast_k) \
        if model.n_seq_max > 1 and sampler == "fast" else None
    steps_active = _active(model, prompt, active, fast_k, commit_reps, seed) if active else None
    return {"canvas_length": C, "prompt_tokens": len(prompt), "runs": runs, "autoregressive": ar,
            "active": steps_active,
            "commit_ms": commit, "floor": floor, "step_io_bytes": {"to_backend": to_backend, "to_host": to_host},
            "batched": batched, "batched_fast": batched_fast}


def bench(path, *, n_ctx: int | None = None, n_gpu_layers: int = -1, threads: int | None = None,
          flash_attn: bool | None = None, kv_type: str = "f16", placement: dict | None = None, batch: int = 1,
          **run_options) -> dict:
    """Load `path`, run(), and add the file, the build and peak memory (RSS; GPU memory where nvidia-smi answers)."""
    from dglocal import load
    from dglocal.convert import info
    from dglocal.runtime import native
    from dglocal.runtime.checks import CTX_PAD, MAX_SEQ, integer, round_up

    integer("--batch", batch, 1, MAX_SEQ)  # before n_ctx * batch, which would be blamed on n_ctx
    canvases = run_options.get("canvases", 1)
    prompt = run_options.get("prompt_tokens", 64)
    ar = run_options.get("ar_tokens", 64)
    probe = info(path)
    C = int(probe.diffusion.get("canvas_length", 256))
    n_ctx = n_ctx or round_up(prompt + max(canvases * C + C, ar + 2) + 16, CTX_PAD)
    t0 = time.perf_counter()
    with load(path, n_ctx=n_ctx * batch, n_gpu_layers=n_gpu_layers, n_threads=threads, kv_type=kv_type,
              flash_attn=flash_attn, n_seq_max=batch, **(placement or {})) as model:
        load_s = time.perf_counter() - t0
        result = run(model, **run_options)
        gpu = _gpu_memory_mib()
        synthetic = "dglocal.synth.preset" in model.metadata
    return {
        "model": str(path), "name": probe.name, "file_type": probe.file_type, "file_size": probe.file_size,
        "n_params": probe.n_params, "synthetic": synthetic,
        "n_ctx": n_ctx, "n_gpu_layers": n_gpu_layers, "threads": threads or os.cpu_count(),
        "gpu_offload": bool(native.llama_supports_gpu_offload()), "offloaded": _offloaded(n_gpu_layers, placement),
        "load_s": load_s,
        **result, "peak_rss_mib": _peak_rss_mib(), "gpu_memory_mib": gpu,
    }


def _offloaded(n_gpu_layers: int, placement: dict | None) -> bool:
    """Whether layers run off the host: on RPC servers, or on a local GPU with n_gpu_layers != 0."""
    from dglocal.runtime.placement import _local_devices

    return bool((placement or {}).get("rpc")) or (n_gpu_layers != 0 and bool(_local_devices()))


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _gpu_memory_mib() -> float | None:
    """This process's GPU memory as nvidia-smi reports it; None without an NVIDIA driver."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line)
            if p.strip() == str(os.getpid())]
    return sum(used) if used else None
