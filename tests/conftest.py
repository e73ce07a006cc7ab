"""Shared fixtures: one tiny random reference model and its checkpoint per test session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so test modules can `import tiny`

import tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "backend: needs the patched llama.cpp library (dglocal._native)")


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny reference model (float32, eval, discriminative weights), seed 0."""
    return tiny.tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    """Directory of the tiny model saved as 5.23's save_pretrained does (per_layer_config form)."""
    return tiny.save_checkpoint(tiny_model, tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def tiny_vocab(tmp_path_factory):
    """512-token vocab-only gemma4 GGUF cut from the real Gemma 4 tokenizer (see tiny.py)."""
    return tiny.tiny_vocab_gguf(tmp_path_factory.mktemp("tiny_vocab") / "vocab-512.gguf")


@pytest.fixture(scope="session")
def tiny_f32_gguf(tiny_checkpoint, tiny_vocab, tmp_path_factory):
    """The tiny checkpoint converted to an f32 GGUF with the 512-token Gemma 4 vocabulary."""
    from dglocal.convert import convert

    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    convert(tiny_checkpoint, out, "f32", tokenizer_from=tiny_vocab)
    return out


@pytest.fixture(scope="session")
def llama_model(tiny_f32_gguf):
    """The tiny f32 GGUF on the patched llama.cpp, set up for exactness: f32 KV cache, no flash attention
    (the CPU flash-attention kernel rounds through f16, ~1e-3 relative)."""
    import dglocal

    m = dglocal.load(tiny_f32_gguf, n_ctx=1024, kv_type="f32", n_threads=2, flash_attn=False)
    yield m
    m.close()
