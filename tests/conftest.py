"""Shared fixtures: one tiny random reference model and its checkpoint per test session.

DGLOCAL_TEST_DEVICE=Vulkan0 (set by `scripts/bootstrap.py test` for its GPU tier, in an environment whose
llama.cpp build has that device) runs only the tests marked `gpu_tier`, with the devices set up for f32 math,
and checks that every model loaded with all its layers offloaded has its weights and KV cache on that device.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so test modules can `import tiny`

import tiny  # noqa: E402


DEVICE = os.environ.get("DGLOCAL_TEST_DEVICE")


def pytest_configure(config):
    config.addinivalue_line("markers", "backend: needs the patched llama.cpp library (dglocal.runtime.native)")
    config.addinivalue_line("markers", "gpu_tier: also runs in the GPU tier (DGLOCAL_TEST_DEVICE), layers on the device")
    config.addinivalue_line("markers", "gpu_only: needs a device: runs in the GPU tier alone")
    config.addinivalue_line("markers", "cpu_only: left out of the GPU tier (the reason is at the test)")
    config.addinivalue_line("markers", "slow: left out of the fast tier (-m 'not slow')")


def pytest_collection_modifyitems(config, items):
    """The GPU tier keeps the gpu_tier tests; the CPU tier drops the gpu_only ones (they need a device)."""
    marker = "gpu_tier" if DEVICE else "gpu_only"
    kept = [item for item in items if bool(item.get_closest_marker(marker)) == bool(DEVICE)]
    if DEVICE:  # the driver over the reference model alone (tests/test_generate.py) needs no device
        kept = [item for item in kept if not item.get_closest_marker("cpu_only") and (
                getattr(item, "callspec", None) is None or item.callspec.params.get("model") != "reference")]
    if SHARD:
        i, n = shard()
        owner = shards(kept, n)
        kept = [item for item in kept if owner[unit(item)] == i]
        if i > 0:  # the SPLIT tests first: their own pipelines compile while shard 0 compiles the shared ones
            kept.sort(key=lambda item: item.path.name not in SPLIT)
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


# DGLOCAL_TEST_SHARD="i/n": this process runs shard i of n (scripts/bootstrap.py runs the GPU tier as two, side by
# side: lavapipe compiles a pipeline on one core). A module stays whole, so its models load and its pipelines compile
# in one process, except the SPLIT ones, whose tests each run their own child processes: those go test by test. The
# heaviest units go first, each to the lightest shard so far, weighed by their module's seconds on a cold shader
# cache (2 cores), shared among a SPLIT module's tests. A module not listed weighs 40. Most modules share one f32
# model's pipelines: two shards starting on them at once compiled them twice (test_batch's first test, 647 s on a
# cold cache under load; 28 s after test_backend's had filled Mesa's disk cache), so the other shards start with
# their SPLIT tests, which compile each quant type's own, and reach the shared ones from the cache.
COLD_SECONDS = {"test_placement.py": 1200, "test_backend.py": 410, "test_swa_cache.py": 270, "test_batch.py": 250,
                "test_fast_sampler.py": 165, "test_gpu.py": 90}
SPLIT = {"test_placement.py"}
SHARD = os.environ.get("DGLOCAL_TEST_SHARD")


def shard() -> tuple[int, int]:
    try:
        i, n = (int(x) for x in SHARD.split("/"))
    except ValueError:
        i = n = 0
    if not 0 <= i < n:
        raise pytest.UsageError(f"DGLOCAL_TEST_SHARD={SHARD!r}: expected i/n with 0 <= i < n")
    return i, n


def unit(item) -> str:
    return item.nodeid if item.path.name in SPLIT else item.path.name


def shards(items, n: int) -> dict[str, int]:
    """Which shard runs each unit (a module, or a test of a SPLIT module) of `items`."""
    weight: dict[str, float] = {}
    for item in items:
        name = item.path.name
        tests = sum(other.path.name == name for other in items) if name in SPLIT else 1
        weight[unit(item)] = COLD_SECONDS.get(name, 40) / tests
    load, owner = [0.0] * n, {}
    for u in sorted(weight, key=lambda u: (-weight[u], u)):
        owner[u] = min(range(n), key=lambda i: (load[i], i))
        load[owner[u]] += weight[u]
    return owner


@pytest.fixture(scope="session", autouse=True)
def on_the_device():
    """The GPU tier: f32 device math (the exactness the parity tests assert; inherited by child processes through
    the environment), and every load that offloads all layers checked to have landed on DEVICE."""
    if not DEVICE:
        yield
        return
    from dglocal.runtime import model, placement

    placement.device_precision("f32")
    init = model.Model.__init__

    def checked_init(self, path, options=None, **kw):
        init(self, path, options, **kw)
        o = self.options
        if o.n_gpu_layers == -1 and not (o.rpc or o.tensor_overrides or o.n_cpu_moe or o.no_alloc):
            assert_on_device(self)

    model.Model.__init__ = checked_init
    yield
    model.Model.__init__ = init


def assert_on_device(m):
    """Weights and KV cache on DEVICE: a silent fallback to the host fails here."""
    from dglocal.runtime.diagnostics import memory_breakdown

    mem = memory_breakdown(m)
    assert DEVICE in mem, f"no buffer on {DEVICE}: {mem}"
    assert mem[DEVICE]["model"] > 0 and mem[DEVICE]["context"] > 0, mem
    host = sum(d["context"] for name, d in mem.items() if name != DEVICE)
    assert host == 0, f"KV cache or state off {DEVICE}: {mem}"


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
def tiny_mmproj(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's vision tower as an f32 mmproj GGUF."""
    from dglocal.convert.mmproj import convert_mmproj

    return convert_mmproj(tiny_checkpoint, tmp_path_factory.mktemp("mmproj") / "mmproj-tiny-f32.gguf", "f32")


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
