"""The hyperparameters and tensors llama.cpp asserts on (or loops on) when it loads and first runs a
diffusion-gemma file, checked from the header before anything native sees it: every rule here stands for a
GGML_ASSERT, a segfault, a division by zero or a hang reachable from a file's contents (the sources are named at
each rule). `dglocal convert` runs the same check on the file it writes, before it renames it into place."""

from __future__ import annotations

import math
import numbers

from ..errors import ModelError

ARCH = "diffusion-gemma"
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
ROPE_SCALING = ("none", "linear", "yarn", "longrope")
TOKENIZERS = ("gemma4", "gpt2")  # what dglocal convert writes; "bert" aborts on byte tokens, others lack a vocab
LAYER_TENSORS = ("attn_q", "attn_k", "attn_output", "ffn_gate_inp", "pre_ffw_norm_2", "post_ffw_norm_1",
                 "post_ffw_norm_2", "ffn_down_exps")  # the graph dereferences these in every layer


class _Keys:
    """The header's `diffusion-gemma.*` keys, read with the type and range each must have."""

    def __init__(self, path, kv: dict):
        self.path, self.kv = path, kv

    def fail(self, key: str, why: str):
        raise ModelError(f"{self.path}: {key} {why}")

    def int(self, key, low, high, *, default=None, required=True):
        value = self.kv.get(key, default)
        if value is None:
            if required:
                self.fail(key, "is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
            self.fail(key, f"must be an integer in {low}..{high}, got {value!r:.60}")
        return int(value)

    def per_layer(self, key, n_layer, low, high, *, default=None):
        """A scalar, or an array of one value per layer (llama.cpp reads either)."""
        value = self.kv.get(key, default)
        if isinstance(value, list):
            if len(value) != n_layer:
                self.fail(key, f"has {len(value)} entries for {n_layer} layers")
            for v in value:
                if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not low <= v <= high:
                    self.fail(key, f"must hold integers in {low}..{high}, got {v!r:.40}")
            return [int(v) for v in value]
        return [self.int(key, low, high, default=default)] * n_layer

    def absent_or(self, key, allowed):
        value = self.kv.get(key)
        if value is not None and value not in allowed:
            self.fail(key, f"must be absent or one of {list(allowed)}, got {value!r:.60}")

    def number(self, key, *, low, strict=False, required=True):
        value = self.kv.get(key)
        if value is None:
            if required:
                self.fail(key, "is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
                value < low or (strict and value == low):
            self.fail(key, f"must be a finite number {'>' if strict else '>='} {low}, got {value!r:.60}")
        return float(value)


def check(path, header) -> None:
    """ModelError naming the key (or tensor) of a header llama.cpp would abort, fault or hang on."""
    kv = header.kv
    k = _Keys(path, kv)
    p = ARCH + "."
    n_layer = k.int(p + "block_count", 1, MAX_LAYERS)  # llama-model.cpp: n_layer_all <= LLAMA_MAX_LAYERS
    k.int(p + "context_length", 1, 2**31 - 1)
    n_embd = k.int(p + "embedding_length", 1, 1 << 20)
    for key in ("nextn_predict_layers", "expert_group_count", "expert_group_used_count", "attention.shared_kv_layers",
                "embedding_length_per_layer_input", "pooling_type"):  # unused by this model; any other value asserts
        k.absent_or(p + key, (0,))
    k.absent_or(p + "embedding_length_out", (n_embd,))
    k.absent_or(p + "rope.scaling.type", ROPE_SCALING)
    _experts(k, p, n_layer)
    _attention(k, p, n_layer, header)
    k.number(p + "attention.layer_norm_rms_epsilon", low=0.0, strict=True)  # ops.cpp: eps >= 0, NaN included
    k.number(p + "final_logit_softcapping", low=0.0, required=False)
    k.per_layer(p + "feed_forward_length", n_layer, 1, 1 << 24)
    k.per_layer(p + "expert_feed_forward_length", n_layer, 1, 1 << 24)
    _tensors(path, header, n_layer)
    _tokenizer(k, kv)


def _experts(k: _Keys, p: str, n_layer: int) -> None:
    n_expert = k.int(p + "expert_count", 1, MAX_EXPERTS)
    used = k.per_layer(p + "expert_used_count", n_layer, 1, n_expert)
    if len(set(used)) > 1:  # the graph takes layer 0's count for every layer: a larger one reads out of bounds
        k.fail(p + "expert_used_count", f"must be the same in every layer, got {used}")


def _attention(k: _Keys, p: str, n_layer: int, header) -> None:
    heads = k.per_layer(p + "attention.head_count", n_layer, 1, 1 << 16)
    kv_heads = k.per_layer(p + "attention.head_count_kv", n_layer, 1, 1 << 16)
    for il, (h, h_kv) in enumerate(zip(heads, kv_heads)):
        if h % h_kv:
            k.fail(p + "attention.head_count", f"({h}) is not a multiple of head_count_kv ({h_kv}) in layer {il}")
    pattern = k.kv.get(p + "attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != n_layer or not all(isinstance(b, bool) for b in pattern):
        k.fail(p + "attention.sliding_window_pattern", f"must list {n_layer} booleans (one per layer), got "
                                                       f"{pattern!r:.60}")
    k.int(p + "attention.sliding_window", 1, 2**31 - 1)
    freqs = next((t for t in header.tensors if t.name == "rope_freqs.weight"), None)
    for suffix, kind in (("", "full"), ("_swa", "sliding")):
        head = k.int(p + f"attention.key_length{suffix}", 1, 1 << 16)
        if k.int(p + f"attention.value_length{suffix}", 1, 1 << 16) != head:
            k.fail(p + f"attention.value_length{suffix}", f"must equal key_length{suffix} ({head})")
        rot = k.int(p + f"rope.dimension_count{suffix}", 2, head)  # 0 spins forever in the CPU rope
        if rot % 2:
            k.fail(p + f"rope.dimension_count{suffix}", f"must be even, got {rot} ({kind} layers)")
        if kind == "full" and freqs is not None and rot // 2 > freqs.shape[0]:
            k.fail(p + "rope.dimension_count", f"({rot}) rotates more pairs than rope_freqs holds ({freqs.shape[0]})")


def _tensors(path, header, n_layer: int) -> None:
    names = {t.name for t in header.tensors}
    for il in range(n_layer):
        if f"blk.{il}.attn_qkv.weight" in names:
            raise ModelError(f"{path}: blk.{il}.attn_qkv.weight: this architecture has separate q, k, v")
        missing = [f"blk.{il}.{t}.weight" for t in LAYER_TENSORS if f"blk.{il}.{t}.weight" not in names]
        if f"blk.{il}.ffn_gate_up_exps.weight" not in names and not {
                f"blk.{il}.ffn_gate_exps.weight", f"blk.{il}.ffn_up_exps.weight"} <= names:
            missing.append(f"blk.{il}.ffn_gate_up_exps.weight")
        if f"blk.{il}.ffn_gate_inp.scale" not in names:
            missing.append(f"blk.{il}.ffn_gate_inp.scale")
        if missing:
            raise ModelError(f"{path}: layer {il} lacks {', '.join(missing)}")
    if "output.weight" not in names and "token_embd.weight" in names and {"output.scale", "output.input_scale"} & names:
        embd = next(t for t in header.tensors if t.name == "token_embd.weight")
        if getattr(embd.type, "name", "") == "NVFP4":  # llama-model.cpp asserts on a tied NVFP4 output's scales
            raise ModelError(f"{path}: a tied NVFP4 output cannot carry output.scale / output.input_scale")


def _tokenizer(k: _Keys, kv: dict) -> None:
    model = kv.get("tokenizer.ggml.model")
    if model not in TOKENIZERS:
        k.fail("tokenizer.ggml.model", f"must be one of {list(TOKENIZERS)}, got {model!r:.40}")
    tokens = kv.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        k.fail("tokenizer.ggml.tokens", "must be a non-empty list of strings")
    if len(set(tokens)) != len(tokens) or "" in tokens:  # llama-vocab.cpp asserts each text maps to one id
        k.fail("tokenizer.ggml.tokens", "must be non-empty, distinct strings")
    if not isinstance(kv.get("tokenizer.ggml.merges"), list):
        k.fail("tokenizer.ggml.merges", "is missing (a BPE vocabulary needs its merges)")
    k.int("tokenizer.ggml.bos_token_id", 0, len(tokens) - 1)  # the tokenizer adds it: out of range asserts
    if kv.get("tokenizer.ggml.add_eos_token"):
        k.int("tokenizer.ggml.eos_token_id", 0, len(tokens) - 1)
