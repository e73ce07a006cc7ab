"""Images in: decoding and checking (Pillow), the reference processor's resize, and the vision tower on llama.cpp's
multimodal library (libmtmd, an mmproj GGUF of projector type gemma4v) giving an image's soft-token embeddings.

    vision = Vision(model, "mmproj.gguf")
    image = load_image("cat.png")                  # a path, bytes, or a PIL image; ImageError if bad
    embd = vision.embed(image)                     # float32 [n_tokens, n_embd], cached by content

An image stands in a prompt as BOI, n image positions, EOI (the reference processor's expansion of `<|image|>`).
Each image position holds the image's key, an int past the vocabulary that names the image's content: equal images
have equal keys, so a cached prompt with an image is reused like any other prefix. The encoder takes the block of
embeddings in one pass (Model.encode_batch, llama_dg_encode_embd).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import itertools
import math
import os
import stat
import struct
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendError, ConfigError, ModelError
from .gguf import read_header
from .options import DEFAULT_IMAGE_TOKENS, SOFT_TOKENS

MARKER = "<|image|>"            # where an image goes in a prompt's text (what the chat template writes)
MAX_BYTES = 20 << 20            # an encoded image larger than this is refused before decoding
MAX_PIXELS = 40_000_000         # and one whose header says more pixels (a 20000 x 20000 image is 400M)
MIN_SIDE = 8                    # and one narrower than this: nothing to see


class ImageError(ConfigError):
    """An image that cannot be used: not an image, truncated, too large or too small."""


@dataclass(frozen=True)
class Image:
    """A decoded RGB image and the digest of its pixels."""

    pixels: np.ndarray  # uint8 [height, width, 3]
    digest: str

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


def load_image(source, *, max_bytes: int = MAX_BYTES, name: str | None = None) -> Image:
    """A path, bytes or a PIL image, decoded and converted to RGB as the reference processor does (transparency
    over white), or an Image already decoded; ImageError names what is wrong, by `name` where given (a server names
    the request's own value, never the path it resolved). Safe on any thread: nothing here is shared."""
    from PIL import Image as PILImage

    if isinstance(source, Image):
        return source
    what = name or "the image"
    if isinstance(source, (str, os.PathLike)):
        what = name or os.fsdecode(source)
        source = _read_file(source, max_bytes, what)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > max_bytes:
            raise ImageError(f"{what}: {len(source)} bytes, over the limit of {max_bytes}")
        img = _open(bytes(source), what)
    elif isinstance(source, PILImage.Image):
        img = source
    else:
        raise ImageError(f"an image is a path, bytes or a PIL image, got {type(source).__name__}")
    return Image(*_pixels(img, what))


def _read_file(path, max_bytes: int, what: str) -> bytes:
    """A regular file's bytes, at most `max_bytes`; a FIFO, a device or a directory is refused before it is opened
    for reading (reading one blocks, or never ends), and checked again once open (it may have been swapped)."""
    if "\0" in os.fsdecode(path):
        shown = what.replace("\0", "\\0")
        raise ImageError(f"{shown}: a path has no NUL character")
    try:
        _check_regular(os.stat(path).st_mode, what)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            _check_regular(st.st_mode, what)
            if st.st_size > max_bytes:
                raise ImageError(f"{what}: {st.st_size} bytes, over the limit of {max_bytes}")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(f"{what}: cannot read it ({e.strerror or e})") from None
    if len(data) > max_bytes:  # it grew since
        raise ImageError(f"{what}: over the limit of {max_bytes} bytes")
    return data


def _check_regular(mode: int, what: str) -> None:
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a device", stat.S_IFBLK:
                "a device", stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "not a regular file")
        raise ImageError(f"{what}: {kind}, not an image file")


def _open(data: bytes, what: str):
    """The image in `data` with its header read, nothing decoded: Pillow's Image.open less its decompression-bomb
    check, which refuses a header past 179 MP with an error of its own before _pixels names the size against
    MAX_PIXELS (and whose limit is a Pillow global, not ours to change from a library on a server's threads)."""
    from PIL import Image as PILImage

    PILImage.preinit()  # as Image.open: the common formats first, then every plugin
    PILImage.init()
    for fmt in tuple(PILImage.ID):
        factory, accept = PILImage.OPEN[fmt]
        try:
            fit = accept(data[:16]) if accept else True
            if fit and not isinstance(fit, str):  # a str: the reason the plugin cannot (a codec missing)
                return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes for "not this format"
            continue
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:  # a plugin's own check
            raise ImageError(f"{what}: over the limit of {MAX_PIXELS} pixels ({e})") from None
        except (OSError, ValueError) as e:  # a header the plugin took, then could not read
            raise ImageError(f"{what}: not an image Pillow can read ({e})") from None
    raise ImageError(f"{what}: not an image Pillow can read")


def _pixels(img, what: str) -> tuple[np.ndarray, str]:
    from PIL import Image as PILImage

    w, h = img.size  # from the header: checked before the pixels are decoded
    if w * h > MAX_PIXELS:
        raise ImageError(f"{what}: {w}x{h} pixels, over the limit of {MAX_PIXELS}")
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{what}: {w}x{h} pixels, under the {MIN_SIDE}-pixel minimum side")
    try:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = PILImage.alpha_composite(white, rgba)
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as e:
        raise ImageError(f"{what}: cannot decode it ({e})") from None
    digest = hashlib.sha256(np.array(rgb.shape, np.int64).tobytes() + rgb.tobytes()).hexdigest()
    return np.ascontiguousarray(rgb), digest


def target_size(height: int, width: int, patch: int, pooling: int, max_tokens: int) -> tuple[int, int]:
    """The reference processor's resize: the aspect ratio kept, as many patches as `max_tokens` soft tokens of
    pooling x pooling patches allow, each side a multiple of patch * pooling."""
    unit = patch * pooling
    scale = math.sqrt(max_tokens * pooling * pooling * patch * patch / (height * width))
    th, tw = math.floor(height * scale / unit) * unit, math.floor(width * scale / unit) * unit
    if th == 0:
        th, tw = unit, min(math.floor(width / height) * unit, max_tokens * unit)
    elif tw == 0:
        th, tw = min(math.floor(height / width) * unit, max_tokens * unit), unit
    return th, tw


def resized(image: Image, size: tuple[int, int]) -> np.ndarray:
    """The pixels at (height, width), resized with Pillow's bicubic filter as the reference processor does."""
    from PIL import Image as PILImage

    th, tw = size
    if image.pixels.shape[:2] == (th, tw):
        return image.pixels
    out = PILImage.fromarray(image.pixels).resize((tw, th), PILImage.BICUBIC)
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))


class Vision:
    """The vision tower of `model` from an mmproj GGUF, on libmtmd; embeddings cached by image content."""

    CACHE = 16  # images whose embeddings stay cached after use (a chat re-sends its images every turn)
    # images whose keys are remembered after use: a key names its image in the prompt caches of sequences, so an
    # image sent again within this many others reuses a cached prefix holding it; past that it gets a fresh key
    KEYS = 4096

    def __init__(self, model, path, *, max_tokens: int = DEFAULT_IMAGE_TOKENS, n_threads: int | None = None,
                 use_gpu: bool = True, flash_attn: bool | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such file")
        self.max_tokens = max_tokens
        self.n_embd = model.n_embd
        self.patch, self.pooling, self.positions = check_mmproj(self.path, self.n_embd)
        self.ids = image_ids(model.metadata)
        self._model = model
        # digest -> key, least recently used first; a key number is never given twice (a cache that holds an old
        # one must not match another image), and never dropped while its embeddings are in use (_live)
        self._keys: OrderedDict[str, int] = OrderedDict()
        self._next_key = model.n_vocab
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> embeddings in use
        self._lock = threading.RLock()  # the server plans requests with images on worker threads: _keys, _cache
        self._mt = mt = _native().mtmd()
        params = mt.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads or os.cpu_count() or 1
        params.print_timings = False
        params.warmup = False
        # as the model's: llama.cpp's choice by default; off, the attention is f32 and the tower's output is what
        # the reference computes (on, it rounds through f16 but needs no [patches x patches] score matrix per head)
        params.flash_attn_type = _native().FLASH_ATTN_TYPES[flash_attn]
        params.image_min_tokens = 1  # the size is chosen here, as the reference processor chooses it
        params.image_max_tokens = max(SOFT_TOKENS)
        self._ctx = model.native(mt.mtmd_init_from_file, os.fsencode(self.path), model._model, params)
        if not self._ctx:
            raise ModelError(f"{self.path}: llama.cpp's multimodal library could not load it: "
                             f"{_native().last_errors() or 'unknown error'}")
        if not mt.mtmd_support_vision(self._ctx):
            self.close()
            raise ModelError(f"{self.path}: the projector has no vision tower")

    def close(self) -> None:
        with self._lock:  # after an encode on another thread, never under it
            if self._ctx:
                self._mt.mtmd_free(self._ctx)
            self._ctx = None

    def size(self, image: Image) -> tuple[int, int]:
        """The (height, width) the image is resized to (target_size); ImageError where its patch grid runs past the
        tower's position table, whose lookup in llama.cpp would index out of bounds (an abort). The reference
        model would index out of its table too (published towers: 10240 positions, 3360 patches a side at most)."""
        h, w = image.pixels.shape[:2]
        th, tw = target_size(h, w, self.patch, self.pooling, self.max_tokens)
        cols, rows = tw // self.patch, th // self.patch
        if max(cols, rows) > self.positions:
            fewer = f", or fewer image tokens than {self.max_tokens}" if self.max_tokens > min(SOFT_TOKENS) else ""
            raise ImageError(f"a {w}x{h} image is resized to {tw}x{th}, {cols}x{rows} patches: more than the "
                             f"{self.positions} positions a side of the vision tower; an image closer to square "
                             f"fits{fewer}")
        return th, tw

    def n_tokens(self, image: Image) -> int:
        th, tw = self.size(image)
        return (th // self.patch // self.pooling) * (tw // self.patch // self.pooling)

    def key(self, image: Image) -> int:
        """The image's key: an int past the vocabulary that stands in its positions of a prompt."""
        with self._lock:
            key = self._keys.pop(image.digest, None)
            if key is None:
                key, self._next_key = self._next_key, self._next_key + 1
            self._keys[image.digest] = key
            excess = max(len(self._keys) - self.KEYS, 0)
            for digest in list(itertools.islice(self._keys, excess)):  # the least recently used, unless in use
                if self._keys[digest] not in self._live:
                    del self._keys[digest]
            return key

    def tokens(self, image: Image) -> list[int]:
        """BOI, the image's key at each of its soft-token positions, EOI."""
        boi, _, eoi = self.ids
        return [boi] + [self.key(image)] * self.n_tokens(image) + [eoi]

    def embed(self, image: Image) -> np.ndarray:
        """The image's soft-token embeddings, float32 [n_tokens, n_embd]; while they are referenced, the encoder
        finds them by the image's key."""
        with self._lock:  # held while encoding: the same image arriving twice at once is encoded once
            embd = self._cache.get(image.digest)
            if embd is None:
                embd = self._encode(image)
            self._cache[image.digest] = embd
            self._cache.move_to_end(image.digest)
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
            self._live[self.key(image)] = embd
            return embd

    def embedding(self, key: int) -> np.ndarray:
        embd = self._live.get(key)  # no lock: the engine's thread must not wait while embed encodes
        if embd is None:
            raise ConfigError(f"image key {key}: no image with this key is in use (embed it first)")
        return embd

    def _encode(self, image: Image) -> np.ndarray:
        if self._ctx is None:
            raise BackendError("the vision tower is closed")
        mt = self._mt
        size = self.size(image)  # before any native call
        rgb = resized(image, size)
        bitmap = mt.mtmd_bitmap_init(size[1], size[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mt.mtmd_input_chunks_init()
        try:
            marker = mt.mtmd_default_marker()
            text = mt.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if self._model.native(mt.mtmd_tokenize, self._ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise BackendError(f"libmtmd could not take the image: {_native().last_errors()}")
            return self._encode_chunks(chunks, self.n_tokens(image))
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def _encode_chunks(self, chunks, expected: int) -> np.ndarray:
        mt = self._mt
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(chunk) != mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                continue  # the text around it (BOI / EOI): the prompt has its own
            n = mt.mtmd_input_chunk_get_n_tokens(chunk)
            if n != expected:  # libmtmd resized the image again: its grid is not the one checked (size)
                raise BackendError(f"libmtmd made {n} tokens of an image of {expected}")
            if self._model.native(mt.mtmd_encode_chunk, self._ctx, chunk) != 0:
                raise BackendError(f"the vision tower failed on the image: {_native().last_errors()}")
            out = mt.mtmd_get_output_embd(self._ctx)
            return np.ctypeslib.as_array(out, shape=(n, self.n_embd)).copy()
        raise BackendError("libmtmd gave no image chunk for the image")


def image_ids(metadata: dict) -> tuple[int, int, int]:
    """(BOI, image, EOI) token ids of a model file with images (its converter wrote them)."""
    ids = tuple(metadata.get(f"diffusion.{k}_token_id") for k in ("boi", "image", "eoi"))
    if any(i is None for i in ids):
        raise ModelError("the model file has no image token ids (diffusion.boi/image/eoi_token_id): it was "
                         "converted without a vision tower, or by an older dglocal (convert it again)")
    return ids


def check_mmproj(path: Path, n_embd: int) -> tuple[int, int, int]:
    """(patch size, pooling, positions a side) of a gemma4v mmproj file that projects into n_embd; ModelError
    otherwise."""
    header = read_header(path)
    kv = header.kv
    kind = kv.get("clip.vision.projector_type") or kv.get("clip.projector_type")
    if kv.get("general.architecture") != "clip" or not kv.get("clip.has_vision_encoder"):
        raise ModelError(f"{path}: not an mmproj file with a vision encoder")
    if kind != "gemma4v":
        raise ModelError(f"{path}: projector type {kind!r}; DiffusionGemma's vision tower is gemma4v")
    if kv.get("clip.vision.projection_dim") != n_embd:
        raise ModelError(f"{path}: it projects into {kv.get('clip.vision.projection_dim')} dimensions, the model's "
                         f"embeddings have {n_embd}: it belongs to another model")
    table = next((t for t in header.tensors if t.name == "v.position_embd.weight"), None)
    if table is None or len(table.shape) != 3:  # [n_embd, positions, 2]: one table for x, one for y
        raise ModelError(f"{path}: no position table v.position_embd.weight of [width, positions, 2]")
    return (int(kv.get("clip.vision.patch_size", 16)), int(kv.get("clip.vision.projector.scale_factor", 3)),
            int(table.shape[1]))


def tower_memory(path, n_embd: int, max_tokens: int = DEFAULT_IMAGE_TOKENS) -> dict:
    """What the tower of an mmproj file for a model of width `n_embd` (check_mmproj) costs on its device, from the
    file's shapes (nothing loaded): its weights (exact) and its compute buffer for the largest image of
    `max_tokens` soft tokens (max_tokens x pooling^2 patches), with flash attention and without it (a
    [patches x patches] f32 score matrix per head). The compute figures are bounds: the live tensors of one layer
    (the FFN's three [patches x n_ff] and two [patches x n_embd] activations, the im2col'ed patches), larger than
    the buffer ggml's allocator packs them into."""
    patch, pooling, _ = check_mmproj(Path(path), n_embd)
    header = read_header(path)
    kv = header.kv
    d, f = int(kv["clip.vision.embedding_length"]), int(kv["clip.vision.feed_forward_length"])
    heads, n = int(kv["clip.vision.attention.head_count"]), max_tokens * pooling ** 2
    weights = sum(t.nbytes or 0 for t in header.tensors)
    flash = 4 * n * (4 * f + 2 * d + 3 * patch * patch)
    return {"weights": weights, "compute_flash": flash, "compute": flash + 4 * heads * n * n, "patches": n,
            "max_tokens": max_tokens}


def _native():
    from . import native

    return native
