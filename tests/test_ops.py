"""The model-free node operations of the runner (``airflow_comfy.runner.ops``) against ComfyUI's behaviour."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import random
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from airflow_comfy.runner.ops import canny as canny_ops
from airflow_comfy.runner.ops import image as image_ops
from airflow_comfy.runner.ops import latent as latent_ops
from airflow_comfy.runner.ops import save as save_ops
from airflow_comfy.runner.values import Latent

# --- helpers --------------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """``(type, payload)`` of every chunk of a PNG file, checking signature and CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        payload = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF
        chunks.append((kind, payload))
        pos += 12 + length
    return chunks


def _rgb_array(h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --- load_image -----------------------------------------------------------------------------------


def test_load_rgb_png(tmp_path):
    pixels = _rgb_array()
    Image.fromarray(pixels, "RGB").save(tmp_path / "rgb.png")
    image, mask = image_ops.load_image(tmp_path / "rgb.png")
    assert image.shape == (1, 6, 5, 3) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.from_numpy(pixels.astype(np.float32) / 255.0))
    assert mask.shape == (1, 64, 64) and not mask.any()


def test_load_rgba_mask_is_one_minus_alpha(tmp_path):
    rgba = np.concatenate([_rgb_array(), np.arange(30, dtype=np.uint8).reshape(6, 5, 1) * 8], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image, mask = image_ops.load_image(str(tmp_path / "rgba.png"))
    assert image.shape == (1, 6, 5, 3)
    assert torch.allclose(image[0], torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0))
    expected = 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0)
    assert mask.shape == (1, 6, 5) and torch.equal(mask[0], expected)


def test_load_palette_transparency(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    picture = Image.fromarray(indices, "P")
    picture.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    picture.save(tmp_path / "pal.png", transparency=1)
    image, mask = image_ops.load_image(tmp_path / "pal.png")
    assert torch.equal(mask[0], torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.equal(image[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(image[0, 1, 0], torch.tensor([0.0, 0.0, 1.0]))


def test_load_16_bit_grey_is_scaled(tmp_path):
    values = np.array([[0, 255 * 100, 255 * 255], [255 * 10, 65535, 255]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as opened:
        assert opened.mode.startswith("I")
    image, mask = image_ops.load_image(tmp_path / "grey16.png")
    expected = torch.tensor([[0, 100, 255], [10, 255, 1]], dtype=torch.float32) / 255.0
    for c in range(3):
        assert torch.equal(image[0, :, :, c], expected)
    assert mask.shape == (1, 64, 64)


def test_load_mode_i_is_scaled(tmp_path):
    values = np.array([[0, 255 * 7, 255 * 300]], dtype=np.int32)
    Image.fromarray(values, "I").save(tmp_path / "int.tiff")  # PNG cannot hold 32-bit mode I
    with Image.open(tmp_path / "int.tiff") as opened:
        assert opened.mode == "I"
    image, _ = image_ops.load_image(tmp_path / "int.tiff")
    assert torch.equal(image[0, 0, :, 1], torch.tensor([0.0, 7.0, 255.0]) / 255.0)


def test_load_animated_png_batches_frames(tmp_path):
    frames = [Image.fromarray(_rgb_array(seed=s), "RGB") for s in range(3)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    image, mask = image_ops.load_image(tmp_path / "anim.png")
    assert image.shape == (3, 6, 5, 3)
    for index in range(3):
        assert torch.equal(image[index], torch.from_numpy(_rgb_array(seed=index).astype(np.float32) / 255.0))
    assert mask.shape == (3, 64, 64)


def test_load_animated_gif_batches_frames(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    frames = [Image.new("RGB", (8, 4), colour) for colour in colours]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image, mask = image_ops.load_image(tmp_path / "anim.gif")
    assert image.shape == (4, 4, 8, 3)
    for index, colour in enumerate(colours):
        assert torch.equal(image[index, 2, 3], torch.tensor(colour, dtype=torch.float32) / 255.0)
    assert mask.shape[0] == 4


def test_load_applies_exif_orientation(tmp_path):
    picture = Image.fromarray(_rgb_array(4, 7), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    picture.save(tmp_path / "rotated.png", exif=exif)
    image, _ = image_ops.load_image(tmp_path / "rotated.png")
    assert image.shape == (1, 7, 4, 3)


def test_load_not_an_image_names_the_file(tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not a picture")
    with pytest.raises(image_ops.ImageLoadError, match="notes.png"):
        image_ops.load_image(bogus)
    with pytest.raises(image_ops.ImageLoadError, match="missing.png"):
        image_ops.load_image(tmp_path / "missing.png")
    with pytest.raises(image_ops.ImageLoadError, match="upload.png"):
        image_ops.load_image(io.BytesIO(b"garbage"), name="upload.png")


def test_load_image_mask_channels(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = [[0, 255], [51, 102]]
    rgba[..., 3] = [[255, 0], [255, 51]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    alpha = image_ops.load_image_mask(tmp_path / "m.png", "alpha")
    red = image_ops.load_image_mask(tmp_path / "m.png", "red")
    assert alpha.shape == (1, 2, 2)
    assert torch.allclose(alpha[0], 1.0 - torch.tensor([[255.0, 0.0], [255.0, 51.0]]) / 255.0)
    assert torch.allclose(red[0], torch.tensor([[0.0, 255.0], [51.0, 102.0]]) / 255.0)
    Image.fromarray(rgba[..., :3], "RGB").save(tmp_path / "rgb.png")
    assert not image_ops.load_image_mask(tmp_path / "rgb.png", "alpha").any()  # opaque → 1 − 1 = 0
    with pytest.raises(ValueError):
        image_ops.load_image_mask(tmp_path / "m.png", "purple")


# --- resizing -------------------------------------------------------------------------------------


def test_image_scale_aspect_rules():
    image = torch.rand(2, 40, 60, 3)
    assert image_ops.image_scale(image, "bilinear", 0, 0, "disabled") is image
    assert image_ops.image_scale(image, "bilinear", 0, 20, "disabled").shape == (2, 20, 30, 3)
    assert image_ops.image_scale(image, "nearest-exact", 90, 0, "disabled").shape == (2, 60, 90, 3)
    assert image_ops.image_scale(image, "area", 0, 1, "disabled").shape == (2, 1, 2, 3)
    out = image_ops.image_scale(image, "bilinear", 33, 17, "disabled")
    expected = F.interpolate(image.movedim(-1, 1), size=(17, 33), mode="bilinear", align_corners=False)
    assert torch.equal(out, expected.movedim(1, -1))


def test_image_scale_by_and_total_pixels():
    image = torch.rand(1, 32, 64, 3)
    assert image_ops.image_scale_by(image, "bicubic", 1.5).shape == (1, 48, 96, 3)
    assert image_ops.image_scale_by(image, "area", 0.33).shape == (1, round(32 * 0.33), round(64 * 0.33), 3)
    # total = int(0.01 · 2²⁰) = 10485; s = sqrt(10485 / 2048) = 2.2627 → 144.8 × 72.4
    assert image_ops.total_pixels_size(64, 32, 0.01) == (145, 72)
    scale = math.sqrt(int(1.0 * 1024 * 1024) / (512 * 768))
    assert image_ops.total_pixels_size(768, 512, 1.0) == (round(768 * scale), round(512 * scale)) == (1254, 836)
    assert image_ops.image_scale_to_total_pixels(image, "nearest-exact", 0.01).shape == (1, 72, 145, 3)


def test_lanczos_matches_pil():
    pixels = _rgb_array(20, 30, seed=3)
    image = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
    out = image_ops.image_scale(image, "lanczos", 47, 13, "disabled")
    expected = np.asarray(Image.fromarray(pixels).resize((47, 13), Image.Resampling.LANCZOS))
    assert torch.equal(out[0], torch.from_numpy(expected.astype(np.float32) / 255.0))


def test_center_crop_before_resize():
    image = torch.arange(4 * 8, dtype=torch.float32).reshape(1, 4, 8, 1)
    out = image_ops.image_scale(image, "nearest-exact", 4, 4, "center")
    assert torch.equal(out, image[:, :, 2:6, :])
    tall = torch.rand(1, 3, 10, 6)
    cropped = image_ops.common_upscale(tall, 6, 6, "bilinear", "center")
    assert torch.equal(cropped, tall[:, :, 2:8, :])


def test_bislerp_constant_identity_and_midpoints():
    constant = torch.tensor([0.3, -1.2, 2.0, 0.5]).view(1, 4, 1, 1).expand(2, 4, 5, 7).contiguous()
    assert torch.allclose(image_ops.bislerp(constant, 11, 3), constant[:, :, :3, :1].expand(2, 4, 3, 11))
    latent = torch.randn(2, 4, 6, 9)
    assert torch.allclose(image_ops.common_upscale(latent, 9, 6, "bislerp", "disabled"), latent, atol=1e-5)
    # Two orthogonal unit vectors 2× wider: sample positions 0 (clamped), 0.25, 0.75, 1 (clamped).
    pair = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).t().reshape(1, 2, 1, 2)
    out = image_ops.bislerp(pair, 4, 1)[0, :, 0, :].t()
    angle = math.pi / 2 * 0.25
    expected = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)],
                             [math.sin(angle), math.cos(angle)], [0.0, 1.0]])
    assert torch.allclose(out, expected, atol=1e-6)
    # Lengths interpolate linearly: (2, 0) and (0, 4) halfway → length 3.
    scaled = torch.tensor([[2.0, 0.0], [0.0, 4.0]]).t().reshape(1, 2, 1, 2)
    middle = image_ops.bislerp(scaled, 3, 1)[0, :, 0, 1]
    assert math.isclose(middle.norm().item(), 3.0, rel_tol=1e-6)


def test_image_invert_and_batch():
    a = torch.rand(1, 8, 8, 3)
    assert torch.equal(image_ops.image_invert(a), 1.0 - a)
    b = torch.rand(2, 8, 8, 3)
    assert torch.equal(image_ops.image_batch(a, b), torch.cat([a, b]))
    c = torch.rand(1, 16, 32, 3)
    out = image_ops.image_batch(a, c)
    resized = image_ops.common_upscale(c.movedim(-1, 1), 8, 8, "bilinear", "center").movedim(1, -1)
    assert out.shape == (2, 8, 8, 3) and torch.equal(out[1:], resized)
    with pytest.raises(ValueError, match="channels"):
        image_ops.image_batch(a, torch.rand(1, 8, 8, 4))


# --- ImagePadForOutpaint --------------------------------------------------------------------------


def test_pad_for_outpaint_sizes_fill_and_feathering():
    image = torch.full((2, 100, 100, 3), 0.2)
    padded, mask = image_ops.image_pad_for_outpaint(image, left=16, top=0, right=0, bottom=8, feathering=10)
    assert padded.shape == (2, 108, 116, 3) and mask.shape == (1, 108, 116)
    assert torch.all(padded[:, :, :16] == 0.5) and torch.all(padded[:, 100:] == 0.5)
    assert torch.all(padded[:, :100, 16:] == 0.2)
    assert torch.all(mask[0, :, :16] == 1.0) and torch.all(mask[0, 100:] == 1.0)

    def inside(i: int, j: int) -> float:
        return mask[0, i, 16 + j].item()

    assert inside(50, 0) == 1.0  # on the padded left edge: d = 0
    assert math.isclose(inside(50, 3), (7 / 10) ** 2, rel_tol=1e-6)
    assert math.isclose(inside(99, 50), (9 / 10) ** 2, rel_tol=1e-6)  # bottom row is at distance 1
    assert math.isclose(inside(97, 2), (8 / 10) ** 2, rel_tol=1e-6)  # nearest of bottom (3) and left (2)
    assert inside(50, 50) == 0.0 and inside(50, 10) == 0.0
    assert inside(0, 50) == 0.0  # no padding on top: no feathering there
    assert inside(50, 99) == 0.0  # nor on the right


def test_pad_for_outpaint_without_feathering():
    image = torch.rand(1, 16, 16, 3)
    padded, mask = image_ops.image_pad_for_outpaint(image, 8, 8, 8, 8, 8)  # 2·8 is not < 16: no feather
    assert padded.shape == (1, 32, 32, 3) and torch.equal(padded[:, 8:24, 8:24], image)
    assert mask[0, 8:24, 8:24].sum() == 0 and mask.sum() == 32 * 32 - 16 * 16


# --- Canny ----------------------------------------------------------------------------------------


def _kornia_style_canny(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """An independent, literal formulation of kornia's steps (2-D convolutions, 8 NMS kernels, kornia's loop)."""
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    g = torch.exp(-(torch.arange(5.0) - 2) ** 2 / 2)
    g = g / g.sum()
    blurred = F.conv2d(F.pad(gray, (2, 2, 2, 2), mode="reflect"), torch.outer(g, g)[None, None])
    sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    grads = F.conv2d(F.pad(blurred, (1, 1, 1, 1), mode="replicate"), torch.stack([sobel, sobel.t()])[:, None])
    gx, gy = grads[:, 0:1], grads[:, 1:2]
    magnitude = torch.sqrt(gx * gx + gy * gy + 1e-6)
    sector = (torch.atan2(gy, gx) * (4 / math.pi)).round()
    nms = torch.zeros(8, 1, 3, 3)
    for k, (dy, dx) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]):
        nms[k, 0, 1, 1] = 1
        nms[k, 0, 1 + dy, 1 + dx] = -1
    diffs = F.conv2d(magnitude, nms, padding=1)
    pos = torch.gather(diffs, 1, (sector % 8).long())
    neg = torch.gather(diffs, 1, ((sector + 4) % 8).long())
    magnitude = magnitude * (torch.minimum(pos, neg) > 0)
    edges = (magnitude > low) * 0.5 + (magnitude > high) * 0.5
    old = -torch.ones_like(edges)
    kernel = torch.zeros(8, 1, 3, 3)
    for k, (dy, dx) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]):
        kernel[k, 0, 1 + dy, 1 + dx] = 1
    result = edges
    while (old != edges).any():
        weak, strong = (edges == 0.5).float(), (edges == 1).float()
        result = (F.conv2d(edges, kernel, padding=1) == 1).any(1, keepdim=True).float() * weak + strong
        old, edges = edges, result + (result == 0) * weak * 0.5
    return result


def test_canny_square_border_only():
    image = torch.zeros(1, 64, 64, 3)
    image[:, 20:44, 20:44] = 1.0
    out = canny_ops.canny(image, 0.4, 0.8)
    assert out.shape == (1, 64, 64, 3) and out.dtype == torch.float32
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])
    edges = out[0, :, :, 0].bool()
    ys, xs = torch.nonzero(edges, as_tuple=True)
    near_border = ((ys - 19.5).abs() <= 1.5) | ((ys - 43.5).abs() <= 1.5) | \
        ((xs - 19.5).abs() <= 1.5) | ((xs - 43.5).abs() <= 1.5)
    assert near_border.all()
    assert ys.min() >= 18 and ys.max() <= 45 and xs.min() >= 18 and xs.max() <= 45
    for row in (25, 32, 38):  # each side of the square has edges
        assert edges[row, 18:22].any() and edges[row, 42:46].any()
        assert edges[18:22, row].any() and edges[42:46, row].any()
    assert not edges[24:40, 24:40].any()


def test_canny_matches_literal_kornia_steps():
    torch.manual_seed(0)
    x = F.avg_pool2d(torch.rand(2, 3, 48, 40), 3, stride=1, padding=1)
    for low, high in ((0.1, 0.2), (0.05, 0.3), (0.2, 0.2)):
        _, edges = canny_ops.canny_edges(x, low, high)
        assert torch.equal(edges, _kornia_style_canny(x, low, high))


def test_canny_thresholds_are_monotonic():
    torch.manual_seed(1)
    image = F.avg_pool2d(torch.rand(1, 3, 64, 64), 5, stride=1, padding=2).movedim(1, -1)
    counts = [canny_ops.canny(image, low, high).sum().item()
              for low, high in ((0.02, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 0.8))]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    weak_fixed = [canny_ops.canny(image, 0.05, high).sum().item() for high in (0.05, 0.1, 0.2, 0.5)]
    assert weak_fixed == sorted(weak_fixed, reverse=True)
    with pytest.raises(ValueError):
        canny_ops.canny(image, 0.8, 0.4)


# --- latents --------------------------------------------------------------------------------------


def test_empty_latent_and_upscale():
    latent = latent_ops.empty_latent(512, 264, batch_size=3)
    assert latent.samples.shape == (3, 4, 33, 64) and not latent.samples.any()
    assert latent_ops.empty_latent(64, 64, channels=16).samples.shape == (1, 16, 8, 8)

    src = Latent(samples=torch.randn(1, 4, 8, 16), noise_mask=torch.ones(1, 1, 64, 128), batch_index=[3])
    assert latent_ops.latent_upscale(src, "bilinear", 0, 0, "disabled") is src
    up = latent_ops.latent_upscale(src, "nearest-exact", 0, 128, "disabled")
    assert up.samples.shape == (1, 4, 16, 32)
    assert up.noise_mask is src.noise_mask and up.batch_index == [3]
    assert latent_ops.latent_upscale(src, "bislerp", 16, 16, "disabled").samples.shape == (1, 4, 8, 8)
    assert latent_ops.latent_upscale(src, "area", 200, 0, "disabled").samples.shape == (1, 4, 12, 25)
    assert latent_ops.latent_upscale(src, "bicubic", 256, 256, "center").samples.shape == (1, 4, 32, 32)
    by = latent_ops.latent_upscale_by(src, "bislerp", 1.5)
    assert by.samples.shape == (1, 4, 12, 24) and by.batch_index == [3]


def test_latent_from_batch_indices_and_masks():
    samples = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 4, 2, 2).contiguous()
    latent = Latent(samples=samples)
    part = latent_ops.latent_from_batch(latent, 1, 2)
    assert torch.equal(part.samples[:, 0, 0, 0], torch.tensor([1.0, 2.0])) and part.batch_index == [1, 2]
    clamped = latent_ops.latent_from_batch(latent, 10, 5)
    assert clamped.samples.shape[0] == 1 and clamped.batch_index == [3]
    assert latent_ops.latent_from_batch(latent, 2, 64).batch_index == [2, 3]

    indexed = Latent(samples=samples, batch_index=[5, 6, 7, 8])
    assert latent_ops.latent_from_batch(indexed, 1, 2).batch_index == [6, 7]

    one_mask = torch.rand(1, 1, 16, 16)
    assert torch.equal(latent_ops.latent_from_batch(Latent(samples, noise_mask=one_mask), 2, 2).noise_mask,
                       one_mask)
    two_masks = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 16, 16)
    sliced = latent_ops.latent_from_batch(Latent(samples, noise_mask=two_masks), 1, 2).noise_mask
    assert sliced[:, 0, 0, 0].tolist() == [1.0, 0.0]  # masks cycled to [m0, m1, m0, m1], then sliced


def test_repeat_latent_batch_indices_and_masks():
    samples = torch.randn(2, 4, 3, 3)
    plain = latent_ops.repeat_latent_batch(Latent(samples=samples), 3)
    assert plain.samples.shape == (6, 4, 3, 3) and plain.batch_index is None
    assert torch.equal(plain.samples[4:], samples)
    assert latent_ops.repeat_latent_batch(Latent(samples, batch_index=[1, 2]), 3).batch_index == [1, 2, 3, 4, 5, 6]
    # The shift is max − min + 1 of the existing indices.
    assert latent_ops.repeat_latent_batch(Latent(samples, batch_index=[0, 2]), 3).batch_index == [0, 2, 3, 5, 6, 8]

    one_mask = torch.rand(1, 1, 8, 8)
    assert latent_ops.repeat_latent_batch(Latent(samples, noise_mask=one_mask), 4).noise_mask is one_mask
    two_masks = torch.rand(2, 1, 8, 8)
    assert latent_ops.repeat_latent_batch(Latent(samples, noise_mask=two_masks), 3).noise_mask.shape[0] == 6
    # ComfyUI quirk: a short mask batch is repeated as is (2 masks × 2 for a 6-item latent).
    short = latent_ops.repeat_latent_batch(Latent(torch.randn(3, 4, 2, 2), noise_mask=two_masks), 2)
    assert short.samples.shape[0] == 6 and short.noise_mask.shape[0] == 4


def test_set_latent_noise_mask_shapes():
    latent = Latent(samples=torch.zeros(2, 4, 8, 8), batch_index=[4, 5])
    assert latent_ops.set_latent_noise_mask(latent, torch.ones(64, 48)).noise_mask.shape == (1, 1, 64, 48)
    masked = latent_ops.set_latent_noise_mask(latent, torch.ones(2, 64, 64))
    assert masked.noise_mask.shape == (2, 1, 64, 64) and masked.batch_index == [4, 5]
    assert masked.samples is latent.samples


def test_vae_encode_for_inpaint_prepare():
    pixels = torch.rand(1, 21, 19, 3)
    mask = torch.zeros(21, 19)
    mask[10, 9] = 1.0
    out, noise_mask = latent_ops.vae_encode_for_inpaint_prepare(pixels, mask, grow_mask_by=6)
    assert out.shape == (1, 16, 16, 3) and noise_mask.shape == (1, 1, 16, 16)
    crop = pixels[:, 2:18, 1:17]  # centre offsets (21 % 8) // 2 = 2, (19 % 8) // 2 = 1
    assert out[0, 8, 8].tolist() == [0.5, 0.5, 0.5]  # the masked pixel (10 − 2, 9 − 1)
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[8, 8] = False
    assert torch.allclose(out[0][keep], crop[0][keep])
    # A 6×6 box with padding 3 covers rows/cols p−2 .. p+3 of a single pixel p.
    ys, xs = torch.nonzero(noise_mask[0, 0], as_tuple=True)
    assert len(ys) == 36 and (ys.min(), ys.max(), xs.min(), xs.max()) == (6, 11, 6, 11)
    assert set(noise_mask.unique().tolist()) == {0.0, 1.0}

    _, exact = latent_ops.vae_encode_for_inpaint_prepare(pixels, mask, grow_mask_by=0)
    assert exact.sum() == 1 and exact[0, 0, 8, 8] == 1
    rgba = torch.rand(2, 16, 16, 4)
    out, noise_mask = latent_ops.vae_encode_for_inpaint_prepare(rgba, torch.ones(1, 8, 8), grow_mask_by=3)
    assert out.shape == (2, 16, 16, 3) and torch.all(out == 0.5) and torch.all(noise_mask == 1)


# --- SaveImage / PreviewImage ---------------------------------------------------------------------


def test_uint8_truncates():
    values = torch.tensor([[[0.999, 0.5, 1.5], [-0.2, 1.0, 0.0039]]])
    assert save_ops.to_uint8(values).tolist() == [[[254, 127, 255], [0, 255, 0]]]


def test_png_chunk_order_and_metadata():
    image = torch.rand(5, 7, 3)
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}
    extra = {"workflow": {"nodes": [], "links": []}, "note": "hé"}
    data = save_ops.encode_png(image, prompt, extra)
    chunks = _png_chunks(data)
    kinds = [kind for kind, _ in chunks]
    assert kinds[:4] == [b"IHDR", b"tEXt", b"tEXt", b"tEXt"]
    assert set(kinds[4:-1]) == {b"IDAT"} and kinds[-1] == b"IEND"
    texts = [payload.split(b"\0", 1) for kind, payload in chunks if kind == b"tEXt"]
    assert [key for key, _ in texts] == [b"prompt", b"workflow", b"note"]
    assert texts[0][1].decode("latin-1") == json.dumps(prompt)
    assert texts[1][1].decode("latin-1") == json.dumps(extra["workflow"])
    assert texts[2][1].decode("latin-1") == json.dumps("hé")
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert decoded.shape == (5, 7, 3) and np.array_equal(decoded, save_ops.to_uint8(image))
    idat = b"".join(payload for kind, payload in chunks if kind == b"IDAT")
    assert idat[:2] == b"\x78\x5e"  # zlib header of compression levels 2..5 (ComfyUI's 4)
    preview = _png_chunks(save_ops.encode_png(image, None, None, save_ops.PREVIEW_COMPRESS_LEVEL))
    assert b"".join(p for k, p in preview if k == b"IDAT")[:2] == b"\x78\x01"
    assert [k for k, _ in preview if k == b"tEXt"] == []
    bare = _png_chunks(save_ops.encode_png(image, prompt, extra, disable_metadata=True))
    assert b"tEXt" not in [k for k, _ in bare]
    rgba = np.asarray(Image.open(io.BytesIO(save_ops.encode_png(torch.rand(3, 3, 4), None, None))))
    assert rgba.shape == (3, 3, 4)


def test_filename_counter_scheme():
    shape = (3, 8, 8, 3)
    assert save_ops.plan_filenames("ComfyUI", shape, []) == [
        ("", "ComfyUI_00001_.png"), ("", "ComfyUI_00002_.png"), ("", "ComfyUI_00003_.png")]
    existing = ["ComfyUI_00001_.png", "ComfyUI_00007_.png", "Other_00050_.png", "ComfyUI_extra.png",
                "ComfyUIx_00090_.png", "sub/ComfyUI_00020_.png", "ComfyUI_00003_.webp"]
    assert [name for _, name in save_ops.plan_filenames("ComfyUI", (1, 8, 8, 3), existing)] == [
        "ComfyUI_00008_.png"]
    assert save_ops.plan_filenames("ComfyUI", (1, 8, 8, 3), ["comfyui_00011_.png"])[0][1] == "ComfyUI_00012_.png"


def test_batch_num_quirk_restarts_counter():
    existing = ["img_0_00001_.png", "img_1_00002_.png"]
    planned = save_ops.plan_filenames("img_%batch_num%", (2, 4, 4, 3), existing)
    assert planned == [("", "img_0_00001_.png"), ("", "img_1_00002_.png")]  # overwritten, as in ComfyUI


def test_subfolders_and_escapes():
    existing = ["a/b/pic_00003_.png", "pic_00010_.png", "a/pic_00020_.png"]
    assert save_ops.plan_filenames("a/b/pic", (1, 4, 4, 3), existing) == [("a/b", "pic_00004_.png")]
    assert save_ops.plan_filenames("a/../pic", (1, 4, 4, 3), existing) == [("", "pic_00011_.png")]
    for bad in ("../pic", "/etc/pic", "a/../../pic", "../../tmp/x"):
        with pytest.raises(save_ops.UnsafeFilenamePrefix):
            save_ops.plan_filenames(bad, (1, 4, 4, 3), [])


def test_prefix_substitutions():
    now = dt.datetime(2024, 3, 5, 7, 8, 9)
    prefix = "%year%-%month%-%day%/%width%x%height%_%hour%%minute%%second%"
    assert save_ops.plan_filenames(prefix, (1, 32, 48, 3), ["2024-03-05/48x32_070809_00004_.png"], now) == [
        ("2024-03-05", "48x32_070809_00005_.png")]
    assert save_ops.substitute_prefix("plain", 1, 2, now) == "plain"
    assert save_ops.substitute_prefix("%width%", 1, 2, now.timetuple()) == "1"


def test_save_and_preview_images():
    images = torch.rand(2, 4, 6, 3)
    saved = save_ops.save_images(images, "run/x", {"1": {}}, {"workflow": {}}, ["run/x_00002_.png"])
    assert [s.ui() for s in saved] == [
        {"filename": "x_00003_.png", "subfolder": "run", "type": "output"},
        {"filename": "x_00004_.png", "subfolder": "run", "type": "output"}]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(saved[1].data))), save_ops.to_uint8(images[1]))
    preview = save_ops.save_images(images[:1], preview=True, rng=random.Random(7))
    name = preview[0].filename
    assert preview[0].type == "temp" and name.startswith("ComfyUI_temp_") and name.endswith("_00001_.png")
    letters = name[len("ComfyUI_temp_"):-len("_00001_.png")]
    assert len(letters) == 5 and set(letters) <= set(save_ops.PREVIEW_LETTERS)
