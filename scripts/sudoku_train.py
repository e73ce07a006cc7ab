"""Train the tiny Sudoku DiffusionGemma with the reference transformers class (uniform-state diffusion).

    nice -n 19 python scripts/sudoku_train.py --threads 1 --minutes 100          # CPU, resumes if a run exists
    python scripts/sudoku_train.py --device cuda --minutes 30 --batch 512        # GPU
    bash scripts/sudoku_gpu.sh prep | device | finish                            # a lent GPU (see that script)

Per batch: symmetry-augmented puzzles from the pool, t ~ U(0,1) per example, each canvas token replaced
by a uniformly random token (whole vocabulary, as the sampler's canvas) with probability t, cross-entropy
to the clean canvas. The encoder runs once per batch; the decoder runs once, or twice on the
self-conditioning batches (a no-grad pass whose temperature-scaled logits feed the graded pass, as
`generate` feeds the previous step's processed logits).

State (model, optimizer, step, RNG) goes to <run-dir>/state.pt every --save-minutes; the HF checkpoint
(save_pretrained + generation_config + tokenizer files) to <checkpoint-dir> at each save and at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sudoku_data import HELDOUT_SEED, augment, pairs_array, read_pairs  # noqa: E402

from dglocal.convert.source import generation_defaults  # noqa: E402
from dglocal.files import replacing  # noqa: E402
from dglocal.sudoku import core as sc  # noqa: E402

HERE = Path(__file__).resolve().parent / "sudoku"
N_STRUCT = len(sc.STRUCTURE_IDS)  # constant prompt prefix, encoded once per batch at batch size 1

# The reference defaults (dglocal.generation.config): self-conditioning trains at their t_min..t_max.
GENERATION = dict(generation_defaults(), max_new_tokens=sc.CANVAS_LENGTH)
# the sampler schedule written into checkpoints: hotter than the generic default, it solved more puzzles alone in fewer
# steps (docs/sudoku.md); the Sudoku guide's restarts keep the cooler one
SAMPLER = dict(t_min=0.7, t_max=1.2)


def build_model(args):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.gemma4 import Gemma4VisionConfig

    layer_types = ["sliding_attention"] * (args.layers - 1) + ["full_attention"]
    text = dict(
        vocab_size=sc.VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        global_head_dim=args.hidden // args.heads,
        num_global_key_value_heads=args.heads,
        # every layer sees the whole prompt + canvas, so sliding and full layers differ only in RoPE
        sliding_window=512,
        layer_types=layer_types,
        max_position_embeddings=1024,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=args.hidden // 2,
        pad_token_id=sc.PAD_ID,
        eos_token_id=sc.EOS_ID,
        bos_token_id=sc.BOS_ID,
    )
    # the class requires a vision tower (unused here); this 1-layer 16-wide one costs ~5k parameters
    vision = Gemma4VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
        head_dim=16, patch_size=4, position_embedding_size=16,
    )
    config = DiffusionGemmaConfig(
        text_config=text, vision_config=vision, canvas_length=sc.CANVAS_LENGTH,
        pad_token_id=sc.PAD_ID, eos_token_id=sc.EOS_ID, bos_token_id=sc.BOS_ID,
    )
    torch.manual_seed(args.seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    model.set_experts_implementation(args.experts)
    model.generation_config = generation_config(**SAMPLER)
    return model


def generation_config(**overrides):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    g = {**GENERATION, **overrides}
    return DiffusionGemmaGenerationConfig(
        max_new_tokens=g["max_new_tokens"],
        max_denoising_steps=g["max_denoising_steps"],
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=g["entropy_bound"]),
        t_min=g["t_min"],
        t_max=g["t_max"],
        stability_threshold=g["stability_threshold"],
        confidence_threshold=g["confidence_threshold"],
        bos_token_id=sc.BOS_ID,
        pad_token_id=sc.PAD_ID,
        eos_token_id=[sc.EOS_ID],
    )


def write_tokenizer(directory: Path) -> None:
    """WordLevel tokenizer over the 41 tokens: one character per cell, '<...>' names as special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(sc.TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[^>]*>|\S"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # cells decode back to an 81-character string, no spaces
    tok.add_special_tokens([t for t in sc.TOKENS if t.startswith("<")])
    tok.save(str(directory / "tokenizer.json"))
    structure = "".join(sc.TOKENS[i] for i in sc.STRUCTURE_IDS[1:])
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<pad>",
        "model_max_length": sc.PROMPT_LENGTH + sc.CANVAS_LENGTH,
        # one user message = one puzzle (81 cells, '.' for blanks); the template adds the coordinate blocks
        "chat_template": "{{ bos_token }}" + structure + "{{ messages[-1]['content'] | trim }}<sep>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --- one training step ----------------------------------------------------------------------------


def encode_prompts(model, givens_ids: torch.Tensor):
    """Encoder pass: the constant structure prefix at batch 1 (expanded), then the B puzzle suffixes."""
    from transformers import DynamicCache

    enc = model.model.encoder.language_model
    b = givens_ids.shape[0]
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    prefix = torch.tensor([sc.STRUCTURE_IDS], device=givens_ids.device)
    enc(input_ids=prefix, past_key_values=cache)
    for layer in cache.layers:
        layer.keys = layer.keys.expand(b, -1, -1, -1)
        layer.values = layer.values.expand(b, -1, -1, -1)
    pos = torch.arange(N_STRUCT, sc.PROMPT_LENGTH, device=givens_ids.device)[None]
    enc(input_ids=givens_ids, past_key_values=cache, position_ids=pos)
    return cache


def decode(model, cache, canvas, sc_logits=None):
    out = model(past_key_values=cache, decoder_input_ids=canvas, self_conditioning_logits=sc_logits)
    return out.logits


def make_batch(pool: np.ndarray, batch: int, rng: np.random.Generator, device):
    idx = rng.integers(0, len(pool), size=batch)
    grids = augment(pool[idx], rng).astype(np.int64)  # (B, 2, 81)
    puzzle, solution = grids[:, 0], grids[:, 1]
    givens = np.where(puzzle > 0, puzzle + sc.DIGIT_BASE, sc.BLANK_ID)
    givens = np.concatenate([givens, np.full((batch, 1), sc.SEP_ID)], axis=1)
    return (
        torch.from_numpy(givens).to(device),
        torch.from_numpy(solution + sc.DIGIT_BASE).to(device),
        torch.from_numpy(puzzle == 0).to(device),
    )


def own_draft(model, cache, canvas, noised, gen: torch.Generator):
    """The canvas as the sampler leaves it mid-run: a share (uniform per example) of the noised positions holds
    the model's own argmax for them instead of a random token. Its wrong digits are plausible ones, the kind a
    canvas keeps after a step, which uniform noise never shows the model."""
    with torch.no_grad():
        guess = decode(model, cache, canvas).argmax(-1)
    b, n = canvas.shape
    share = torch.rand(b, 1, generator=gen, device=canvas.device)
    take = noised & (torch.rand(b, n, generator=gen, device=canvas.device) < share)
    return torch.where(take, guess, canvas)


def train_step(model, batch, use_sc: bool, gen: torch.Generator, use_draft: bool = False):
    givens, clean, blank = batch
    b, n = clean.shape
    dev = clean.device
    t = torch.rand(b, 1, generator=gen, device=dev)
    noised = torch.rand(b, n, generator=gen, device=dev) < t
    noise = torch.randint(0, sc.VOCAB_SIZE, (b, n), generator=gen, device=dev)
    canvas = torch.where(noised, noise, clean)

    cache = encode_prompts(model, givens)
    if use_draft:
        canvas = own_draft(model, cache, canvas, noised, gen)
    sc_logits = None
    if use_sc:
        with torch.no_grad():
            temp = GENERATION["t_min"] + (GENERATION["t_max"] - GENERATION["t_min"]) * t
            sc_logits = decode(model, cache, canvas) / temp[:, :, None]
    logits = decode(model, cache, canvas, sc_logits)
    loss = F.cross_entropy(logits.reshape(-1, sc.VOCAB_SIZE), clean.reshape(-1))
    with torch.no_grad():
        right = logits.argmax(-1) == clean
        hard = blank & noised  # blank cells whose canvas token was noised: the real work
        acc = (right & hard).sum().item() / max(hard.sum().item(), 1)
    return loss, acc


# --- evaluation through the reference `generate` ----------------------------------------------------


@torch.no_grad()
def evaluate(model, pairs, batch: int = 64, seed: int = 0, **gen_overrides) -> dict:
    """Solve rate (check_grid), blank-cell accuracy and mean denoising steps via `model.generate`."""
    was_training = model.training
    model.eval()
    gc = copy.deepcopy(model.generation_config)  # the checkpoint's sampler settings, then the overrides
    for key, value in gen_overrides.items():
        setattr(gc, key, value)
    solved = blanks = blanks_right = 0
    steps_total = 0.0
    grids = []
    dev = model.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for k in range(0, len(pairs), batch):
            chunk = pairs[k : k + batch]
            ids = torch.tensor([sc.encode_prompt(p) for p, _ in chunk], device=dev)
            out = model.generate(ids, generation_config=gc)
            canvas = out.sequences[:, sc.PROMPT_LENGTH :].cpu()
            valid = (canvas != sc.PAD_ID).sum(-1).float()
            steps_total += (valid / out.tokens_per_forward.cpu().float()).sum().item()
            for (p, s), row in zip(chunk, canvas.tolist()):
                g = sc.decode_canvas(row)
                grids.append(g)
                solved += sc.check_grid(p, g)
                if s is not None:
                    for pi, si, gi in zip(p, s, g):
                        if not pi:
                            blanks += 1
                            blanks_right += si == gi
    if was_training:
        model.train()
    n = len(pairs)
    return dict(n=n, solved=solved / n, blank_acc=blanks_right / max(blanks, 1), steps=steps_total / n, grids=grids)


# --- state -------------------------------------------------------------------------------------------


def lr_at(examples: int, args, seconds: float = 0.0) -> float:
    warm = args.warmup_from + args.warmup_examples
    if examples < warm:
        return args.lr * (examples - args.warmup_from + args.batch) / args.warmup_examples
    if args.decay_minutes:  # a machine of unknown speed: the cosine runs over this invocation's wall time
        frac = min(seconds / (args.decay_minutes * 60), 1.0)
    else:
        # --anneal-from starts the cosine late: a resumed run at a constant LR can cool down over its last stretch
        start = max(warm, args.anneal_from)
        if examples < start:
            return args.lr
        frac = min((examples - start) / max(args.horizon - start, 1), 1.0)
    return args.lr_min + 0.5 * (args.lr - args.lr_min) * (1 + math.cos(math.pi * frac))


def save_state(path: Path, model, opt, progress: dict, nprng: np.random.Generator, gen: torch.Generator):
    with replacing(path) as partial:
        torch.save(
            dict(model=model.state_dict(), opt=opt.state_dict(), progress=progress,
                 np_rng=nprng.bit_generator.state, torch_rng=gen.get_state(), py_rng=random.getstate()),
            partial,
        )


def save_checkpoint(model, directory: Path, progress: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # writes generation_config.json from model.generation_config
    write_tokenizer(directory)
    # what --init-from needs to go on from this checkpoint on another machine (state.pt is not committed)
    seen = {k: progress[k] for k in ("step", "examples", "train_seconds")}
    (directory / "training_progress.json").write_text(json.dumps(seen, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of this invocation")
    ap.add_argument("--examples", type=int, default=0, help="stop once this many examples were seen in total (0: no limit)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-min", type=float, default=1e-4)
    ap.add_argument("--warmup-examples", type=int, default=10_000)
    ap.add_argument("--warmup-from", type=int, default=0, help="examples at which the warmup starts (a warm "
                    "restart from --init-from: the examples the checkpoint had seen)")
    ap.add_argument("--horizon", type=int, default=20_000_000, help="examples over which the LR decays (cosine)")
    ap.add_argument("--anneal-from", type=int, default=0, help="examples at which the cosine decay starts (0: after warmup)")
    ap.add_argument("--decay-minutes", type=float, default=0.0, help="the cosine decay over this invocation's first "
                    "minutes of wall time instead of --horizon examples (a device whose speed is not known)")
    ap.add_argument("--sc-prob", type=float, default=0.5, help="fraction of batches trained with self-conditioning")
    ap.add_argument("--draft-prob", type=float, default=0.0, help="fraction of batches whose noised positions "
                    "partly hold the model's own guesses (training on its own mistakes)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", default="eager", help="transformers experts implementation (eager is fastest on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", default=str(HERE / "run" / "pool.txt"), help="training puzzles (sudoku_data.py output)")
    ap.add_argument("--heldout", default=str(HERE / "heldout.txt"))
    ap.add_argument("--exclude", nargs="*", default=[str(HERE / "heldout_alt.txt"), str(HERE / "hard.txt"),
                                                 str(HERE / "hard_tune.txt"), str(HERE / "famous.txt")],
                    help="other held-out sets no training solution may appear in")
    ap.add_argument("--run-dir", default=str(HERE / "run"), help="resumable state lives here")
    ap.add_argument("--checkpoint-dir", default=str(HERE / "checkpoint"))
    ap.add_argument("--save-minutes", type=float, default=10.0)
    ap.add_argument("--eval-minutes", type=float, default=15.0)
    ap.add_argument("--eval-n", type=int, default=64, help="held-out puzzles per periodic evaluation")
    ap.add_argument("--eval-steps", type=int, default=48)
    ap.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing state.pt")
    ap.add_argument("--init-from", help="without a state.pt: start from this HF checkpoint's weights and its "
                    "training_progress.json (a fresh optimizer), e.g. the committed scripts/sudoku/checkpoint")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.pt"

    pool = pairs_array(read_pairs(args.pool))
    heldout = read_pairs(args.heldout)
    for held_path in [args.heldout, *args.exclude]:
        held_solutions = {bytes(np.array(s, dtype=np.uint8)) for _, s in read_pairs(held_path)}
        overlap = sum(bytes(row[1]) in held_solutions for row in pool)
        if overlap:
            raise SystemExit(f"{overlap} training solutions appear in the held-out set {held_path}")

    model = build_model(args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    nprng = np.random.default_rng(args.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    progress = dict(step=0, examples=0, train_seconds=0.0, log=[])
    if state_path.exists() and not args.fresh:
        st = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        progress = st["progress"]
        nprng.bit_generator.state = st["np_rng"]
        gen.set_state(st["torch_rng"])
        random.setstate(st["py_rng"])
        print(f"resumed {state_path}: step {progress['step']}, {progress['examples']} examples", flush=True)
    elif args.init_from:
        from transformers import DiffusionGemmaForBlockDiffusion

        init = Path(args.init_from)
        model.load_state_dict(DiffusionGemmaForBlockDiffusion.from_pretrained(init).state_dict())
        seen = init / "training_progress.json"
        if seen.exists():
            progress.update(json.loads(seen.read_text()))
        print(f"initialised from {init}: {progress['examples']} examples seen before", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params}, pool {len(pool)} puzzles, held-out {len(heldout)} (seed {HELDOUT_SEED}), "
          f"batch {args.batch}, threads {args.threads}, device {device}", flush=True)

    model.train()
    t_start = time.time()
    t_save = t_eval = t_start
    window = dict(loss=0.0, acc=0.0, n=0, ex=0, t=time.time())
    while True:
        elapsed = time.time() - t_start
        done = elapsed > args.minutes * 60 or (args.examples and progress["examples"] >= args.examples)
        if done or time.time() - t_save > args.save_minutes * 60:
            save_state(state_path, model, opt, progress, nprng, gen)
            save_checkpoint(model, Path(args.checkpoint_dir), progress)
            t_save = time.time()
            print(f"saved {state_path} and {args.checkpoint_dir} at {progress['examples']} examples", flush=True)
        if done or time.time() - t_eval > args.eval_minutes * 60:
            r = evaluate(model, heldout[: args.eval_n], max_denoising_steps=args.eval_steps)
            r.pop("grids")
            progress["log"].append(dict(kind="eval", examples=progress["examples"], **r))
            print(f"eval @ {progress['examples']} ex: solved {r['solved']:.3f}, blank acc {r['blank_acc']:.3f}, "
                  f"steps {r['steps']:.1f} (n={r['n']})", flush=True)
            t_eval = time.time()
        if done:
            break

        for group in opt.param_groups:
            group["lr"] = lr_at(progress["examples"], args, elapsed)
        batch = make_batch(pool, args.batch, nprng, device)
        use_sc = nprng.random() < args.sc_prob
        use_draft = args.draft_prob > 0 and nprng.random() < args.draft_prob
        t0 = time.time()
        loss, acc = train_step(model, batch, use_sc, gen, use_draft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        progress["train_seconds"] += time.time() - t0
        progress["step"] += 1
        progress["examples"] += args.batch
        window["loss"] += loss.item()
        window["acc"] += acc
        window["n"] += 1
        window["ex"] += args.batch
        if progress["step"] % args.log_every == 0:
            now = time.time()
            rate = window["ex"] / (now - window["t"])
            entry = dict(kind="train", step=progress["step"], examples=progress["examples"],
                         loss=window["loss"] / window["n"], noised_blank_acc=window["acc"] / window["n"],
                         lr=opt.param_groups[0]["lr"], ex_per_s=rate)
            progress["log"].append(entry)
            print(f"step {entry['step']} ex {entry['examples']} loss {entry['loss']:.4f} "
                  f"noised-blank acc {entry['noised_blank_acc']:.3f} lr {entry['lr']:.2e} {rate:.1f} ex/s", flush=True)
            window = dict(loss=0.0, acc=0.0, n=0, ex=0, t=now)
    return 0


if __name__ == "__main__":
    sys.exit(main())
