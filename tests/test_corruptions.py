"""corruptions.py and evaluate.py --corruptions (issues 20, 26): each generated corruption seeded, uint8 32 x 32 x 3
and growing with severity on real test images; the helpers against PIL, matplotlib and torchvision; glass blur and
elastic against NumPy transcriptions of make_cifar_c.py fed the same draws; the official layout read a severity at a
time; its bad files one-line errors; the report's figures against a hand computation, its means over the benchmark
corruptions only."""
import io
import json
import warnings
from pathlib import Path

import matplotlib.colors
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import common
import evaluate
from support import corruptions
from support.errors import UserError
from conftest import assert_one_line_error, real_cifar_dir, run_cli

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")
needs_real = pytest.mark.skipif(real_cifar_dir() is None, reason="real CIFAR-10 not available")
# The corruptions that draw random numbers (the others are functions of the image alone).
SEEDED = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "fog",
          "elastic_transform"}


@pytest.fixture(scope="module")
def images():
    """uint8 16 x 3 x 32 x 32: real test images when present, else random ones."""
    if real_cifar_dir() is not None:
        return torch.as_tensor(common.read_batch(real_cifar_dir() / "test_batch")[0][:16])
    return torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# ---- The generated corruptions ------------------------------------------------------------------------------------
def test_each_corruption_is_deterministic_for_a_seed_and_keeps_uint8_32x32x3(images):
    assert len(corruptions.CORRUPTIONS) == 15
    assert set(corruptions.CORRUPTIONS) == set(corruptions.BENCHMARK) - {"frost"} | {"saturate"}
    for name in corruptions.CORRUPTIONS:
        first = corruptions.corrupt(images, name, 3, seed=0, batch_size=8)
        assert first.dtype == torch.uint8 and first.shape == (16, 3, 32, 32), name
        assert torch.equal(first, corruptions.corrupt(images, name, 3, seed=0, batch_size=8)), name
        other_seed = corruptions.corrupt(images, name, 3, seed=1, batch_size=8)
        assert torch.equal(first, other_seed) == (name not in SEEDED), name
        assert not torch.equal(first, images), name


@needs_real
def test_the_change_grows_with_severity_on_real_test_images():
    """Mean absolute pixel change from the clean image, severities 1-5, on 64 real test images. Four exceptions are
    the paper's own parameters (make_cifar_c.py), checked here as they are: saturate washes colours out at 1-2 and
    strengthens them at 3-5; elastic's affine part shrinks (2.56 -> 0.96 px) while its local field grows (0 -> 3.2 px);
    motion blur's severities 3 and 4 share sigma = 2 px, so the 4th's longer kernel adds weights below e^-18; glass
    blur's severities 4-5 make two passes of pixel moves, 1-3 one, and at a fixed number of passes its wider blur
    smooths more of the moves away (0.4 px at 3 and 5, 0.25 at 2 and 4; 0.05 at 1 and 0.25 at 2 hardly blur at all:
    the 0.25-px kernel's outer weights are e^-8)."""
    clean = torch.as_tensor(common.read_batch(real_cifar_dir() / "test_batch")[0][:64])

    def change(name, severity):
        return float((corruptions.corrupt(clean, name, severity).float() - clean.float()).abs().mean())
    for name in corruptions.CORRUPTIONS:
        changes = [change(name, severity) for severity in range(1, 6)]
        if name == "saturate":
            assert changes[0] < changes[1] and changes[2] < changes[3] < changes[4], changes
        elif name == "elastic_transform":
            assert changes == sorted(changes, reverse=True), changes  # the affine part dominates
        elif name == "motion_blur":
            assert changes[2] == pytest.approx(changes[3], abs=1e-3), changes
            assert changes[0] < changes[1] < changes[2] < changes[4], changes
        elif name == "glass_blur":
            assert changes[0] == pytest.approx(changes[1], abs=0.05), changes
            assert changes[2] < changes[1] and changes[4] < changes[3] and min(changes[3:]) > max(changes[:3]) + 5, \
                changes
        else:
            assert all(a < b for a, b in zip(changes, changes[1:])), (name, changes)
    function, params = corruptions.CORRUPTIONS["elastic_transform"]
    local = [float((function(clean.float() / 255, (alpha, sigma, 0.0), torch.Generator().manual_seed(0)) * 255
                    - clean.float()).abs().mean()) for alpha, sigma, _ in params]  # the displacement field alone
    assert local[0] == pytest.approx(0, abs=1e-3) and all(a < b for a, b in zip(local, local[1:])), local


def test_pixelate_is_pils_box_resize_down_and_up(images):
    for severity, fraction in enumerate((0.95, 0.9, 0.85, 0.75, 0.65), 1):
        side = int(32 * fraction)
        pil = np.stack([np.asarray(Image.fromarray(image).resize((side, side), Image.BOX).resize((32, 32), Image.BOX))
                        for image in images.permute(0, 2, 3, 1).numpy()])
        ours = corruptions.corrupt(images, "pixelate", severity).permute(0, 2, 3, 1).numpy()
        assert np.abs(ours.astype(int) - pil).max() <= 1  # PIL rounds its intermediate image to uint8


def test_brightness_and_saturate_are_matplotlibs_hsv(images):
    """Against rgb_to_hsv -> change V or S -> hsv_to_rgb, with grey pixels (hue 0) among them."""
    x = images.float() / 255
    x[:, :, :4, :4] = x[:, :1, :4, :4]  # a grey corner
    x[:, :, 4:6, :4] = 0.0  # and black pixels
    hsv = matplotlib.colors.rgb_to_hsv(x.permute(0, 2, 3, 1).numpy())
    for shift in (0.05, 0.3):
        expected = hsv.copy()
        expected[..., 2] = np.clip(expected[..., 2] + shift, 0, 1)
        ours = corruptions.brightness(x, shift, None).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, matplotlib.colors.hsv_to_rgb(expected), atol=1e-5)
    for factor, offset in ((0.1, 0), (2.5, 0.2)):
        expected = hsv.copy()
        expected[..., 1] = np.clip(expected[..., 1] * factor + offset, 0, 1)
        ours = corruptions.saturate(x, (factor, offset), None).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, matplotlib.colors.hsv_to_rgb(expected), atol=1e-5)


def test_defocus_blur_of_a_disk_within_one_pixel_is_the_3x3_anti_aliasing_gaussian(images):
    """Radius 0.3 px: the disk is the centre pixel alone, so the kernel is the 3 x 3 Gaussian of sigma 0.4."""
    x = images.float() / 255
    expected = TF.gaussian_blur(x, [3, 3], [0.4, 0.4])
    torch.testing.assert_close(corruptions.defocus_blur(x, (0.3, 0.4), None), expected, atol=1e-6, rtol=0)


def test_elastic_affine_part_moves_the_image_as_opencv_warp_affine(images, monkeypatch):
    """Each of the three control points moved by (+1, +1) px: the pixel at p comes from p - (1, 1)."""
    x = images.float() / 255
    monkeypatch.setattr(corruptions, "_uniform", lambda shape, low, high, generator, device: torch.ones(shape))
    moved = corruptions.elastic_transform(x, (0.0, 0.0, 2.56), None)
    torch.testing.assert_close(moved[..., 1:, 1:], x[..., :-1, :-1], atol=1e-5, rtol=0)


def test_motion_blur_at_angle_zero_is_a_one_sided_gaussian_along_the_rows(images, monkeypatch):
    """ImageMagick's kernel at angle 0: sum_i w_i x[:, :, y, min(x + i, 31)], w_i ~ exp(-i^2 / 2 sigma^2), i < 13."""
    x = images.float() / 255
    monkeypatch.setattr(corruptions, "_uniform", lambda shape, low, high, generator, device: torch.zeros(shape))
    weights = np.exp(-np.arange(13) ** 2 / (2 * 1.5 ** 2))
    weights /= weights.sum()
    padded = np.concatenate([x.numpy(), np.repeat(x.numpy()[..., -1:], 12, axis=-1)], axis=-1)
    expected = sum(w * padded[..., i:i + 32] for i, w in enumerate(weights))
    np.testing.assert_allclose(corruptions.motion_blur(x, (6, 1.5), None).numpy(), expected, atol=1e-5)


def test_clipped_zoom_crops_whole_pixels_and_aligns_corners_as_scipy_zoom(images):
    """A horizontal ramp (value = column): zoom 2 keeps columns 8-23, stretched corner to corner, column j becoming
    8 + 15 j / 31; zoom 1.01 keeps the whole image (ceil(32 / 1.01) = 32, round(32 x 1.01) = 32): no change."""
    ramp = torch.arange(32.0).expand(1, 3, 32, 32)
    expected = (8 + 15 * torch.arange(32.0) / 31).expand(1, 3, 32, 32)
    torch.testing.assert_close(corruptions.clipped_zoom(ramp, 2.0), expected)
    x = images.float() / 255
    assert torch.equal(corruptions.clipped_zoom(x, 1.01), x)


def test_plasma_fractal_spans_zero_to_one_per_map():
    maps = corruptions.plasma_fractal(3, 2.0, torch.Generator().manual_seed(0), CPU)
    assert maps.shape == (3, 32, 32)
    assert maps.amin((1, 2)).tolist() == [0, 0, 0] and maps.amax((1, 2)).tolist() == [1, 1, 1]
    assert not torch.equal(maps[0], maps[1])


def test_jpeg_is_pillows_save_and_open_at_the_papers_qualities(images):
    """Pillow's own round trip, value for value, at 80, 65, 58, 50, 40; no torchvision.io codec, no warning."""
    for severity, quality in enumerate((80, 65, 58, 50, 40), 1):
        expected = []
        for image in images.permute(0, 2, 3, 1).numpy():
            encoded = io.BytesIO()
            Image.fromarray(image).save(encoded, "JPEG", quality=quality)
            expected.append(np.asarray(Image.open(encoded)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = corruptions.corrupt(images, "jpeg_compression", severity).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(ours, np.stack(expected))
    assert "torchvision.io" not in Path(corruptions.__file__).read_text()


def test_zoom_blur_takes_np_arange_factors_so_the_last_at_severity_5_makes_a_33_px_frame():
    """1 + 25 x 0.01 in floating point is 1.2500000000000002: ceil(32 / z) = 26 px, round(26 z) = 33, not 32. A
    horizontal ramp: columns 3-28 stretched over 33 px, column j of the kept 32 becoming 3 + 25 j / 32 (not / 31)."""
    zooms = corruptions.CORRUPTIONS["zoom_blur"][1]
    assert [len(factors) for factors in zooms] == [7, 12, 16, 21, 26]
    assert zooms[4] == tuple(np.arange(1, 1.26, 0.01).tolist()) and zooms[4][-1] == 1.2500000000000002
    ramp = torch.arange(32.0).expand(1, 3, 32, 32)
    torch.testing.assert_close(corruptions.clipped_zoom(ramp, zooms[4][-1]),
                               (3 + 25 * torch.arange(32.0) / 32).expand(1, 3, 32, 32))


def test_snow_blends_towards_the_grey_maximum_and_adds_its_flakes_twice(images):
    """No flakes (threshold 99): 0.8 x + 0.2 max(x, 1.5 grey + 0.5), OpenCV's grey. Black images kept (blend 1): the
    flake layer alone, grey, in whole levels, plus itself turned by 180 degrees."""
    x = images.float() / 255
    ours = corruptions.snow(x, (0.1, 0.2, 1, 99, 8, 3, 0.8), torch.Generator().manual_seed(0))
    grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    torch.testing.assert_close(ours, 0.8 * x + 0.2 * torch.maximum(x, 1.5 * grey + 0.5), atol=1e-6, rtol=0)
    flakes = corruptions.snow(torch.zeros(4, 3, 32, 32), (0.5, 0.3, 1.75, 0.6, 10, 4, 1.0),
                              torch.Generator().manual_seed(0))
    assert torch.equal(flakes, flakes.flip(-2, -1)) and torch.equal(flakes[:, 0], flakes[:, 2])
    assert 0.1 < float(flakes.mean()) < 0.9 and float(flakes.std()) > 0.05
    assert torch.allclose(flakes * 255, (flakes * 255).round(), atol=1e-4)  # whole levels, as the paper's 8-bit layer


# ---- NumPy transcriptions of make_cifar_c.py (no SciPy, scikit-image or OpenCV here), fed the draws ours made ------
def recorded(monkeypatch, name):
    """The values each later call of corruptions.NAME (a random draw) returns, in order."""
    draws, draw = [], getattr(corruptions, name)

    def record(*args):
        draws.append(draw(*args))
        return draws[-1]
    monkeypatch.setattr(corruptions, name, record)
    return draws


def np_gaussian(image, sigma, truncate, mode):
    """scipy.ndimage.gaussian_filter over axes 0 and 1 (skimage's gaussian): weights exp(-x^2 / 2 sigma^2), |x| <=
    int(truncate sigma + 0.5), normalised; 'nearest' repeats the edge, 'reflect' is NumPy's pad mode 'symmetric'."""
    radius = int(truncate * sigma + 0.5)
    weights = np.exp(-0.5 * np.arange(-radius, radius + 1) ** 2 / sigma ** 2) if radius else np.ones(1)
    weights /= weights.sum()
    out = np.asarray(image, dtype=np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode={"nearest": "edge", "reflect": "symmetric"}[mode])
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(weights))
    return out


def paper_pixel_moves(image, draws, max_delta=1):
    """make_cifar_c.py's glass-blur loop, literally, on an H x W x C uint8 array; draws: passes x rows x columns x
    (dx, dy), in the loop's order. NumPy's tuple assignment of views: x[h, w] takes x[h', w'], which keeps its own."""
    x = image.copy()
    for moves in draws:
        for i, h in enumerate(range(32 - max_delta, max_delta, -1)):
            for j, w in enumerate(range(32 - max_delta, max_delta, -1)):
                dx, dy = moves[i, j]
                h_prime, w_prime = h + dy, w + dx
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]  # the paper's "swap"
    return x


def reflect_101(index, n):
    """OpenCV's BORDER_REFLECT_101 of integer indices: gfedcb|abcdefgh|gfedcba."""
    index = np.abs(index) % (2 * n - 2)
    return np.where(index >= n, 2 * n - 2 - index, index)


def bilinear(image, rows, cols, fold_rows, fold_cols):
    """H x W x C `image` at float (rows, cols): the four taps around each, folded back into the image, weighted."""
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]

    def at(r, c):
        return image[fold_rows(r), fold_cols(c)]
    return (1 - fr) * ((1 - fc) * at(r0, c0) + fc * at(r0, c0 + 1)) + fr * ((1 - fc) * at(r0 + 1, c0) +
                                                                           fc * at(r0 + 1, c0 + 1))


def cv2_warp_affine(image, forward):
    """cv2.warpAffine(image, forward, INTER_LINEAR, BORDER_REFLECT_101): the 2 x 3 map inverted
    (invertAffineTransform), each output pixel (x, y) read at inverse @ (x, y, 1) in OpenCV's fixed point: X =
    (round(1024 a x) + round(1024 (b y + c)) + 16) >> 5, in 1/32 px."""
    height, width = image.shape[:2]
    inverse_linear = np.linalg.inv(forward[:, :2])
    inverse = np.c_[inverse_linear, -inverse_linear @ forward[:, 2]]
    y, x = np.mgrid[0:height, 0:width]

    def fixed(a, b, c):
        return np.floor((np.round(a * x * 1024) + np.round((b * y + c) * 1024) + 16) / 32) / 32
    return bilinear(image, fixed(*inverse[1]), fixed(*inverse[0]), lambda r: reflect_101(r, height),
                    lambda c: reflect_101(c, width))


def scipy_map_coordinates_reflect(image, rows, cols, taps="reflect"):
    """scipy.ndimage.map_coordinates(order=1, mode='reflect') of an H x W x C image: a coordinate outside [0, n - 1]
    reflected about the pixels' outer edges (c < 0 -> -c - 1, c > n - 1 -> 2n - c - 1, after wrapping by 2n), then
    the two taps around it, those outside folded back: half-sample (-1 -> 0, n -> n - 1) in SciPy >= 1.6 (taps=
    "reflect"), mirrored (-1 -> 1, n -> n - 2) before (taps="mirror")."""
    def coordinate(c, n):
        c = np.array(c, dtype=np.float64)
        low, high = c < 0, c > n - 1
        v = c[low]
        v = np.where(v < -2 * n, 2 * n * np.trunc(-v / (2 * n)) + v, v)
        c[low] = np.where(v < -n, v + 2 * n, -v - 1)
        v = c[high] - 2 * n * np.trunc(c[high] / (2 * n))
        c[high] = np.where(v >= n, 2 * n - v - 1, v)
        return c

    def fold(n):
        if taps == "reflect":
            return lambda i: np.where(i < 0, -i - 1, np.where(i >= n, 2 * n - 1 - i, i))
        return lambda i: np.where(i < 0, -i, np.where(i >= n, 2 * n - 2 - i, i))
    height, width = image.shape[:2]
    return bilinear(image, coordinate(rows, height), coordinate(cols, width), fold(height), fold(width))


def paper_elastic(image, shifts, noise, params, taps="reflect"):
    """make_cifar_c.py's elastic_transform of an H x W x C float image, its draws given: shifts 3 x 2 (float32),
    noise 2 x H x W (dx's, dy's) or None (alpha 0)."""
    alpha, sigma, _ = params
    pts1 = np.float32([[26, 26], [26, 6], [6, 6]])
    pts2 = (pts1 + shifts).astype(np.float64)  # float32 there
    forward = np.linalg.solve(np.c_[pts1, np.ones(3)], pts2).T  # cv2.getAffineTransform(pts1, pts2)
    warped = cv2_warp_affine(image, forward)
    if noise is None:
        return warped
    dx = (np_gaussian(noise[0], sigma, 3, "reflect") * alpha).astype(np.float32)
    dy = (np_gaussian(noise[1], sigma, 3, "reflect") * alpha).astype(np.float32)
    y, x = np.mgrid[0:32, 0:32]
    return scipy_map_coordinates_reflect(warped, y + dy, x + dx, taps)


def test_gaussian_filter_is_scipys_with_skimages_borders(images):
    x = images[:4].float() / 255
    for sigma, truncate, mode in ((0.25, 4.0, "nearest"), (0.4, 4.0, "nearest"), (6.4, 3.0, "reflect"),
                                  (0.96, 3.0, "reflect")):
        ours = corruptions._gaussian_filter(x, sigma, truncate, mode).permute(0, 2, 3, 1).numpy()
        expected = np.stack([np_gaussian(image, sigma, truncate, mode) for image in x.permute(0, 2, 3, 1).numpy()])
        np.testing.assert_allclose(ours, expected, atol=1e-6, err_msg=f"{sigma} {mode}")


def test_sample_borders_are_reflect_101_and_scipys_reflect_tap_by_tap():
    """_sample's "mirror" and "symmetric" at coordinates from 40 px before to 40 px beyond the image, and within a
    pixel of its border, against the taps folded by hand."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=generator)
    rows = torch.cat([torch.rand(2, 16, 32, generator=generator) * 112 - 40,
                      torch.rand(2, 16, 32, generator=generator) * 2 - 1 + 31 * (torch.rand(2, 16, 32) < 0.5)], 1)
    cols = torch.rand(2, 32, 32, generator=generator) * 112 - 40
    pixels = x.permute(0, 2, 3, 1).numpy()
    for padding, reference in (("mirror", lambda image, r, c: bilinear(image, r, c, lambda i: reflect_101(i, 32),
                                                                        lambda i: reflect_101(i, 32))),
                               ("symmetric", scipy_map_coordinates_reflect)):
        ours = corruptions._sample(x, rows, cols, padding=padding).permute(0, 2, 3, 1).numpy()
        expected = np.stack([reference(image, r, c) for image, r, c in zip(pixels, rows.double().numpy(),
                                                                            cols.double().numpy())])
        np.testing.assert_allclose(ours, expected, atol=2e-5, err_msg=padding)


@needs_real
def test_glass_blur_moves_pixels_exactly_as_the_papers_sequential_loop(monkeypatch):
    """The vectorised pass against the paper's loop on 32 real test images, fed the same draws: equal, value for
    value, without blur (sigma 0.05: a 1-tap kernel) at 1 and 2 passes; at severity 5 (0.4 px, 2 passes), from our
    blurred image on, equal to float rounding."""
    clean = torch.as_tensor(common.read_batch(real_cifar_dir() / "test_batch")[0][:32])
    x = clean.float() / 255
    for passes in (1, 2):
        draws = recorded(monkeypatch, "_randint")
        moved = corruptions.to_uint8(corruptions.glass_blur(x, (0.05, 1, passes), torch.Generator().manual_seed(0)))
        expected = [paper_pixel_moves(image, draws[0][:, k].numpy()) for k, image in
                    enumerate(clean.permute(0, 2, 3, 1).numpy())]
        np.testing.assert_array_equal(moved.permute(0, 2, 3, 1).numpy(), np.stack(expected))
        assert (moved != clean).float().mean() > 0.5  # most pixels take a neighbour's
    draws = recorded(monkeypatch, "_randint")
    ours = corruptions.glass_blur(x, (0.4, 1, 2), torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy()
    blurred = corruptions.to_uint8(corruptions._gaussian_filter(x, 0.4, 4.0, "nearest")).permute(0, 2, 3, 1).numpy()
    expected = [np_gaussian(paper_pixel_moves(image, draws[-1][:, k].numpy()) / 255, 0.4, 4, "nearest")
                for k, image in enumerate(blurred)]
    np.testing.assert_allclose(ours, np.stack(expected), atol=1e-5)


@needs_real
def test_elastic_is_the_papers_two_resamplings(monkeypatch):
    """Against paper_elastic (OpenCV's fixed-point warpAffine, REFLECT_101, then SciPy >= 1.6's map_coordinates,
    'reflect') on 32 real test images at severities 1-5, fed the same draws: within 0.01 levels."""
    clean = torch.as_tensor(common.read_batch(real_cifar_dir() / "test_batch")[0][:32])
    x = clean.float() / 255
    for params in corruptions.CORRUPTIONS["elastic_transform"][1]:
        draws = recorded(monkeypatch, "_uniform")
        ours = corruptions.elastic_transform(x, params, torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy()
        noise = draws[1].numpy() if len(draws) > 1 else [None] * len(x)
        expected = np.stack([paper_elastic(image, shifts, field, params) for image, shifts, field in
                             zip(x.permute(0, 2, 3, 1).numpy(), draws[0].numpy(), noise)])
        assert np.abs(ours - expected).max() * 255 < 0.01, params
        assert np.abs(ours - x.permute(0, 2, 3, 1).numpy()).mean() * 255 > 5, params  # it does move the image


# ---- The report ---------------------------------------------------------------------------------------------------
def test_corruption_summary_by_hand():
    """A: a = 0.9 .. 0.5, b = 1.0 .. 0.6 -> mean 7.5 / 10 = 0.75; per severity 0.95, 0.85, 0.75, 0.65, 0.55; clean 0.95:
    drop 0.2 / 0.95. B: a = 0.8, b = 0.5 at each severity. Errors summed: A 1.5 and 1.0, B 1.0 and 2.5: CE 1.5, 0.4,
    mCE 0.95."""
    accuracy = {"a": [0.9, 0.8, 0.7, 0.6, 0.5], "b": [1.0, 0.9, 0.8, 0.7, 0.6]}
    summary = corruptions.corruption_summary(accuracy, 0.95, {"a": [0.8] * 5, "b": [0.5] * 5})
    assert summary["mean_acc1"] == pytest.approx(0.75)
    assert summary["mean_acc1_per_severity"] == pytest.approx([0.95, 0.85, 0.75, 0.65, 0.55])
    assert summary["relative_drop"] == pytest.approx(0.2 / 0.95)
    assert summary["ce"] == pytest.approx({"a": 1.5, "b": 0.4}) and summary["mce"] == pytest.approx(0.95)
    assert "ce" not in corruptions.corruption_summary(accuracy, 0.95)


class PixelModel(nn.Module):
    """Predicts the class written in each image's top-left red value (undoing common.prepare_batch's normalisation)."""

    def forward(self, x):
        value = ((x[:, 0, 0, 0] * common.IMAGENET_STD[0] + common.IMAGENET_MEAN[0]) * 255).round().long()
        return 10.0 * nn.functional.one_hot(value % 10, 10).float()


def write_official(folder, labels, severities_right):
    """An official-layout folder: per corruption, severity s holds len(labels) images of which the first
    severities_right[name][s - 1] carry their true label (the rest the next class); labels.npy tiled five times."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    for name, right in severities_right.items():
        images = np.zeros((5 * n, 32, 32, 3), dtype=np.uint8)
        for severity, k in enumerate(right):
            images[severity * n:(severity + 1) * n, 0, 0, 0] = (labels + (np.arange(n) >= k)) % 10
        np.save(folder / f"{name}.npy", images)
    np.save(folder / "labels.npy", np.tile(labels, 5).astype(np.uint8))  # the official labels are uint8


def test_official_layout_severity_slices_and_mean_accuracy_by_hand(tmp_path):
    """2 corruptions x 5 severities x 20 images. `fog`: 4 s images right at severity s -> 0.2 .. 1.0; `defocus_blur`:
    10 right at each -> 0.5. Mean (3.0 + 2.5) / 10 = 0.55; per severity 0.35, 0.45, 0.55, 0.65, 0.75; clean 1 (the
    clean images carry their labels): drop 0.45. Both are benchmark corruptions: 2 of 15, no extras."""
    labels = np.arange(20) % 10
    write_official(tmp_path / "CIFAR-10-C", labels, {"fog": [4, 8, 12, 16, 20], "defocus_blur": [10] * 5})
    source = corruptions.read_official(tmp_path, torch.as_tensor(labels))  # finds the CIFAR-10-C/ inside
    assert sorted(source) == ["defocus_blur", "fog"] and isinstance(source["fog"], np.memmap)
    clean = np.zeros((20, 3, 32, 32), dtype=np.uint8)
    clean[:, 0, 0, 0] = labels
    test_set = common.CifarDataset(clean, labels)
    result = corruptions.corruption_report(PixelModel(), test_set, CPU, 32, source=source, batch_size=8)
    assert result["acc1"]["fog"] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert result["acc1"]["defocus_blur"] == pytest.approx([0.5] * 5)
    benchmark = result["benchmark"]
    assert benchmark["corruptions"] == ["defocus_blur", "fog"] and len(benchmark["missing"]) == 13
    assert benchmark["mean_acc1"] == pytest.approx(0.55) and result["clean_acc1"] == 1.0
    assert benchmark["mean_acc1_per_severity"] == pytest.approx([0.35, 0.45, 0.55, 0.65, 0.75])
    assert benchmark["relative_drop"] == pytest.approx(0.45) and result["images_per_severity"] == 20
    assert result["extras"] is None
    first_10 = common.CifarDataset(clean[:10], labels[:10])  # --subset 10: the first 10 of each severity
    result = corruptions.corruption_report(PixelModel(), first_10, CPU, 32, source=source)
    assert result["acc1"]["fog"] == pytest.approx([0.4, 0.8, 1.0, 1.0, 1.0])


def test_official_means_are_over_the_15_benchmark_corruptions_never_the_extras(tmp_path, capsys):
    """Issue 26 point 1: an official folder whose 15 benchmark files are the clean test set (all right) and whose 4
    extras are all wrong: the benchmark mean is the clean accuracy, 1.0, the extras' block 0.0 apart; a NAME.npy that
    is neither (wrong too) is skipped with a line, and counted nowhere. The table says 15 of 15 and splits them."""
    labels = np.arange(20) % 10
    write_official(tmp_path, labels, {**{name: [20] * 5 for name in corruptions.BENCHMARK},
                                      **{name: [0] * 5 for name in (*corruptions.EXTRAS, "my_blur")}})
    source = corruptions.read_official(tmp_path, torch.as_tensor(labels))
    assert "skipped" in capsys.readouterr().out and "my_blur" not in source and len(source) == 19
    clean = np.zeros((20, 3, 32, 32), dtype=np.uint8)
    clean[:, 0, 0, 0] = labels
    result = corruptions.corruption_report(PixelModel(), common.CifarDataset(clean, labels), CPU, 32, source=source,
                                           baseline={name: [0.5] * 5 for name in source})
    table = capsys.readouterr().out
    benchmark, extras = result["benchmark"], result["extras"]
    assert list(result["acc1"]) == [*corruptions.BENCHMARK, *corruptions.EXTRAS]  # the benchmark's order, then extras
    assert benchmark["corruptions"] == list(corruptions.BENCHMARK) and benchmark["missing"] == []
    assert benchmark["mean_acc1"] == result["clean_acc1"] == 1.0 and benchmark["relative_drop"] == 0.0
    assert benchmark["mean_acc1_per_severity"] == [1.0] * 5 and benchmark["mce"] == pytest.approx(0.0)
    assert extras["corruptions"] == list(corruptions.EXTRAS) and extras["mean_acc1"] == 0.0
    assert set(benchmark["ce"]) == set(corruptions.BENCHMARK) and extras["mce"] == pytest.approx(2.0)
    assert "over all 15 benchmark corruptions: mean corruption accuracy 100.00 %" in table
    assert "extras, not in the benchmark means (4 of 4)" in table


def test_generated_report_splits_14_benchmark_corruptions_from_saturate(tmp_path, monkeypatch, capsys):
    """Generated: the 14 benchmark corruptions but frost in the benchmark block and its mean, saturate alone in the
    extras; the table says 14 of 15; the heat map has the 15 rows, saturate last, marked and below a line."""
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    test_set = common.CifarDataset(images, images[:, 0, 0, 0].long() % 10)
    result = corruptions.corruption_report(PixelModel(), test_set, CPU, 32)
    assert result["benchmark"]["corruptions"] == [name for name in corruptions.BENCHMARK if name != "frost"]
    assert result["benchmark"]["missing"] == ["frost"] and result["extras"]["corruptions"] == ["saturate"]
    cells = [a for name in result["benchmark"]["corruptions"] for a in result["acc1"][name]]
    assert result["benchmark"]["mean_acc1"] == pytest.approx(np.mean(cells))
    assert "over 14 of the 15 benchmark corruptions (no frost)" in capsys.readouterr().out
    drawn = []
    monkeypatch.setattr(evaluate, "_save", lambda fig, path, title: drawn.append(fig))
    corruptions.plot_corruptions(result, tmp_path / "heat.png", "generated")
    axis = drawn[0].axes[0]
    labels = [label.get_text() for label in axis.get_yticklabels()]
    assert len(labels) == 15 and labels[:14] == result["benchmark"]["corruptions"] and labels[14] == "saturate (extra)"
    assert [line.get_ydata()[0] for line in axis.lines] == [13.5] and "14 of 15" in axis.get_title()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.manual_seed(0)
    torch.save({"model": common.build_model("none").state_dict(), "args": {"img_size": 32}}, path)
    return path


def test_cli_generated_writes_the_json_and_heat_map(tmp_path, checkpoint, synthetic_root):
    """--corruptions on a folder without .npy files: generated, said so; with --baseline itself, every CE is 1."""
    (tmp_path / "empty").mkdir()
    out = run_cli(evaluate, checkpoint, "--corruptions", tmp_path / "empty", "--baseline", checkpoint, "--subset", 4,
                  "--data-dir", synthetic_root, "--out", tmp_path, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "holds no .npy file: using generated CIFAR-10-C-style" in out.stdout
    json_path = tmp_path / f"eval_{Path(checkpoint).parent.name}-model_corruptions.json"  # folder-checkpoint
    result = json.loads(json_path.read_text())
    assert result["source"] == "generated" and len(result["acc1"]) == 15 and result["images_per_severity"] == 4
    benchmark, extras = result["benchmark"], result["extras"]
    assert benchmark["ce"] == pytest.approx(dict.fromkeys(benchmark["corruptions"], 1.0)) and len(benchmark["ce"]) == 14
    assert benchmark["mce"] == pytest.approx(1.0) and extras["ce"] == pytest.approx({"saturate": 1.0})
    assert result["baseline"]["checkpoint"] == str(checkpoint) and benchmark["mean_ece"] >= 0
    assert json_path.with_suffix(".png").stat().st_size > 0
    assert "corruption_acc1=" in out.stdout.splitlines()[-1] and "benchmark_corruptions=14/15" in out.stdout


def test_cli_truncated_npy_and_mismatched_labels_are_one_line_errors(tmp_path, checkpoint, synthetic_root):
    test_labels = common.read_batch(synthetic_root / "cifar-10-batches-py" / "test_batch")[1][:20]
    write_official(tmp_path / "ok", test_labels, {"fog": [20] * 5})
    flags = ["--subset", 20, "--data-dir", synthetic_root, "--out", tmp_path, "--device", "cpu"]
    write_official(tmp_path / "truncated", test_labels, {"fog": [20] * 5})
    data = (tmp_path / "truncated" / "fog.npy").read_bytes()
    (tmp_path / "truncated" / "fog.npy").write_bytes(data[:len(data) // 2])
    assert_one_line_error(run_cli(evaluate, checkpoint, "--corruptions", tmp_path / "truncated", *flags),
                          "fog.npy is not a readable .npy array")
    write_official(tmp_path / "mismatch", (test_labels + 1) % 10, {"fog": [20] * 5})
    assert_one_line_error(run_cli(evaluate, checkpoint, "--corruptions", tmp_path / "mismatch", *flags),
                          "labels.npy", "not the test set's")
    assert_one_line_error(run_cli(evaluate, checkpoint, "--baseline", checkpoint, *flags), "--baseline needs")
    np.save(tmp_path / "ok" / "fog.npy", np.zeros((100, 32, 32), dtype=np.uint8))  # a wrong shape
    with pytest.raises(UserError, match=r"fog.npy must be a uint8 array of shape \(100, 32, 32, 3\)"):
        corruptions.read_official(tmp_path / "ok", torch.as_tensor(test_labels))
    write_official(tmp_path / "extras_only", test_labels, {"saturate": [20] * 5, "fog_v2": [20] * 5})
    with pytest.raises(UserError, match="holds none of CIFAR-10-C's 15 benchmark corruptions"):
        corruptions.read_official(tmp_path / "extras_only", torch.as_tensor(test_labels))
    with pytest.raises(UserError, match="is not a folder"):
        corruptions.read_official(tmp_path / "nowhere", torch.as_tensor(test_labels))
    with pytest.raises(UserError, match="holds 20 images per severity, fewer than the 21"):
        corruptions.read_official(tmp_path / "mismatch", torch.arange(21) % 10)
