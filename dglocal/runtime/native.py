"""ctypes bindings of the patched llama.cpp, the only module that touches the library: the stock calls dglocal
makes (through llama-cpp-python's declarations), the diffusion-gemma functions our patches add
(patches 0017 to 0023, and `llama_set_abort_flag` of 0009), and ggml's device registry. Bindings only, no logic."""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque

from dglocal.errors import BUILD_HINT, BackendError

try:
    import llama_cpp as ll
    from llama_cpp import llama_cpp as _ll
except (ImportError, OSError) as e:  # OSError: the shared library itself failed to load
    raise BackendError(f"the patched llama-cpp-python is not installed ({e}); {BUILD_HINT}") from None

_lib = _ll._lib

c_int32_p = ctypes.POINTER(ctypes.c_int32)
c_float_p = ctypes.POINTER(ctypes.c_float)
c_uint32_p = ctypes.POINTER(ctypes.c_uint32)
c_uint8_p = ctypes.POINTER(ctypes.c_uint8)


def _bind(name: str, argtypes: list, restype):
    fn = getattr(_lib, name, None)
    if fn is None:
        raise BackendError(f"the installed llama.cpp lacks {name}(): it is not dglocal's patched build; {BUILD_HINT}")
    fn.argtypes, fn.restype = argtypes, restype
    return fn


# -- the stock llama.cpp API dglocal calls, as llama-cpp-python declares it (llama_cpp/llama_cpp.py) -------------

llama_model_p = _ll.llama_model_p_ctypes
llama_context_p = _ll.llama_context_p_ctypes
llama_progress_callback = _ll.llama_progress_callback
llama_model_default_params = _ll.llama_model_default_params
llama_context_default_params = _ll.llama_context_default_params
llama_model_load_from_file = _ll.llama_model_load_from_file
llama_model_free = _ll.llama_model_free
llama_init_from_model = _ll.llama_init_from_model
llama_free = _ll.llama_free
llama_max_devices = _ll.llama_max_devices
llama_supports_gpu_offload = _ll.llama_supports_gpu_offload
llama_n_ctx_seq, llama_n_batch, llama_n_ubatch = _ll.llama_n_ctx_seq, _ll.llama_n_batch, _ll.llama_n_ubatch
# the enum values set in the load and context parameters (llama.h)
LLAMA_LOAD_MODE_NONE = _ll.LLAMA_LOAD_MODE_NONE  # no mmap: weights read into llama.cpp's own buffers
# dglocal's flash_attn option (None: llama.cpp's choice) -> enum llama_flash_attn_type, which libmtmd takes too
FLASH_ATTN_TYPES = {None: _ll.LLAMA_FLASH_ATTN_TYPE_AUTO, False: _ll.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                    True: _ll.LLAMA_FLASH_ATTN_TYPE_ENABLED}
# vocabulary
llama_model_get_vocab = _ll.llama_model_get_vocab
llama_vocab_n_tokens = _ll.llama_vocab_n_tokens
llama_model_n_embd = _ll.llama_model_n_embd
llama_vocab_is_eog = _ll.llama_vocab_is_eog
llama_vocab_get_attr = _ll.llama_vocab_get_attr
LLAMA_TOKEN_ATTR_CONTROL, LLAMA_TOKEN_ATTR_USER_DEFINED = _ll.LLAMA_TOKEN_ATTR_CONTROL, _ll.LLAMA_TOKEN_ATTR_USER_DEFINED
llama_tokenize = _ll.llama_tokenize
llama_token_to_piece = _ll.llama_token_to_piece
# the causal encoder pass and its outputs
llama_batch_init, llama_batch_free = _ll.llama_batch_init, _ll.llama_batch_free
llama_decode = _ll.llama_decode
llama_get_logits = _ll.llama_get_logits
llama_get_logits_ith = _ll.llama_get_logits_ith
# LoRA adapters (llama.cpp's adapter API: loaded per model, set with scales per context)
llama_adapter_lora_p = _ll.llama_adapter_lora_p_ctypes
llama_adapter_lora_init = _ll.llama_adapter_lora_init
llama_set_adapters_lora = _ll.llama_set_adapters_lora
# the KV cache, and a sequence's state (the sliding-window checkpoints)
llama_get_memory = _ll.llama_get_memory
llama_memory_seq_rm = _ll.llama_memory_seq_rm
llama_memory_seq_pos_min = _ll.llama_memory_seq_pos_min
llama_memory_seq_pos_max = _ll.llama_memory_seq_pos_max
LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY = _ll.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY  # the sliding layers' part
llama_state_seq_get_size_ext = _ll.llama_state_seq_get_size_ext
llama_state_seq_get_data_ext = _ll.llama_state_seq_get_data_ext
llama_state_seq_set_data_ext = _ll.llama_state_seq_set_data_ext
# llama-quantize's entry point (dglocal convert --type q4_k_m, ...)
llama_model_quantize_default_params = _ll.llama_model_quantize_default_params
llama_model_quantize = _ll.llama_model_quantize

# -- the diffusion-gemma functions of our patches ----------------------------------------------------------------

# int32_t llama_dg_canvas_length(const struct llama_model * model);
llama_dg_canvas_length = _bind("llama_dg_canvas_length", [llama_model_p], ctypes.c_int32)

class llama_dg_canvas(ctypes.Structure):
    """struct llama_dg_canvas: one canvas of a batched denoise call."""

    _fields_ = [("size", ctypes.c_size_t), ("seq_id", ctypes.c_int32), ("tokens", c_int32_p), ("n_tokens", ctypes.c_int32),
                ("temperature", ctypes.c_float), ("uniforms", c_float_p), ("self_condition", ctypes.c_bool),
                ("argmax", c_int32_p), ("sampled", c_int32_p), ("entropy", c_float_p),
                ("bias", c_float_p), ("n_bias", ctypes.c_int32), ("bias_row", c_int32_p),
                ("top_k", ctypes.c_int32), ("top_p", ctypes.c_float), ("min_p", ctypes.c_float),
                ("allow", c_uint32_p), ("n_allow", ctypes.c_int32), ("allow_row", c_int32_p),
                ("n_probs", ctypes.c_int32), ("top_ids", c_int32_p), ("top_logprobs", c_float_p),
                ("token_logprob", c_float_p), ("argmax_logprob", c_float_p),
                ("n_past", ctypes.c_int32), ("index", c_int32_p), ("n_index", ctypes.c_int32),
                ("keep", c_uint8_p), ("fast_k", ctypes.c_int32)]


LLAMA_DG_MAX_PROBS = 20  # log-probabilities a position the denoise pass selects at most


# int32_t llama_dg_denoise_batch(struct llama_context * ctx, struct llama_dg_canvas * canvases, int32_t n_canvases,
#                                bool logits);
llama_dg_denoise_batch = _bind("llama_dg_denoise_batch", [llama_context_p, ctypes.POINTER(llama_dg_canvas),
                                                          ctypes.c_int32, ctypes.c_bool], ctypes.c_int32)

# struct llama_dg_canvas llama_dg_canvas_default(void): size set, temperature 1, the rest zero
llama_dg_canvas_default = _bind("llama_dg_canvas_default", [], llama_dg_canvas)


class llama_dg_params(ctypes.Structure):
    """struct llama_dg_params: how a context runs the denoise pass, fixed at its creation."""

    _fields_ = [("size", ctypes.c_size_t), ("embd_t_type", ctypes.c_int32), ("reduce", ctypes.c_int32),
                ("prec_f32", ctypes.c_bool)]


LLAMA_DG_REDUCE = {"auto": 0, "chain": 1}  # enum llama_dg_reduce_type
# struct llama_dg_params llama_dg_default_params(void);
llama_dg_default_params = _bind("llama_dg_default_params", [], llama_dg_params)
# struct llama_context * llama_dg_init_from_model(struct llama_model * model, struct llama_context_params params,
#                                                 const struct llama_dg_params * dg_params);
llama_dg_init_from_model = _bind("llama_dg_init_from_model", [llama_model_p, _ll.llama_context_params,
                                                              ctypes.POINTER(llama_dg_params)], llama_context_p)

# void llama_set_abort_flag(struct llama_context * ctx, const volatile int32_t * flag);
llama_set_abort_flag = _bind("llama_set_abort_flag", [llama_context_p, c_int32_p], None)

# void llama_dg_last_io_bytes(const struct llama_context * ctx, int64_t * to_backend, int64_t * to_host);
llama_dg_last_io_bytes = _bind("llama_dg_last_io_bytes", [llama_context_p,
                                                          ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)],
                               None)

# typedef void (*llama_dg_node_cb)(void * user, const char * op, const char * name, int32_t src0_type,
#                                  double flops, double bytes, const char * backend, double copied);
llama_dg_node_cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32,
                                    ctypes.c_double, ctypes.c_double, ctypes.c_char_p, ctypes.c_double)
# int32_t llama_dg_graph_walk(struct llama_context * ctx, int32_t kind, int32_t n_tokens, llama_dg_node_cb cb,
#                             void * user);
llama_dg_graph_walk = _bind("llama_dg_graph_walk", [llama_context_p, ctypes.c_int32, ctypes.c_int32,
                                                    llama_dg_node_cb, ctypes.c_void_p], ctypes.c_int32)
# typedef void (*llama_dg_memory_cb)(void * user, const char * buffer_type, size_t model, size_t context,
#                                    size_t compute);
llama_dg_memory_cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                      ctypes.c_size_t)
# void llama_dg_memory_breakdown(const struct llama_context * ctx, llama_dg_memory_cb cb, void * user);
llama_dg_memory_breakdown = _bind("llama_dg_memory_breakdown", [llama_context_p, llama_dg_memory_cb,
                                                                ctypes.c_void_p], None)

# int32_t llama_dg_encode_embd(struct llama_context * ctx, llama_seq_id seq_id, const float * embd,
#                              int32_t n_tokens, bool logits);
llama_dg_encode_embd = _bind("llama_dg_encode_embd", [llama_context_p, ctypes.c_int32, c_float_p, ctypes.c_int32,
                                                      ctypes.c_bool], ctypes.c_int32)

DG_STATUS = {
    -1: "the model is not diffusion-gemma",
    -2: "invalid argument",
    -3: "the canvas does not fit in one micro-batch (n_ubatch)",
    -4: "the canvas does not fit the context",
    -5: "could not allocate the self-conditioning buffer",
    -6: "the decoder pass failed",
    -7: "interrupted",
}

# llama.cpp logs to stderr by default; keep its errors to explain failed calls, print only with DGLOCAL_DEBUG.
# Each thread keeps its own: llama.cpp logs on the thread that makes the call, and contexts on several threads (a
# Sudoku race's workers) fail apart, so none reports or clears another's errors.
GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 3, 4, 5
_logs = threading.local()


def _log() -> threading.local:
    if not hasattr(_logs, "tail"):
        _logs.tail, _logs.level = deque(maxlen=20), 0
    return _logs


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _log_callback(level, text, _user_data):
    log = _log()
    if level != GGML_LOG_LEVEL_CONT:
        log.level = level
    msg = text.decode("utf-8", "replace") if text else ""
    if log.level >= GGML_LOG_LEVEL_ERROR:
        log.tail.append(msg.rstrip())
    if os.environ.get("DGLOCAL_DEBUG"):
        os.write(2, msg.encode())


def last_errors() -> str:
    """The errors llama.cpp logged on this thread since the last call of this function, joined into one string."""
    tail = _log().tail
    text = " ".join(m for m in tail if m)
    tail.clear()
    return text


def logged(fn, *args):
    """(fn(*args), the errors llama.cpp logged meanwhile on this thread): for a call made on another thread
    (Model.native's worker), whose errors keep_errors hands to the thread that asked for it."""
    last_errors()  # this thread's earlier errors are not this call's
    return fn(*args), last_errors()


def keep_errors(errors: str) -> None:
    """Errors another thread logged for this one's call: its next last_errors() returns them."""
    if errors:
        _log().tail.append(errors)


_initialized = False


def init() -> None:
    global _initialized
    if not _initialized:
        _ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _ll.llama_backend_init()
        _initialized = True


# -- ggml's device registry (libggml, next to libllama): devices, buffer types, RPC ---------------------------

def _ggml_lib() -> ctypes.CDLL:
    base = os.path.dirname(_lib._name)
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        if os.path.exists(os.path.join(base, name)):
            return ctypes.CDLL(os.path.join(base, name))
    raise BackendError(f"libggml is missing next to {_lib._name}; {BUILD_HINT}")


_ggml = _ggml_lib()
_vp, _cp, _sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t


def _bind_ggml(name: str, argtypes: list, restype):
    fn = getattr(_ggml, name)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


ggml_backend_dev_count = _bind_ggml("ggml_backend_dev_count", [], _sz)
ggml_backend_dev_get = _bind_ggml("ggml_backend_dev_get", [_sz], _vp)
ggml_backend_dev_name = _bind_ggml("ggml_backend_dev_name", [_vp], _cp)
ggml_backend_dev_description = _bind_ggml("ggml_backend_dev_description", [_vp], _cp)
ggml_backend_dev_type = _bind_ggml("ggml_backend_dev_type", [_vp], ctypes.c_int)
ggml_backend_dev_buffer_type = _bind_ggml("ggml_backend_dev_buffer_type", [_vp], _vp)
ggml_backend_dev_backend_reg = _bind_ggml("ggml_backend_dev_backend_reg", [_vp], _vp)
ggml_backend_dev_memory = _bind_ggml("ggml_backend_dev_memory", [_vp, ctypes.POINTER(_sz), ctypes.POINTER(_sz)], None)
ggml_backend_buft_name = _bind_ggml("ggml_backend_buft_name", [_vp], _cp)
ggml_backend_reg_name = _bind_ggml("ggml_backend_reg_name", [_vp], _cp)
ggml_backend_reg_by_name = _bind_ggml("ggml_backend_reg_by_name", [_cp], _vp)
ggml_backend_reg_dev_count = _bind_ggml("ggml_backend_reg_dev_count", [_vp], _sz)
ggml_backend_reg_dev_get = _bind_ggml("ggml_backend_reg_dev_get", [_vp, _sz], _vp)
ggml_backend_reg_get_proc_address = _bind_ggml("ggml_backend_reg_get_proc_address", [_vp, _cp], _vp)
ggml_backend_register = _bind_ggml("ggml_backend_register", [_vp], None)

# enum ggml_backend_dev_type (ggml-backend.h), which llama-cpp-python does not export
GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU = 0, 1, 2

# procedures found through a backend's registry entry (ggml_backend_reg_get_proc_address)
# ggml_backend_buffer_type_t * ggml_backend_dev_get_extra_bufts(ggml_backend_dev_t device): NULL-terminated
dev_get_extra_bufts_t = ctypes.CFUNCTYPE(ctypes.POINTER(_vp), _vp)
# ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint)
rpc_add_server_t = ctypes.CFUNCTYPE(_vp, _cp)
# void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir, size_t n_threads,
#                                    size_t n_devices, ggml_backend_dev_t * devices)
rpc_start_server_t = ctypes.CFUNCTYPE(None, _cp, _cp, _sz, _sz, ctypes.POINTER(_vp))


def reg_proc(reg, name: str, ftype):
    """A registry entry's procedure `name` cast to `ftype`, or None when the backend lacks it."""
    addr = ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    return ftype(addr) if addr else None


class llama_model_tensor_buft_override(ctypes.Structure):
    _fields_ = [("pattern", _cp), ("buft", _vp)]


# -- llama.cpp's multimodal library (libmtmd): the vision tower -------------------------------------------------

def mtmd():
    """llama-cpp-python's libmtmd bindings, its logs routed as llama.cpp's are (imported on first use: a text-only
    run never needs the library)."""
    try:
        from llama_cpp import mtmd_cpp
    except (ImportError, OSError, FileNotFoundError) as e:
        raise BackendError(f"the installed llama-cpp-python has no multimodal library (libmtmd: {e}); "
                           f"{BUILD_HINT}") from None
    init()
    mtmd_cpp.mtmd_log_set(_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_log_callback, ctypes.c_void_p(0))
    return mtmd_cpp
