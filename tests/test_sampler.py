"""Sampler pieces and GenerationConfig on hand-built inputs, checked against hand-computed values and
against the reference classes (generation_diffusion_gemma.py) where one exists."""

import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma import generation_diffusion_gemma as ref

from dglocal.generation.config import GenerationConfig
from dglocal.errors import ConfigError
from dglocal.generation.sampler import (
    SeededNoise, StabilityHistory, accept_mask, find_stop, inverse_cdf, is_confident, stop_holdback, temperature,
    trim_eos,
)


# -- temperature schedule ---------------------------------------------------------------------------

def test_temperature_hand_values():
    assert temperature(4, 4, 0.4, 0.8) == float(np.float32(0.8))
    assert temperature(2, 4, 0.4, 0.8) == float(np.float32(0.6))
    assert temperature(1, 4, 0.4, 0.8) == 0.5


@pytest.mark.parametrize("t_min,t_max,n", [(0.4, 0.8, 48), (0.3, 0.9, 12), (0.0, 1.7, 7)])
def test_temperature_bitwise_as_reference(t_min, t_max, n):
    proc = ref.LinearTemperatureScheduleLogitsProcessor(t_min, t_max, n)
    scores = torch.randn(1, 4, 1000, generator=torch.Generator().manual_seed(n)) * 20
    for s in range(n, 0, -1):
        # the reference divides by a float32 T computed from an int32 step tensor (as in _denoising_step)
        expect = proc(None, scores, cur_step=torch.tensor(s, dtype=torch.int32))
        ours = scores / torch.tensor(temperature(s, n, t_min, t_max), dtype=torch.float32)
        assert torch.equal(ours, expect)


# -- entropy-bound acceptance -----------------------------------------------------------------------

def test_accept_mask_hand_values():
    h = np.array([0.5, 0.01, 0.03, 0.2, 0.05], dtype=np.float32)
    # ascending 0.01 0.03 0.05 0.2 0.5; cumsum - own = 0, 0.01, 0.04, 0.09, 0.29
    assert accept_mask(h, 0.1).tolist() == [False, True, True, True, True]
    assert accept_mask(h, 0.05).tolist() == [False, True, True, False, True]
    assert accept_mask(np.array([5.0, 3.0], dtype=np.float32), 0.1).tolist() == [False, True]  # lowest always
    assert accept_mask(np.zeros(4, dtype=np.float32), 1e-9).all()


def test_accept_mask_as_reference():
    g = torch.Generator().manual_seed(0)
    for bound in (0.05, 0.1, 0.5, 2.0):
        logits = torch.randn(1, 32, 50, generator=g) * torch.rand(1, 32, 1, generator=g) * 12
        sampler = ref.EntropyBoundSampler(ref.EntropyBoundSamplerConfig(entropy_bound=bound), 32, 50, 8)
        sampler.accept_canvas(torch.zeros(1, 32, dtype=torch.long), torch.ones(1, 32, dtype=torch.long), logits, 1)
        entropy = torch.distributions.Categorical(logits=logits).entropy()[0].numpy()
        assert accept_mask(entropy, bound).tolist() == sampler.accepted_token_mask[0].tolist()


# -- stability history and confidence ---------------------------------------------------------------

def test_stability_history_hand_values():
    a, b = np.array([3, 4, 5]), np.array([3, 4, 6])
    h = StabilityHistory(2, 3)
    assert [h.update(x) for x in (a, a, a, b, b, b, a)] == [False, False, True, False, False, True, False]
    h = StabilityHistory(1, 3)
    assert [h.update(x) for x in (a, a, b, a, a)] == [False, True, False, False, True]
    h = StabilityHistory(0, 3)
    assert [h.update(x) for x in (a, b)] == [True, True]


@pytest.mark.parametrize("threshold", [0, 1, 2, 3])
def test_stability_and_confidence_as_reference(threshold):
    g = torch.Generator().manual_seed(threshold)
    crit = ref.StableAndConfidentStoppingCriteria(threshold, 1.0)
    ours = StabilityHistory(threshold, 6)
    for _ in range(30):
        argmax = torch.randint(0, 2, (1, 6), generator=g) * (torch.rand(1, generator=g) < 0.8)
        logits = torch.randn(1, 6, 10, generator=g) * 4
        entropy = torch.distributions.Categorical(logits=logits).entropy()[0].numpy()
        expect = bool(crit(argmax, logits)[0])
        assert (ours.update(argmax[0].numpy()) and is_confident(entropy, 1.0)) == expect


def test_is_confident_is_strict():
    assert is_confident(np.array([0.1, 0.3]), 0.2000001)
    assert not is_confident(np.array([0.25, 0.25]), 0.25)


# -- EOS, stop strings ------------------------------------------------------------------------------

def test_trim_eos():
    tokens, found = trim_eos(np.array([5, 1, 7, 1]), (1, 106))
    assert tokens.tolist() == [5] and found
    assert trim_eos(np.array([5, 106, 1]), (1, 106))[0].tolist() == [5]
    tokens, found = trim_eos(np.array([5, 7]), (1,))
    assert tokens.tolist() == [5, 7] and not found
    assert trim_eos(np.array([1, 5]), (1,))[0].tolist() == []
    assert trim_eos(np.array([1, 5]), ())[0].tolist() == [1, 5]


def test_find_stop_across_blocks():
    first = "Hello wor"  # block 1: nothing yet
    assert find_stop(first, ["world"], 0) == -1
    assert find_stop(first + "ld!\n\nbye", ["world"], len(first)) == 6  # straddles the boundary
    assert find_stop("ab STOP cd", ["STOP"], 10) == -1  # entirely in text already checked
    assert find_stop("ab STOP cd", ["STOP"], 6) == 3  # ends after the start: found
    assert find_stop("x\n\ny END", ["END", "\n\n"], 0) == 1  # the earliest wins


def test_stop_holdback():
    assert stop_holdback("abc\n", ["\n\n"]) == 1
    assert stop_holdback("abc", ["\n\n"]) == 0
    assert stop_holdback("xx<en", ["<end>", "n"]) == 3
    assert stop_holdback("<end", ["<end>"]) == 4
    assert stop_holdback("", ["ab"]) == 0


# -- noise and the inverse-CDF draw -----------------------------------------------------------------

def test_seeded_noise_is_reproducible():
    a, b = SeededNoise(512, 7), SeededNoise(512, 7)
    assert a.tokens(16).tolist() == b.tokens(16).tolist()
    assert a.uniforms(16).tolist() == b.uniforms(16).tolist()
    t = SeededNoise(512, 1).tokens(10000)
    assert t.min() >= 0 and t.max() < 512 and len(set(t.tolist())) > 450
    u = SeededNoise(512, 1).uniforms(1000)
    assert (u >= 0).all() and (u < 1).all()


def test_inverse_cdf_hand_values():
    p = np.array([[0.1, 0.2, 0.3, 0.4]] * 6)
    # ids whose cumulative probability (0.1, 0.3, 0.6, 1.0) is < u
    assert inverse_cdf(p, [0.05, 0.15, 0.35, 0.7, 0.999, 1.0]).tolist() == [0, 1, 2, 3, 3, 3]
    assert inverse_cdf(np.array([[0.0, 1.0, 0.0]]), [0.5]).tolist() == [1]


# -- GenerationConfig -------------------------------------------------------------------------------

def test_config_defaults_are_the_reference_defaults():
    d = ref.DiffusionGemmaGenerationConfig._get_default_generation_params()
    c = GenerationConfig()
    assert (c.max_new_tokens, c.max_denoising_steps, c.t_min, c.t_max) == (
        d["max_new_tokens"], d["max_denoising_steps"], d["t_min"], d["t_max"])
    assert (c.stability_threshold, c.confidence_threshold) == (d["stability_threshold"], d["confidence_threshold"])
    assert c.entropy_bound == d["sampler_config"].entropy_bound


def test_config_from_metadata_and_overrides():
    meta = {"diffusion.eb_max_steps": np.uint32(12), "diffusion.eb_t_min": float(np.float32(0.3)),
            "diffusion.eb_t_max": np.float32(0.9), "diffusion.eb_entropy_bound": np.float32(0.2),
            "diffusion.eb_stability_threshold": 2, "diffusion.eb_confidence_threshold": np.float32(0.01),
            "diffusion.canvas_length": 16}
    c = GenerationConfig.from_metadata(meta, t_max=1.5, seed=None, stop="\n\n")
    assert (c.max_denoising_steps, c.t_min, c.t_max, c.entropy_bound) == (12, 0.3, 1.5, 0.2)
    assert (c.stability_threshold, c.confidence_threshold, c.stop) == (2, 0.01, ("\n\n",))
    assert GenerationConfig.from_metadata(None) == GenerationConfig()
    off = GenerationConfig.from_metadata(meta, stability_threshold="off")
    assert off.stability_threshold is None and not off.early_stop and c.early_stop


@pytest.mark.parametrize("bad,needle", [
    (dict(max_denoising_steps=0), "max_denoising_steps"), (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(t_min=0.9), "t_max must be > t_min"), (dict(t_min=-1.0, t_max=0.5), "t_min"),
    (dict(entropy_bound=0.0), "entropy_bound"), (dict(stability_threshold=-1), "stability_threshold"),
    (dict(confidence_threshold=0), "confidence_threshold"), (dict(seed="x"), "seed"), (dict(stop=[""]), "stop"),
    (dict(temprature=0.3), "temprature"),
])
def test_config_errors_name_the_value(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        GenerationConfig.from_metadata({}, **bad)
