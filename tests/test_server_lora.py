"""LoRA adapters through a real `dglocal serve --lora` (and `dglocal run`): per-request scales (llama-server's `lora` field) switch
without reloading and never mix between the slots of one batched forward; /lora-adapters lists and sets them."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import dglocal
from dglocal.convert.lora import convert_lora
from test_lora import ATTN_MLP, peft_adapter
from test_server import Server

pytestmark = pytest.mark.backend

STEPS = {"max_denoising_steps": 4}
PROMPTS = ["Once upon a time", "The weather today", "A list of fruits:", "Dear reader,"]


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("server-lora")
    return convert_lora(peft_adapter(tiny_model, ATTN_MLP, 5, d / "peft"), d / "a.gguf").path


@pytest.fixture(scope="module")
def server(tiny_f32_gguf, adapter):
    s = Server(str(tiny_f32_gguf), "-np", "4", "-c", "4096", "--alias", "tiny", "--seed", "1", "--lora",
               str(adapter))
    yield s
    s.stop()


def alone(gguf, adapter, scale, prompt, seed):
    with dglocal.load(gguf, n_ctx=1024, n_threads=1, lora=[(str(adapter), scale)]) as m:
        return m.generate(prompt, seed=seed, max_new_tokens=32, **STEPS).text


def test_adapters_are_listed_and_scales_switch_per_request_without_mixing(server, tiny_f32_gguf, adapter):
    listed = json.load(urllib.request.urlopen(server.url + "/lora-adapters", timeout=30))
    assert listed == [{"id": 0, "path": str(adapter), "scale": 1.0}]
    scales = [1.0, 0.0, 0.5, 1.0]
    client = server.client()

    def ask(k):
        return client.completions.create(model="tiny", prompt=PROMPTS[k], max_tokens=32, seed=k,
                                         extra_body={"lora": [{"id": 0, "scale": scales[k]}], **STEPS}).choices[0].text

    with ThreadPoolExecutor(4) as pool:  # four slots busy at once, three sets of scales among them
        answers = list(pool.map(ask, range(4)))
    for k, text in enumerate(answers):
        assert text == alone(tiny_f32_gguf, adapter, scales[k], PROMPTS[k], k), k
    assert alone(tiny_f32_gguf, adapter, 0.0, PROMPTS[0], 0) != answers[0]  # the adapter does change answers


def test_new_default_scales(server, tiny_f32_gguf, adapter):
    status, body, _ = server.post("/lora-adapters", json.dumps([{"id": 0, "scale": 0.25}]))
    assert status == 200 and body[0]["scale"] == 0.25
    out = server.client().completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=32, seed=9,
                                             extra_body=STEPS).choices[0].text
    assert out == alone(tiny_f32_gguf, adapter, 0.25, PROMPTS[1], 9)
    server.post("/lora-adapters", json.dumps([{"id": 0, "scale": 1.0}]))


@pytest.mark.parametrize("path, body, words", [
    ("/v1/completions", {"prompt": "x", "lora": [{"id": 3, "scale": 1.0}]}, "id 3 does not exist"),
    ("/v1/completions", {"prompt": "x", "lora": [{"id": 0}]}, "'lora' must be a list"),
    ("/v1/completions", {"prompt": "x", "lora": {"0": 1.0}}, "'lora' must be a list"),
    ("/v1/completions", {"prompt": "x", "lora": [{"id": 0, "scale": 1e9}]}, "'lora' must be a number"),
    ("/lora-adapters", [{"id": 7, "scale": 1.0}], "id 7 does not exist"),
    ("/lora-adapters", {"id": 0}, "'body' must be a list"),
])
def test_bad_scales_are_named_400s(server, path, body, words):
    status, answer, _ = server.post(path, json.dumps(body))
    assert status == 400 and words in answer["error"]["message"], answer


def test_run_takes_lora_scaled_as_llama_cpp_spells_it(tiny_f32_gguf, adapter):
    from test_cli import SMALL, piped

    from dglocal.generation.channels import split

    with dglocal.load(tiny_f32_gguf, n_ctx=1024, n_threads=1, lora=[(str(adapter), 0.5)]) as m:
        text = m.chat().send("hello", max_denoising_steps=4, max_new_tokens=32, seed=1).text
    expected = split(text, tools=False).content  # what the chat prints on stdout: a thought goes to stderr
    out = piped("run", tiny_f32_gguf, *SMALL, "--steps", "4", "-n", "32", "-p", "hello", "--lora-scaled",
                adapter, "0.5")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    bad = piped("run", tiny_f32_gguf, "-p", "hello", "--lora", tiny_f32_gguf)  # a model, not an adapter
    assert bad.returncode == 1 and "LoRA adapter" in bad.stderr and "could not load" in bad.stderr, bad.stderr
