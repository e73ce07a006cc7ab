"""`dglocal plan`: placements chosen from llama.cpp's own buffer sizes, checked against what a real load allocates.

The device is a `dglocal rpc-server` on 127.0.0.1 (what plan itself starts when the machine has no GPU).
"""

import json
import subprocess

import pytest
from test_cli import DGLOCAL

import tiny

import dglocal
from dglocal.runtime import plan as planner
from dglocal.runtime.diagnostics import memory_breakdown
from dglocal.runtime.placement import is_host_buffer
from dglocal.convert.synth import synth

pytestmark = [pytest.mark.backend, pytest.mark.slow]  # child processes, many loads: the full tier



@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synth("small", "q8_0", tmp_path_factory.mktemp("plan") / "small-q8_0.gguf").path


@pytest.fixture(scope="module")
def device():
    with planner.stand_in_device() as endpoints:
        yield endpoints


def device_bytes(path, endpoints, n_ctx=1024, **placement) -> dict:
    """What a real load (weights read, buffers allocated) puts on the RPC device, per part."""
    with dglocal.load(path, n_ctx=n_ctx, rpc=endpoints, n_threads=1, mmap=False, **placement) as m:
        parts = [p for name, p in memory_breakdown(m).items() if not is_host_buffer(name)]
    return {k: sum(p[k] for p in parts) for k in planner.PARTS}


def test_plan_moves_experts_to_the_host_and_predicts_the_device_buffers(small, device):
    everything = planner.measure(small, n_ctx=1024, parallel=1, n_ubatch=512, kv_type="f16", n_gpu_layers=-1,
                                 n_cpu_moe=0, rpc=device)
    margin = 64 << 20
    r = planner.search(small, everything.device_total + margin, n_ctx=1024, rpc=device, margin=margin)
    assert r["fits"] and r["choice"]["n_cpu_moe"] == 0 and r["choice"]["n_gpu_layers"] == -1
    # one byte short: the experts of the first layers go to the host, as few as fit
    r = planner.search(small, everything.device_total + margin - 1, n_ctx=1024, rpc=device, margin=margin)
    c = r["choice"]
    assert r["fits"] and c["n_gpu_layers"] == -1 and 1 <= c["n_cpu_moe"] <= r["n_layer"], r
    assert "experts of the first" in r["words"]
    # the prediction against what llama.cpp then allocates on the device, part by part (within 5%)
    real = device_bytes(small, device, n_cpu_moe=c["n_cpu_moe"])
    for part in planner.PARTS:
        assert c["device"][part] == pytest.approx(real[part], rel=0.05, abs=1 << 20), (part, c["device"], real)


def test_plan_predicts_the_tiny_preset_with_either_sliding_cache(tmp_path, device):
    tiny = synth("tiny", "q8_0", tmp_path / "tiny-q8_0.gguf").path
    kv = {}
    for swa_full in (True, False):
        c = planner.measure(tiny, n_ctx=4096, parallel=1, n_ubatch=512, kv_type="f16", n_gpu_layers=-1,
                            n_cpu_moe=1, rpc=device, swa_full=swa_full)
        assert c.cache.startswith("sliding layers keep " + ("every token" if swa_full else "the last"))
        real = device_bytes(tiny, device, n_ctx=4096, n_cpu_moe=1, swa_full=swa_full)
        for part in planner.PARTS:
            assert c.device[part] == pytest.approx(real[part], rel=0.05, abs=1 << 20), (part, c.device, real)
        kv[swa_full] = c.device["context"]
    assert kv[False] < kv[True]


def test_plan_with_too_little_memory_keeps_everything_on_the_host(small, device):
    r = planner.search(small, 300 << 20, n_ctx=1024, rpc=device, margin=0)
    # the output layer carries the vocabulary-wide buffers (~0.8 GiB here): nothing offloads under them
    assert r["choice"]["n_gpu_layers"] == 0 and r["words"] == "everything on the host"
    assert sum(r["choice"]["device"].values()) == 0


def test_plan_takes_sizes_as_text(small, device):
    r = planner.plan(small, "300M", n_ctx=1024, rpc=device, margin="0M")
    assert r["vram"] == 300 << 20 and r["margin"] == 0 and r["device"] == "rpc"


def test_plan_command(small):
    r = subprocess.run([*DGLOCAL, "plan", str(small), "--vram", "8G", "-c", "1024", "--json"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["device"] == "stand-in" and out["fits"] and out["choice"]["n_gpu_layers"] == -1
    bad = subprocess.run([*DGLOCAL, "plan", str(small), "--vram", "lots"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "lots" in bad.stderr


def test_run_fit(small, device):
    """run --fit sizes the placements for the device's free memory and says what it chose; without a device it
    says everything stays on the host."""
    args = [*DGLOCAL, "run", str(small), "-p", "hi", "-n", "8", "--steps", "1", "-c", "1024", "-t", "1", "--fit"]
    r = subprocess.run([*args, "--rpc", device[0]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--fit (" in r.stderr and "layers on the device" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "everything runs on the host" in r.stderr, r.stderr[-2000:]


def test_plan_for_two_devices_checks_each_and_matches_a_real_load(small, device):
    """Two RPC servers of different sizes: every device within its own budget, the layers split in proportion
    (-ts), and each device's prediction within 5% of what a real load with the chosen options allocates there."""
    with planner.stand_in_device() as second:
        both = device + second
        alone = planner.measure(small, n_ctx=1024, parallel=1, n_ubatch=512, kv_type="f16", n_gpu_layers=-1,
                                n_cpu_moe=0, rpc=both, tensor_split=[1, 2])
        margin = 64 << 20
        # the last device holds the output layer and its vocabulary-wide buffers; the first is a third as large
        big = max(alone.devices.values()) + margin
        for sizes in ([big // 3, big], [big // 3, big // 2]):
            r = planner.search(small, sizes, n_ctx=1024, rpc=both, margin=margin)
            assert r["tensor_split"] == sizes and len(r["devices"]) == 2
            assert r["fits"] == all(d["used"] <= d["budget"] for d in r["devices"]), r["devices"]
            c = r["choice"]
            with dglocal.load(small, n_ctx=1024, rpc=both, n_threads=1, mmap=False, n_cpu_moe=c["n_cpu_moe"],
                              n_gpu_layers=c["n_gpu_layers"], tensor_split=sizes) as m:
                real = {n: sum(p.values()) for n, p in memory_breakdown(m).items() if not is_host_buffer(n)}
            for d in r["devices"]:
                assert d["used"] == pytest.approx(real.get(d["name"], 0), rel=0.05, abs=1 << 20), (d, real)
        # half the output device cannot hold the output layer's buffers: less goes to the devices
        assert r["choice"]["n_gpu_layers"] != -1 or r["choice"]["n_cpu_moe"] > 0, r["choice"]


def test_plan_sets_the_vision_tower_aside_on_the_first_device(tiny_f32_gguf, tiny_mmproj, device):
    """With --mmproj the tower's weights and compute buffer come off the first device's budget: memory that held
    every layer no longer does, and as much more again does."""
    from dglocal.runtime.vision import tower_memory

    margin = 64 << 20
    alone = planner.search(tiny_f32_gguf, 8 << 30, n_ctx=1024, rpc=device, margin=margin)
    assert alone["vision"] is None and alone["choice"]["n_cpu_moe"] == 0
    need = sum(alone["choice"]["device"].values()) + margin
    tower = tower_memory(tiny_mmproj, tiny.TEXT["hidden_size"], 70)
    short = planner.search(tiny_f32_gguf, need, n_ctx=1024, rpc=device, margin=margin, mmproj=tiny_mmproj,
                           image_tokens=70)
    assert short["vision"] == tower and short["choice"]["n_cpu_moe"] >= 1, short["choice"]
    enough = planner.search(tiny_f32_gguf, need + tower["weights"] + tower["compute"], n_ctx=1024, rpc=device,
                            margin=margin, mmproj=tiny_mmproj, image_tokens=70)
    assert enough["choice"]["n_cpu_moe"] == 0 and enough["choice"]["n_gpu_layers"] == -1, enough["choice"]
    r = subprocess.run([*DGLOCAL, "plan", str(tiny_f32_gguf), "--vram", "8G", "-c", "1024", "--rpc", device[0],
                        "--mmproj", str(tiny_mmproj), "--image-tokens", "70"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "vision tower (first device)" in r.stdout, r.stdout + r.stderr[-2000:]
    foreign = subprocess.run([*DGLOCAL, "plan", str(tiny_f32_gguf), "--vram", "8G", "--mmproj", str(tiny_f32_gguf)],
                             capture_output=True, text=True, timeout=300)
    assert foreign.returncode == 1 and "not an mmproj file" in foreign.stderr, foreign.stderr[-2000:]

