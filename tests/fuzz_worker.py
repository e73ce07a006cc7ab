"""Seeded mutants of a GGUF and of a checkpoint, and the child process that runs them (tests/test_fuzz.py).

    python tests/fuzz_worker.py gguf BASE.gguf WORKDIR FIRST LAST     # mutants FIRST..LAST-1, one line each
    python tests/fuzz_worker.py checkpoint CKPT VOCAB WORKDIR FIRST LAST

Each line: `<index> <outcome> <detail>`. Outcomes: `error` (a DglocalError: the clean refusal), `same` (loads and
denoises exactly like the base file), `differs` (loads but computes something else: a silently wrong model),
`traceback` (any other exception), `leftover` (a converter left a file behind). A child killed by a signal or
stuck is seen by the parent, which restarts it after the mutant at fault.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import sys
import traceback
from pathlib import Path

import numpy as np

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


def gguf_fields(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """Offsets of the structural fields of a GGUF: kind -> [(offset, byte width)]."""
    f: dict[str, list[tuple[int, int]]] = {k: [] for k in (
        "count", "str_len", "vtype", "arr_len", "n_dims", "dim", "ttype", "toffset", "canvas_value")}
    f["count"] += [(8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(pos):
        (n,) = struct.unpack_from("<Q", data, pos)
        f["str_len"].append((pos, 8))
        return data[pos + 8:pos + 8 + n].decode(), pos + 8 + n

    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", data, pos)
        f["vtype"].append((pos, 4))
        pos += 4
        if key == "diffusion.canvas_length":
            f["canvas_value"].append((pos, 4))
        if vtype == STRING:
            _, pos = string(pos)
        elif vtype == ARRAY:
            sub, n = struct.unpack_from("<IQ", data, pos)
            f["arr_len"].append((pos + 4, 8))
            pos += 12
            for _ in range(n):
                if sub == STRING:
                    _, pos = string(pos)
                else:
                    pos += SCALAR_SIZES[sub]
        else:
            pos += SCALAR_SIZES[vtype]
    for _ in range(n_tensors):
        _, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        f["n_dims"].append((pos, 4))
        pos += 4
        f["dim"] += [(pos + 8 * i, 8) for i in range(n_dims)]
        pos += 8 * n_dims
        f["ttype"].append((pos, 4))
        f["toffset"].append((pos + 4, 8))
        pos += 12
    f["header_end"] = [(pos, 0)]
    return f


def mutate_gguf(data: bytes, index: int) -> tuple[str, bytes]:
    """Mutant `index` of `data`: (what was done, the mutated bytes)."""
    rng = random.Random(index)
    fields = gguf_fields(data)
    kinds = ["count", "str_len", "vtype", "arr_len", "n_dims", "dim", "ttype", "toffset", "truncate", "canvas"]
    kind = kinds[index % len(kinds)]
    out = bytearray(data)
    if kind == "truncate":
        cut = rng.choice([rng.randrange(0, fields["header_end"][0][0]), rng.randrange(0, len(data))])
        return f"truncate at {cut}", bytes(out[:cut])
    if kind == "canvas":
        (off, _), = fields["canvas_value"]
        value = rng.choice([0, 2**31, 2**32 - 1, 70000])
        struct.pack_into("<I", out, off, value)
        return f"canvas_length {value}", bytes(out)
    off, width = rng.choice(fields[kind])
    old = int.from_bytes(out[off:off + width], "little")
    if kind == "vtype":
        new = rng.choice([t for t in [*range(0, 13), 99] if t != old])
    elif kind == "ttype":
        new = rng.choice([t for t in [0, 1, 2, 8, 10, 12, 14, 16, 20, 24, 26, 28, 30, 39, 99, 1000] if t != old])
    elif kind == "n_dims":
        new = rng.choice([0, 5, old + 1, max(old - 1, 0)])
    else:
        new = rng.choice([old + 1, max(old - 1, 0), old * 2, 0, 2**31, 2**62, old + 32, (1 << 8 * width) - 1])
    new %= 1 << 8 * width
    out[off:off + width] = new.to_bytes(width, "little")
    return f"{kind}@{off} {old}->{new}", bytes(out)


def denoise_fingerprint(path) -> np.ndarray:
    """Load with default options, prefill and one denoise step: the logits."""
    import dglocal

    with dglocal.load(path, n_ctx=128, n_threads=1, kv_type="f32", flash_attn=False) as m:
        s = m.sequence()
        s.prefill([2, 10, 11, 12, 13])
        canvas = np.arange(m.canvas_length, dtype=np.int32) % m.n_vocab
        return s.denoise(canvas, temperature=1.0, self_condition=False, return_logits=True).logits


def run_gguf(base: Path, work: Path, first: int, last: int) -> None:
    from dglocal import DglocalError
    from dglocal.convert import info

    data = base.read_bytes()
    want = denoise_fingerprint(base)
    for i in range(first, last):
        what, mutant = mutate_gguf(data, i)
        path = work / f"mutant-{i}.gguf"
        path.write_bytes(mutant)
        outcome = []
        for stage in (lambda: info(path), lambda: denoise_fingerprint(path)):
            try:
                got = stage()
            except DglocalError as e:
                outcome.append(f"error:{str(e)[-60:]!r}")
                break
            except Exception as e:  # noqa: BLE001 (what the fuzz test looks for)
                outcome.append(f"traceback:{type(e).__name__}:{e!s:.200}:{traceback.format_exc()[-300:]!r}")
                break
        else:
            outcome.append("same" if np.array_equal(got, want) else "differs")
        path.unlink()
        print(i, outcome[-1].split(":")[0], what, outcome[-1], flush=True)


# -- checkpoints ---------------------------------------------------------------------------------------------

def mutate_checkpoint(src: Path, dst: Path, index: int) -> str:
    """Copy of the checkpoint `src` with mutant `index` applied (a safetensors header or a config value)."""
    shutil.copytree(src, dst)
    rng = random.Random(10_000 + index)
    kinds = ["offsets", "dtype", "shape", "header_len", "truncate", "config", "config", "generation"]
    kind = kinds[index % len(kinds)]
    st = dst / "model.safetensors"
    raw = bytearray(st.read_bytes())
    (n,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    if kind in ("offsets", "dtype", "shape"):
        meta = header[name]
        if kind == "offsets":
            a, b = meta["data_offsets"]
            meta["data_offsets"] = rng.choice([[a, b + 4], [a + 4, b], [b, a], [a, b * 1000], ["x", b], [a]])
        elif kind == "dtype":
            meta["dtype"] = rng.choice(["F64", "I32", "U8", "Q4", 7, "BF16" if meta["dtype"] != "BF16" else "F16"])
        else:
            meta["shape"] = rng.choice([meta["shape"][::-1] + [1], [-1], ["a"], meta["shape"] + [2], None])
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        raw = struct.pack("<Q", len(body)) + body + raw[8 + n:]
        st.write_bytes(raw)
        return f"{kind} of {name}: {header[name]}"
    if kind == "header_len":
        struct.pack_into("<Q", raw, 0, rng.choice([0, 7, n + 1, 2**40, len(raw)]))
        st.write_bytes(raw)
        return "header length"
    if kind == "truncate":
        st.write_bytes(raw[: rng.randrange(0, len(raw))])
        return "truncated safetensors"
    path = dst / ("config.json" if kind == "config" else "generation_config.json")
    cfg = json.loads(path.read_text())
    section = cfg.get("text_config", cfg) if kind == "config" else cfg
    keys = sorted(k for k, v in section.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    key = rng.choice(keys)
    section[key] = rng.choice([-1, 0, 2**40, "7", None, 1e300, [1]])
    if kind == "config" and index % 3 == 0:
        cfg["canvas_length"] = rng.choice([0, -16, 2**31, "16"])
        key = "canvas_length"
    path.write_text(json.dumps(cfg))
    return f"{path.name}: {key}"


def run_checkpoint(ckpt: Path, vocab: Path, work: Path, first: int, last: int) -> None:
    from dglocal import DglocalError
    from dglocal.convert import convert

    for i in range(first, last):
        src = work / f"ck-{i}"
        what = mutate_checkpoint(ckpt, src, i)
        out = work / f"out-{i}.gguf"
        try:
            convert(src, out, "f32" if i % 2 else "q8_0", tokenizer_from=vocab)
            outcome = "converted"
        except DglocalError as e:
            outcome = f"error:{str(e)[-80:]!r}"
        except Exception as e:  # noqa: BLE001
            outcome = f"traceback:{type(e).__name__}:{e!s:.200}"
        written = [*work.glob(f"out-{i}.gguf*"), *work.glob(f"mmproj-out-{i}.gguf*")]  # the model, its tower
        left = sorted(p.name for p in written)
        if outcome.startswith("error") and left:
            outcome = f"leftover:{left}"
        for p in written:
            p.unlink()
        shutil.rmtree(src)
        print(i, outcome.split(":")[0], what, outcome, flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "gguf":
        run_gguf(Path(args[0]), Path(args[1]), int(args[2]), int(args[3]))
    else:
        run_checkpoint(Path(args[0]), Path(args[1]), Path(args[2]), int(args[3]), int(args[4]))
