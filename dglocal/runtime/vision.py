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
import math
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendError, ConfigError, ModelError
from .gguf import read_header
from .options import SOFT_TOKENS

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


def load_image(source, *, max_bytes: int = MAX_BYTES) -> Image:
    """A path, bytes or a PIL image, decoded and converted to RGB as the reference processor does (transparency
    over white), or an Image already decoded; ImageError names what is wrong."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    what = "the image"
    if isinstance(source, Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        what = str(source)
        try:
            if Path(source).stat().st_size > max_bytes:
                raise ImageError(f"{what}: {Path(source).stat().st_size} bytes, over the limit of {max_bytes}")
            source = Path(source).read_bytes()
        except OSError as e:
            raise ImageError(f"{what}: cannot read it ({e.strerror or e})") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > max_bytes:
            raise ImageError(f"{what}: {len(source)} bytes, over the limit of {max_bytes}")
        try:
            img = PILImage.open(io.BytesIO(bytes(source)))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageError(f"{what}: not an image Pillow can read ({e})") from None
    elif isinstance(source, PILImage.Image):
        img = source
    else:
        raise ImageError(f"an image is a path, bytes or a PIL image, got {type(source).__name__}")
    return Image(*_pixels(img, what))


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

    def __init__(self, model, path, *, max_tokens: int = 280, n_threads: int | None = None, use_gpu: bool = True,
                 flash_attn: bool | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such file")
        self.max_tokens = max_tokens
        self.n_embd = model.n_embd
        self.patch, self.pooling = check_mmproj(self.path, self.n_embd)
        self.ids = image_ids(model.metadata)
        self._model = model
        self._keys: dict[str, int] = {}  # digest -> key, for the model's lifetime: a key is never reused
        self._next_key = model.n_vocab
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> embeddings in use
        self._lock = threading.RLock()  # the server plans requests with images on worker threads
        self._mt = mt = _native().mtmd()
        params = mt.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads or os.cpu_count() or 1
        params.print_timings = False
        params.warmup = False
        # as the model's: llama.cpp's choice by default; off, the attention is f32 and the tower's output is what
        # the reference computes (on, it rounds through f16 but needs no [patches x patches] score matrix per head)
        params.flash_attn_type = {None: -1, False: 0, True: 1}[flash_attn]
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
        if getattr(self, "_ctx", None):
            self._mt.mtmd_free(self._ctx)
        self._ctx = None

    def n_tokens(self, image: Image) -> int:
        th, tw = target_size(image.pixels.shape[0], image.pixels.shape[1], self.patch, self.pooling, self.max_tokens)
        return (th // self.patch // self.pooling) * (tw // self.patch // self.pooling)

    def key(self, image: Image) -> int:
        """The image's key: an int past the vocabulary that stands in its positions of a prompt."""
        with self._lock:
            if image.digest not in self._keys:
                self._keys[image.digest] = self._next_key
                self._next_key += 1
            return self._keys[image.digest]

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
        embd = self._live.get(key)
        if embd is None:
            raise ConfigError(f"image key {key}: no image with this key is in use (embed it first)")
        return embd

    def _encode(self, image: Image) -> np.ndarray:
        if self._ctx is None:
            raise BackendError("the vision tower is closed")
        mt = self._mt
        size = target_size(image.pixels.shape[0], image.pixels.shape[1], self.patch, self.pooling, self.max_tokens)
        rgb = resized(image, size)
        bitmap = mt.mtmd_bitmap_init(size[1], size[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mt.mtmd_input_chunks_init()
        try:
            marker = mt.mtmd_default_marker()
            text = mt.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if self._model.native(mt.mtmd_tokenize, self._ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise BackendError(f"libmtmd could not take the image: {_native().last_errors()}")
            return self._encode_chunks(chunks)
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def _encode_chunks(self, chunks) -> np.ndarray:
        mt = self._mt
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(chunk) != mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                continue  # the text around it (BOI / EOI): the prompt has its own
            n = mt.mtmd_input_chunk_get_n_tokens(chunk)
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


def check_mmproj(path: Path, n_embd: int) -> tuple[int, int]:
    """(patch size, pooling) of a gemma4v mmproj file that projects into n_embd; ModelError otherwise."""
    kv = read_header(path).kv
    kind = kv.get("clip.vision.projector_type") or kv.get("clip.projector_type")
    if kv.get("general.architecture") != "clip" or not kv.get("clip.has_vision_encoder"):
        raise ModelError(f"{path}: not an mmproj file with a vision encoder")
    if kind != "gemma4v":
        raise ModelError(f"{path}: projector type {kind!r}; DiffusionGemma's vision tower is gemma4v")
    if kv.get("clip.vision.projection_dim") != n_embd:
        raise ModelError(f"{path}: it projects into {kv.get('clip.vision.projection_dim')} dimensions, the model's "
                         f"embeddings have {n_embd}: it belongs to another model")
    return int(kv.get("clip.vision.patch_size", 16)), int(kv.get("clip.vision.projector.scale_factor", 3))


def tower_memory(path, n_embd: int, max_tokens: int = 280) -> dict:
    """What the tower of an mmproj file for a model of width `n_embd` (check_mmproj) costs on its device, from the
    file's shapes (nothing loaded): its weights (exact) and its compute buffer for the largest image of
    `max_tokens` soft tokens (max_tokens x pooling^2 patches), with flash attention and without it (a
    [patches x patches] f32 score matrix per head). The compute figures are bounds: the live tensors of one layer
    (the FFN's three [patches x n_ff] and two [patches x n_embd] activations, the im2col'ed patches), larger than
    the buffer ggml's allocator packs them into."""
    patch, pooling = check_mmproj(Path(path), n_embd)
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
