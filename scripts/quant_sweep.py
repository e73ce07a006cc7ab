#!/usr/bin/env python3
"""Where does a quantized file's decoder lose more precision than its encoder? A sweep over tiny random configs.

    nice -n 10 python3 scripts/quant_sweep.py --vocab 512 --round            # every config, 512 tokens: ~4 min
    nice -n 10 python3 scripts/quant_sweep.py -c base,qk1-scal1 -t f32,q8_0,q4_k_m --round   # real vocabulary
    nice -n 10 python3 scripts/quant_sweep.py -c qk1-scal1 --vocab 512 --seed 2 --soft-embedding f32 --kv f16

Needs the test extra (torch, transformers) and the patched backend; one thread everywhere (torch and llama.cpp).
For each config (CONFIGS: tests/tiny.py's model with overrides, one axis changed at a time from `base`) it builds
the reference checkpoint, converts it to each type with dglocal.convert, runs llama.cpp on the file in a child
process (an abort fails one run, not the sweep) and the reference on the file's own weights as gguf-py dequantizes
them (test_convert._dequantized_model): weight rounding is out, what is left is llama.cpp's arithmetic. Printed,
each the median over positions of the per-position relative L2 error of the logits:

  enc    encoder next-token logits of a 24-token prompt, prefilled in one batch
  enc1   the same prompt prefilled one token at a time (the single-row kernels)
  step1  the first denoise step (canvas A, T = 1, no self-conditioning)
  step2  a self-conditioned step after it (canvas B, T = 0.8): through the soft embedding of step 1's output

--round also runs the reference with llama.cpp's CPU rounding of every matrix product's input
(tests/cpu_rounding.py) and prints how far that moves the reference ("ref~") and how far llama.cpp is from the
rounded reference ("vs~"). Where the rounded reference moves as much as llama.cpp errs, the error is the model's
amplification of that rounding, not a fault of the runtime.

The real 262144-token vocabulary is the pinned sdist's vocab-only Gemma 4 GGUF (dglocal.runtime.upstream.VOCAB_GEMMA4,
tests/tiny.vocab_gguf); smaller ones are cuts of it (tiny.tiny_vocab_gguf). Prompt and canvas tokens are drawn from
the whole vocabulary unless a config says `draw`. A real-vocabulary config takes 1.5-5 minutes (its 67M-entry
embedding is converted, dequantized and run several times); --vocab 512 gives each config a 512-token vocabulary
instead, which changes the errors little and takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
S, F = "sliding_attention", "full_attention"
REAL_VOCAB = 262144
PROMPT_LEN = 24          # longer than every sliding window below

WIDE = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256)  # rows of 256: K-quants apply
# `base`: the real vocabulary, hidden 256, 4 layers of which two global (head 128, one KV head; sliding heads 32),
# sliding window 4, 4 experts top-2. Every other config changes one thing from it (the qk1-* ones two).
BASE = dict(WIDE, vocab_size=REAL_VOCAB, num_hidden_layers=4, layer_types=[S, F, S, F], num_attention_heads=4,
            head_dim=32, num_key_value_heads=2, global_head_dim=128, num_global_key_value_heads=1,
            sliding_window=4, num_experts=4, top_k_experts=2)
QK1 = dict(qk_norm=(0.8, 1.2))     # q/k norm weights near 1 (tiny.py draws 0.2-0.5): attention scores ~ head size
SCAL1 = dict(scalars=((1.0, 1.0), (1.0, 1.0)))   # every layer scalar 1 (tiny.py: encoder 0.5-0.9, decoder 1.1-1.5)


def _base(**changes):
    return {**BASE, **changes}


# name -> (model overrides, extras: seed, draw (token ids drawn below it), qk_norm / norms / scalars redraws)
CONFIGS = {
    "wide": (dict(WIDE), dict(seed=3)),                  # test_placement's `wide` model: 512 tokens, 6 layers
    "real4": (dict(WIDE, vocab_size=REAL_VOCAB, num_hidden_layers=4, layer_types=[S, S, F, F]), {}),
    "base": (_base(), {}),
    # vocabulary, and canvas tokens from its first 512 ids only
    "v512": (_base(vocab_size=512), {}),
    "v32k": (_base(vocab_size=32768), {}),
    "draw512": (_base(), dict(draw=512)),
    # heads
    "gh32": (_base(global_head_dim=32), {}),
    "gh512": (_base(global_head_dim=512), {}),
    "h64-gh256": (_base(head_dim=64, global_head_dim=256), {}),
    "gkv2": (_base(num_global_key_value_heads=2), {}),
    # global vs sliding layers (the last layer is always global), depth
    "1global": (_base(layer_types=[S, S, S, F]), {}),
    "3global": (_base(layer_types=[S, F, F, F]), {}),
    "8layers": (_base(num_hidden_layers=8, layer_types=[S, F] * 4), {}),
    # window vs canvas
    "win16": (_base(sliding_window=16), {}),
    "win64": (_base(sliding_window=64), {}),
    "canvas32": (_base(canvas_length=32), {}),
    # experts
    "e4k1": (_base(top_k_experts=1), {}),
    "e8k2": (_base(num_experts=8), {}),
    "e16k4": (_base(num_experts=16, top_k_experts=4), {}),
    # scales: decoder layer scalars drawn as the encoder's, every scalar 1, norm weights near 1, q/k norms
    "scal-enc": (_base(), dict(scalars=((0.5, 0.9), (0.5, 0.9)))),
    "scal1": (_base(), SCAL1),
    "norms1": (_base(), dict(norms=(0.9, 1.1))),
    "qk0.5": (_base(), dict(qk_norm=(0.4, 0.6))),
    "qk1": (_base(), QK1),
    "qk1.5": (_base(), dict(qk_norm=(1.3, 1.7))),
    # q/k norms near 1 with another axis
    "qk1-gh32": (_base(global_head_dim=32), QK1),
    "qk1-gh512": (_base(global_head_dim=512), QK1),
    "qk1-h64-gh256": (_base(head_dim=64, global_head_dim=256), QK1),
    "qk1-win16": (_base(sliding_window=16), QK1),
    "qk1-canvas32": (_base(canvas_length=32), QK1),
    "qk1-e8k2": (_base(num_experts=8), QK1),
    "qk1-scal1": (_base(), {**QK1, **SCAL1}),          # the worst found (tests/test_placement.py AMPLIFYING)
}


# -- the child: llama.cpp on one file ---------------------------------------------------------------------------

def child(path: str, inputs: str, out: str, options: str) -> int:
    import dglocal

    with np.load(inputs) as z:
        prompt, canvases = z["prompt"].tolist(), z["canvases"]
    opts = {"n_ctx": 256, "kv_type": "f32", "flash_attn": False, "n_threads": 1, "extra_bufts": False,
            **json.loads(options)}
    with dglocal.load(path, **opts) as model:
        seq = model.sequence()
        enc = seq.prefill(prompt, logits_all=True)
        seq.truncate(0)
        enc1 = np.stack([seq.prefill([t], logits_last=True) for t in prompt])
        s1 = seq.denoise(canvases[0], temperature=1.0, self_condition=False, return_logits=True).logits
        s2 = seq.denoise(canvases[1], temperature=0.8, self_condition=True, return_logits=True).logits
    np.savez(out, enc=enc, enc1=enc1, step1=s1, step2=s2)
    return 0


def run_llama(path, inputs, out, options, env) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", str(path), str(inputs), str(out), json.dumps(options)],
                       capture_output=True, text=True, timeout=1800, env={**os.environ, **env})
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp run on {path} exited {r.returncode}:\n{r.stderr[-2000:]}")
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


# -- the reference ------------------------------------------------------------------------------------------------

def build_model(overrides: dict, extras: dict, seed_offset: int = 0):
    import tiny
    from cpu_rounding import rescale

    seed = extras.get("seed", 0) + seed_offset
    return rescale(tiny.tiny_model(seed, **overrides), seed, qk_norm=extras.get("qk_norm"),
                   norms=extras.get("norms"), scalars=extras.get("scalars"))


def reference_run(model, prompt, canvases) -> dict:
    from reference_harness import ReferenceModel, encoder_logits

    enc = encoder_logits(model, prompt)
    seq = ReferenceModel(model, n_ctx=256).sequence()
    seq.prefill(prompt)
    s1 = seq.denoise(canvases[0], temperature=1.0, self_condition=False, return_logits=True).logits
    s2 = seq.denoise(canvases[1], temperature=0.8, self_condition=True, return_logits=True).logits * np.float32(0.8)
    return dict(enc=enc, step1=s1, step2=s2)


# -- the sweep ----------------------------------------------------------------------------------------------------

def rel(a, b) -> float:
    """Median over positions of the per-position relative L2 error of a against b ([n, V] each)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.median(np.sqrt(((a - b) ** 2).mean(-1) / (b ** 2).mean(-1))))


def errors(got: dict, want: dict) -> dict:
    out = {k: rel(got[k], want[k]) for k in ("enc", "step1", "step2")}
    if "enc1" in got:
        out["enc1"] = rel(got["enc1"], want["enc"])
    return out


def sweep_config(name, types, work: Path, args) -> list[dict]:
    import torch
    import tiny
    from cpu_rounding import rounded_activations
    from test_convert import _dequantized_model

    from dglocal.convert import convert

    overrides, extras = CONFIGS[name]
    if args.vocab:
        overrides = dict(overrides, vocab_size=args.vocab)
        name = f"{name}@{args.vocab}"
    if args.seed:
        name = f"{name}#{args.seed}"
    t0 = time.monotonic()
    model = build_model(overrides, extras, args.seed)
    text = model.config.text_config
    vocab, canvas = text.vocab_size, model.config.canvas_length
    draw = extras.get("draw", vocab)
    rng = np.random.default_rng(7 + args.seed)
    prompt = rng.integers(3, draw, PROMPT_LEN).tolist()
    canvases = rng.integers(0, draw, (2, canvas)).astype(np.int32)
    inputs = work / f"{name}-inputs.npz"
    np.savez(inputs, prompt=np.array(prompt), canvases=canvases)

    ck = tiny.save_checkpoint(model, work / f"{name}-ck")
    tok = tiny.vocab_gguf() if vocab == REAL_VOCAB else tiny.tiny_vocab_gguf(work / f"{name}-vocab.gguf", vocab)
    options = {"kv_type": args.kv, "soft_embedding": args.soft_embedding}
    env = dict(e.split("=", 1) for e in args.env)
    soft_type = "f32" if args.soft_embedding == "f32" else "f16"  # the copy of E the rounded reference uses
    rows = []
    for type_name in types:
        path = work / f"{name}-{type_name}.gguf"
        convert(ck, path, type_name, tokenizer_from=tok, force=True)
        got = run_llama(path, inputs, work / f"{name}-{type_name}.npz", options, env)
        deq = model if type_name == "f32" else _dequantized_model(model, path)
        want = reference_run(deq, prompt, canvases)
        row = dict(config=name, type=type_name, **errors(got, want))
        if args.round and type_name != "f32":
            with rounded_activations(deq, path, soft_type), torch.no_grad():
                rounded = reference_run(deq, prompt, canvases)
            row["ref~"] = errors(rounded, want)       # how far the reference moves with llama.cpp's rounding
            row["vs~"] = errors(got, rounded)         # llama.cpp against the rounded reference
        rows.append(row)
        print(fmt(row), flush=True)
        del deq
        for p in (path, work / f"{name}-{type_name}.npz"):
            p.unlink(missing_ok=True)
    print(f"# {name}: {time.monotonic() - t0:.0f} s", flush=True)
    return rows


def fmt(row: dict) -> str:
    e = lambda d: " ".join(f"{k} {d[k]:.4f}" for k in ("enc", "enc1", "step1", "step2") if k in d)
    ratio = row["step1"] / max(row["enc"], 1e-12)
    s = f"{row['config']:14s} {row['type']:7s} {e(row)}  step1/enc {ratio:5.1f}"
    if "ref~" in row:
        s += f"\n{'':14s} {'ref~':7s} {e(row['ref~'])}\n{'':14s} {'vs~':7s} {e(row['vs~'])}"
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    ap.add_argument("-t", "--types", default="q8_0,q4_k_m")
    ap.add_argument("--round", action="store_true", help="also run the reference with llama.cpp's rounding")
    ap.add_argument("--kv", default="f32", help="KV cache type of the llama.cpp runs (f32 | f16; "
                    "the rounded reference keeps K and V exact)")
    ap.add_argument("--soft-embedding", choices=["f32", "f16", "q8_0"], help="the type of the soft embedding's "
                    "copy of E (default: f32 for an f32 embedding, else f16)")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the llama.cpp child (ggml's own "
                    "switches, e.g. GGML_VK_VISIBLE_DEVICES)")
    ap.add_argument("--vocab", type=int, help="every config with this vocabulary size instead (a quick pass)")
    ap.add_argument("--seed", type=int, default=0, help="added to every config's seed (another draw)")
    ap.add_argument("--json", help="append the rows to this JSON-lines file")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            rows = sweep_config(name, args.types.split(","), work, args)
            if args.json:
                with open(args.json, "a") as f:
                    for r in rows:
                        f.write(json.dumps({**r, "kv": args.kv, "soft_embedding": args.soft_embedding, "env": args.env}) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(*sys.argv[2:]))
    sys.exit(main())
