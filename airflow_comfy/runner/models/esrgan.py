"""UpscaleModelLoader / ImageUpscaleWithModel for ESRGAN-family (RRDB-Net) super-resolution models.

Our own RRDB-Net (residual-in-residual dense blocks, nearest-neighbour ×2 upsampling stages, LeakyReLU 0.2),
loading the two common state-dict layouts:

* original ESRGAN: ``model.0`` (first conv), ``model.1.sub.<i>.RDB<r>.conv<c>.0`` (blocks), ``model.1.sub.<nb>``
  (trunk conv), then the upsampling convs, the HR conv and the last conv at increasing ``model.<n>`` indices;
* BasicSR / Real-ESRGAN: ``conv_first``, ``body.<i>.rdb<r>.conv<c>``, ``conv_body``, ``conv_up1`` ..,
  ``conv_hr``, ``conv_last`` (also wrapped in ``params`` / ``params_ema`` in .pth files).

Everything is inferred from the weights: feature width ``nf``, block count ``nb``, growth ``gc``, the number of
×2 stages, and a pixel-unshuffle input (first conv taking 4× or 16× the output channels: Real-ESRGAN's ×2 and ×1
models). Scale = 2^stages / unshuffle.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from airflow_comfy.runner.models.cache import ModelCache
from airflow_comfy.runner.models.files import (
    ModelFileError,
    TensorReader,
    _label,
    file_key,
    resolve_model_file,
)
from airflow_comfy.runner.values import Recipe, UpscaleModel


class DenseBlock(nn.Module):
    """Five 3×3 convs, each seeing the block input and every earlier output; residual scaled by 0.2."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        for i in range(5):
            setattr(self, f"conv{i + 1}", nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i in range(1, 5):
            conv = getattr(self, f"conv{i}")
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1 = DenseBlock(nf, gc)
        self.rdb2 = DenseBlock(nf, gc)
        self.rdb3 = DenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32,
                 upsamples: int = 2, unshuffle: int = 1) -> None:
        super().__init__()
        self.in_nc, self.out_nc, self.nf, self.nb, self.gc = in_nc, out_nc, nf, nb, gc
        self.upsamples = upsamples
        self.unshuffle = unshuffle
        self.scale = 2 ** upsamples / unshuffle
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        for i in range(upsamples):
            self.add_module(f"conv_up{i + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.unshuffle > 1:
            k = self.unshuffle
            pad_h, pad_w = (-h) % k, (-w) % k
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
            x = F.pixel_unshuffle(x, k)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.upsamples):
            conv = getattr(self, f"conv_up{i + 1}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        if self.unshuffle > 1:
            out = out[..., : int(h * self.scale), : int(w * self.scale)]
        return out


_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"model\.(\d+)\.(weight|bias)$")


def convert_original_esrgan(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-ESRGAN keys (``model.N...``) -> BasicSR keys (``conv_first``, ``body.i.rdbR.convC`` ...)."""
    out: dict[str, torch.Tensor] = {}
    trunk: int | None = None
    top: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if m := _OLD_RDB.match(key):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        elif m := re.match(r"model\.1\.sub\.(\d+)\.(weight|bias)$", key):
            trunk = int(m.group(1))
            out[f"conv_body.{m.group(2)}"] = value
        elif m := _OLD_TOP.match(key):
            top.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            raise ModelFileError(f"unexpected key {key!r} for an ESRGAN model")
    del trunk
    indices = sorted(top)
    if len(indices) < 3 or indices[0] != 0:
        raise ModelFileError("not an ESRGAN model (missing model.0 / HR / last convs)")
    names = ["conv_first"] + [f"conv_up{i + 1}" for i in range(len(indices) - 3)] + ["conv_hr", "conv_last"]
    for index, name in zip(indices, names, strict=True):
        for param, value in top[index].items():
            out[f"{name}.{param}"] = value
    return out


def _count(keys: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def build_rrdbnet(state_dict: dict[str, torch.Tensor], *, label: str = "upscale model") -> RRDBNet:
    """An :class:`RRDBNet` with its hyper-parameters inferred from (either layout of) ``state_dict``."""
    sd = dict(state_dict)
    if any(k.startswith("model.") for k in sd):
        sd = convert_original_esrgan(sd)
    if "conv_first.weight" not in sd or "conv_last.weight" not in sd:
        raise ModelFileError(f"{label}: not an ESRGAN (RRDB-Net) model; only ESRGAN/Real-ESRGAN RRDB models are "
                             f"supported (keys start with {', '.join(sorted(sd)[:3])})")
    keys = list(sd)
    nf, in_nc = sd["conv_first.weight"].shape[:2]
    out_nc = sd["conv_last.weight"].shape[0]
    nb = _count(keys, r"body\.(\d+)\.")
    gc = sd["body.0.rdb1.conv1.weight"].shape[0] if nb else 32
    upsamples = sum(1 for k in keys if re.match(r"conv_up\d+\.weight$", k))
    ratio = in_nc // out_nc if in_nc % out_nc == 0 else 0
    unshuffle = {1: 1, 4: 2, 16: 4}.get(ratio)
    if unshuffle is None:
        raise ModelFileError(f"{label}: cannot tell the input layout ({in_nc} input vs {out_nc} output channels)")
    net = RRDBNet(in_nc=in_nc, out_nc=out_nc, nf=nf, nb=nb, gc=gc, upsamples=upsamples, unshuffle=unshuffle)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{label}: the weights do not fit an RRDB-Net: {exc}") from exc
    net.eval()
    net.requires_grad_(False)
    return net


_CACHE: ModelCache[UpscaleModel] = ModelCache(1)


def load_upscale_model_file(path: str | os.PathLike[str], *, name: str | None = None, allow_pickle: bool = False,
                            device: torch.device | str = "cpu", use_cache: bool = True) -> UpscaleModel:
    """UpscaleModelLoader: an ESRGAN file -> :class:`UpscaleModel` (fp32)."""
    p = Path(path)
    name = name or p.name
    key = (file_key(p), str(device), allow_pickle)
    cached = _CACHE.get(key) if use_cache else None
    if cached is not None:
        return replace(cached, recipe=Recipe("UpscaleModelLoader", name))
    with TensorReader(p, allow_pickle=allow_pickle) as reader:
        sd = reader.read()
    if "module.conv_first.weight" in sd or any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    net = build_rrdbnet(sd, label=_label(p)).to(device)
    model = UpscaleModel(model=net, scale=int(net.scale) if float(net.scale).is_integer() else net.scale,
                         recipe=Recipe("UpscaleModelLoader", name))
    if use_cache:
        _CACHE.put(key, model)
    return replace(model)


def load_upscale_model(context: Any, model_name: str) -> UpscaleModel:
    """UpscaleModelLoader for a run: ``model_name`` in ``<models_root>/upscale_models``."""
    from airflow_comfy.runner.models.files import record_model_file

    path = resolve_model_file(Path(context.models_root), "upscale_models", model_name)
    record_model_file(context, "upscale_models", model_name, path)
    return load_upscale_model_file(path, name=model_name, allow_pickle=bool(getattr(context, "allow_pickle", False)),
                                   device=getattr(context, "device", "cpu"))


# --- tiled upscaling -------------------------------------------------------------------------------------------


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    return list(range(0, size - overlap, tile - overlap))


def _feather(height: int, width: int, width_px: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A ``[1,1,h,w]`` weight: 1 inside, ramping linearly (1/f .. 1) over the ``f`` pixels at every edge."""
    mask = torch.ones(1, 1, height, width, device=device, dtype=dtype)
    f = width_px
    for size, dim in ((height, 2), (width, 3)):
        if f <= 0 or f >= size:
            continue
        ramp = torch.arange(1, f + 1, device=device, dtype=dtype) / f
        shape = [1, 1, 1, 1]
        shape[dim] = f
        ramp = ramp.reshape(shape)
        mask.narrow(dim, 0, f).mul_(ramp)
        mask.narrow(dim, size - f, f).mul_(ramp.flip(dim))
    return mask


def tiled_scale(images: torch.Tensor, fn: Any, *, scale: float, tile: int = 512, overlap: int = 32) -> torch.Tensor:
    """Apply ``fn`` (``[1,C,h,w] -> [1,C',h·s,w·s]``) in overlapping tiles, blending the overlaps with linear
    feathering (tiles start every ``tile - overlap`` pixels; the last ones may be smaller), like ComfyUI."""
    results = []
    for b in range(images.shape[0]):
        item = images[b:b + 1]
        height, width = item.shape[-2:]
        if height <= tile and width <= tile:
            results.append(fn(item))
            continue
        out = weight = None
        feather = round(overlap * scale)
        for y in _starts(height, tile, overlap):
            for x in _starts(width, tile, overlap):
                patch = item[..., y:y + tile, x:x + tile]
                result = fn(patch)
                th, tw = result.shape[-2:]
                if out is None:
                    out = torch.zeros(1, result.shape[1], round(height * scale), round(width * scale),
                                      device=result.device, dtype=result.dtype)
                    weight = torch.zeros(1, 1, out.shape[2], out.shape[3], device=result.device, dtype=result.dtype)
                mask = _feather(th, tw, feather, device=result.device, dtype=result.dtype)
                oy, ox = round(y * scale), round(x * scale)
                out[..., oy:oy + th, ox:ox + tw] += result * mask
                weight[..., oy:oy + th, ox:ox + tw] += mask
        results.append(out / weight)
    return torch.cat(results, dim=0)


def upscale_image(model: UpscaleModel | nn.Module, image: torch.Tensor, *, tile: int = 512,
                  overlap: int = 32) -> torch.Tensor:
    """ImageUpscaleWithModel: IMAGE ``[B,H,W,C]`` -> ``[B,H·s,W·s,C]`` clamped to 0..1. Tiled (512 px, 32 px
    overlap); on out-of-memory the tile is halved down to 128 px."""
    net = model.model if isinstance(model, UpscaleModel) else model
    scale = float(model.scale if isinstance(model, UpscaleModel) else net.scale)
    param = next(net.parameters())
    # Contiguous NCHW whatever the IMAGE's strides (one read from the artifact store and one computed in this
    # group differ): convolution kernels depend on the memory format, and sliced runs must equal unsliced ones.
    pixels = image.movedim(-1, 1).to(device=param.device, dtype=param.dtype).contiguous()
    with torch.no_grad():
        while True:
            try:
                out = tiled_scale(pixels, net, scale=scale, tile=tile, overlap=overlap)
                break
            except torch.OutOfMemoryError:
                if tile <= 128:
                    raise
                tile //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return torch.clamp(out.movedim(1, -1).float(), 0.0, 1.0).to(image.device)
