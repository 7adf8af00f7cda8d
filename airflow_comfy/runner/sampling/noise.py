"""The fresh noise that stochastic samplers add at each step, drawn the way ComfyUI 0.3.64 draws it.

A noise source is a callable ``source(σ, σ_next) -> Tensor`` giving standard-normal noise shaped like the
latent for the step from σ to σ_next.

* :class:`SeededGaussianNoise` — the ancestral samplers: one ``torch.Generator`` on the latent's device,
  seeded once, one ``randn`` of the latent's shape per call (σ is ignored).
* :class:`BrownianIncrementNoise` — the SDE samplers: the normalised increment
  ``(W(σ_next) − W(σ)) / √|σ_next − σ|`` of one seeded Brownian motion W over σ, so that noise of
  overlapping steps is correlated as the SDE requires. W is :class:`torchsde.BrownianTree` (Apache-2.0,
  imported only when such a source is built, so that a runner that never samples with an SDE solver does not
  load it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

_SEED_SPACE = 1 << 64


class SeededGaussianNoise:
    """``randn(latent.shape)`` per call from one generator on the latent's device.

    On the CPU the generator is seeded with ``seed + 1`` (as ComfyUI does): the initial noise comes from a CPU
    generator seeded with ``seed``, so the same seed would repeat it as the first step's noise. Without a seed
    the global generator is used.
    """

    def __init__(self, x: torch.Tensor, seed: int | None):
        self._like = x
        self._generator: torch.Generator | None = None
        if seed is not None:
            offset = 1 if x.device.type == "cpu" else 0
            self._generator = torch.Generator(device=x.device)
            self._generator.manual_seed((seed + offset) % _SEED_SPACE)

    def __call__(self, sigma: torch.Tensor | float | None = None,
                 sigma_next: torch.Tensor | float | None = None) -> torch.Tensor:
        like = self._like
        return torch.randn(like.size(), dtype=like.dtype, layout=like.layout, device=like.device,
                           generator=self._generator)


def _ordered(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(low, high, swapped)``: the two times in ascending order, and whether they came descending."""
    if a < b:
        return a, b, False
    return b, a, True


def _query_time(t: torch.Tensor) -> float:
    """A query time as the tree sees it: the float32 value of ``t`` (as a Python float)."""
    return float(t.detach().to(device="cpu", dtype=torch.float32))


class BrownianIncrementNoise:
    """Standard-normal noise from the increments of a seeded Brownian motion over σ (the SDE samplers').

    The motion lives on ``[min(σ_a, σ_b), max(σ_a, σ_b)]`` — in ComfyUI's samplers the smallest positive σ of
    the schedule and its largest — and starts at 0. It is a :class:`torchsde.BrownianTree` on the CPU (default
    tolerance and entropy pool) whose entropy is the seed, with samples of the latent's shape and dtype. With a
    sequence of seeds (one per batch item) each item gets its own tree of one item's shape and the results are
    stacked; without a seed a random one is drawn from torch's global generator.

    A call ``(σ, σ_next)`` asks the tree for the increment between the two times in ascending order (as float32
    values on the CPU), moves it to σ's device and dtype, restores the sign of the descending step, and divides
    by ``√|σ_next − σ|`` computed from the two σ tensors, which makes it standard normal.
    """

    def __init__(self, x: torch.Tensor, sigma_a: torch.Tensor | float, sigma_b: torch.Tensor | float,
                 seed: int | Sequence[int] | None):
        import torchsde  # deferred: only the SDE samplers pay for the import

        low, high, self._interval_swapped = _ordered(torch.as_tensor(sigma_a), torch.as_tensor(sigma_b))
        if seed is None:
            seed = int(torch.randint(0, 2 ** 63 - 1, ()).item())
        self._per_item = isinstance(seed, (list, tuple))
        seeds = list(seed) if self._per_item else [seed]
        if self._per_item and len(seeds) != x.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]}: one seed per batch item is needed")
        shape = x.shape[1:] if self._per_item else x.shape
        start = torch.zeros(shape, dtype=x.dtype, device="cpu")
        self._trees = [torchsde.BrownianTree(float(low), start, float(high), entropy=int(s))
                       for s in seeds]

    def _increment(self, low: float, high: float) -> torch.Tensor:
        with warnings.catch_warnings():
            # torchsde keeps the interval's ends rounded to its tolerance (1e-6) and warns when a query lies
            # beyond them, e.g. at the float32 σ_max itself; it then clamps the query, as ComfyUI's runs do too.
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            if self._per_item:
                return torch.stack([tree(low, high) for tree in self._trees])
            return self._trees[0](low, high)

    def __call__(self, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
        sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, swapped = _ordered(sigma, sigma_next)
        dw = self._increment(_query_time(low), _query_time(high)).to(device=low.device, dtype=low.dtype)
        if swapped != self._interval_swapped:
            dw = -dw
        return dw / (sigma_next - sigma).abs().sqrt()


__all__ = ["BrownianIncrementNoise", "SeededGaussianNoise"]
