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


def test_local_files_are_off_by_default(tiny_f32_gguf):
    from dglocal.serving.app import ApiError, Frontend

    class Stub:
        metadata = {}

    with pytest.raises(ApiError, match="--image-files"):
        Frontend(Stub(), "tiny", {})._image_source({"type": "image", "file": "/etc/passwd"})


@pytest.mark.parametrize("url,words", [
    (data_url(b"hello, not an image", "text/plain"), "not an image"),
    (data_url(b"\x89PNG\r\n\x1a\n" + bytes(50 << 20)), "over the limit"),  # 50 MB
    ("https://example.com/cat.png", "fetches nothing"),
    ("data:image/png;base64,@@@", "not valid base64"),
])
def test_bad_images_are_a_400(server, url, words):
    status, body, _ = server.post("/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": image_message(url), "max_tokens": 8}))
    assert status == 400, body
    assert words in body["error"]["message"]
