"""Model and sequence: the low-level contract of the patched llama.cpp backend (no seeds, no chat, no defaults
of generation: those are dglocal.generation's).

    model = Model("model.gguf", n_ctx=4096)             # or LoadOptions(...); dglocal.load wraps it in an LLM
    seq = model.sequence()                             # a lease on a free KV-cache sequence
    seq.prefill(model.tokenize("Hello"))               # encoder, causal, writes the KV cache
    out = seq.denoise(canvas, temperature=0.8)         # decoder over the canvas, cache untouched
    seq.commit(out.argmax)                             # encoder over the finished block

Native handles live in an ExitStack and are freed context-before-model by `close()` (or `with`).
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendError, ConfigError, ContextError, ModelError
from . import checks, swa
from .filters import checked
from .gguf import read_header
from .fastpass import FastPass, KeptCells, evaluated
from .fastpass import checked as checked_fast
from .lora import Adapters
from .options import KV_TYPES, SOFT_EMBEDDING_TYPES, LoadOptions
from .placement import device_precision, placement
from .vision import Vision


@dataclass
class Denoised:
    """One decoder pass over a canvas: per position, for x = logits / temperature."""

    argmax: np.ndarray  # int32 [C]
    sampled: np.ndarray | None  # int32 [C], inverse CDF of softmax(x) at the given uniforms
    entropy: np.ndarray  # float32 [C], entropy of softmax(x)
    logits: np.ndarray | None = None  # float32 [C, n_vocab], raw (softcapped) logits, when asked
    # log-probabilities of the model's distribution (softcapped logits at temperature 1, no filter), when asked:
    top_ids: np.ndarray | None = None  # int32 [C, k], the k most likely ids, most likely first
    top_logprobs: np.ndarray | None = None  # float32 [C, k], theirs
    token_logprob: np.ndarray | None = None  # float32 [C], the canvas' own token's
    argmax_logprob: np.ndarray | None = None  # float32 [C], the argmax' (of the filtered distribution)


def _dg_params(nat, opts: LoadOptions):
    """The denoise pass' parameters of this model's context (llama_dg_params): each model in a process its own."""
    p = nat.llama_dg_default_params()
    p.embd_t_type = int(SOFT_EMBEDDING_TYPES[opts.soft_embedding])
    p.reduce = nat.LLAMA_DG_REDUCE[opts.reductions]
    p.prec_f32 = opts.precision == "f32"
    return p


class Model:
    def __init__(self, path: str | os.PathLike, options: LoadOptions | None = None, **changes):
        """Load `path` with `options` (a LoadOptions), or with LoadOptions fields given by name."""
        self._ctx = self._model = None
        self._stack = ExitStack()
        opts = options or LoadOptions()
        if changes:
            opts = opts.replace(**changes)
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such file")
        header = read_header(self.path)  # raises ModelError on a malformed file
        self.metadata = header.kv
        self.canvas_length = checks.model_file(self.path, header)
        self.sliding_window = swa.sliding_window(self.metadata)
        self.options = opts = opts.resolve(self.canvas_length, self.sliding_window)
        self.n_seq_max, self.swa_full, self.swa_checkpoints = opts.n_seq_max, opts.swa_full, opts.swa_checkpoints
        # llama.cpp's no_alloc: shapes and buffer sizes without the weights (memory plans, cost models); such a
        # model runs nothing (sequence() refuses)
        self.no_alloc = opts.no_alloc
        device_precision(opts.precision)
        try:  # whatever exists when a step fails (or Ctrl-C arrives) is freed
            self._open(opts, placement(opts.rpc, opts.tensor_overrides, opts.n_cpu_moe, opts.tensor_split))
        except BaseException:
            self.close()
            raise
        self._sequences: dict[int, weakref.ref] = {}  # the Sequence holding each id (dropped: the id is free)
        self._leasing = threading.Lock()

    def _open(self, opts: LoadOptions, where) -> None:
        from . import native as nat

        self._nat = nat
        nat.init()
        # native calls run on a worker thread so that Ctrl-C, caught here, can raise the abort flag they poll
        self._abort = ctypes.c_int32(0)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dglocal-native")
        self._stack.callback(self._worker.shutdown)
        mparams = nat.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        # llama.cpp's CPU "extra" buffer types (repacked / AMX weight layouts): its CPU speed, on by default
        mparams.use_extra_bufts = bool(opts.extra_bufts)
        mparams.no_alloc = opts.no_alloc  # as llama.cpp's own fit pass: nothing mapped, nothing read
        if not opts.mmap or opts.no_alloc:
            mparams.load_mode = nat.LLAMA_LOAD_MODE_NONE  # llama.cpp's --no-mmap: weights read into its own buffers
        progress = nat.llama_progress_callback(lambda _p, _d: not self._abort.value)  # False: stop loading
        mparams.progress_callback = progress
        where.apply(mparams)  # `where` keeps the arrays mparams points to alive
        self._model = self.native(nat.llama_model_load_from_file, os.fsencode(self.path), mparams)  # any bytes
        if not self._model:
            raise ModelError(f"{self.path}: llama.cpp could not load it: {nat.last_errors() or 'unknown error'}")
        self._stack.callback(nat.llama_model_free, self._model)

        cparams = nat.llama_context_default_params()
        cparams.n_ctx = opts.n_ctx
        cparams.n_batch = cparams.n_ubatch = opts.n_ubatch  # a canvas is one bidirectional micro-batch
        cparams.n_seq_max = self.n_seq_max
        # one cache stream per sequence (llama.cpp's default): attention spans a sequence's own cells only
        cparams.n_threads = cparams.n_threads_batch = opts.n_threads or os.cpu_count() or 1
        cparams.type_k = cparams.type_v = KV_TYPES[opts.kv_type]
        # windowed sliding layers (swa_full False) need checkpoints to truncate (dglocal.runtime.swa)
        cparams.swa_full = opts.swa_full
        cparams.flash_attn_type = nat.FLASH_ATTN_TYPES[opts.flash_attn]  # None: llama.cpp's choice
        self._ctx = self.native(nat.llama_dg_init_from_model, self._model, cparams, ctypes.byref(_dg_params(nat, opts)))
        if not self._ctx:
            raise BackendError(f"could not create a llama.cpp context (n_ctx={opts.n_ctx}): "
                               f"{nat.last_errors() or 'unknown error'}")
        self._stack.callback(nat.llama_free, self._ctx)  # ExitStack: freed before the model
        nat.llama_set_abort_flag(self._ctx, ctypes.byref(self._abort))
        self._stack.callback(self._worker.shutdown)  # LIFO: no native call is running when the context goes

        self._vocab = nat.llama_model_get_vocab(self._model)
        self.n_vocab = nat.llama_vocab_n_tokens(self._vocab)
        self.n_ctx = nat.llama_n_ctx_seq(self._ctx)  # per sequence: n_ctx / n_seq_max
        # llama.cpp rounds n_ctx up and may cap n_batch / n_ubatch by it: feed it what it actually accepts
        self.n_ubatch = min(nat.llama_n_batch(self._ctx), nat.llama_n_ubatch(self._ctx))
        if self.n_ubatch < self.canvas_length:
            raise ContextError(f"n_ctx {self.n_ctx} gives micro-batches of {self.n_ubatch} tokens, under the "
                               f"canvas of {self.canvas_length}: raise n_ctx")
        if nat.llama_dg_canvas_length(self._model) != self.canvas_length:
            raise BackendError("the backend and the GGUF disagree on the canvas length")
        self.eos_ids = self._eos_ids()
        self.adapters = Adapters.load(self, None if opts.no_alloc else opts.lora)
        self.n_embd = nat.llama_model_n_embd(self._model)
        self.vision = None
        if opts.mmproj is not None and not opts.no_alloc:
            self.vision = Vision(self, opts.mmproj, max_tokens=opts.image_tokens, n_threads=cparams.n_threads,
                                 use_gpu=opts.n_gpu_layers != 0, flash_attn=opts.flash_attn)
            self._stack.callback(self.vision.close)  # LIFO: before the context and the weights it refers to

    # -- lifetime ------------------------------------------------------------------------------------------

    def native(self, fn, *args):
        """Run a native call on the worker thread. Ctrl-C meanwhile sets the abort flag, which llama.cpp polls
        between graph nodes; the KeyboardInterrupt is raised here once the stopped call has returned."""
        future = self._worker.submit(self._nat.logged, fn, *args)
        try:
            result, errors = future.result()
            self._nat.keep_errors(errors)  # last_errors() on this thread explains a failed call, as if made here
            return result
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
        self._sequences = {}

    def abort(self, on: bool = True) -> None:
        """Raise (or lower) the flag llama.cpp polls between graph nodes: a running pass stops early and fails,
        and so does every pass until it is lowered (a server shutting down: its last step ends now)."""
        if not self.closed:
            self._abort.value = int(on)

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
            n = self._nat.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            n_max = -n
        raise BackendError(f"tokenization failed: llama.cpp asked for {n_max} tokens twice")

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        self.check_open()
        token = checks.integer("token", token, 0, self.n_vocab - 1)
        buf = ctypes.create_string_buffer(64)
        n = self._nat.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._nat.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_control(self, token: int) -> bool:
        """A control token (<eos>, <|turn>, ...): never part of plain text."""
        attr = self._nat.llama_vocab_get_attr(self._vocab, checks.integer("token", token, 0, self.n_vocab - 1))
        return bool(attr & self._nat.LLAMA_TOKEN_ATTR_CONTROL)

    def detokenize(self, tokens, *, special: bool = False) -> str:
        ids = checks.token_ids(tokens, self.n_vocab)
        return b"".join(self.token_piece(int(t), special=special) for t in ids).decode("utf-8", "replace")

    def _eos_ids(self) -> tuple[int, ...]:
        ids = self.metadata.get("diffusion.eos_token_ids")
        if ids is None:
            ids = [t for t in range(self.n_vocab) if self._nat.llama_vocab_is_eog(self._vocab, t)]
        return tuple(int(t) for t in ids)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    # -- sequences and generation ---------------------------------------------------------------------------

    def sequence(self, seq_id: int | None = None) -> "Sequence":
        """A lease on a KV-cache sequence, emptied: `seq_id` (0..n_seq_max-1), or the lowest id no Sequence holds.
        It is held until `release()` (or the end of a `with`, or until the Sequence is dropped); asking for a held
        id, or for one when all are held, is a ConfigError: a Sequence never clears another's cache."""
        self.check_open()
        if self.no_alloc:
            raise ConfigError(f"{self.path.name} was loaded with no_alloc (sizes only): it cannot run")
        with self._leasing:
            held = self.held()
            if seq_id is None:
                free = [i for i in range(self.n_seq_max) if i not in held]
                if not free:
                    raise ConfigError(f"all {self.n_seq_max} sequences of this model are held (n_seq_max "
                                      f"{self.n_seq_max}): release one (Sequence.release()) or load with a larger "
                                      "n_seq_max")
                seq_id = free[0]
            seq_id = checks.integer("seq_id", seq_id, 0, self.n_seq_max - 1)
            if seq_id in held:
                raise ConfigError(f"sequence {seq_id} is held by another Sequence: release() it first")
            seq = Sequence(self, seq_id)
            self._sequences[seq_id] = weakref.ref(seq)
        return seq

    def held(self) -> set[int]:
        """The ids a live Sequence holds."""
        return {i for i, ref in self._sequences.items() if ref() is not None}

    def _holder(self, seq_id: int):
        ref = self._sequences.get(seq_id)
        return ref() if ref is not None else None

    def encode_batch(self, items, *, all_logits: bool = False) -> None:
        """The causal encoder over (sequence, tokens) pairs of distinct sequences, appended to their caches; the
        logits of the last token are kept (llama_get_logits_ith(-1)), or of every token of the last chunk with
        all_logits. Each sequence's tokens go through the same micro-batches as they would alone (see _together),
        so its cache does not depend on what else was encoded with it."""
        texts, with_images = [], []
        for seq, tokens in items:
            self._own(seq)
            seq._cells.drop(self, seq)  # a canvas' frozen positions, before its commit is encoded
            toks = self._prompt_ids(tokens)
            if len(seq.tokens) + toks.size > self.n_ctx:
                raise ContextError(f"{len(seq.tokens)} cached + {toks.size} new tokens exceed n_ctx {self.n_ctx}")
            if toks.size and toks.max() >= self.n_vocab:
                with_images.append((seq, toks))
            elif toks.size:
                texts.append((seq, toks))
        if len({id(s) for s, _ in items}) != len(items):
            raise ConfigError("encode_batch: each sequence may appear once per call")
        before = [(seq, len(seq.tokens)) for seq, _ in items]
        batch = self._nat.llama_batch_init(self.n_ubatch, 0, 1)
        try:
            for seq, toks in with_images:  # text and image blocks in turn, each sequence on its own
                self._encode_blocks(batch, seq, toks, all_logits and not texts and seq is with_images[-1][0])
            for group in self._together(texts):
                self._encode_text(batch, [(seq, int(t)) for seq, toks in group for t in toks], last=True,
                                  every=all_logits)
        except BaseException:
            # all or nothing: the chunks and image blocks that did go in leave again, so a caller may retry the
            # whole call (a batch that failed may have failed for one of its sequences only)
            for seq, n in before:
                seq._restore(n)
            raise
        finally:
            self._nat.llama_batch_free(batch)
        stamp = self.adapters.applied if self.adapters is not None else ()
        for seq, tokens in items:
            seq.lora = stamp  # the scales its cache was encoded with: a prefix is reused only under the same
            seq._encoded(len(tokens))

    def _together(self, texts: list) -> list[list]:
        """The sequences that share llama_decode calls: those with as many tokens as each other, while they fit one
        micro-batch together (the commits of a step's canvases). With a cache stream per sequence llama.cpp cuts
        a call into micro-batches of equal pieces of each sequence, so a longer prompt beside a shorter one would
        be encoded in other pieces than alone, and its keys would round otherwise; it goes on its own."""
        groups: dict[int, list] = {}
        out: list[list] = []
        for seq, toks in texts:
            group = groups.setdefault(toks.size, [])
            if (len(group) + 1) * toks.size > self.n_ubatch:
                if group:
                    out.append(group)
                group = groups[toks.size] = []
            group.append((seq, toks))
        return out + [g for g in groups.values() if g]

    def _encode_text(self, batch, work: list, *, last: bool, every: bool) -> None:
        """(sequence, token) pairs in chunks of a micro-batch; with `last`, the final chunk keeps its logits."""
        for start in range(0, len(work), self.n_ubatch):
            end = last and start + self.n_ubatch >= len(work)
            self._encode_chunk(batch, work[start:start + self.n_ubatch], last=end, every=every)

    def _prompt_ids(self, tokens) -> np.ndarray:
        """Token ids, or the keys of images in use (runtime.vision) past the vocabulary."""
        if self.vision is None:
            return checks.token_ids(tokens, self.n_vocab)
        toks = checks.token_ids(tokens, np.iinfo(np.int32).max)
        for key in np.unique(toks[toks >= self.n_vocab]):
            self.vision.embedding(int(key))  # ConfigError unless the image is in use
        return toks

    def _encode_blocks(self, batch, seq, toks: np.ndarray, every: bool) -> None:
        """A sequence's tokens with images: runs of text through the causal encoder, each image's block of
        embeddings through one bidirectional pass (llama_dg_encode_embd)."""
        group = np.where(toks >= self.n_vocab, toks, -1)  # text: -1, an image: its key
        runs = np.split(toks, np.flatnonzero(np.diff(group)) + 1)
        for k, run in enumerate(runs):
            last = k == len(runs) - 1
            if run[0] < self.n_vocab:
                self._encode_text(batch, [(seq, int(t)) for t in run], last=last, every=every)
            else:
                self._encode_image(seq, run, logits=last)

    def _encode_image(self, seq, run: np.ndarray, *, logits: bool) -> None:
        embd = self.vision.embedding(int(run[0]))
        if len(run) % len(embd):
            raise ConfigError(f"an image of {len(embd)} tokens stands at {len(run)} prompt positions")
        data = np.ascontiguousarray(embd, dtype=np.float32)
        for _ in range(len(run) // len(embd)):  # the same image twice in a row: one block each
            status = self.native(self._nat.llama_dg_encode_embd, self._ctx, seq.seq_id,
                                 data.ctypes.data_as(self._nat.c_float_p), len(embd), logits)
            if status != 0:  # encode_batch takes back what the call put in
                err = ContextError if status == -4 else BackendError
                raise err(f"encoder pass over an image failed: {self._nat.DG_STATUS.get(status, status)}: "
                          f"{self._nat.last_errors()}")
            seq.tokens += [int(run[0])] * len(embd)

    def _own(self, seq) -> None:
        """A live Sequence of this model: another model's would put its tokens into this model's cache."""
        if not isinstance(seq, Sequence):
            raise ConfigError(f"expected a Sequence, got {type(seq).__name__}")
        if seq.model is not self:
            raise ConfigError(f"sequence {seq.seq_id} belongs to another model ({seq.model.path.name})")
        seq._check_live()

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
        ret = self.native(self._nat.llama_decode, self._ctx, batch)
        if ret != 0:  # part of the chunk may be in the caches: encode_batch takes every chunk of the call back
            raise BackendError(f"encoder pass failed (llama_decode returned {ret}): {self._nat.last_errors()}")
        for seq, tok in chunk:
            seq.tokens.append(tok)

    def denoise_batch(self, requests, *, return_logits: bool = False) -> list["Denoised"]:
        """One decoder pass per group of canvases that fits a micro-batch: `requests` are (sequence, canvas,
        temperature, uniforms or None, self_condition[, filters[, n_probs]]) of distinct sequences (filters: a
        dglocal.runtime.filters.Filters or None; n_probs: log-probabilities a position, 0 to 20, the device's
        selection (Denoised.top_ids, top_logprobs, token_logprob), 0 none); results in the same order."""
        items = [self._request(*r) for r in requests]
        if len({id(r[0]) for r in items}) != len(items):
            raise ConfigError("denoise_batch: each sequence may appear once per call")
        out: dict[int, Denoised] = {}
        for group in self._groups(items):
            out.update(zip((id(r[0]) for r in group), self._denoise_group(group, return_logits)))
        return [out[id(r[0])] for r in items]

    def _groups(self, items: list) -> list[list]:
        """The canvases of one call in passes llama.cpp runs as one micro-batch each: with a cache stream per
        sequence its split keeps only consecutive sequence ids together (sequences 0 and 2 would go in two
        micro-batches, the first one's pass run but its results lost), and at most n_ubatch tokens. It also puts
        equal numbers of tokens of each sequence in a micro-batch: canvases of the fast sampler go together when
        they run as many positions (a pass of canvases padded to one size would change what each computes)."""
        per = max(1, self.n_ubatch // self.canvas_length)
        size = lambda r: evaluated(r[7], self.canvas_length)  # noqa: E731
        groups: list[list] = []
        for item in sorted(items, key=lambda r: (size(r), r[0].seq_id)):
            last = groups[-1] if groups else None
            if last and len(last) < per and item[0].seq_id == last[-1][0].seq_id + 1 and size(item) == size(last[-1]):
                last.append(item)
            else:
                groups.append([item])
        return groups

    def _request(self, seq, canvas, temperature, uniforms=None, self_condition=True, filters=None, n_probs=0,
                 fast=None):
        """One denoise request, checked: (sequence, int32 canvas, temperature, float32 uniforms or None, bool,
        Filters or None, log-probabilities a position, FastPass or None)."""
        self._own(seq)
        toks = checks.token_ids(canvas, self.n_vocab, "canvas ids")
        n = self.canvas_length
        if toks.size != n:
            raise ConfigError(f"the canvas has {toks.size} tokens, the model's canvas_length is {n}")
        u = None
        if uniforms is not None:
            u = np.ascontiguousarray(uniforms, dtype=np.float32).reshape(-1)
            if u.size != n or not ((u >= 0) & (u <= 1)).all():
                raise ConfigError(f"uniforms must be {n} numbers in [0, 1]")
        if filters is not None:
            filters = checked(filters, self.n_vocab, n)
        n_probs = checks.integer("n_probs", n_probs, 0, min(self._nat.LLAMA_DG_MAX_PROBS, self.n_vocab))
        if fast is not None:
            fast = checked_fast(fast, n, self.n_vocab)
        return seq, toks, checks.temperature(temperature), u, bool(self_condition), filters, n_probs, fast

    def _denoise_group(self, items, return_logits: bool) -> list["Denoised"]:
        nat, n = self._nat, self.canvas_length
        results, arrays = [], []
        canvases = (nat.llama_dg_canvas * len(items))(*[nat.llama_dg_canvas_default() for _ in items])
        ptr = lambda a, t: a.ctypes.data_as(t) if a is not None else None  # noqa: E731
        for c, (seq, toks, temperature, u, sc, filters, n_probs, fast) in zip(canvases, items):
            if not sc and not (fast is not None and fast.frozen):  # a new canvas: what the last one kept goes
                seq._cells.drop(self, seq)
            # positions a sparse pass does not evaluate: their own token, entropy 0, no log-probabilities
            res = Denoised(toks.copy(), toks.copy() if u is not None else None, np.zeros(n, np.float32))
            if n_probs:
                res.top_ids, res.top_logprobs = np.full((n, n_probs), -1, np.int32), np.full((n, n_probs), np.nan, np.float32)
                res.token_logprob, res.argmax_logprob = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
                c.n_probs, c.top_ids = n_probs, ptr(res.top_ids, nat.c_int32_p)
                c.top_logprobs = ptr(res.top_logprobs, nat.c_float_p)
                c.token_logprob = ptr(res.token_logprob, nat.c_float_p)
                c.argmax_logprob = ptr(res.argmax_logprob, nat.c_float_p)
            arrays.append((toks, u, filters))  # kept alive through the call
            c.seq_id, c.tokens, c.n_tokens, c.temperature = seq.seq_id, ptr(toks, nat.c_int32_p), n, temperature
            c.uniforms, c.self_condition = ptr(u, nat.c_float_p), sc
            c.argmax, c.sampled = ptr(res.argmax, nat.c_int32_p), ptr(res.sampled, nat.c_int32_p)
            c.entropy = ptr(res.entropy, nat.c_float_p)
            if filters is not None:
                c.top_k, c.top_p, c.min_p = filters.top_k, filters.top_p, filters.min_p
                if filters.bias is not None:
                    c.bias, c.n_bias = ptr(filters.bias, nat.c_float_p), len(filters.bias)
                    c.bias_row = ptr(filters.bias_row, nat.c_int32_p)
                if filters.allow is not None:
                    c.allow, c.n_allow = ptr(filters.allow, nat.c_uint32_p), len(filters.allow)
                    c.allow_row = ptr(filters.allow_row, nat.c_int32_p)
            if fast is not None:
                self._set_fast(c, seq, fast, arrays)
            results.append(res)
        status = self.native(nat.llama_dg_denoise_batch, self._ctx, canvases, len(items), bool(return_logits))
        for seq, *_, fast in items:
            seq._cells.after(self, seq, fast, status == 0)
        if status != 0:
            err = ContextError if status == -4 else BackendError
            raise err(f"denoise failed: {nat.DG_STATUS.get(status, status)}: {nat.last_errors()}")
        if return_logits:  # the evaluated positions' rows, canvas after canvas (NaN rows: not evaluated)
            ran = [np.arange(n) if f is None or f.index is None else f.index for *_, f in items]
            lp = self._nat.llama_get_logits(self._ctx)
            logits = np.ctypeslib.as_array(lp, shape=(sum(r.size for r in ran), self.n_vocab))
            start = 0
            for res, rows in zip(results, ran):
                res.logits = np.full((n, self.n_vocab), np.nan, np.float32)
                res.logits[rows] = logits[start:start + rows.size]
                start += rows.size
        for seq, *_ in items:
            seq.n_denoise += 1  # the decoder passes it took; its cache is untouched but for kept positions
        return results

    def _set_fast(self, c, seq, fast: FastPass, arrays: list) -> None:
        """The fast sampler's fields of a canvas (fastpass.FastPass); a sparse pass names its canvas' start."""
        nat = self._nat
        seq._cells.check(fast)
        arrays.append(fast)  # its arrays, kept alive through the call
        c.fast_k = fast.fast_k
        if fast.index is not None:
            c.index, c.n_index = fast.index.ctypes.data_as(nat.c_int32_p), fast.index.size
        if fast.keep is not None:
            c.keep = fast.keep.ctypes.data_as(nat.c_uint8_p)
        if fast.sparse or seq._cells.kept:
            c.n_past = seq._cells.start(self, seq)


class Sequence:
    """One KV-cache sequence: encoder prefill/commit, decoder denoise, truncation. `tokens` is what it holds."""

    def __init__(self, model: Model, seq_id: int = 0):
        self.model = model
        self.seq_id = seq_id
        self._nat = model._nat
        self._mem = self._nat.llama_get_memory(model._ctx)
        # a free id (Model.sequence leases it): whatever a former holder left goes, on the model's native thread
        model.native(self._nat.llama_memory_seq_rm, self._mem, seq_id, -1, -1)
        self.tokens: list[int] = []  # what its cache holds
        self._window = None if model.swa_full else swa.Checkpoints(
            model._ctx, seq_id, model.sliding_window, model.swa_checkpoints, call=model.native)
        self.n_encoded = 0  # tokens its encoder passes appended (prompts, commits, re-encodes)
        self.n_denoise = 0  # decoder passes run on it
        self.lora: tuple = ()  # the LoRA scales its cache was encoded with (a prefix is reused only under the same)
        self._cells = KeptCells()  # the fast sampler's frozen positions of its current canvas

    @property
    def live(self) -> bool:
        """False once the model is closed or the sequence was released."""
        return not self.model.closed and self.model._holder(self.seq_id) is self

    def _check_live(self) -> None:
        self.model.check_open()
        if self.model._holder(self.seq_id) is not self:
            raise BackendError(f"sequence {self.seq_id} was released: its cache is no longer this Sequence's")

    def release(self) -> None:
        """Give the id back (Model.sequence leases it again, emptied); this Sequence stops working."""
        with self.model._leasing:
            if self.model._holder(self.seq_id) is self:
                del self.model._sequences[self.seq_id]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

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
        self.model.encode_batch([(self, tokens)], all_logits=logits_all)
        if logits_all and len(tokens):
            ptr = self._nat.llama_get_logits(self.model._ctx)
            return np.ctypeslib.as_array(ptr, shape=(len(tokens), self.model.n_vocab)).copy()
        if logits_last and len(tokens):
            ptr = self._nat.llama_get_logits_ith(self.model._ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()
        return None

    def commit(self, tokens) -> None:
        """Append a finished block: the same causal encoder pass as prefill."""
        self.model.encode_batch([(self, tokens)])

    def _encoded(self, n: int) -> None:
        """After an encoder pass appended n tokens: a windowed cache saves a checkpoint when it is due."""
        self.n_encoded += n
        if self._window:
            self._window.after_encode(len(self.tokens))

    def denoise(self, canvas, *, temperature: float, uniforms=None, self_condition: bool = True,
                return_logits: bool = False, filters=None, n_probs: int = 0, fast=None) -> Denoised:
        """Decoder pass over `canvas` (canvas_length ids) at positions n_past.. ; the cache is left as it was.
        self_condition=True feeds the soft embedding left by this sequence's previous denoise (its logits / its
        temperature); False feeds zeros, as at the first step of a canvas. `fast`: a runtime.fastpass.FastPass
        (the fast sampler's positions, kept K/V and reductions)."""
        return self.model.denoise_batch([(self, canvas, temperature, uniforms, self_condition, filters, n_probs,
                                          fast)],
                                        return_logits=return_logits)[0]

    def end_canvas(self) -> None:
        """The canvas in flight ended (its generation finished, failed or was dropped): what the fast sampler kept
        of it leaves the cache, which then holds `tokens` only."""
        if self.live:
            self._cells.drop(self.model, self)

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
        return self._cut(self._image_start(checks.integer("truncate length", n, 0, len(self.tokens))))

    def _cut(self, n: int) -> int:
        self._cells.drop(self.model, self)
        if not self.model.native(self._nat.llama_memory_seq_rm, self._mem, self.seq_id, n, -1):
            raise BackendError(f"the KV cache cannot be truncated to {n} tokens")
        if self._window:  # its checkpoints are taken after whole encoder calls: never inside an image's block
            n = self._window.rewind(n)
        del self.tokens[n:]
        return n

    def _restore(self, n: int) -> None:
        """After a failed encoder call: the cache back to the n tokens it held before it, exactly (a windowed
        cache whose keys the call pushed out re-encodes from its checkpoint). Where even that fails, it holds
        fewer, and `tokens` says how many."""
        held = self.tokens[:n]
        k = self._cut(n)
        if k < n:
            try:
                self.model.encode_batch([(self, held[k:n])])
            except Exception:  # noqa: BLE001 (the first failure is the one the caller sees)
                pass

    def _image_start(self, n: int) -> int:
        """n, or where the image block that n falls inside starts: a block is encoded whole (its tokens see each
        other), so a cut inside one keeps none of it."""
        t = self.tokens
        while 0 < n < len(t) and t[n] >= self.model.n_vocab and t[n - 1] == t[n]:
            n -= 1
        return n
