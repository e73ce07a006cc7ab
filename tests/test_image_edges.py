"""Images at the edges: headers past Pillow's bomb limit, paths with a NUL, FIFOs, devices and directories, a patch
grid past the tower's position table, extreme aspect ratios, the key table's bound, many threads at once. Each
one is a clear ImageError (a ConfigError: a 400 over HTTP), never an abort, a hang or a 500. Whatever could hang or
abort the process on old code runs in a subprocess, so that it fails the test instead of stopping pytest."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import tiny

PIL = pytest.importorskip("PIL.Image")


def png(h: int, w: int, seed: int = 0) -> bytes:
    out = io.BytesIO()
    PIL.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG file whose header says w x h: a few hundred bytes, however many pixels it claims."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


def isolated(code: str, *args, timeout: float = 60, memory: int | None = None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, with `memory` bytes of address space at most: a hang, an abort or a runaway
    read fails the test instead of stopping pytest."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    root = Path(__file__).resolve().parents[1]  # this checkout's dglocal, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit if memory else None, cwd=root, env=env)


# -- decoding: sizes and files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("w,h", [(20000, 9000), (65535, 65535), (7000, 7000)])
def test_a_header_past_the_limit_is_our_error_before_any_decoding(w, h):
    """Past 179 MP Pillow's Image.open raised its DecompressionBombError first (a 500; the CLI said its name)."""
    from dglocal.errors import ConfigError
    from dglocal.runtime.vision import MAX_PIXELS, load_image

    with pytest.raises(ConfigError, match=f"the image: {w}x{h} pixels, over the limit of {MAX_PIXELS}"):
        load_image(png_header(w, h))


@pytest.mark.backend
def test_the_cli_says_the_limit_in_one_line(tiny_f32_gguf, tiny_mmproj, tmp_path):
    """`dglocal run --image` of a 180 MP header printed "error: DecompressionBombError"."""
    from test_cli import piped

    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(20000, 9000))
    done = piped("run", tiny_f32_gguf, "-c", "1024", "-t", "1", "--mmproj", tiny_mmproj, "--image-tokens",
                 tiny.MAX_SOFT_TOKENS, "--image", path, "-p", "hello")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].endswith(f"{path}: 20000x9000 pixels, over the limit of 40000000")


def test_pillow_formats_still_open():
    """The header is read by Pillow's own plugins (Image.open less its bomb check): every common format decodes."""
    from dglocal.runtime.vision import load_image

    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for fmt in ("PNG", "BMP", "TIFF", "PPM", "GIF", "JPEG", "WEBP"):
        out = io.BytesIO()
        PIL.fromarray(pixels).save(out, format=fmt)
        want = np.asarray(PIL.open(io.BytesIO(out.getvalue())).convert("RGB"))
        np.testing.assert_array_equal(load_image(out.getvalue()).pixels, want, err_msg=fmt)
    for junk in (b"", b"hello", b"\x89PNG\r\n\x1a\n" + bytes(40), b"GIF89a" + bytes(4), b"BM" + bytes(2)):
        with pytest.raises(ValueError, match="not an image Pillow can read"):
            load_image(junk)


LOAD = """
import sys
from dglocal.runtime.vision import ImageError, load_image
try:
    load_image(sys.argv[1])
except ImageError as e:
    print(e)
"""


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "nul"])
def test_only_regular_files_are_read(tmp_path, kind):
    """A FIFO blocked the reader forever, a device (/dev/zero: size 0) was read without end, a NUL in the path
    was a ValueError; each is now named and refused before it is read."""
    path = {"fifo": tmp_path / "pipe.png", "directory": tmp_path, "device": "/dev/zero",
            "nul": f"{tmp_path}/a\0b.png"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "nul":  # argv cannot carry a NUL
        done = isolated(LOAD.replace("sys.argv[1]", repr(str(path))), memory=2 << 30)
    else:
        done = isolated(LOAD, path, memory=2 << 30)
    assert done.returncode == 0, done.stderr[-2000:]
    words = {"fifo": "a FIFO, not an image file", "directory": "a directory, not an image file",
             "device": "a device, not an image file", "nul": "a path has no NUL character"}[kind]
    assert done.stdout.strip().endswith(words), done.stdout
    assert "\0" not in done.stdout


def test_a_file_over_the_byte_limit_is_refused_unread(tmp_path):
    from dglocal.runtime.vision import load_image

    path = tmp_path / "big.png"
    path.write_bytes(png(40, 56))
    with pytest.raises(ValueError, match=f"big.png: {path.stat().st_size} bytes, over the limit of 100"):
        load_image(path, max_bytes=100)
    with pytest.raises(ValueError, match="^shown: "):
        load_image(path, max_bytes=100, name="shown")  # the caller's name in place of the path


def test_load_image_on_many_threads_equals_one_thread():
    """The server decodes on worker threads (load_image shares nothing): the same images, the same pixels."""
    from concurrent.futures import ThreadPoolExecutor

    from dglocal.runtime.vision import load_image

    raws = [png(40 + i, 56 - i, i) for i in range(16)] + [png_header(9000, 9000), png(4, 4)]

    def digest(raw):
        try:
            return load_image(raw).digest
        except ValueError as e:
            return str(e)

    alone = [digest(r) for r in raws]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(4):
            assert list(pool.map(digest, raws)) == alone


# -- the HTTP frontend's local files -------------------------------------------------------------------------------


class Stub:
    metadata: dict = {}


def frontend(directory):
    from dglocal.serving.frontend import Frontend

    return Frontend(Stub(), "tiny", {}, image_files=directory)


def source(directory, value):
    return frontend(directory)._image({"type": "image", "file": value})


def test_a_nul_in_a_file_url_is_a_400(tmp_path):
    from dglocal.serving.frontend import ApiError

    with pytest.raises(ApiError, match=r"^'/srv/a\\x00b.png': a file path has no NUL character$") as e:
        source(tmp_path, "/srv/a\0b.png")
    assert e.value.status == 400


def test_errors_name_the_request_value_never_the_server_directory(tmp_path):
    """The 400 said "outside the image directory /abs/path" and named files by the path they resolved to."""
    from dglocal.errors import ConfigError
    from dglocal.serving.frontend import ApiError, _named

    served = tmp_path / "served"
    served.mkdir()
    (served / "notes.txt").write_text("not an image")
    (tmp_path / "b.png").write_bytes(png(40, 56))
    (served / "link.png").symlink_to(tmp_path / "b.png")  # out through a link
    (served / "loop.png").symlink_to(served / "loop.png")
    cases = {"/b.png": "outside the image directory", "link.png": "outside the image directory",
             "../b.png": "outside the image directory", f"{served}/./notes.txt": "not an image Pillow can read",
             "loop.png": "", "missing.png": "cannot read it (No such file or directory)"}
    for value, words in cases.items():
        with pytest.raises((ApiError, ConfigError)) as e:  # Frontend.chat_prompt: a ConfigError is a 400 too
            source(served, value)
        message = str(e.value)
        assert getattr(e.value, "status", 400) == 400 and message.startswith(_named(value) + ": "), message
        assert words in message and str(served) not in message.replace(_named(value), ""), message


def test_relative_files_are_under_the_image_directory(tmp_path, monkeypatch):
    """A relative path is the image directory's, not the server's working directory's."""
    (tmp_path / "a.png").write_bytes(png(40, 56))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert source(tmp_path, "a.png").size == (56, 40)


FRONTEND_FIFO = """
import sys
from dglocal.serving.frontend import ApiError, Frontend
class Stub:
    metadata = {}
f = Frontend(Stub(), "tiny", {}, image_files=sys.argv[1])
try:
    f._image({"type": "image", "file": sys.argv[2]})
except Exception as e:
    print(type(e).__name__, e)
"""


def test_a_fifo_under_the_image_directory_is_a_400_at_once(tmp_path):
    """It was read on the event loop, blocking the server until a writer came (an ImageError is a 400)."""
    os.mkfifo(tmp_path / "pipe.png")
    done = isolated(FRONTEND_FIFO, tmp_path, "pipe.png")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ImageError 'pipe.png': a FIFO, not an image file", done.stdout


# -- the tower: grids past its position table, extreme aspect ratios, keys -------------------------------------


@pytest.fixture(scope="module")
def small_table_mmproj(tiny_checkpoint, tmp_path_factory):
    """The tiny tower with a position table of 16 a side (patch 4, pooling 2): a grid of more than 16 patches a
    side, which 70 soft tokens give any image not near square, has no positions."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from dglocal.convert.mmproj import convert_mmproj

    d = tmp_path_factory.mktemp("small-table")
    shutil.copytree(tiny_checkpoint, d / "ckpt")
    config = json.loads((d / "ckpt" / "config.json").read_text())
    config["vision_config"]["position_embedding_size"] = 16
    (d / "ckpt" / "config.json").write_text(json.dumps(config))
    (path,) = (d / "ckpt").glob("*.safetensors")
    weights = load_file(path)
    name = "model.encoder.vision_tower.patch_embedder.position_embedding_table"
    weights[name] = np.ascontiguousarray(weights[name][:, :16])
    save_file(weights, path, metadata={"format": "pt"})
    return convert_mmproj(d / "ckpt", d / "mmproj-16.gguf", "f32")


EMBED = """
import json, sys
import numpy as np
from PIL import Image
import dglocal
from dglocal.runtime.vision import ImageError, load_image
gguf, mmproj, tokens, sizes = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
out = {}
with dglocal.load(gguf, n_ctx=2048, n_threads=1, flash_attn=False, mmproj=mmproj, image_tokens=tokens) as m:
    for h, w in sizes:
        image = load_image(Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), np.uint8)))
        try:
            n = m.vision.n_tokens(image)
            embd = m.vision.embed(image)
            assert embd.shape == (n, m.n_embd) and np.isfinite(embd).all(), embd.shape
            out[f"{h}x{w}"] = n
        except ImageError as e:
            out[f"{h}x{w}"] = str(e)
print(json.dumps(out))
"""


def embed_isolated(gguf, mmproj, tokens: int, sizes) -> dict:
    done = isolated(EMBED, gguf, mmproj, tokens, json.dumps(sizes), timeout=300)
    assert done.returncode == 0, f"returncode {done.returncode}: {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_grid(h: int, w: int, tokens: int) -> tuple[int, int, int]:
    """(rows, columns) of patches and soft tokens the reference processor gives an h x w image."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    P, k = tiny.VISION["patch_size"], tiny.VISION["pooling_kernel_size"]
    th, tw = get_aspect_ratio_preserving_size(h, w, P, tokens * k * k, k)
    return th // P, tw // P, (th // P) * (tw // P) // (k * k)


@pytest.mark.backend
def test_a_grid_past_the_position_table_is_refused_not_an_abort(tiny_f32_gguf, small_table_mmproj):
    """A 37x53 PNG became 48x80 pixels, 12x20 patches, on a tower of 16 positions a side: llama.cpp's get_rows
    asserted (GGML_ASSERT i01 < ne01) and the process aborted. Now: an ImageError naming the grid, before any
    native call; the square image that fits still encodes."""
    sizes = [(53, 37), (37, 53), (40, 40), (17, 17)]
    got = embed_isolated(tiny_f32_gguf, small_table_mmproj, tiny.MAX_SOFT_TOKENS, sizes)
    for h, w in sizes:
        rows, cols, n = reference_grid(h, w, tiny.MAX_SOFT_TOKENS)
        if max(rows, cols) > 16:
            assert got[f"{h}x{w}"] == (f"a {w}x{h} image is resized to {cols * 4}x{rows * 4}, {cols}x{rows} patches: "
                                       f"more than the 16 positions a side of the vision tower; an image closer to "
                                       f"square fits"), got
        else:
            assert got[f"{h}x{w}"] == n, got
    assert isinstance(got["53x37"], str) and isinstance(got["40x40"], int)


EXTREME = [(8, 4000), (4000, 8), (8, 40000), (40000, 8), (8, 1000), (9, 2001), (3000, 11), (8, 8), (8, 9),
           (4000, 4000), (6000, 6600), (17, 17), (33, 257)]


@pytest.mark.backend
@pytest.mark.parametrize("tokens", [70, 280])
def test_extreme_aspect_ratios_encode_or_are_refused(tiny_f32_gguf, tiny_mmproj, tokens):
    """The tests' own tower (256 positions a side): at 280 tokens an 8x4000 image is 2x560 patches and aborted
    the process (the server with it). Every size gives the reference processor's token count, or, where the
    grid has no positions, an ImageError; none aborts."""
    got = embed_isolated(tiny_f32_gguf, tiny_mmproj, tokens, EXTREME)
    positions = tiny.VISION["position_embedding_size"]
    for h, w in EXTREME:
        rows, cols, n = reference_grid(h, w, tokens)
        want = n if max(rows, cols) <= positions else (f"{cols}x{rows} patches: more than the {positions} positions "
                                                       f"a side of the vision tower; an image closer to square fits, "
                                                       f"or fewer image tokens than {tokens}")
        assert want == got[f"{h}x{w}"] if isinstance(want, int) else want in got[f"{h}x{w}"], (h, w, got)
    assert any(isinstance(v, str) for v in got.values()) == (tokens == 280)


def rgb(h, w, seed):
    return PIL.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def vision_model(tiny_f32_gguf, tiny_mmproj):
    import dglocal

    with dglocal.load(tiny_f32_gguf, n_ctx=1024, n_threads=1, flash_attn=False, mmproj=tiny_mmproj,
                      image_tokens=tiny.MAX_SOFT_TOKENS) as m:
        yield m


@pytest.mark.backend
def test_the_key_table_is_bounded_and_keeps_the_keys_in_use(vision_model, monkeypatch):
    """Vision._keys gained an entry per image for the life of the process. Now the least recently used beyond
    KEYS go, unless their embeddings are in use (a plan holds them, or the embedding cache); one that went gets a
    key never given before, so a prompt cache holding the old one cannot match another image."""
    from dglocal.runtime.vision import Vision, load_image

    monkeypatch.setattr(Vision, "KEYS", 4, raising=False)
    monkeypatch.setattr(Vision, "CACHE", 2)
    v = vision_model.vision
    images = [load_image(rgb(16, 16, i)) for i in range(12)]
    held = v.embed(images[0])  # in use: its key stays
    keys = [v.key(images[0])]
    for im in images[1:]:
        v.embed(im)  # the embeddings dropped at once: only the cache's last 2 stay in use
        keys.append(v.key(im))
    assert len(set(keys)) == 12
    assert sorted(v._keys.values()) == [keys[0]] + keys[-4:]
    assert v.key(images[0]) == keys[0] and v.key(images[11]) == keys[11]
    assert v.embedding(keys[0]) is held
    again = v.key(images[1])  # it went: a fresh key
    assert again > max(keys)


@pytest.mark.backend
def test_an_image_sent_again_keeps_its_key_after_its_embeddings_went(vision_model):
    """The prefix cache reuses an image when its key is the same: a chat re-sends its images each turn, and a
    server's slot keeps the prompt. After more images than the embedding cache holds, the key stays."""
    from dglocal.generation.request import common_prefix, plan
    from dglocal.runtime.vision import Vision, load_image

    first = plan(vision_model.model, "Look: <|image|> now.", images=[rgb(40, 56, 0)], seed=0).tokens
    for i in range(Vision.CACHE + 4):
        plan(vision_model.model, "<|image|>", images=[rgb(16, 16, 100 + i)], seed=0)
    second = plan(vision_model.model, "Look: <|image|> now, again.", images=[rgb(40, 56, 0)], seed=0).tokens
    n = vision_model.vision.n_tokens(load_image(rgb(40, 56, 0)))
    assert sum(t >= vision_model.n_vocab for t in first) == n
    assert common_prefix(first, second) > n
