"""Train a LoRA adapter of the shipped Sudoku model with the training recipe, on harder puzzles: the end-to-end
example of adapters (PEFT -> `dglocal convert --lora` -> `dglocal sudoku --lora`).

    python scripts/sudoku_lora.py --pool hard_pool.txt --minutes 5 --out /tmp/sudoku-lora
    dglocal convert --lora /tmp/sudoku-lora /tmp/sudoku-lora.gguf
    dglocal sudoku --eval scripts/sudoku/hard.txt --no-guide --lora /tmp/sudoku-lora.gguf

The adapter wraps the decoder's attention and MLP projections, and the encoder runs through the same wrapped
modules (its layers are tied to the decoder's in the checkpoint): both passes see W + BA, which is what the
adapter GGUF gives both passes in llama.cpp, so the model trained is the model that runs.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sudoku_data import pairs_array, read_pairs  # noqa: E402
from sudoku_train import HERE, make_batch, train_step  # noqa: E402

TARGETS = r"model\.decoder\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def lora_model(checkpoint: Path, rank: int, alpha: float):
    from peft import LoraConfig, get_peft_model
    from transformers import DiffusionGemmaForBlockDiffusion

    base = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, experts_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
    hf = model.get_base_model()
    for dec, enc in zip(hf.model.decoder.layers, hf.model.encoder.language_model.layers):
        enc.self_attn.q_proj, enc.self_attn.k_proj, enc.self_attn.o_proj = (dec.self_attn.q_proj, dec.self_attn.k_proj,
                                                                            dec.self_attn.o_proj)
        if getattr(dec.self_attn, "v_proj", None) is not None:
            enc.self_attn.v_proj = dec.self_attn.v_proj
        enc.mlp = dec.mlp
    return model, hf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(HERE / "checkpoint"))
    ap.add_argument("--pool", required=True, help="training puzzles (sudoku_data.py output)")
    ap.add_argument("--out", required=True, help="PEFT adapter directory to write")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    pool = pairs_array(read_pairs(args.pool))
    model, hf = lora_model(Path(args.checkpoint), args.rank, args.alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    hf.train()
    t0, step, seen = time.time(), 0, 0
    while time.time() - t0 < args.minutes * 60:
        loss, acc = train_step(hf, make_batch(pool, args.batch, rng, "cpu"), step % 2 == 1, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step, seen = step + 1, seen + args.batch
        if step % 20 == 0:
            print(f"step {step} ex {seen} loss {loss.item():.4f} noised-blank acc {acc:.3f} "
                  f"{seen / (time.time() - t0):.1f} ex/s", flush=True)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in params)} adapter parameters, {seen} examples", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
