"""Model and sequence: the low-level contract of the patched llama.cpp backend.

    model = dglocal.load("model.gguf", n_ctx=4096)
    seq = model.sequence()
    seq.prefill(model.tokenize("Hello"))               # encoder, causal, writes the KV cache
    out = seq.denoise(canvas, temperature=0.8)         # decoder over the canvas, cache untouched
    seq.commit(out.argmax)                             # encoder over the finished block

Native handles live in an ExitStack and are freed context-before-model by `close()` (or `with`).
"""

from __future__ import annotations

import ctypes
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BackendError, ContextError, ModelError
from .gguf_read import read_header
from .placement import placement

ARCH = "diffusion-gemma"


@dataclass
class Denoised:
    """One decoder pass over a canvas: per position, for x = logits / temperature."""

    argmax: np.ndarray  # int32 [C]
    sampled: np.ndarray | None  # int32 [C], inverse CDF of softmax(x) at the given uniforms
    entropy: np.ndarray  # float32 [C], entropy of softmax(x)
    logits: np.ndarray | None = None  # float32 [C, n_vocab], raw (softcapped) logits, when asked


class Model:
    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 4096, n_gpu_layers: int = -1,
                 n_threads: int | None = None, seed: int | None = None, n_ubatch: int = 512, kv_type: str = "f16",
                 swa_full: bool = True, flash_attn: bool | None = None, extra_bufts: bool = True,
                 rpc: list[str] | None = None, tensor_overrides: list[str] | None = None, n_cpu_moe: int = 0):
        from . import _native as nat

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such file")
        self.metadata = read_header(self.path).kv  # raises ModelError on a malformed file
        arch = self.metadata.get("general.architecture")
        if arch != ARCH:
            raise ModelError(f"{self.path}: architecture is {arch!r}, dglocal runs {ARCH!r} models")
        self.canvas_length = int(self.metadata["diffusion.canvas_length"])
        # generations without their own seed draw one from here: a fixed load seed makes a run reproducible
        self._rng = np.random.default_rng(seed)
        self._nat = nat
        self._ll = nat._ll
        self._stack = ExitStack()
        nat.init()

        mparams = self._ll.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # llama.cpp's CPU "extra" buffer types (repacked / AMX weight layouts): its CPU speed, on by default
        mparams.use_extra_bufts = bool(extra_bufts)
        where = placement(rpc, tensor_overrides, n_cpu_moe)  # keeps the arrays mparams points to alive
        where.apply(mparams)
        self._model = self._ll.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise ModelError(f"{self.path}: llama.cpp could not load it: {nat.last_errors() or 'unknown error'}")
        self._stack.callback(self._ll.llama_model_free, self._model)

        n_ubatch = max(n_ubatch, self.canvas_length)  # a canvas is one bidirectional micro-batch
        if n_ctx < self.canvas_length + 1:
            self.close()
            raise ContextError(f"n_ctx {n_ctx} is too small: a canvas alone needs {self.canvas_length + 1}")
        cparams = self._ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ubatch
        cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = 1
        threads = n_threads or os.cpu_count() or 1
        cparams.n_threads = cparams.n_threads_batch = threads
        kv = {"f16": 1, "f32": 0, "q8_0": 8}
        if kv_type not in kv:
            self.close()
            raise ModelError(f"kv_type must be one of {sorted(kv)}, got {kv_type!r}")
        cparams.type_k = cparams.type_v = kv[kv_type]
        # a full-size SWA cache: the canvas never evicts prefix keys, and chat turns can truncate to any prefix
        cparams.swa_full = swa_full
        if flash_attn is not None:
            cparams.flash_attn_type = 1 if flash_attn else 0
        self._ctx = self._ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            err = nat.last_errors()
            self.close()
            raise BackendError(f"could not create a llama.cpp context (n_ctx={n_ctx}): {err or 'unknown error'}")
        self._stack.callback(self._ll.llama_free, self._ctx)  # ExitStack: freed before the model

        self._vocab = self._ll.llama_model_get_vocab(self._model)
        self.n_vocab = self._ll.llama_vocab_n_tokens(self._vocab)
        self.n_ctx = self._ll.llama_n_ctx(self._ctx)
        self.n_ubatch = n_ubatch
        if nat.llama_dg_canvas_length(self._model) != self.canvas_length:
            self.close()
            raise BackendError("the backend and the GGUF disagree on the canvas length")
        self.eos_ids = self._eos_ids()
        self._sequence: Sequence | None = None
        self._default: tuple[Sequence, list[int]] | None = None  # the sequence stream() reuses, and its tokens

    # -- lifetime ------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._stack.close()
        self._ctx = self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- tokenizer -----------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        for _ in range(2):  # a negative count is the size needed (byte-fallback tokens can outnumber bytes)
            buf = (ctypes.c_int32 * n_max)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            n_max = -n
        raise BackendError(f"tokenization failed: llama.cpp asked for {n_max} tokens twice")

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens, *, special: bool = False) -> str:
        return b"".join(self.token_piece(int(t), special=special) for t in tokens).decode("utf-8", "replace")

    def _eos_ids(self) -> tuple[int, ...]:
        ids = self.metadata.get("diffusion.eos_token_ids")
        if ids is None:
            ids = [t for t in range(self.n_vocab) if self._ll.llama_vocab_is_eog(self._vocab, t)]
        return tuple(int(t) for t in ids)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    # -- sequences and generation ---------------------------------------------------------------------------

    def sequence(self) -> "Sequence":
        """The context's one KV-cache sequence, emptied; a sequence made earlier becomes unusable."""
        if self._ctx is None:
            raise BackendError("the model is closed")
        self._sequence = Sequence(self)
        return self._sequence

    def stream(self, prompt, **options):
        """Generate after `prompt` (text or token ids); yields Step drafts, BlockText per committed block and
        a final Completion (dglocal.generate.stream). Consecutive calls reuse the cached common prefix."""
        from . import generate as gen

        if self._default is None or not self._default[0].live:
            self._default = (self.sequence(), [])
        seq, cached = self._default
        if options.get("seed") is None:
            options["seed"] = self.next_seed()
        return gen.stream(self, prompt, seq=seq, cached=cached, **options)

    def next_seed(self) -> int:
        """A seed for a generation that was given none, drawn from the load seed's generator."""
        return int(self._rng.integers(2**63))

    def generate(self, prompt, **options):
        """Run `stream` to the end: a Completion with text, tokens, finish_reason and stats."""
        for event in self.stream(prompt, **options):
            pass
        return event

    def chat(self, messages=None, **options):
        """A multi-turn ChatSession over the GGUF chat template that keeps the KV cache across turns."""
        from .generate import ChatSession

        return ChatSession(self, messages, **options)


class Sequence:
    """One KV-cache sequence: encoder prefill/commit, decoder denoise, truncation."""

    def __init__(self, model: Model, seq_id: int = 0):
        self.model = model
        self.seq_id = seq_id
        self._ll = model._ll
        self._mem = self._ll.llama_get_memory(model._ctx)
        self._ll.llama_memory_clear(self._mem, True)
        # counters: prompt tokens encoded, block tokens committed, decoder passes
        self.n_prefilled = 0
        self.n_committed = 0
        self.n_denoise = 0

    @property
    def live(self) -> bool:
        """False once a newer model.sequence() has taken over the context's cache."""
        return self.model._sequence is self

    def _check_live(self) -> None:
        if not self.live:
            raise BackendError("this sequence was replaced by a newer model.sequence() and its cache is gone")

    @property
    def n_past(self) -> int:
        return int(self._ll.llama_memory_seq_pos_max(self._mem, self.seq_id)) + 1

    def _check_tokens(self, tokens) -> np.ndarray:
        toks = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        if toks.size and (toks.min() < 0 or toks.max() >= self.model.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.model.n_vocab}), got {toks.min()}..{toks.max()}")
        return toks

    def prefill(self, tokens, *, logits_last: bool = False) -> np.ndarray | None:
        """Run the causal encoder over `tokens`, appending them to the cache. With logits_last, return the
        encoder's next-token logits after the last token (the autoregressive view of the same weights)."""
        logits = self._encode(tokens, logits_last)
        self.n_prefilled += len(tokens)
        return logits

    def commit(self, tokens) -> None:
        """Append a finished block: the same causal encoder pass as prefill."""
        self._encode(tokens, False)
        self.n_committed += len(tokens)

    def _encode(self, tokens, logits_last: bool) -> np.ndarray | None:
        self._check_live()
        toks = self._check_tokens(tokens)
        if self.n_past + toks.size > self.model.n_ctx:
            raise ContextError(f"{self.n_past} cached + {toks.size} new tokens exceed n_ctx {self.model.n_ctx}")
        step = self.model.n_ubatch
        batch = self._ll.llama_batch_init(step, 0, 1)
        try:
            for start in range(0, toks.size, step):
                chunk = toks[start:start + step]
                pos0 = self.n_past
                for i, t in enumerate(chunk):
                    batch.token[i] = int(t)
                    batch.pos[i] = pos0 + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = self.seq_id
                    batch.logits[i] = logits_last and start + i == toks.size - 1
                batch.n_tokens = len(chunk)
                ret = self._ll.llama_decode(self.model._ctx, batch)
                if ret != 0:
                    # a failed ubatch may leave part of the chunk in the cache: drop it, the cache stays consistent
                    self._ll.llama_memory_seq_rm(self._mem, self.seq_id, pos0, -1)
                    raise BackendError(f"encoder pass failed (llama_decode returned {ret}): "
                                       f"{self.model._nat.last_errors()}")
        finally:
            self._ll.llama_batch_free(batch)
        if logits_last and toks.size:
            ptr = self._ll.llama_get_logits_ith(self.model._ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()
        return None

    def denoise(self, canvas, *, temperature: float, uniforms=None, self_condition: bool = True,
                return_logits: bool = False) -> Denoised:
        """Decoder pass over `canvas` at positions n_past.. ; the cache is left as it was.
        self_condition=True feeds the soft embedding left by the previous denoise call (its logits / its
        temperature); False feeds zeros, as at the first step of a canvas."""
        self._check_live()
        nat = self.model._nat
        toks = self._check_tokens(canvas)
        n = toks.size
        u = None
        if uniforms is not None:
            u = np.ascontiguousarray(uniforms, dtype=np.float32).reshape(-1)
            if u.size != n:
                raise ValueError(f"uniforms has {u.size} values for a canvas of {n}")
        argmax = np.empty(n, np.int32)
        sampled = np.empty(n, np.int32) if u is not None else None
        entropy = np.empty(n, np.float32)
        ptr = lambda a, t: a.ctypes.data_as(t) if a is not None else None  # noqa: E731
        status = nat.llama_dg_denoise(
            self.model._ctx, self.seq_id, ptr(toks, nat.c_int32_p), n, float(temperature),
            ptr(u, nat.c_float_p), bool(self_condition), bool(return_logits),
            ptr(argmax, nat.c_int32_p), ptr(sampled, nat.c_int32_p), ptr(entropy, nat.c_float_p))
        if status != 0:
            err = ContextError if status == -4 else BackendError
            raise err(f"denoise failed: {nat.DG_STATUS.get(status, status)}: {nat.last_errors()}")
        self.n_denoise += 1
        logits = None
        if return_logits:
            lp = self._ll.llama_get_logits(self.model._ctx)
            logits = np.ctypeslib.as_array(lp, shape=(n, self.model.n_vocab)).copy()
        return Denoised(argmax, sampled, entropy, logits)

    def truncate(self, n: int) -> None:
        """Keep the first n cached tokens (multi-turn reuse)."""
        self._check_live()
        if not 0 <= n <= self.n_past:
            raise ValueError(f"cannot truncate to {n}: the cache holds {self.n_past} tokens")
        if not self._ll.llama_memory_seq_rm(self._mem, self.seq_id, n, -1):
            raise BackendError(f"the KV cache cannot be truncated to {n} tokens (SWA cache without swa_full?)")


def load(path, **opts) -> Model:
    """Load a diffusion-gemma GGUF. opts: n_ctx, n_gpu_layers, n_threads, seed, n_ubatch, kv_type, swa_full,
    flash_attn, extra_bufts (llama.cpp's repacked CPU layouts), rpc (["HOST:PORT", ...]: layers on ggml RPC
    servers), tensor_overrides (["REGEX=BUFFER_TYPE", ...], llama.cpp's -ot), n_cpu_moe (experts of the first N
    layers in host memory)."""
    return Model(path, **opts)
