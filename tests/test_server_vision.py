"""Images through a real `dglocal serve --mmproj` and the official openai client: a base64 image_url part gets
the answer the Python API gives for the same image and text, its tokens count in usage; a non-image, an image
over the size limit and a URL the server would have to fetch are a 400."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

import dglocal
import tiny
from dglocal.runtime.vision import load_image
from test_image_edges import png_header
from test_server import Server

pytestmark = pytest.mark.backend

PIL = pytest.importorskip("PIL.Image")
STEPS = {"max_denoising_steps": 4}


def png(h, w, seed) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    PIL.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(raw: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(raw).decode()}"


def image_message(url: str, text: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def mmproj(tiny_checkpoint, tmp_path_factory):
    from dglocal.convert.mmproj import convert_mmproj

    return convert_mmproj(tiny_checkpoint, tmp_path_factory.mktemp("server-vision") / "mmproj.gguf", "f32")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The directory the server may read images from (--image-files), with one image in it."""
    d = tmp_path_factory.mktemp("served-images")
    (d / "a.png").write_bytes(png(40, 56, 0))
    return d


@pytest.fixture(scope="module")
def server(tiny_f32_gguf, mmproj, images):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "2048", "--alias", "tiny", "--seed", "1", "--mmproj",
               str(mmproj), "--image-tokens", str(tiny.MAX_SOFT_TOKENS), "--image-files", str(images))
    yield s
    s.stop()


def test_an_image_gets_the_python_api_answer_and_counts_in_usage(server, tiny_f32_gguf, mmproj):
    raw = png(40, 56, 0)
    out = server.client().chat.completions.create(model="tiny", messages=image_message(data_url(raw)),
                                                  max_tokens=32, seed=3, extra_body=STEPS)
    with dglocal.load(tiny_f32_gguf, n_ctx=1024, n_threads=1, mmproj=mmproj,
                      image_tokens=tiny.MAX_SOFT_TOKENS) as m:
        done = m.chat().send("What is in this picture?", images=[raw], seed=3, max_new_tokens=32, **STEPS)
        image_tokens = m.vision.n_tokens(load_image(raw))
    assert out.choices[0].message.content == done.text
    assert out.usage.prompt_tokens == done.stats.prompt_tokens > image_tokens + 2  # BOI, the image, EOI, the text
    other = server.client().chat.completions.create(model="tiny", messages=image_message(data_url(png(40, 56, 1))),
                                                    max_tokens=32, seed=3, extra_body=STEPS)
    assert other.choices[0].message.content != done.text  # the image is what the answer depends on


def test_a_local_file_under_the_image_directory_is_the_same_image(server, images, tmp_path):
    ask = lambda url: server.client().chat.completions.create(  # noqa: E731
        model="tiny", messages=image_message(url), max_tokens=32, seed=3, extra_body=STEPS).choices[0].message.content
    by_value = ask(data_url((images / "a.png").read_bytes()))
    assert ask(f"file://{images / 'a.png'}") == by_value == ask(str(images / "a.png"))
    outside = tmp_path / "b.png"
    outside.write_bytes(png(40, 56, 0))
    for url in (str(outside), f"file://{images}/../{tmp_path.name}/b.png"):
        status, body, _ = server.post("/v1/chat/completions", json.dumps(
            {"model": "tiny", "messages": image_message(url), "max_tokens": 8}))
        assert status == 400 and "outside the image directory" in body["error"]["message"], body
    # the request's own value is named, never the server's directory (the 400 once ended with it)
    status, body, _ = server.post("/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": image_message(str(outside)), "max_tokens": 8}))
    assert body["error"]["message"] == f"{str(outside)!r}: outside the image directory (serve --image-files)", body


def test_a_nul_a_fifo_and_a_directory_are_a_400_at_once(server, images):
    """A NUL in a file URL was a 500; a FIFO under --image-files was read on the event loop and blocked the whole
    server until a writer came; each is now a 400 naming the request's value, and the server goes on."""
    import os
    import threading

    fifo = images / "pipe.png"
    os.mkfifo(fifo)
    cases = {f"file://{images}/a\0.png": "a file path has no NUL character",
             f"file://{fifo}": "a FIFO, not an image file", str(images): "a directory, not an image file"}
    try:
        for url, words in cases.items():
            answer = []

            def ask():
                try:
                    answer.append(server.post("/v1/chat/completions", json.dumps(
                        {"model": "tiny", "messages": image_message(url), "max_tokens": 8})))
                except Exception as e:  # a 500's body is not JSON
                    answer.append((None, repr(e), None))

            post = threading.Thread(target=ask, daemon=True)
            post.start()
            post.join(30)
            assert answer, f"{url!r}: no answer in 30 s"
            status, body, _ = answer[0]
            assert status == 400 and body["error"]["message"].endswith(words), body
            assert repr(url.removeprefix("file://")) in body["error"]["message"], body
    finally:
        try:  # a reader still blocked on the FIFO (old code) gets its end of file
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        fifo.unlink()
    assert server.client().models.list().data  # still serving


def test_an_image_whose_grid_has_no_positions_is_a_400(tiny_f32_gguf, mmproj):
    """At 280 image tokens an 8x4000 image is 2x560 patches, past the tiny tower's 256 positions a side: llama.cpp
    asserted in get_rows and the server process aborted. Now a 400 that names the grid; the server goes on."""
    s = Server(str(tiny_f32_gguf), "-c", "2048", "--alias", "tiny", "--mmproj", str(mmproj), "--image-tokens",
               "280")
    try:
        status, body, _ = s.post("/v1/chat/completions", json.dumps(
            {"model": "tiny", "messages": image_message(data_url(png(8, 4000, 0))), "max_tokens": 8}))
        assert status == 400, body
        assert "2240x8, 560x2 patches: more than the 256 positions a side" in body["error"]["message"], body
        out = s.client().chat.completions.create(model="tiny", messages=image_message(data_url(png(40, 56, 0))),
                                                 max_tokens=8, extra_body=STEPS)
        assert out.usage.prompt_tokens > 266  # the 56x40 image: 14x19 soft tokens
    finally:
        s.stop()


def test_local_files_are_off_by_default(tiny_f32_gguf):
    from dglocal.serving.frontend import ApiError, Frontend

    class Stub:
        metadata = {}

    with pytest.raises(ApiError, match="--image-files"):
        Frontend(Stub(), "tiny", {})._image_source({"type": "image", "file": "/etc/passwd"})


@pytest.mark.parametrize("url,words", [
    (data_url(b"hello, not an image", "text/plain"), "not an image"),
    (data_url(b"\x89PNG\r\n\x1a\n" + bytes(25 << 20)), "over the limit of 20971520"),  # 25 MB: a body under 64 MiB
    ("https://example.com/cat.png", "fetches nothing"),
    ("data:image/png;base64,@@@", "not valid base64"),
    (data_url(png_header(20000, 9000)), "20000x9000 pixels, over the limit of 40000000"),  # was Pillow's bomb: a 500
], ids=["text", "25MB", "https", "base64", "180MP"])
def test_bad_images_are_a_400(server, url, words):
    status, body, _ = server.post("/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": image_message(url), "max_tokens": 8}))
    assert status == 400, body
    assert words in body["error"]["message"]
