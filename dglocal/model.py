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
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import checks, swa
from .errors import BackendError, ConfigError, ContextError, ModelError
from .gguf_read import read_header
from .placement import device_precision, placement


@dataclass
class Denoised:
    """One decoder pass over a canvas: per position, for x = logits / temperature."""

    argmax: np.ndarray  # int32 [C]
    sampled: np.ndarray | None  # int32 [C], inverse CDF of softmax(x) at the given uniforms
    entropy: np.ndarray  # float32 [C], entropy of softmax(x)
    logits: np.ndarray | None = None  # float32 [C, n_vocab], raw (softcapped) logits, when asked


class GraphNode(NamedTuple):
    """One compute node of a graph as llama.cpp builds and schedules it (Model.graph_nodes)."""

    op: str
    name: str
    src0_type: int  # ggml type id of the first source (a matmul's weight), -1 if none
    flops: float
    bytes: float  # read + written
    backend: str  # where the scheduler runs it ("CPU", "Vulkan0", "CUDA0", ...)
    copied: float  # bytes of its sources the scheduler copies in from another backend


KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8, "q4_0": 2}
QUANTIZED_KV = ("q8_0", "q4_0")  # llama.cpp quantizes V only inside flash attention


class Model:
    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 4096, n_gpu_layers: int = -1,
                 n_threads: int | None = None, seed: int | None = None, n_ubatch: int = 512, kv_type: str = "f16",
                 swa_full: bool | None = None, flash_attn: bool | None = None, extra_bufts: bool = True,
                 rpc: list[str] | None = None, tensor_overrides: list[str] | None = None, n_cpu_moe: int = 0,
                 n_seq_max: int = 1, no_alloc: bool = False, mmap: bool = True, swa_checkpoints: int = 4,
                 tensor_split=None, precision: str = "auto"):
        self._ctx = self._model = None
        self._stack = ExitStack()
        seed = checks.load_options(n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads, seed=seed,
                                   n_ubatch=n_ubatch, kv_type=kv_type, kv_types=KV_TYPES)
        self.n_seq_max = checks.integer("n_seq_max", n_seq_max, 1, checks.MAX_SEQ)
        if kv_type in QUANTIZED_KV:
            if flash_attn is False:
                raise ConfigError(f"a {kv_type} KV cache needs flash attention (llama.cpp quantizes V only inside "
                                  "it): drop --no-flash-attn, or use an f16 cache")
            flash_attn = True
        # llama.cpp's no_alloc: shapes and buffer sizes without the weights (memory plans, cost models); such a
        # model runs nothing (sequence() refuses)
        self.no_alloc = bool(no_alloc)
        self._mmap = bool(mmap) and not self.no_alloc  # llama.cpp's --no-mmap: weights read into its own buffers
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such file")
        header = read_header(self.path)  # raises ModelError on a malformed file
        self.metadata = header.kv
        self.canvas_length = checks.model_file(self.path, header)
        if n_ctx < self.canvas_length + 1:
            raise ContextError(f"n_ctx {n_ctx} is too small: a canvas alone needs {self.canvas_length + 1}")
        # generations without their own seed draw one from here: a fixed load seed makes a run reproducible
        self._rng = np.random.default_rng(seed)
        n_ubatch = max(n_ubatch, self.canvas_length)
        self.sliding_window = swa.sliding_window(self.metadata)
        if swa_full is None:
            n_ctx_seq = -(-(n_ctx // self.n_seq_max) // 256) * 256
            swa_full = swa.full_by_default(n_ctx_seq, self.sliding_window, n_ubatch)
        self.swa_full = bool(swa_full) or self.sliding_window == 0
        self.swa_checkpoints = checks.integer("swa_checkpoints", swa_checkpoints, 0, 64)
        device_precision(precision)
        try:  # whatever exists when a step fails (or Ctrl-C arrives) is freed
            self._open(n_ctx, n_gpu_layers, n_threads, n_ubatch, kv_type, self.swa_full,
                       flash_attn, extra_bufts, placement(rpc, tensor_overrides, n_cpu_moe, tensor_split))
        except BaseException:
            self.close()
            raise
        self._sequences: dict[int, Sequence] = {}  # the live sequence of each id
        self._default: Sequence | None = None  # the sequence stream() reuses across calls

    def _open(self, n_ctx, n_gpu_layers, n_threads, n_ubatch, kv_type, swa_full, flash_attn, extra_bufts, where):
        from . import _native as nat

        self._nat, self._ll = nat, nat._ll
        nat.init()
        # native calls run on a worker thread so that Ctrl-C, caught here, can raise the abort flag they poll
        self._abort = ctypes.c_int32(0)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dglocal-native")
        self._stack.callback(self._worker.shutdown)
        mparams = self._ll.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # llama.cpp's CPU "extra" buffer types (repacked / AMX weight layouts): its CPU speed, on by default
        mparams.use_extra_bufts = bool(extra_bufts)
        mparams.no_alloc = self.no_alloc  # as llama.cpp's own fit pass: nothing mapped, nothing read
        if not self._mmap:
            mparams.load_mode = 0
        progress = self._ll.llama_progress_callback(lambda _p, _d: not self._abort.value)  # False: stop loading
        mparams.progress_callback = progress
        where.apply(mparams)  # `where` keeps the arrays mparams points to alive
        self._model = self.native(self._ll.llama_model_load_from_file, str(self.path).encode(), mparams)
        if not self._model:
            raise ModelError(f"{self.path}: llama.cpp could not load it: {nat.last_errors() or 'unknown error'}")
        self._stack.callback(self._ll.llama_model_free, self._model)

        cparams = self._ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_ubatch  # a canvas is one bidirectional micro-batch
        cparams.n_seq_max = self.n_seq_max
        # one cache stream per sequence (llama.cpp's default): attention spans a sequence's own cells only
        cparams.n_threads = cparams.n_threads_batch = n_threads or os.cpu_count() or 1
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
        # windowed sliding layers (swa_full False) need checkpoints to truncate (dglocal.swa)
        cparams.swa_full = swa_full
        if flash_attn is not None:
            cparams.flash_attn_type = 1 if flash_attn else 0
        self._ctx = self.native(self._ll.llama_init_from_model, self._model, cparams)
        if not self._ctx:
            raise BackendError(f"could not create a llama.cpp context (n_ctx={n_ctx}): "
                               f"{nat.last_errors() or 'unknown error'}")
        self._stack.callback(self._ll.llama_free, self._ctx)  # ExitStack: freed before the model
        nat.llama_dg_set_abort_flag(self._ctx, ctypes.byref(self._abort))
        self._stack.callback(self._worker.shutdown)  # LIFO: no native call is running when the context goes

        self._vocab = self._ll.llama_model_get_vocab(self._model)
        self.n_vocab = self._ll.llama_vocab_n_tokens(self._vocab)
        self.n_ctx = self._ll.llama_n_ctx_seq(self._ctx)  # per sequence: n_ctx / n_seq_max
        # llama.cpp rounds n_ctx up and may cap n_batch / n_ubatch by it: feed it what it actually accepts
        self.n_ubatch = min(self._ll.llama_n_batch(self._ctx), self._ll.llama_n_ubatch(self._ctx))
        if self.n_ubatch < self.canvas_length:
            raise ContextError(f"n_ctx {self.n_ctx} gives micro-batches of {self.n_ubatch} tokens, under the "
                               f"canvas of {self.canvas_length}: raise n_ctx")
        if nat.llama_dg_canvas_length(self._model) != self.canvas_length:
            raise BackendError("the backend and the GGUF disagree on the canvas length")
        self.eos_ids = self._eos_ids()

    # -- lifetime ------------------------------------------------------------------------------------------

    def native(self, fn, *args):
        """Run a native call on the worker thread. Ctrl-C meanwhile sets the abort flag, which llama.cpp polls
        between graph nodes; the KeyboardInterrupt is raised here once the stopped call has returned."""
        future = self._worker.submit(fn, *args)
        try:
            return future.result()
        except KeyboardInterrupt:
            self._abort.value = 1
            try:
                while not future.done():
                    try:
                        future.exception()  # wait for the call to stop; a second Ctrl-C does not cut this short
                    except KeyboardInterrupt:
                        pass
            finally:
                self._abort.value = 0
            raise

    def close(self) -> None:
        """Free the context and the weights. Every Sequence and chat made from this model stops working."""
        self._stack.close()
        self._ctx = self._model = None
        self._sequences, self._default = {}, None

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def check_open(self) -> None:
        if self._ctx is None:
            raise BackendError("the model is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- tokenizer -----------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        self.check_open()
        if not isinstance(text, str):
            raise ConfigError(f"tokenize takes a str, got {type(text).__name__}")
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
        self.check_open()
        token = checks.integer("token", token, 0, self.n_vocab - 1)
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens, *, special: bool = False) -> str:
        ids = checks.token_ids(tokens, self.n_vocab)
        return b"".join(self.token_piece(int(t), special=special) for t in ids).decode("utf-8", "replace")

    def _eos_ids(self) -> tuple[int, ...]:
        ids = self.metadata.get("diffusion.eos_token_ids")
        if ids is None:
            ids = [t for t in range(self.n_vocab) if self._ll.llama_vocab_is_eog(self._vocab, t)]
        return tuple(int(t) for t in ids)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    # -- sequences and generation ---------------------------------------------------------------------------

    def sequence(self, seq_id: int = 0) -> "Sequence":
        """KV-cache sequence `seq_id` (0..n_seq_max-1), emptied; an earlier Sequence of that id becomes unusable."""
        self.check_open()
        if self.no_alloc:
            raise ConfigError(f"{self.path.name} was loaded with no_alloc (sizes only): it cannot run")
        seq_id = checks.integer("seq_id", seq_id, 0, self.n_seq_max - 1)
        self._sequences[seq_id] = Sequence(self, seq_id)
        return self._sequences[seq_id]

    def encode_batch(self, items, *, all_logits: bool = False) -> None:
        """The causal encoder over (sequence, tokens, kind) triples of distinct sequences, appended to their caches,
        in as few llama_decode calls as the batch size allows (llama.cpp splits them into micro-batches); the
        logits of the last token are kept (llama_get_logits_ith(-1)), or of every token of the last chunk with
        all_logits. kind "prefill" (a prompt) or "commit" (a finished block) says which of the sequence's counters
        the tokens add to."""
        work = []
        for seq, tokens, _kind in items:
            seq._check_live()
            toks = checks.token_ids(tokens, self.n_vocab)
            if len(seq.tokens) + toks.size > self.n_ctx:
                raise ContextError(f"{len(seq.tokens)} cached + {toks.size} new tokens exceed n_ctx {self.n_ctx}")
            work += [(seq, int(t)) for t in toks]
        if len({id(s) for s, _, _ in items}) != len(items):
            raise ConfigError("encode_batch: each sequence may appear once per call")
        batch = self._ll.llama_batch_init(self.n_ubatch, 0, 1)
        try:
            for start in range(0, len(work), self.n_ubatch):
                last = start + self.n_ubatch >= len(work)
                self._encode_chunk(batch, work[start:start + self.n_ubatch], last=last, every=all_logits)
        finally:
            self._ll.llama_batch_free(batch)
        for seq, tokens, kind in items:
            if kind == "prefill":
                seq.n_prefilled += len(tokens)
            else:
                seq.n_committed += len(tokens)
            if seq._window:
                seq._window.after_encode(len(seq.tokens))

    def _encode_chunk(self, batch, chunk: list, *, last: bool, every: bool = False) -> None:
        pos0, nxt = {}, {}
        for i, (seq, tok) in enumerate(chunk):
            pos = nxt.get(seq)
            if pos is None:
                pos = pos0[seq] = len(seq.tokens)
            nxt[seq] = pos + 1
            batch.token[i], batch.pos[i] = tok, pos
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq.seq_id
            batch.logits[i] = last and (every or i == len(chunk) - 1)
        batch.n_tokens = len(chunk)
        ret = self.native(self._ll.llama_decode, self._ctx, batch)
        if ret != 0:
            # a failed micro-batch may leave part of the chunk in the caches: drop it, they stay consistent
            for seq, p in pos0.items():
                seq.rewind(p)  # the tokens list still ends at p
            raise BackendError(f"encoder pass failed (llama_decode returned {ret}): {self._nat.last_errors()}")
        for seq, tok in chunk:
            seq.tokens.append(tok)

    def denoise_batch(self, requests, *, return_logits: bool = False) -> list["Denoised"]:
        """One decoder pass per group of canvases that fits a micro-batch: `requests` are (sequence, canvas,
        temperature, uniforms or None, self_condition) of distinct sequences; results in the same order."""
        items = [Sequence._request(*r) for r in requests]
        if len({id(r[0]) for r in items}) != len(items):
            raise ConfigError("denoise_batch: each sequence may appear once per call")
        per = max(1, self.n_ubatch // self.canvas_length)
        out: list[Denoised] = []
        for k in range(0, len(items), per):
            out += self._denoise_group(items[k:k + per], return_logits)
        return out

    def _denoise_group(self, items, return_logits: bool) -> list["Denoised"]:
        nat, n = self._nat, self.canvas_length
        results, arrays = [], []
        canvases = (nat.llama_dg_canvas * len(items))()
        for c, (seq, toks, temperature, u, sc) in zip(canvases, items):
            res = Denoised(np.empty(n, np.int32), np.empty(n, np.int32) if u is not None else None,
                           np.empty(n, np.float32))
            arrays.append((toks, u))  # kept alive through the call
            ptr = lambda a, t: a.ctypes.data_as(t) if a is not None else None  # noqa: E731
            c.seq_id, c.tokens, c.n_tokens, c.temperature = seq.seq_id, ptr(toks, nat.c_int32_p), n, temperature
            c.uniforms, c.self_condition = ptr(u, nat.c_float_p), sc
            c.argmax, c.sampled = ptr(res.argmax, nat.c_int32_p), ptr(res.sampled, nat.c_int32_p)
            c.entropy = ptr(res.entropy, nat.c_float_p)
            results.append(res)
        status = self.native(nat.llama_dg_denoise_batch, self._ctx, canvases, len(items), bool(return_logits))
        if status != 0:
            err = ContextError if status == -4 else BackendError
            raise err(f"denoise failed: {nat.DG_STATUS.get(status, status)}: {nat.last_errors()}")
        if return_logits:
            lp = self._ll.llama_get_logits(self._ctx)
            logits = np.ctypeslib.as_array(lp, shape=(n * len(items), self.n_vocab))
            for k, res in enumerate(results):
                res.logits = logits[k * n:(k + 1) * n].copy()
        for seq, *_ in items:
            seq.n_denoise += 1
        return results

    def last_io_bytes(self) -> tuple[int, int]:
        """(to backend, to host): bytes the last denoise call's graphs took from the host as inputs and gave back,
        summed over its passes: the per-step traffic when the layers run on a GPU or an RPC device."""
        self.check_open()
        to_backend, to_host = ctypes.c_int64(), ctypes.c_int64()
        self._nat.llama_dg_last_io_bytes(self._ctx, ctypes.byref(to_backend), ctypes.byref(to_host))
        return to_backend.value, to_host.value

    def graph_nodes(self, kind: str, n_tokens: int) -> list[GraphNode]:
        """The compute nodes of the graph llama.cpp builds for one micro-batch of n_tokens ("encode": the causal
        encoder; "denoise": a canvas pass), walked without running it, as the scheduler splits it between
        backends. Works with no_alloc."""
        self.check_open()
        kinds = {"encode": 0, "denoise": 1}
        if kind not in kinds:
            raise ConfigError(f"graph kind must be one of {sorted(kinds)}, got {kind!r}")
        n_tokens = checks.integer("n_tokens", n_tokens, 1, self.n_ubatch)
        nodes = []
        cb = self._nat.llama_dg_node_cb(lambda _u, op, name, t, flops, nbytes, backend, copied: nodes.append(
            GraphNode(op.decode(), name.decode(), t, flops, nbytes, backend.decode(), copied)))
        if self.native(self._nat.llama_dg_graph_walk, self._ctx, kinds[kind], n_tokens, cb, None) < 0:
            raise BackendError(f"could not build the {kind} graph: {self._nat.last_errors()}")
        return nodes

    def memory_breakdown(self) -> dict[str, dict[str, int]]:
        """Bytes per llama.cpp buffer type: {"CUDA0": {"model": .., "context": .., "compute": ..}, ...}, as
        allocated (or, with no_alloc, as llama.cpp would allocate them)."""
        self.check_open()
        out = {}
        cb = self._nat.llama_dg_memory_cb(lambda _u, name, m, c, k: out.__setitem__(
            name.decode(), {"model": m, "context": c, "compute": k}))
        self._nat.llama_dg_memory_breakdown(self._ctx, cb, None)
        return out

    def stream(self, prompt, **options):
        """Generate after `prompt` (text or token ids); yields Step drafts, BlockText per committed block and
        a final Completion (dglocal.generate.stream). Consecutive calls reuse the cached common prefix."""
        from . import generate as gen

        self.check_open()
        if self._default is None or not self._default.live:
            self._default = self.sequence()
        if options.get("seed") is None:
            options["seed"] = self.next_seed()
        return gen.stream(self, prompt, seq=self._default, **options)

    def next_seed(self) -> int:
        """A seed for a generation that was given none, drawn from the load seed's generator."""
        return int(self._rng.integers(2**63))

    def generate(self, prompt, **options):
        """Run `stream` to the end: a Completion with text, tokens, finish_reason and stats."""
        for event in self.stream(prompt, **options):
            pass
        return event

    def generate_many(self, prompts, *, seed: int | None = None, **options):
        """`generate` for every prompt, up to n_seq_max canvases per forward (dglocal.schedule); with a seed,
        prompt i's noise comes from (seed, i): its result does not depend on the batch. A list of Completions."""
        from .schedule import generate_many

        self.check_open()
        return generate_many(self, prompts, seed=seed, **options)

    def chat(self, messages=None, **options):
        """A multi-turn ChatSession over the GGUF chat template that keeps the KV cache across turns."""
        from .generate import ChatSession

        self.check_open()
        return ChatSession(self, messages, **options)


class Sequence:
    """One KV-cache sequence: encoder prefill/commit, decoder denoise, truncation. `tokens` is what it holds."""

    def __init__(self, model: Model, seq_id: int = 0):
        self.model = model
        self.seq_id = seq_id
        self._ll = model._ll
        self._mem = self._ll.llama_get_memory(model._ctx)
        self._ll.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        self.tokens: list[int] = []
        self._window = None if model.swa_full else swa.Checkpoints(
            self._ll, model._ctx, seq_id, model.sliding_window, model.swa_checkpoints)
        # counters: prompt tokens encoded, block tokens committed, decoder passes
        self.n_prefilled = 0
        self.n_committed = 0
        self.n_denoise = 0

    @property
    def live(self) -> bool:
        """False once the model is closed or a newer model.sequence() has taken over the context's cache."""
        return not self.model.closed and self.model._sequences.get(self.seq_id) is self

    def _check_live(self) -> None:
        self.model.check_open()
        if self.model._sequences.get(self.seq_id) is not self:
            raise BackendError("this sequence was replaced by a newer model.sequence() and its cache is gone")

    @property
    def n_past(self) -> int:
        self._check_live()
        return len(self.tokens)

    def prefill(self, tokens, *, logits_last: bool = False, logits_all: bool = False) -> np.ndarray | None:
        """Run the causal encoder over `tokens`, appending them to the cache. With logits_last, return the
        encoder's next-token logits after the last token (the autoregressive view of the same weights); with
        logits_all, those after every token, [n, n_vocab] (at most n_ubatch tokens)."""
        if logits_all and len(tokens) > self.model.n_ubatch:
            raise ConfigError(f"logits_all takes at most n_ubatch = {self.model.n_ubatch} tokens, got {len(tokens)}")
        self.model.encode_batch([(self, tokens, "prefill")], all_logits=logits_all)
        if logits_all and len(tokens):
            ptr = self._ll.llama_get_logits(self.model._ctx)
            return np.ctypeslib.as_array(ptr, shape=(len(tokens), self.model.n_vocab)).copy()
        if logits_last and len(tokens):
            ptr = self._ll.llama_get_logits_ith(self.model._ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()
        return None

    def commit(self, tokens) -> None:
        """Append a finished block: the same causal encoder pass as prefill."""
        self.model.encode_batch([(self, tokens, "commit")])

    def denoise(self, canvas, *, temperature: float, uniforms=None, self_condition: bool = True,
                return_logits: bool = False) -> Denoised:
        """Decoder pass over `canvas` (canvas_length ids) at positions n_past.. ; the cache is left as it was.
        self_condition=True feeds the soft embedding left by this sequence's previous denoise (its logits / its
        temperature); False feeds zeros, as at the first step of a canvas."""
        return self.model.denoise_batch([(self, canvas, temperature, uniforms, self_condition)],
                                        return_logits=return_logits)[0]

    @staticmethod
    def _request(seq, canvas, temperature, uniforms=None, self_condition=True):
        """One denoise request, checked: (sequence, int32 canvas, temperature, float32 uniforms or None, bool)."""
        if not isinstance(seq, Sequence):
            raise ConfigError(f"denoise requests start with a Sequence, got {type(seq).__name__}")
        seq._check_live()
        toks = checks.token_ids(canvas, seq.model.n_vocab, "canvas ids")
        n = seq.model.canvas_length
        if toks.size != n:
            raise ConfigError(f"the canvas has {toks.size} tokens, the model's canvas_length is {n}")
        u = None
        if uniforms is not None:
            u = np.ascontiguousarray(uniforms, dtype=np.float32).reshape(-1)
            if u.size != n or not ((u >= 0) & (u <= 1)).all():
                raise ConfigError(f"uniforms must be {n} numbers in [0, 1]")
        return seq, toks, checks.temperature(temperature), u, bool(self_condition)

    def truncate(self, n: int) -> int:
        """Keep the first n cached tokens (multi-turn reuse). A windowed sliding cache that no longer holds the
        keys position n reads re-encodes from its latest checkpoint (or the start); returns how many tokens that
        re-encoded."""
        held = list(self.tokens)
        k = self.rewind(n)  # checks n
        if k < n:
            self.prefill(held[k:n])
        return n - k

    def rewind(self, n: int) -> int:
        """Cut the sequence back to at most n tokens, to where it can continue exactly: n, or with a windowed
        sliding cache that lost the keys n needs, its latest checkpoint before n (0 without one). Returns the
        new length; the caller encodes the rest (generate does it with the new prompt)."""
        self._check_live()
        n = checks.integer("truncate length", n, 0, len(self.tokens))
        if not self._ll.llama_memory_seq_rm(self._mem, self.seq_id, n, -1):
            raise BackendError(f"the KV cache cannot be truncated to {n} tokens")
        if self._window:
            n = self._window.rewind(n)
        del self.tokens[n:]
        return n


def load(path, **opts) -> Model:
    """Load a diffusion-gemma GGUF. opts: n_ctx, n_gpu_layers, n_threads, seed, n_ubatch, kv_type, swa_full,
    flash_attn, extra_bufts (llama.cpp's repacked CPU layouts), rpc (["HOST:PORT", ...]: layers on ggml RPC
    servers), tensor_overrides (["REGEX=BUFFER_TYPE", ...], llama.cpp's -ot), n_cpu_moe (experts of the first N
    layers in host memory), tensor_split ("3,1": each device's share of the layers, llama.cpp's -ts), n_seq_max,
    mmap (False: llama.cpp's --no-mmap), no_alloc (sizes only: graph_nodes, memory_breakdown; nothing runs),
    swa_full (None: by context size, dglocal.swa), swa_checkpoints (sliding-cache checkpoints per sequence),
    precision ("f32": f32 math on devices that would round f32 through f16, for exactness; per process)."""
    return Model(path, **opts)
