"""The guided denoiser ``D(x; σ)`` the samplers call: UNet + conditioning + classifier-free guidance.

What one call does (ComfyUI 0.3.64 semantics: ``comfy/samplers.py`` ``calc_cond_batch``, ``cfg_function``):

1. every conditioning entry (positive = "cond", negative = "uncond"; the negative ones are skipped when
   ``cfg == 1``) takes its area of the latent (``CondEntry.area = (h, w, y, x)`` in latent units, clamped to the
   latent; no area = everything) and a weight map ``strength`` over that area, feathered linearly over
   ``min(8, size//4)`` rows/columns on every edge that does not touch the latent's border;
2. entries that can share a UNet call (same input shape, same ControlNet object, text embeddings whose token
   counts have a least common multiple at most 4× the shorter — they are repeated up to it, which leaves
   attention unchanged) are batched, in the order ComfyUI batches them (for the plain case: ``[uncond, cond]``);
3. the UNet sees ``x/√(σ²+1)`` and the *integer* timestep nearest to σ; its ε (or v) output becomes the
   denoised estimate ``d = x − ε·σ``;
4. per pixel, cond and uncond are the weight-averaged denoised values of their entries
   (``Σ w·d / (Σ w + 1e-37)``), and the result is ``d_u + (d_c − d_u)·cfg``.

SDXL-style UNets (``addition_embed_type == "text_time"``) get ``added_cond_kwargs``: ``text_embeds`` = the
entry's pooled output, ``time_ids`` = (height, width, crop_h, crop_w, target_height, target_width) from the
entry's ``extra`` (defaults: the latent size × 8, crops 0, target = size), or for the refiner's 5-id layout
(height, width, crop_h, crop_w, aesthetic_score) with aesthetic score 6 (positive) / 2.5 (negative).

ControlNets: an entry's ``control`` (a :class:`~airflow_comfy.runner.values.ControlRef`, chained through
``previous``) is evaluated by the injectable hook ``control_fn`` — ``control_fn(control, x_in, t, cond,
percent)`` returning the *unscaled* ``(down_residuals, mid_residual)`` or None, called with the UNet's scaled
input, its integer timesteps, the batched text embeddings and the run's progress in [0, 1]. A hook that
declares them (or ``**kwargs``) also gets ``added_cond_kwargs=`` (SDXL) and ``batched_number=`` (how many
conditioning entries share the call, e.g. 2 for [uncond, cond]). This module applies each control only while σ
lies between ``percent_to_sigma(start_percent)`` and ``percent_to_sigma(end_percent)``, multiplies its
residuals by ``strength`` and sums the chain. T2I-adapters (``control_net.kind == "t2i_adapter"``) are passed as
``down_intrablock_additional_residuals``. ControlNetApply's ``control_apply_to_uncond`` copies the positive's
control onto the negative entries without area that have none.

Inpainting UNets (``in_channels == latent channels + 5``) get ComfyUI's extra input channels
``[mask, masked latent]`` (or ``[1, "blank" latent]`` without a mask) through :meth:`CFGDenoiser.prepare`,
which :func:`~airflow_comfy.runner.sampling.ksampler.sample` calls before sampling.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from airflow_comfy.runner.sampling.schedule import ModelSampling
from airflow_comfy.runner.values import CondEntry, Conditioning, ControlRef, DiffusionModel

ControlResiduals = tuple[Sequence[torch.Tensor], "torch.Tensor | None"]
ControlFn = Callable[..., "ControlResiduals | None"]

COND, UNCOND = 0, 1

# The latent of an all-zero (mid-grey) image for SD 1.x-family VAEs: what an inpainting UNet is given as the
# masked image when the latent carries no mask (ComfyUI model_base.blank_inpaint_image_like).
_BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        reps = math.ceil(batch_size / tensor.shape[0])
        return tensor.repeat([reps] + [1] * (tensor.ndim - 1))[:batch_size]
    return tensor


@dataclass
class _Item:
    """One conditioning entry prepared for one model call (ComfyUI's ``cond_obj``)."""

    kind: int
    input_x: torch.Tensor
    mult: torch.Tensor
    area: tuple[int, int, int, int] | None  # (h, w, y, x), clamped
    cond: torch.Tensor  # [B, tokens, dim]
    text_embeds: torch.Tensor | None
    time_ids: torch.Tensor | None
    concat: torch.Tensor | None
    control: ControlRef | None


def _lcm_concat(conds: list[torch.Tensor]) -> torch.Tensor:
    length = conds[0].shape[1]
    for c in conds[1:]:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in conds])


def _cond_compatible(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape == b.shape:
        return True
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    return math.lcm(a.shape[1], b.shape[1]) // min(a.shape[1], b.shape[1]) <= 4


def _can_concat(a: _Item, b: _Item) -> bool:
    if a.input_x.shape != b.input_x.shape or a.control is not b.control:
        return False
    if not _cond_compatible(a.cond, b.cond):
        return False
    for x, y in ((a.text_embeds, b.text_embeds), (a.time_ids, b.time_ids), (a.concat, b.concat)):
        if (x is None) != (y is None) or (x is not None and x.shape != y.shape):
            return False
    return True


def fill_uncond_controls(positive: Conditioning, negative: Conditioning) -> Conditioning:
    """ControlNetApply's ``control_apply_to_uncond``: give the negative entries without area and without a
    control the controls of the flagged positive entries without area (round robin), unless some negative
    entry without area already has one."""
    cond_cnets = [e.control for e in positive
                  if e.control_apply_to_uncond and e.area is None and e.control is not None]
    if not cond_cnets:
        return list(negative)
    if any(e.area is None and e.control is not None for e in negative):
        return list(negative)
    others = [i for i, e in enumerate(negative) if e.area is None and e.control is None]
    if not others:
        return list(negative)
    out = list(negative)
    for k, control in enumerate(cond_cnets):
        i = others[k % len(others)]
        out[i] = replace(negative[i], control=control)
    return out


class CFGDenoiser:
    """``denoiser(x, sigma) -> denoised``: the classifier-free-guided denoiser of a :class:`DiffusionModel`.

    ``x`` is the noisy latent in model space (already × latent_scale), ``sigma`` a ``Tensor[B]``.
    ``max_batch`` caps how many conditioning entries share one UNet call (None = as many as can).
    """

    def __init__(self, model: DiffusionModel, positive: Conditioning, negative: Conditioning, cfg: float, *,
                 model_sampling: ModelSampling | None = None, control_fn: ControlFn | None = None,
                 max_batch: int | None = None):
        self.model = model
        self.unet = model.unet
        self.ms = model_sampling or ModelSampling(model.prediction)
        self.cfg = float(cfg)
        self.control_fn = control_fn
        self.max_batch = max_batch
        self.positive = list(positive)
        self.negative = fill_uncond_controls(self.positive, negative)
        self.concat: torch.Tensor | None = None
        self.calls = 0
        """UNet invocations so far (for tests and progress)."""
        config = getattr(self.unet, "config", None)
        self._config = config
        self._sdxl = getattr(config, "addition_embed_type", None) == "text_time"
        self._windows: dict[int, tuple[float, float]] = {}
        self._hook_kwargs = _accepted_keywords(control_fn, ("added_cond_kwargs", "batched_number"))

    # -- device / dtype ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.unet.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        dtype = getattr(self.unet, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        for p in self.unet.parameters():
            return p.dtype
        return torch.float32

    # -- preparation (inpainting UNets) --------------------------------------------------------------------------
    def prepare(self, latent_image: torch.Tensor, denoise_mask: torch.Tensor | None, noise: torch.Tensor) -> None:
        """Build the extra input channels of an inpainting UNet (no-op for ordinary UNets)."""
        in_channels = getattr(self._config, "in_channels", None)
        channels = noise.shape[1]
        if in_channels is None or in_channels == channels:
            self.concat = None
            return
        if in_channels != channels + 1 + channels:
            raise ValueError(f"UNet expects {in_channels} input channels; the latent has {channels}")
        batch, size = noise.shape[0], noise.shape[-2:]
        if denoise_mask is not None:
            mask = denoise_mask[:, :1] if denoise_mask.ndim == noise.ndim else denoise_mask
            mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:]))
            if mask.shape[-2:] != size:
                mask = F.interpolate(mask, size=tuple(size), mode="bilinear")
            mask = repeat_to_batch_size(mask.round(), batch)
            image = latent_image
            if image.shape[-2:] != size:
                image = F.interpolate(image, size=tuple(size), mode="bilinear")
            image = repeat_to_batch_size(image, batch)
            self.concat = torch.cat([mask.to(noise), image.to(noise)], dim=1)
        else:
            if channels != len(_BLANK_INPAINT_LATENT):
                raise ValueError("an inpainting UNet without a noise mask needs a 4-channel latent")
            blank = torch.ones_like(noise) * torch.tensor(_BLANK_INPAINT_LATENT, dtype=noise.dtype,
                                                          device=noise.device).view(1, -1, 1, 1)
            self.concat = torch.cat([torch.ones_like(noise)[:, :1], blank], dim=1)

    # -- the call ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        skip_uncond = math.isclose(self.cfg, 1.0)
        to_run: list[_Item] = []
        for kind, entries in ((COND, self.positive), (UNCOND, [] if skip_uncond else self.negative)):
            for entry in entries:
                item = self._item(entry, kind, x)
                if item is not None:
                    to_run.append(item)

        out = [torch.zeros_like(x), torch.zeros_like(x)]
        counts = [torch.ones_like(x) * 1e-37, torch.ones_like(x) * 1e-37]
        while to_run:
            first = to_run[0]
            indices = [k for k in range(len(to_run)) if _can_concat(to_run[k], first)]
            indices.reverse()
            if self.max_batch is not None:
                indices = indices[:max(1, self.max_batch)]
            batch = [to_run.pop(k) for k in indices]  # descending indices: pops stay valid
            for item, denoised in zip(batch, self._run(batch, x, sigma), strict=True):
                if item.area is None:
                    out[item.kind] += denoised * item.mult
                    counts[item.kind] += item.mult
                else:
                    h, w, y, x0 = item.area
                    out[item.kind][:, :, y:y + h, x0:x0 + w] += denoised * item.mult
                    counts[item.kind][:, :, y:y + h, x0:x0 + w] += item.mult
        cond = out[COND] / counts[COND]
        if skip_uncond:
            return cond
        uncond = out[UNCOND] / counts[UNCOND]
        return uncond + (cond - uncond) * self.cfg

    def _item(self, entry: CondEntry, kind: int, x: torch.Tensor) -> _Item | None:
        height, width = x.shape[2], x.shape[3]
        area = None
        input_x = x
        concat = self.concat
        if entry.area is not None:
            h, w, y, x0 = (int(v) for v in entry.area)
            h, w = min(height - y, h), min(width - x0, w)
            if h <= 0 or w <= 0:
                return None
            area = (h, w, y, x0)
            input_x = x[:, :, y:y + h, x0:x0 + w]
            if concat is not None:
                concat = concat[:, :, y:y + h, x0:x0 + w]
        mult = torch.ones_like(input_x) * entry.strength
        if area is not None:
            h, w, y, x0 = area
            for dim, (size, offset, full) in enumerate(((h, y, height), (w, x0, width))):
                rr = min(8, mult.shape[2 + dim] // 4)
                if offset != 0:
                    for t in range(rr):
                        mult.narrow(2 + dim, t, 1).mul_((1.0 / rr) * (t + 1))
                if size + offset < full:
                    for t in range(rr):
                        mult.narrow(2 + dim, size - 1 - t, 1).mul_((1.0 / rr) * (t + 1))
        batch = x.shape[0]
        cond = repeat_to_batch_size(entry.cond.to(x.device), batch)
        text_embeds = time_ids = None
        if self._sdxl:
            text_embeds, time_ids = self._added_conds(entry, kind, x)
        if concat is not None:
            concat = repeat_to_batch_size(concat, batch)
        return _Item(kind, input_x, mult, area, cond, text_embeds, time_ids, concat, entry.control)

    def _added_conds(self, entry: CondEntry, kind: int, x: torch.Tensor):
        batch = x.shape[0]
        extra = entry.extra or {}
        width = extra.get("width", x.shape[3] * 8)
        height = extra.get("height", x.shape[2] * 8)
        crop_w, crop_h = extra.get("crop_w", 0), extra.get("crop_h", 0)
        add_dim = getattr(self._config, "addition_time_embed_dim", None) or 256
        proj = getattr(self._config, "projection_class_embeddings_input_dim", None)
        pooled = entry.pooled_output
        if pooled is not None:
            pooled_dim = pooled.shape[-1]
            n_ids = (proj - pooled_dim) // add_dim if proj else 6
        else:
            n_ids = 6
            pooled_dim = (proj - n_ids * add_dim) if proj else 1280
            pooled = torch.zeros(1, pooled_dim)
        if n_ids == 5:  # SDXL refiner
            default_score = 2.5 if kind == UNCOND else 6.0
            ids = [height, width, crop_h, crop_w, extra.get("aesthetic_score", default_score)]
        else:
            ids = [height, width, crop_h, crop_w, extra.get("target_height", height), extra.get("target_width", width)]
        time_ids = torch.tensor([float(v) for v in ids], dtype=torch.float32, device=x.device).unsqueeze(0)
        pooled = pooled.reshape(-1, pooled.shape[-1]).to(device=x.device, dtype=torch.float32)
        return repeat_to_batch_size(pooled, batch), time_ids.repeat(batch, 1)

    def _run(self, batch: list[_Item], x: torch.Tensor, sigma: torch.Tensor) -> list[torch.Tensor]:
        n = len(batch)
        input_x = torch.cat([item.input_x for item in batch])
        sig = torch.cat([sigma] * n)
        t = self.ms.sigma_to_t(sig).to(input_x.device)
        xc = self.ms.calculate_input(sig, input_x)
        if batch[0].concat is not None:
            xc = torch.cat([xc, torch.cat([item.concat for item in batch])], dim=1)
        dtype = self.dtype
        xc = xc.to(dtype)
        context = _lcm_concat([item.cond for item in batch]).to(dtype)
        kwargs: dict[str, Any] = {}
        added = None
        if batch[0].text_embeds is not None:
            added = {"text_embeds": torch.cat([item.text_embeds for item in batch]).to(dtype),
                     "time_ids": torch.cat([item.time_ids for item in batch]).to(dtype)}
            kwargs["added_cond_kwargs"] = added
        control = batch[0].control
        if control is not None and self.control_fn is not None:
            kwargs.update(self._control_kwargs(control, xc, t, context, added, float(sigma.reshape(-1)[0]), n))
        self.calls += 1
        output = self.unet(xc, t, encoder_hidden_states=context, **kwargs).sample.float()
        denoised = self.ms.calculate_denoised(sig, output, input_x)
        return list(denoised.chunk(n))

    # -- ControlNet ----------------------------------------------------------------------------------------------
    def _window(self, control: ControlRef) -> tuple[float, float]:
        key = id(control)
        if key not in self._windows:
            self._windows[key] = (self.ms.percent_to_sigma(control.start_percent),
                                  self.ms.percent_to_sigma(control.end_percent))
        return self._windows[key]

    def _control_kwargs(self, control: ControlRef, xc: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                        added: dict[str, torch.Tensor] | None, sigma: float, chunks: int) -> dict[str, Any]:
        chain: list[ControlRef] = []
        node: ControlRef | None = control
        while node is not None:
            chain.append(node)
            node = node.previous
        percent = self.ms.sigma_to_percent(sigma)
        acc: dict[str, list[torch.Tensor | None]] = {"down": [], "mid": [], "intrablock": []}
        for ref in reversed(chain):  # oldest first: each control adds onto the sum of those before it
            sigma_start, sigma_end = self._window(ref)
            if sigma > sigma_start or sigma < sigma_end:
                continue
            optional = {"added_cond_kwargs": added, "batched_number": chunks}
            extra = {k: v for k, v in optional.items() if k in self._hook_kwargs and v is not None}
            result = self.control_fn(ref, xc, t, context, percent, **extra)
            if result is None:
                continue
            down, mid = result
            adapter = getattr(ref.control_net, "kind", "controlnet") == "t2i_adapter"
            scaled_down = [d * ref.strength if d is not None else None for d in (down or [])]
            _accumulate(acc["intrablock" if adapter else "down"], scaled_down)
            if mid is not None:
                _accumulate(acc["mid"], [mid * ref.strength])
        kwargs: dict[str, Any] = {}
        if acc["down"]:
            kwargs["down_block_additional_residuals"] = tuple(acc["down"])
        if acc["mid"]:
            kwargs["mid_block_additional_residual"] = acc["mid"][0]
        if acc["intrablock"]:
            kwargs["down_intrablock_additional_residuals"] = tuple(acc["intrablock"])
        return kwargs


def _accepted_keywords(fn: Callable[..., Any] | None, names: tuple[str, ...]) -> frozenset[str]:
    """Which of the optional keywords ``fn`` takes (all of them if it has ``**kwargs``)."""
    if fn is None:
        return frozenset()
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return frozenset(names)
    return frozenset(p.name for p in params if p.name in names)


def _accumulate(acc: list[torch.Tensor | None], new: list[torch.Tensor | None]) -> None:
    for i, value in enumerate(new):
        if i >= len(acc):
            acc.append(value)
        elif value is not None:
            acc[i] = value if acc[i] is None else acc[i] + value


def make_denoiser(model: DiffusionModel, positive: Conditioning, negative: Conditioning, cfg: float, *,
                  model_sampling: ModelSampling | None = None, control_fn: ControlFn | None = None,
                  max_batch: int | None = None) -> CFGDenoiser:
    """The ``denoise_fn`` for :func:`~airflow_comfy.runner.sampling.ksampler.sample`."""
    return CFGDenoiser(model, positive, negative, cfg, model_sampling=model_sampling, control_fn=control_fn,
                       max_batch=max_batch)
