"""The runner's sampling package: schedules, noise, KSampler semantics, samplers, CFG.

Expected numbers were measured by running ComfyUI 0.3.64 (``comfy/samplers.py`` ``calculate_sigmas``,
``KSampler.set_steps``, ``comfy/sample.py`` ``prepare_noise``). The samplers are checked
on analytic denoisers: a point mass (the ideal denoiser is constant) and a Gaussian N(μ, s²), whose ideal
denoiser is ``D(x; σ) = μ + s²/(s²+σ²)·(x − μ)`` and whose probability-flow ODE maps ``μ + ε·√(s²+σ_T²)`` to
``μ + ε·s``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from airflow_comfy.runner.sampling import cfg as cfg_mod
from airflow_comfy.runner.sampling.cfg import CFGDenoiser, fill_uncond_controls
from airflow_comfy.runner.sampling.ksampler import (
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS,
    advanced_sigmas,
    initial_x,
    ksampler,
    ksampler_advanced,
    latent_to_model,
    prepare_mask,
    prepare_noise,
    sample,
    sigmas_for,
)
from airflow_comfy.runner.sampling.noise import BrownianIncrementNoise, SeededGaussianNoise
from airflow_comfy.runner.sampling.progress import StepProgress
from airflow_comfy.runner.sampling.samplers import (
    ANCESTRAL_SAMPLERS,
    BIT_EXACT_ON_CPU,
    COMFY_EXACT,
    SAMPLERS,
    SDE_SAMPLERS,
    noise_sampler_for,
)
from airflow_comfy.runner.sampling.schedule import (
    SCHEDULERS,
    ModelSampling,
    beta_cdf,
    beta_ppf,
    calculate_sigmas,
)
from airflow_comfy.runner.sampling.solvers import lms_coefficient
from airflow_comfy.runner.values import CondEntry, ControlNet, ControlRef, DiffusionModel, Latent, Recipe
from airflow_comfy.workflow.core_nodes import SUPPORTED_SAMPLERS, SUPPORTED_SCHEDULERS

MS = ModelSampling()

# ---------------------------------------------------------------------------------------------------------------
# Registries


def test_registries_match_the_node_catalog():
    assert tuple(SAMPLERS) == SUPPORTED_SAMPLERS
    assert tuple(SCHEDULERS) == SUPPORTED_SCHEDULERS
    assert set(COMFY_EXACT) == set(SAMPLERS)
    assert set(SAMPLERS) == BIT_EXACT_ON_CPU
    assert SDE_SAMPLERS <= BIT_EXACT_ON_CPU and ANCESTRAL_SAMPLERS <= BIT_EXACT_ON_CPU
    assert {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"} == DISCARD_PENULTIMATE_SIGMA_SAMPLERS


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def test_model_sampling_table():
    assert float(MS.sigma_min) == pytest.approx(0.029167, abs=1e-6)
    assert float(MS.sigma_max) == pytest.approx(14.614641, abs=1e-6)
    assert MS.sigmas.dtype == torch.float32 and MS.log_sigmas.dtype == torch.float32
    assert torch.all(MS.sigmas[1:] > MS.sigmas[:-1])


def test_sigma_to_t_is_the_nearest_integer_index_as_float():
    t = MS.sigma_to_t(torch.tensor([float(MS.sigma_max), float(MS.sigma_min), float(MS.sigmas[500]) * 1.0001]))
    assert t.dtype == torch.float32
    assert t.tolist() == [999.0, 0.0, 500.0]
    mid = MS.t_to_sigma(torch.tensor(499.5))
    expected = math.exp(0.5 * (float(MS.log_sigmas[499]) + float(MS.log_sigmas[500])))
    assert float(mid) == pytest.approx(expected, rel=1e-6)
    # exp(float32 log σ) may differ from the float32 σ by an ulp (hence max_denoise's relative tolerance)
    assert float(MS.t_to_sigma(torch.tensor(999.0))) == pytest.approx(float(MS.sigma_max), rel=1e-6)
    assert MS.is_max_denoise(calculate_sigmas(MS, "normal", 20))


def test_percent_to_sigma():
    assert MS.percent_to_sigma(0.0) > 1e8
    assert MS.percent_to_sigma(1.0) == 0.0
    assert MS.percent_to_sigma(0.5) == pytest.approx(float(MS.t_to_sigma(torch.tensor(499.5))), rel=1e-6)
    assert MS.sigma_to_percent(MS.sigma_max) == 0.0


COMFYUI_20 = {  # first, second, last non-zero σ of ComfyUI 0.3.64's 20-step SD 1.x schedules
    "normal": (14.6146, 10.7468, 0.0292),
    "karras": (14.6146, 11.7254, 0.0292),
    "simple": (14.6146, 10.9042, 0.2230),
    "sgm_uniform": (14.6146, 10.9073, 0.2255),
    "exponential": (14.6146, 10.5363, 0.0292),
    "ddim_uniform": (11.0283, 8.3907, 0.0413),
    "beta": (14.6146, 13.5157, 0.1114),
}


@pytest.mark.parametrize("scheduler", SUPPORTED_SCHEDULERS)
def test_schedulers_match_comfyui_at_20_steps(scheduler):
    sigmas = calculate_sigmas(MS, scheduler, 20)
    first, second, last = COMFYUI_20[scheduler]
    assert sigmas.dtype == torch.float32
    assert len(sigmas) == 21
    assert float(sigmas[-1]) == 0.0
    assert round(float(sigmas[0]), 4) == first
    assert round(float(sigmas[1]), 4) == second
    assert round(float(sigmas[-2]), 4) == last
    assert torch.all(sigmas[1:] < sigmas[:-1])


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential", "simple", "sgm_uniform", "beta"])
@pytest.mark.parametrize("steps", [1, 3, 7, 30])
def test_schedule_lengths(scheduler, steps):
    sigmas = calculate_sigmas(MS, scheduler, steps)
    assert len(sigmas) == steps + 1
    assert float(sigmas[-1]) == 0.0


def test_ddim_uniform_length_follows_comfyui():
    assert len(calculate_sigmas(MS, "ddim_uniform", 25)) == 26  # 1000 divisible by 25
    assert len(calculate_sigmas(MS, "ddim_uniform", 30)) == 32  # every 33rd index from 1: 31 values, + 0


def test_unknown_scheduler():
    with pytest.raises(ValueError, match="unknown scheduler"):
        calculate_sigmas(MS, "linear_quadratic", 20)


def test_incomplete_beta_against_closed_forms():
    for x in (1e-6, 0.01, 0.2, 0.5, 0.77, 0.999):
        # Beta(1/2, 1/2) is the arcsine distribution; Beta(2, 1) has CDF x².
        assert beta_cdf(x, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-13)
        assert beta_cdf(x, 2.0, 1.0) == pytest.approx(x * x, abs=1e-13)
        assert beta_ppf(beta_cdf(x, 0.6, 0.6), 0.6, 0.6) == pytest.approx(x, abs=1e-12)
    assert beta_cdf(0.5, 0.6, 0.6) == pytest.approx(0.5, abs=1e-14)


def test_sigmas_for_denoise():
    sigmas = sigmas_for("normal", 20, 0.5)
    assert len(sigmas) == 21
    assert round(float(sigmas[0]), 4) == 1.5482
    assert torch.equal(sigmas, calculate_sigmas(MS, "normal", 40)[-21:])
    assert sigmas_for("normal", 20, 0.0).numel() == 0
    assert torch.equal(sigmas_for("karras", 20, 1.0), calculate_sigmas(MS, "karras", 20))
    assert torch.equal(sigmas_for("karras", 20, None), calculate_sigmas(MS, "karras", 20))


@pytest.mark.parametrize("sampler", sorted(DISCARD_PENULTIMATE_SIGMA_SAMPLERS))
def test_discard_penultimate(sampler):
    sigmas = sigmas_for("normal", 20, sampler_name=sampler)
    longer = calculate_sigmas(MS, "normal", 21)
    assert len(sigmas) == 21
    assert torch.equal(sigmas, torch.cat([longer[:-2], longer[-1:]]))
    assert not torch.equal(sigmas, sigmas_for("normal", 20, sampler_name="euler"))


def test_advanced_sigmas():
    sigmas = calculate_sigmas(MS, "normal", 20)
    cut = advanced_sigmas(sigmas, 0, 10, force_full_denoise=True)
    assert len(cut) == 11 and float(cut[-1]) == 0.0 and float(sigmas[10]) > 0  # the input is not modified
    leftover = advanced_sigmas(sigmas, 0, 10, force_full_denoise=False)
    assert torch.equal(leftover, sigmas[:11])
    assert torch.equal(advanced_sigmas(sigmas, 12, 10000), sigmas[12:])
    assert advanced_sigmas(sigmas, 20, 10000).numel() == 0
    assert torch.equal(advanced_sigmas(sigmas, 0, 10000), sigmas)


# ---------------------------------------------------------------------------------------------------------------
# Noise and KSampler semantics


def test_noise_seed_zero():
    noise = prepare_noise(Latent(torch.zeros(1, 4, 64, 64)), 0)
    assert noise.flatten()[:5].tolist() == pytest.approx([-1.1258, -1.1524, -0.2506, -0.4339, 0.8487], abs=1e-4)
    assert noise.device.type == "cpu"


def test_noise_batch_index():
    full = prepare_noise(Latent(torch.zeros(3, 4, 8, 8)), 1234)
    assert torch.equal(prepare_noise(Latent(torch.zeros(1, 4, 8, 8), batch_index=[1]), 1234), full[1:2])
    picked = prepare_noise(Latent(torch.zeros(3, 4, 8, 8), batch_index=[2, 0, 2]), 1234)
    assert torch.equal(picked, torch.stack([full[2], full[0], full[2]]))


def test_noise_disabled_and_seed_range():
    assert torch.count_nonzero(prepare_noise(Latent(torch.ones(2, 4, 8, 8)), 5, add_noise=False)) == 0
    prepare_noise(Latent(torch.zeros(1, 4, 8, 8)), 2 ** 64 - 1)
    with pytest.raises(ValueError):
        prepare_noise(Latent(torch.zeros(1, 4, 8, 8)), 2 ** 64)


def test_initial_x_scaling():
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    latent = torch.full((1, 4, 8, 8), 0.25)
    full = sigmas_for("normal", 20)
    x = initial_x(noise, latent, full)
    assert torch.allclose(x, noise * math.sqrt(1 + float(full[0]) ** 2) + latent)
    part = sigmas_for("normal", 20, 0.6)
    x = initial_x(noise, latent, part)
    assert torch.allclose(x, noise * float(part[0]) + latent)


def test_latent_scaling_skipped_for_all_zero_latents():
    zeros = torch.zeros(1, 4, 8, 8)
    assert latent_to_model(zeros, 0.18215) is zeros
    ones = torch.ones(1, 4, 8, 8)
    assert torch.equal(latent_to_model(ones, 0.18215), ones * 0.18215)


class Spy:
    """A denoiser that records its inputs and returns ``value`` (a constant data point)."""

    def __init__(self, value: float | torch.Tensor = 0.0):
        self.value = value
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, sigma):
        self.calls.append((x.clone(), sigma.clone()))
        return torch.zeros_like(x) + self.value


def test_sample_full_denoise_start_and_output_scaling():
    spy = Spy(0.5)
    latent = Latent(torch.zeros(2, 4, 8, 8), batch_index=None)
    out = sample(spy, latent, seed=7, steps=5, sampler_name="euler", scheduler="karras", latent_scale=0.18215)
    noise = prepare_noise(latent, 7)
    sigma0 = float(sigmas_for("karras", 5)[0])
    x0, s0 = spy.calls[0]
    assert torch.allclose(x0, noise * math.sqrt(1 + sigma0 ** 2))
    assert s0.shape == (2,) and float(s0[0]) == pytest.approx(sigma0)
    assert len(spy.calls) == 5
    assert torch.allclose(out.samples, torch.full((2, 4, 8, 8), 0.5 / 0.18215), atol=1e-5)


def test_sample_partial_denoise_uses_sigma0_and_scaled_latent():
    spy = Spy(0.0)
    samples = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    latent = Latent(samples, noise_mask=None, batch_index=[0])
    out = sample(spy, latent, seed=3, steps=10, sampler_name="euler", scheduler="normal", latent_scale=0.5,
                 denoise=0.4)
    sigmas = sigmas_for("normal", 10, 0.4)
    expected = prepare_noise(latent, 3) * sigmas[0] + samples * 0.5
    assert torch.allclose(spy.calls[0][0], expected)
    assert out.batch_index == [0] and out.samples.shape == samples.shape


def test_sample_empty_schedule_returns_input():
    latent = Latent(torch.randn(1, 4, 8, 8))
    spy = Spy()
    assert sample(spy, latent, seed=0, steps=10, sampler_name="euler", scheduler="normal", latent_scale=1.0,
                  denoise=0.0) is latent
    assert sample(spy, latent, seed=0, steps=10, sampler_name="euler", scheduler="normal", latent_scale=1.0,
                  start_at_step=10, end_at_step=10000) is latent
    assert spy.calls == []


def test_sample_advanced_leftover_noise_and_disabled_noise():
    spy = Spy(0.0)
    latent = Latent(torch.zeros(1, 4, 8, 8))
    sample(spy, latent, seed=0, steps=10, sampler_name="euler", scheduler="normal", latent_scale=1.0,
           add_noise=False, start_at_step=4, end_at_step=7, force_full_denoise=False)
    sigmas = calculate_sigmas(MS, "normal", 10)
    assert [round(float(s[0]), 5) for _, s in spy.calls] == [round(float(v), 5) for v in sigmas[4:7]]
    assert torch.count_nonzero(spy.calls[0][0]) == 0


def test_prepare_mask_bilinear_to_latent_size():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0
    m = prepare_mask(mask, (2, 4, 8, 8))
    assert m.shape == (2, 4, 8, 8)
    assert torch.equal(m[:, :, :, :4], torch.zeros(2, 4, 8, 4))
    assert torch.equal(m[:, :, :, 4:], torch.ones(2, 4, 8, 4))
    soft = prepare_mask(torch.tensor([[0.0, 1.0]]), (1, 1, 1, 4))  # [H, W] input, bilinear weights
    assert soft.flatten().tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_inpainting_blend(sampler):
    samples = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0
    latent = Latent(samples, noise_mask=mask)
    spy = Spy(0.0)
    scale = 0.5
    out = sample(spy, latent, seed=21, steps=6, sampler_name=sampler, scheduler="normal", latent_scale=scale)
    noise = prepare_noise(latent, 21)
    blend_noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(22)) if sampler == "ddim" \
        else noise
    x0, s0 = spy.calls[0]
    keep = (slice(None), slice(None), slice(None), slice(0, 4))
    assert torch.allclose(x0[keep], samples[keep] * scale + blend_noise[keep] * s0[0])
    assert torch.allclose(x0[:, :, :, 4:], (noise * math.sqrt(1 + float(s0[0]) ** 2) + samples * scale)[:, :, :, 4:])
    assert torch.allclose(out.samples[keep], samples[keep], atol=1e-5)  # unmasked part kept
    assert torch.allclose(out.samples[:, :, :, 4:], torch.zeros(1, 4, 8, 4), atol=1e-5)
    assert out.noise_mask is mask


# ---------------------------------------------------------------------------------------------------------------
# Samplers on analytic denoisers

MU, S = 0.7, 0.5


def gaussian_denoiser(x, sigma):
    sig = sigma.view(-1, 1, 1, 1)
    return MU + S ** 2 / (S ** 2 + sig ** 2) * (x - MU)


def run(name, steps, seed=42, denoiser=gaussian_denoiser, scheduler="karras", shape=(1, 4, 64, 64)):
    sigmas = sigmas_for(scheduler, steps, sampler_name=name)
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x_t = MU + eps * (S ** 2 + sigmas[0] ** 2) ** 0.5
    out = SAMPLERS[name](denoiser, x_t, sigmas, noise_sampler=noise_sampler_for(name, x_t, sigmas, seed))
    return out, MU + eps * S


@pytest.mark.parametrize("name", SUPPORTED_SAMPLERS)
def test_point_mass_converges(name):
    out, _ = run(name, 20, denoiser=lambda x, sigma: torch.full_like(x, MU), shape=(1, 4, 16, 16))
    # UniPC stops at σ = 0.001 instead of 0 (as ComfyUI runs it): a residual of 0.001·ε is left.
    tolerance = 6e-3 if name.startswith("uni_pc") else 1e-5
    assert torch.allclose(out, torch.full_like(out, MU), atol=tolerance)


ODE_TOLERANCE_30 = {  # max |x − exact| at 30 karras steps (measured ≈ 0.13, 0.01, 2e-5, 8e-3, 0.01, 7e-3)
    "euler": 0.2, "ddim": 0.2, "heun": 0.02, "dpm_2": 2e-3, "lms": 0.02, "dpmpp_2m": 0.02, "uni_pc": 0.015,
    "uni_pc_bh2": 0.015,
}


@pytest.mark.parametrize("name", sorted(ODE_TOLERANCE_30))
def test_ode_samplers_follow_the_exact_flow(name):
    out, exact = run(name, 30)
    assert float((out - exact).abs().max()) < ODE_TOLERANCE_30[name]
    out2, _ = run(name, 30, seed=999)
    assert torch.equal(out, out2)  # no randomness after the initial noise


def test_order_of_accuracy():
    def err(name, steps):
        out, exact = run(name, steps, shape=(1, 4, 16, 16))
        return float((out - exact).abs().max())

    e_euler, e_heun, e_2m, e_unipc = (err(n, 20) for n in ("euler", "heun", "dpmpp_2m", "uni_pc"))
    assert e_heun < e_euler / 4 and e_2m < e_euler / 4 and e_unipc < e_2m
    assert err("euler", 40) < err("euler", 20) * 0.7  # first order: halves roughly
    assert err("heun", 40) < err("heun", 20) * 0.4  # second order: quarters roughly


@pytest.mark.parametrize("name", sorted(ANCESTRAL_SAMPLERS | SDE_SAMPLERS))
def test_stochastic_samplers(name):
    out, exact = run(name, 30)
    assert float(out.mean()) == pytest.approx(MU, abs=0.015)
    assert float(out.std()) == pytest.approx(S, abs=0.06)
    again, _ = run(name, 30)
    assert torch.equal(out, again)
    other, _ = run(name, 30, seed=43)
    assert not torch.allclose(out, other)
    assert not torch.allclose(out, exact, atol=0.1)  # it is not the ODE


def test_ancestral_noise_stream_is_comfyuis():
    x = torch.zeros(1, 4, 8, 8)
    ns = SeededGaussianNoise(x, 5)
    first, second = ns(None, None), ns(None, None)
    g = torch.Generator().manual_seed(6)  # CPU: seed + 1
    assert torch.equal(first, torch.randn(x.shape, generator=g))
    assert torch.equal(second, torch.randn(x.shape, generator=g))


# The SDE samplers' noise, as ComfyUI 0.3.64 builds it (k_diffusion/sampling.py, the Brownian-tree noise sampler
# that sample_dpmpp_sde / sample_dpmpp_2m_sde create with cpu=True and the KSampler seed):
# * one torchsde.BrownianTree per seed, on the CPU, over [t0, t1] = [min of the positive σ, max σ], starting at
#   w0 = zeros of the latent's shape and dtype, entropy = seed, torchsde's other defaults;
# * a query (σ, σ') asks the tree for the increment between the two as ascending float32 CPU times, moves it to
#   σ's device and dtype, negates it when σ > σ' (the samplers always query descending pairs), and divides it
#   by √|σ' − σ| computed from the σ tensors;
# * a list of seeds (one per batch item) builds one tree of one item's shape per seed and stacks the results.


def reference_noise(shape, sigmas, seed, queries):
    import torchsde

    positive = sigmas[sigmas > 0]
    tree = torchsde.BrownianTree(float(positive.min()), torch.zeros(shape), float(sigmas.max()), entropy=seed)
    out = []
    for a, b in queries:
        low, high = (a, b) if a < b else (b, a)
        w = tree(float(low), float(high))
        out.append((w if a < b else -w) / (b - a).abs().sqrt())
    return out


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # torchsde: a query at the rounded end of [t0, t1]
@pytest.mark.parametrize("seed", [0, 42, 2 ** 64 - 1])
def test_sde_noise_is_torchsdes_brownian_tree(seed, one_thread):
    sigmas = sigmas_for("karras", 12)
    x = torch.zeros(2, 4, 8, 8)
    queries = [(sigmas[i], sigmas[i + 1]) for i in range(11)] + [(sigmas[3], sigmas[2]), (sigmas[5], sigmas[9])]
    ours = noise_sampler_for("dpmpp_2m_sde", x, sigmas, seed)
    assert isinstance(ours, BrownianIncrementNoise)
    expected = reference_noise(x.shape, sigmas, seed, queries)
    for (a, b), want in zip(queries, expected, strict=True):
        got = ours(a, b)
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert torch.equal(got, want)
    # the same seed gives the same noise whatever the sampler object; another seed other noise
    again = noise_sampler_for("dpmpp_sde", x, sigmas, seed)
    assert torch.equal(again(sigmas[0], sigmas[1]), expected[0])
    other = noise_sampler_for("dpmpp_sde", x, sigmas, seed ^ 1)
    assert not torch.equal(other(sigmas[0], sigmas[1]), expected[0])


def test_sde_noise_batches(one_thread):
    sigmas = sigmas_for("normal", 8)
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    # one seed: one tree over the whole batch, so the items get different noise
    whole = BrownianIncrementNoise(torch.zeros(3, 4, 8, 8), lo, hi, 7)(sigmas[1], sigmas[2])
    assert not torch.equal(whole[0], whole[1])
    # one seed per item: item i is what a one-item tree of seed i gives
    per_item = BrownianIncrementNoise(torch.zeros(3, 4, 8, 8), lo, hi, [7, 8, 7])(sigmas[1], sigmas[2])
    single = {s: BrownianIncrementNoise(torch.zeros(1, 4, 8, 8), lo, hi, [s])(sigmas[1], sigmas[2])[0]
              for s in (7, 8)}
    assert torch.equal(per_item[0], single[7]) and torch.equal(per_item[2], single[7])
    assert torch.equal(per_item[1], single[8])
    with pytest.raises(ValueError, match="one seed per batch item"):
        BrownianIncrementNoise(torch.zeros(2, 4, 8, 8), lo, hi, [1, 2, 3])


def test_sde_noise_is_standard_normal_and_brownian(one_thread):
    sigmas = sigmas_for("karras", 10)
    ns = noise_sampler_for("dpmpp_2m_sde", torch.zeros(1, 20000), sigmas, 3)
    a, b = ns(sigmas[2], sigmas[3]), ns(sigmas[3], sigmas[4])
    assert float(a.mean()) == pytest.approx(0.0, abs=0.03) and float(a.std()) == pytest.approx(1.0, rel=0.03)
    assert abs(float((a * b).mean())) < 0.03  # disjoint steps: independent
    # consistency of the path: the step over [σ4, σ2] is the two steps added, with their lengths as weights
    whole = ns(sigmas[2], sigmas[4])
    joined = (a * (sigmas[2] - sigmas[3]).sqrt() + b * (sigmas[3] - sigmas[4]).sqrt()) / (sigmas[2] - sigmas[4]).sqrt()
    assert torch.allclose(whole, joined, atol=1e-4)
    assert torch.equal(ns(sigmas[3], sigmas[2]), -a)


def test_sde_samplers_query_the_noise_comfyui_does():
    """dpmpp_sde asks for (σ, σ_mid) and (σ, σ_next) per step, σ_mid = e^(−λ_mid) at the midpoint of
    λ = −log σ; dpmpp_2m_sde asks for (σ, σ_next); neither asks on the last step to σ = 0."""
    sigmas = sigmas_for("karras", 5)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 15
    for name in ("dpmpp_sde", "dpmpp_2m_sde"):
        asked = []

        def recorder(a, b, asked=asked):
            asked.append((a, b))
            return torch.zeros_like(x)

        SAMPLERS[name](gaussian_denoiser, x, sigmas, noise_sampler=recorder)
        expected = []
        for i in range(4):
            if name == "dpmpp_sde":
                lam, lam_next = -sigmas[i].log(), -sigmas[i + 1].log()
                expected.append((sigmas[i], (-(lam + 0.5 * (lam_next - lam))).exp()))
            expected.append((sigmas[i], sigmas[i + 1]))
        assert [(float(a), float(b)) for a, b in asked] == [(float(a), float(b)) for a, b in expected]


def test_torchsde_is_imported_only_by_the_sde_samplers():
    code = ("import sys, torch; from airflow_comfy.runner.sampling import ksampler; "
            "from airflow_comfy.runner.sampling.samplers import noise_sampler_for; "
            "s = torch.tensor([14.6, 3.0, 0.0]); x = torch.zeros(1, 4, 2, 2); "
            "noise_sampler_for('euler_ancestral', x, s, 0); assert 'torchsde' not in sys.modules; "
            "noise_sampler_for('dpmpp_sde', x, s, 0); assert 'torchsde' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lms_coefficients_are_exact_integrals():
    t = [14.6, 9.0, 5.5, 3.0, 1.2, 0.0]
    # order 2 at i = 1: ℓ_0(τ) = (τ − t0)/(t1 − t0), ℓ_1 = 1 − ℓ_0
    c0 = lms_coefficient(2, t, 1, 0)
    expected = ((t[2] - t[0]) ** 2 - (t[1] - t[0]) ** 2) / (2 * (t[1] - t[0]))
    assert c0 == pytest.approx(expected, rel=1e-13)
    for order in (1, 2, 3, 4):
        i = 3
        coeffs = [lms_coefficient(order, t, i, j) for j in range(order)]
        assert sum(coeffs) == pytest.approx(t[i + 1] - t[i], rel=1e-12)  # the basis sums to 1
    with pytest.raises(ValueError):
        lms_coefficient(4, t, 1, 0)


def kdiffusion_lms(model, x, sigmas, order=4):
    """k-diffusion's ``sample_lms`` and ``linear_multistep_coeff`` (MIT, Katherine Crowson), as ComfyUI 0.3.64
    runs them, written out from the published formula: the reference lms must equal bit for bit."""
    from scipy import integrate

    def coeff(order, t, i, j):
        def fn(tau):
            prod = 1.
            for k in range(order):
                if j == k:
                    continue
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
            return prod
        return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]

    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        ds.append((x - denoised) / sigmas[i][(None,) * x.ndim])
        if len(ds) > order:
            ds.pop(0)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur_order = min(i + 1, order)
            coeffs = [coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential"])
def test_lms_is_bit_for_bit_kdiffusions(scheduler):
    sigmas = sigmas_for(scheduler, 12, sampler_name="lms")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * sigmas[0]

    def denoise(x, sigma):  # smooth and nonlinear, so every coefficient's last bit shows in the result
        return torch.tanh(x / (1 + sigma[:, None, None, None] ** 2) ** 0.5) * 0.7 + 0.05 * x.roll(1, -1)

    assert torch.equal(SAMPLERS["lms"](denoise, x.clone(), sigmas), kdiffusion_lms(denoise, x.clone(), sigmas))


def unipc_reference(model, noise, sigmas, variant):
    """UniPC as ComfyUI 0.3.64's KSampler runs ``uni_pc`` / ``uni_pc_bh2``, written out from the authors'
    multistep B(h) solver with data prediction (https://github.com/wl-zhao/UniPC, MIT, Wenliang Zhao): the VE
    schedule seen as a VP process (α = 1/√(1+σ²)), the last σ = 0 replaced by 0.001, order min(3, steps − 1),
    lower orders on the final steps, no corrector after the last step, the result divided by α(σ_last)."""
    def log_alpha(s):
        return 0.5 * torch.log(1 / ((s * s) + 1))

    def std(s):
        return torch.sqrt(1. - torch.exp(2. * log_alpha(s)))

    def lam(s):
        return log_alpha(s) - 0.5 * torch.log(1. - torch.exp(2. * log_alpha(s)))

    def expand(v, dims):
        return v[(...,) + (None,) * (dims - 1)]

    def data_prediction(x, t):
        sigma = t.view(t.shape[:1] + (1,) * (x.ndim - 1))
        scaled = x * ((sigma ** 2 + 1.0) ** 0.5)
        eps = (scaled - model(scaled, t)) / sigma
        return (x - expand(std(t), x.dim()) * eps) / expand(torch.exp(log_alpha(t)), x.dim())

    def update(x, model_prev_list, t_prev_list, t, order, use_corrector):
        dims = x.dim()
        t_prev_0, model_prev_0 = t_prev_list[-1], model_prev_list[-1]
        lambda_prev_0 = lam(t_prev_0)
        alpha_t = torch.exp(log_alpha(t))
        h = lam(t) - lambda_prev_0
        rks, D1s = [], []
        for i in range(1, order):
            rk = ((lam(t_prev_list[-(i + 1)]) - lambda_prev_0) / h)[0]
            rks.append(rk)
            D1s.append((model_prev_list[-(i + 1)] - model_prev_0) / rk)
        rks.append(1.)
        rks = torch.tensor(rks, device=x.device)
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        B_h = hh if variant == "bh1" else torch.expm1(hh)
        R, b, factorial_i = [], [], 1
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R, b = torch.stack(R), torch.tensor(b, device=x.device)
        D1s = torch.stack(D1s, dim=1) if D1s else None
        if D1s is not None:
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_t_ = expand(std(t) / std(t_prev_0), dims) * x - expand(alpha_t * h_phi_1, dims) * model_prev_0
        pred_res = torch.einsum("k,bkchw->bchw", rhos_p, D1s) if D1s is not None else 0
        x_t = x_t_ - expand(alpha_t * B_h, dims) * pred_res
        if not use_corrector:
            return x_t, None
        rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
        model_t = data_prediction(x_t, t)
        corr_res = torch.einsum("k,bkchw->bchw", rhos_c[:-1], D1s) if D1s is not None else 0
        return x_t_ - expand(alpha_t * B_h, dims) * (corr_res + rhos_c[-1] * (model_t - model_prev_0)), model_t

    timesteps = sigmas.clone()
    if timesteps[-1] == 0:
        timesteps[-1] = 0.001
    x = noise / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    steps, order = len(timesteps) - 1, min(3, len(timesteps) - 2)
    t_prev_list = [timesteps[0].expand(x.shape[0])]
    model_prev_list = [data_prediction(x, t_prev_list[0])]
    for step in range(1, order):
        t = timesteps[step].expand(x.shape[0])
        x, model_x = update(x, model_prev_list, t_prev_list, t, step, True)
        t_prev_list.append(t)
        model_prev_list.append(model_x)
    for step in range(order, steps + 1) if order > 0 else ():
        t = timesteps[step].expand(x.shape[0])
        x, model_x = update(x, model_prev_list, t_prev_list, t, min(order, steps + 1 - step), step != steps)
        t_prev_list = t_prev_list[1:] + [t]
        if step < steps:
            model_prev_list = model_prev_list[1:] + [model_x]
    return x / torch.exp(log_alpha(timesteps[-1]))


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 9])
def test_uni_pc_is_bit_for_bit_the_reference(name, steps):
    sigmas = sigmas_for("karras" if steps % 2 else "normal", steps, sampler_name=name)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps)) * sigmas[0]

    def denoise(x, sigma):
        return torch.tanh(x / (1 + sigma[:, None, None, None] ** 2) ** 0.5) * 0.7 + 0.05 * x.roll(1, -1)

    variant = "bh2" if name.endswith("bh2") else "bh1"
    assert torch.equal(SAMPLERS[name](denoise, x.clone(), sigmas), unipc_reference(denoise, x.clone(), sigmas, variant))


def test_callback_once_per_step():
    for name in SUPPORTED_SAMPLERS:
        seen = []
        sigmas = sigmas_for("normal", 6, sampler_name=name)
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 15
        SAMPLERS[name](gaussian_denoiser, x, sigmas, noise_sampler=noise_sampler_for(name, x, sigmas, 0),
                       callback=lambda i, x, d, seen=seen: seen.append(i))
        assert seen == list(range(6)), name


# ---------------------------------------------------------------------------------------------------------------
# CFG denoiser with a fake UNet


class FakeUNet(torch.nn.Module):
    """ε = 0.1·sample + mean(text embedding) + t/1000 + mean(mid residual): easy to predict by hand."""

    def __init__(self, sdxl: bool = False, in_channels: int = 4, time_ids: int = 6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(in_channels=in_channels,
                                      addition_embed_type="text_time" if sdxl else None,
                                      addition_time_embed_dim=256 if sdxl else None,
                                      projection_class_embeddings_input_dim=1280 + time_ids * 256 if sdxl else None)
        self.calls: list[dict] = []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None):
        self.calls.append(dict(sample=sample.clone(), t=timestep.clone(), ctx=encoder_hidden_states.clone(),
                               added=added_cond_kwargs, down=down_block_additional_residuals,
                               mid=mid_block_additional_residual))
        eps = 0.1 * sample[:, :4] + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1) \
            + (timestep / 1000).view(-1, 1, 1, 1)
        if mid_block_additional_residual is not None:
            eps = eps + mid_block_additional_residual.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=eps)


def text(value: float, tokens: int = 77) -> torch.Tensor:
    return torch.full((1, tokens, 8), float(value))


def fake_model(unet=None) -> DiffusionModel:
    return DiffusionModel(unet=unet or FakeUNet(), family="sd1", latent_scale=0.18215,
                          recipe=Recipe("CheckpointLoaderSimple", "fake.safetensors"))


def expected_denoised(x, sigma, value):
    t = float(MS.sigma_to_t(torch.tensor([sigma]))[0])
    eps = 0.1 * x / math.sqrt(sigma ** 2 + 1) + value + t / 1000
    return x - eps * sigma


def test_cfg_batches_uncond_then_cond_with_integer_timesteps():
    model = fake_model()
    den = CFGDenoiser(model, [CondEntry(text(1.0))], [CondEntry(text(-1.0))], 7.5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.full((2,), 2.5)
    out = den(x, sigma)
    (call,) = model.unet.calls
    assert call["ctx"][:, 0, 0].tolist() == [-1.0, -1.0, 1.0, 1.0]  # [uncond × B, cond × B]
    t = call["t"]
    assert t.dtype == torch.float32 and torch.equal(t, t.round()) and t.shape == (4,)
    assert float(t[0]) == float(MS.sigma_to_t(torch.tensor([2.5]))[0])
    assert torch.allclose(call["sample"], torch.cat([x, x]) / math.sqrt(2.5 ** 2 + 1))
    d_c, d_u = expected_denoised(x, 2.5, 1.0), expected_denoised(x, 2.5, -1.0)
    assert torch.allclose(out, d_u + (d_c - d_u) * 7.5, atol=1e-5)


def test_cfg_one_skips_uncond():
    model = fake_model()
    den = CFGDenoiser(model, [CondEntry(text(1.0))], [CondEntry(text(-1.0))], 1.0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = den(x, torch.tensor([1.3]))
    (call,) = model.unet.calls
    assert call["ctx"].shape[0] == 1 and float(call["ctx"][0, 0, 0]) == 1.0
    assert torch.allclose(out, expected_denoised(x, 1.3, 1.0), atol=1e-6)


def test_v_prediction_denoised():
    ms = ModelSampling("v")
    x = torch.randn(1, 4, 2, 2)
    v = torch.randn(1, 4, 2, 2)
    sigma = torch.tensor([3.0])
    expected = x / 10 - v * 3.0 / math.sqrt(10)
    assert torch.allclose(ms.calculate_denoised(sigma, v, x), expected, atol=1e-6)


def test_area_conditioning_weighted_average():
    model = fake_model()
    full = CondEntry(text(1.0))
    left = CondEntry(text(3.0), area=(16, 8, 0, 0), strength=2.0)  # left half, touches top/bottom/left borders
    den = CFGDenoiser(model, [full, left], [CondEntry(text(0.0))], 1.0)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    out = den(x, torch.tensor([1.0]))
    # weights of the area entry: strength 2, feathered over min(8, 8//4) = 2 columns at its right edge only
    w = torch.zeros(16)
    w[:8] = 2.0
    w[7] *= 0.5
    w[6] *= 1.0
    w = w.view(1, 1, 1, 16)
    d_full, d_left = expected_denoised(x, 1.0, 1.0), expected_denoised(x, 1.0, 3.0)
    expected = (d_full + d_left * w) / (1 + w)
    assert torch.allclose(out, expected, atol=1e-5)
    # different input sizes: two UNet calls; the area entry sees only its slice
    assert sorted(tuple(c["sample"].shape) for c in model.unet.calls) == [(1, 4, 16, 8), (1, 4, 16, 16)]


def test_area_feathering_inside_the_latent():
    den = CFGDenoiser(fake_model(), [], [], 1.0)
    item = den._item(CondEntry(text(0.0), area=(16, 16, 8, 8), strength=1.0), 0, torch.zeros(1, 4, 40, 40))
    ramp = [(t + 1) / 4 for t in range(4)]  # rr = min(8, 16 // 4) = 4 on all four inner edges
    assert item.mult[0, 0, :4, 8].tolist() == pytest.approx(ramp)
    assert item.mult[0, 0, -4:, 8].tolist() == pytest.approx(ramp[::-1])
    assert item.mult[0, 0, 0, 0] == pytest.approx(1 / 16)
    clamped = den._item(CondEntry(text(0.0), area=(100, 100, 30, 30)), 0, torch.zeros(1, 4, 40, 40))
    assert clamped.area == (10, 10, 30, 30)


def test_token_lengths_are_repeated_to_their_lcm_when_batched():
    model = fake_model()
    den = CFGDenoiser(model, [CondEntry(text(1.0, 154))], [CondEntry(text(-1.0, 77))], 3.0)
    den(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))
    (call,) = model.unet.calls
    assert call["ctx"].shape == (2, 154, 8)


def test_sdxl_added_conds():
    model = fake_model(FakeUNet(sdxl=True))
    pooled = torch.randn(1, 1280)
    pos = CondEntry(text(1.0), pooled_output=pooled, extra={"width": 1024, "height": 768, "crop_w": 8})
    neg = CondEntry(text(0.0), pooled_output=torch.zeros(1, 1280))
    den = CFGDenoiser(model, [pos], [neg], 5.0)
    den(torch.zeros(2, 4, 16, 12), torch.tensor([1.0, 1.0]))
    added = model.unet.calls[0]["added"]
    defaults = [128.0, 96.0, 0.0, 0.0, 128.0, 96.0]  # (height, width, crop_h, crop_w, target_h, target_w) = latent × 8
    given = [768.0, 1024.0, 0.0, 8.0, 768.0, 1024.0]
    assert added["time_ids"].tolist() == [defaults] * 2 + [given] * 2
    assert torch.equal(added["text_embeds"][2:], pooled.repeat(2, 1))


def test_sdxl_refiner_aesthetic_score():
    model = fake_model(FakeUNet(sdxl=True, time_ids=5))
    pos = CondEntry(text(1.0), pooled_output=torch.zeros(1, 1280))
    neg = CondEntry(text(0.0), pooled_output=torch.zeros(1, 1280), extra={"aesthetic_score": 3.0})
    CFGDenoiser(model, [pos], [neg], 5.0)(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))
    assert model.unet.calls[0]["added"]["time_ids"].tolist() == [[64.0, 64.0, 0, 0, 3.0], [64.0, 64.0, 0, 0, 6.0]]


def control_ref(strength, start, end, previous=None):
    cn = ControlNet(model=torch.nn.Identity(), recipe=Recipe("ControlNetLoader", "cn.safetensors"))
    return ControlRef(control_net=cn, hint=torch.zeros(1, 64, 64, 3), strength=strength, start_percent=start,
                      end_percent=end, previous=previous)


def test_control_hook_window_strength_and_chain():
    calls = []

    def control_fn(control, x_in, t, cond, percent, batched_number=None):
        calls.append((control, float(t[0]), percent, x_in.shape[0], cond.shape[0], batched_number))
        return [], torch.ones(x_in.shape[0], 1, 1, 1) * (10.0 if control.strength == 0.5 else 1.0)

    first = control_ref(1.0, 0.0, 1.0)
    second = control_ref(0.5, 0.0, 0.5, previous=first)
    model = fake_model()
    den = CFGDenoiser(model, [CondEntry(text(0.0), control=second)], [CondEntry(text(0.0), control=second)], 2.0,
                      control_fn=control_fn)
    x = torch.zeros(1, 4, 8, 8)
    high = float(MS.sigmas[900])  # early in the run: percent ≈ 0.1
    den(x, torch.tensor([high]))
    assert [c[0] for c in calls] == [first, second]
    assert calls[0][2] == pytest.approx(1 - 900 / 999)
    assert calls[0][3:] == (2, 2, 2)  # cond and uncond share the control: one batched call of 2 entries
    mid = model.unet.calls[-1]["mid"]
    assert torch.allclose(mid, torch.full_like(mid, 1.0 * 1.0 + 10.0 * 0.5))
    calls.clear()
    low = float(MS.sigmas[100])  # late: percent ≈ 0.9, outside the second control's window
    den(x, torch.tensor([low]))
    assert [c[0] for c in calls] == [first]
    assert torch.allclose(model.unet.calls[-1]["mid"], torch.ones(2, 1, 1, 1))


def test_control_apply_to_uncond_and_batching_by_control_identity():
    ref = control_ref(1.0, 0.0, 1.0)
    pos = [CondEntry(text(1.0), control=ref, control_apply_to_uncond=True)]
    neg = [CondEntry(text(-1.0))]
    filled = fill_uncond_controls(pos, neg)
    assert filled[0].control is ref and neg[0].control is None
    model = fake_model()
    den = CFGDenoiser(model, [CondEntry(text(1.0), control=ref)], [CondEntry(text(-1.0))], 2.0)
    den(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))
    assert len(model.unet.calls) == 2  # different controls cannot share a call


def test_inpainting_unet_gets_mask_and_latent_channels():
    model = fake_model(FakeUNet(in_channels=9))
    den = CFGDenoiser(model, [CondEntry(text(1.0))], [], 1.0)
    noise = torch.zeros(1, 4, 8, 8)
    den.prepare(torch.full((1, 4, 8, 8), 0.3), torch.ones(1, 4, 8, 8) * 0.7, noise)
    den(noise, torch.tensor([1.0]))
    sample_in = model.unet.calls[0]["sample"]
    assert sample_in.shape == (1, 9, 8, 8)
    assert torch.all(sample_in[:, 4] == 1.0) and torch.allclose(sample_in[:, 5:], torch.full((1, 4, 8, 8), 0.3))
    den.prepare(torch.zeros(1, 4, 8, 8), None, noise)
    assert den.concat[0, 1:, 0, 0].tolist() == pytest.approx([0.8223, -0.6876, 0.6364, 0.1380])


# ---------------------------------------------------------------------------------------------------------------
# The nodes end to end (fake UNet) and progress


def test_ksampler_end_to_end_with_progress():
    lines = []
    clock = iter(range(100))
    progress = StepProgress("KSampler", lines.append, clock=lambda: float(next(clock)))
    model = fake_model()
    latent = Latent(torch.zeros(1, 4, 8, 8))
    out = ksampler(model, latent, seed=1, steps=4, cfg=3.0, sampler_name="dpmpp_2m", scheduler="karras",
                   positive=[CondEntry(text(0.1))], negative=[CondEntry(text(0.0))], progress=progress)
    assert out.samples.shape == (1, 4, 8, 8) and torch.isfinite(out.samples).all()
    assert len(model.unet.calls) == 4
    assert lines[0] == "KSampler: step 1/4, elapsed 1.0s, ETA 3.0s"
    assert lines[-1].startswith("KSampler: step 4/4")
    again = ksampler(fake_model(), latent, seed=1, steps=4, cfg=3.0, sampler_name="dpmpp_2m", scheduler="karras",
                     positive=[CondEntry(text(0.1))], negative=[CondEntry(text(0.0))])
    assert torch.equal(out.samples, again.samples)


def test_ksampler_advanced_two_passes_equal_one():
    """Base + refiner style: steps 0-6 with leftover noise, then 6-end without adding noise."""
    kwargs = dict(steps=10, cfg=2.0, sampler_name="euler", scheduler="normal",
                  positive=[CondEntry(text(0.2))], negative=[CondEntry(text(0.0))])
    latent = Latent(torch.zeros(1, 4, 8, 8))
    one = ksampler_advanced(fake_model(), latent, add_noise="enable", noise_seed=5, **kwargs)
    first = ksampler_advanced(fake_model(), latent, add_noise="enable", noise_seed=5, start_at_step=0,
                              end_at_step=6, return_with_leftover_noise="enable", **kwargs)
    second = ksampler_advanced(fake_model(), first, add_noise="disable", noise_seed=5, start_at_step=6,
                               end_at_step=10000, return_with_leftover_noise="disable", **kwargs)
    assert torch.allclose(one.samples, second.samples, atol=1e-4)


def test_progress_every_and_format():
    lines = []
    t = iter([0.0, 90.0, 180.0])
    p = StepProgress("s", lines.append, every=2, clock=lambda: next(t))
    p(1, 3)
    p(2, 3)
    p(3, 3)
    assert lines == ["s: step 2/3, elapsed 1m30s, ETA 45.0s", "s: step 3/3, elapsed 3m00s, ETA 0.0s"]


# ---------------------------------------------------------------------------------------------------------------
# A real (tiny) diffusers UNet: the keyword interface and ControlNet residual plumbing


def test_tiny_diffusers_unet_through_ksampler():
    from diffusers.models.unets import unet_2d_condition as unet_module
    torch.manual_seed(0)
    tiny = dict(sample_size=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=32)
    unet = unet_module.UNet2DConditionModel(in_channels=4, **tiny).eval()
    model = DiffusionModel(unet=unet, family="sd1", latent_scale=0.18215, recipe=Recipe("x", "tiny"))
    pos, neg = [CondEntry(torch.randn(1, 77, 32))], [CondEntry(torch.zeros(1, 77, 32))]
    latent = Latent(torch.zeros(1, 4, 8, 8))
    plain = ksampler(model, latent, seed=3, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal",
                     positive=pos, negative=neg)
    assert torch.isfinite(plain.samples).all()

    seen = []

    def zero_control(control, x_in, t, cond, percent):
        # one residual per skip connection: conv_in, block 0 (resnet, downsampler), block 1 (resnet); then mid
        n = x_in.shape[0]
        seen.append((tuple(x_in.shape), tuple(t.shape), tuple(cond.shape)))
        down = [torch.zeros(n, 32, 8, 8), torch.zeros(n, 32, 8, 8), torch.zeros(n, 32, 4, 4),
                torch.zeros(n, 64, 4, 4)]
        return down, torch.zeros(n, 64, 4, 4)

    ref = control_ref(1.0, 0.0, 1.0)
    with_control = ksampler(model, latent, seed=3, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal",
                            positive=[CondEntry(pos[0].cond, control=ref)], negative=[CondEntry(neg[0].cond,
                                                                                                control=ref)],
                            control_fn=zero_control)
    assert seen == [((2, 4, 8, 8), (2,), (2, 77, 32))] * 3
    assert torch.allclose(with_control.samples, plain.samples, atol=1e-5)

    # SDXL-style (text_time) and inpainting (9-channel) UNets accept what the denoiser sends them
    sdxl = unet_module.UNet2DConditionModel(in_channels=4, addition_embed_type="text_time", addition_time_embed_dim=8,
                                            projection_class_embeddings_input_dim=16 + 6 * 8, **tiny).eval()
    model = DiffusionModel(unet=sdxl, family="sdxl", latent_scale=0.13025, recipe=Recipe("x", "tiny-xl"))
    pos = [CondEntry(torch.randn(1, 77, 32), pooled_output=torch.randn(1, 16))]
    neg = [CondEntry(torch.zeros(1, 77, 32), pooled_output=torch.zeros(1, 16))]
    out = ksampler(model, latent, seed=3, steps=3, cfg=4.0, sampler_name="uni_pc", scheduler="karras",
                   positive=pos, negative=neg)
    assert torch.isfinite(out.samples).all()
    inpaint = unet_module.UNet2DConditionModel(in_channels=9, **tiny).eval()
    model = DiffusionModel(unet=inpaint, family="sd1", latent_scale=0.18215, recipe=Recipe("x", "tiny-inpaint"))
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0
    out = ksampler(model, Latent(torch.randn(1, 4, 8, 8), noise_mask=mask), seed=3, steps=3, cfg=4.0,
                   sampler_name="dpmpp_2m_sde", scheduler="karras", positive=[CondEntry(torch.randn(1, 77, 32))],
                   negative=[CondEntry(torch.zeros(1, 77, 32))])
    assert torch.isfinite(out.samples).all()


def test_module_exports():
    assert cfg_mod.COND == 0 and cfg_mod.UNCOND == 1
