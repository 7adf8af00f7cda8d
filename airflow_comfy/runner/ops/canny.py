"""The Canny node (ComfyUI's ``comfy_extras/nodes_canny.py``): kornia's ``filters.canny`` with its defaults,
reimplemented without kornia.

ComfyUI's node runs ``kornia.filters.canny(image, low, high)`` on the channels-first image and returns the
edge map (kornia's second output) repeated to three channels. kornia's algorithm, step by step:

1. RGB → grey as ``0.299·R + 0.587·G + 0.114·B`` (one-channel input is used as is);
2. 5×5 Gaussian blur, σ = 1, separable, reflected borders (``torch`` ``reflect`` padding, edge not repeated);
3. Sobel gradients, **unnormalised** 3×3 kernels (``[-1 0 1; -2 0 2; -1 0 1]`` and its transpose, as
   cross-correlation), replicated borders: a 0→1 step gives a magnitude of about 4 before blurring, which is
   why thresholds such as 0.4 / 0.8 make sense;
4. magnitude ``sqrt(gx² + gy² + 1e-6)``, direction ``atan2(gy, gx)`` rounded to the nearest multiple of 45°;
5. non-maximum suppression: a pixel survives if its magnitude is strictly larger than both neighbours along
   the rounded direction (zero outside the image);
6. double threshold (strictly above ``low`` = weak, strictly above ``high`` = strong);
7. hysteresis: weak pixels 8-connected to strong ones become strong, repeated until nothing changes; the
   result is 1 on strong pixels and 0 elsewhere.

Differences from ComfyUI + kornia: an RGBA image is reduced to its RGB channels first (ComfyUI/kornia fail on
four channels); the hysteresis propagates several steps between convergence checks, which reaches the same
fixed point with fewer checks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
KERNEL_SIZE = 5
SIGMA = 1.0
EPS = 1e-6

# Neighbour offsets (dy, dx) for the rounded direction index k = round(angle / 45°) mod 8 (y points down).
_DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def _to_gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] == 3:
        r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        w_r, w_g, w_b = (torch.tensor(w, dtype=x.dtype, device=x.device) for w in GRAY_WEIGHTS)
        return w_r * r + w_g * g + w_b * b
    if x.shape[1] != 1:
        raise ValueError(f"Canny expects 1, 3 or 4 channels, got {x.shape[1]}")
    return x


def gaussian_kernel1d(size: int = KERNEL_SIZE, sigma: float = SIGMA, dtype=torch.float32) -> torch.Tensor:
    """Normalised Gaussian weights at the integer offsets around the centre (kornia's ``gaussian``)."""
    offsets = torch.arange(size, dtype=dtype) - size // 2
    if size % 2 == 0:
        offsets = offsets + 0.5
    sigma_t = torch.tensor(sigma, dtype=dtype)
    weights = torch.exp(-offsets.pow(2.0) / (2 * sigma_t.pow(2.0)))
    return weights / weights.sum()


def gaussian_blur(x: torch.Tensor, size: int = KERNEL_SIZE, sigma: float = SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 1, H, W]``: horizontal pass then vertical, each with reflect padding."""
    kernel = gaussian_kernel1d(size, sigma, x.dtype).to(x.device)
    half = size // 2
    out = F.conv2d(F.pad(x, (half, half, 0, 0), mode="reflect"), kernel.reshape(1, 1, 1, size))
    return F.conv2d(F.pad(out, (0, 0, half, half), mode="reflect"), kernel.reshape(1, 1, size, 1))


def sobel_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised Sobel ``(gx, gy)`` of ``[B, 1, H, W]`` with replicated borders."""
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    kernels = torch.stack([sobel_x, sobel_x.t()]).unsqueeze(1)
    grads = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels)
    return grads[:, 0:1], grads[:, 1:2]


def _neighbour(padded: torch.Tensor, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    """``value[y + dy, x + dx]`` from a 1-pixel zero-padded map."""
    return padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def non_max_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Keep the magnitude where it beats both neighbours along the gradient direction (rounded to 45°)."""
    height, width = magnitude.shape[-2:]
    sector = torch.round(torch.atan2(gy, gx) * (4 / math.pi))
    forward = torch.remainder(sector, 8).long()
    backward = torch.remainder(sector + 4, 8).long()
    padded = F.pad(magnitude, (1, 1, 1, 1))
    neighbours = torch.stack([_neighbour(padded, dy, dx, height, width) for dy, dx in _DIRECTIONS])
    ahead = neighbours.gather(0, forward.unsqueeze(0)).squeeze(0)
    behind = neighbours.gather(0, backward.unsqueeze(0)).squeeze(0)
    is_max = (magnitude - ahead > 0) & (magnitude - behind > 0)
    return magnitude * is_max


def hysteresis(weak: torch.Tensor, strong: torch.Tensor, steps_per_check: int = 8) -> torch.Tensor:
    """Grow ``strong`` through 8-connected ``weak`` pixels until stable (boolean ``[B, 1, H, W]`` maps)."""
    weak = weak & ~strong
    while True:
        before = strong
        for _ in range(steps_per_check):
            grown = F.max_pool2d(strong.float(), kernel_size=3, stride=1, padding=1) > 0
            strong = strong | (weak & grown)
        if torch.equal(before, strong):
            return strong


def canny_edges(x: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kornia-equivalent ``canny(x [B, C, H, W], low, high)`` → ``(magnitude, edges)``, both ``[B, 1, H, W]``."""
    if not low <= high:
        raise ValueError(f"Canny: low_threshold ({low}) must not be larger than high_threshold ({high})")
    for label, value in (("low_threshold", low), ("high_threshold", high)):
        if not 0 < value < 1:
            raise ValueError(f"Canny: {label} must be in (0, 1), got {value}")
    dtype = x.dtype
    gray = _to_gray(x)
    blurred = gaussian_blur(gray)
    gx, gy = sobel_gradients(blurred)
    magnitude = torch.sqrt(gx * gx + gy * gy + EPS)
    magnitude = non_max_suppression(magnitude, gx, gy)
    strong = hysteresis(magnitude > low, magnitude > high)
    return magnitude, strong.to(dtype)


def canny(image: torch.Tensor, low_threshold: float, high_threshold: float) -> torch.Tensor:
    """The Canny node: IMAGE ``[B, H, W, C]`` → IMAGE ``[B, H, W, 3]`` of 0/1 edges."""
    _, edges = canny_edges(image.movedim(-1, 1), low_threshold, high_threshold)
    return edges.repeat(1, 3, 1, 1).movedim(1, -1)


__all__ = ["canny", "canny_edges", "gaussian_blur", "gaussian_kernel1d", "hysteresis", "non_max_suppression",
           "sobel_gradients"]
