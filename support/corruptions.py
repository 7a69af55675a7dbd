"""CIFAR-10-C-style corruptions (Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations"): 15 of the paper's 19 (14 of its 15 benchmark ones, all but frost, and saturate), in
torch, on whole uint8 batches on the device (JPEG through Pillow on the CPU), seeded; the reader of the official
files; and the robustness report (means and mCE over the benchmark corruptions present, the extras apart). Called by
evaluate.py (`evaluate.py CKPT --corruptions generated|DIR`) and by Level 4's final test (support.study.robustness).
The five severities of each are the parameters of the paper's own CIFAR-10 generator, hendrycks/robustness
`ImageNet-C/create_c/make_cifar_c.py` (NumPy, scikit-image, SciPy, OpenCV, ImageMagick, Pillow); motion blur follows
ImageMagick's kernel as bethgelab/imagecorruptions re-implements it. The code here is this project's own, and the
images are *not* the released ones: figures on them are not comparable to published CIFAR-10-C numbers.
Left out: frost (a benchmark corruption, but it needs the paper's frost photographs) and three of the four extra
corruptions: spatter (OpenCV's edge and distance transforms), speckle noise and Gaussian blur (left out to keep the set
at 15 x 5 = 75 passes). BENCHMARK and EXTRAS name the paper's 15 and 4 in its order.
"""
import io
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import common
import evaluate
from support.errors import UserError

# The paper's 15 benchmark corruptions in its order (make_cifar_c.py, the CIFAR-10-C release, AugMix's cifar.py), and
# its four extra ("validation") ones. CORRUPTIONS generates all but frost, spatter, speckle noise and Gaussian blur.
BENCHMARK = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
             "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
EXTRAS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

def to_uint8(images):
    """[0, 1] floats -> uint8, rounded (the paper's final np.uint8 truncates every float-valued corruption, which
    darkens it by half a level; its JPEG, pixelate and motion blur come back as uint8 images already)."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)

def _levels(images):
    """Rounded to whole uint8 levels and back to [0, 1] floats: the paper's intermediate 8-bit images."""
    return to_uint8(images).to(images.dtype) / 255

def _uniform(shape, low, high, generator, device):
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)

def _normal(shape, mean, std, generator, device):
    return mean + std * torch.randn(shape, generator=generator, device=device)

def _randint(low, high, shape, generator, device):
    """Integers in [low, high), as np.random.randint."""
    return torch.randint(low, high, shape, generator=generator, device=device)

def _pixel_grid(images):
    """(rows, cols): N x H x W pixel coordinates, 0 at the first pixel's centre."""
    n, _, height, width = images.shape
    rows, cols = torch.meshgrid(torch.arange(height, device=images.device, dtype=images.dtype),
                                torch.arange(width, device=images.device, dtype=images.dtype), indexing="ij")
    return rows.expand(n, -1, -1), cols.expand(n, -1, -1)

def _sample(images, rows, cols, mode="bilinear", padding="border"):
    """Each image read at N x H x W pixel coordinates (rows, cols), bilinear or nearest. Beyond the border: "border"
    repeats the edge pixels; "mirror" is OpenCV's BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba); "symmetric" scipy's
    mode='reflect' (half-sample: hgfedcba|abcdefgh|hgfedcba). For bilinear reads both are grid_sample's 'reflection'
    padding, which reflects the *coordinate*: about the first and last pixels' centres with align_corners=True (the
    interpolant of the REFLECT_101 sequence is symmetric about them), about their outer edges and then clamped to the
    centres with align_corners=False (that of the half-sample sequence is symmetric about the edges and flat between
    edge and centre, as SciPy >= 1.6 reads it). tests/test_corruptions.py checks both against tap-by-tap references."""
    height, width = images.shape[-2:]
    if padding == "symmetric":
        grid = torch.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], dim=-1)
    else:
        grid = torch.stack([2 * cols / (width - 1) - 1, 2 * rows / (height - 1) - 1], dim=-1)
    return F.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode="border" if padding == "border"
                         else "reflection", align_corners=padding != "symmetric")

def _gaussian_filter(images, sigma, truncate, border):
    """scipy.ndimage.gaussian_filter of each channel, as skimage.filters.gaussian calls it: along the rows, then the
    columns, the normalised weights exp(-x^2 / 2 sigma^2) for |x| <= int(truncate sigma + 0.5) px; beyond the border
    "nearest" (the edge repeated, skimage's default) or "reflect" (half-sample: ...cba|abc...). Each pass is a side x
    side matrix, the border folded into it."""
    radius = int(truncate * sigma + 0.5)
    if radius == 0:
        return images
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * offsets ** 2 / sigma ** 2)
    weights /= weights.sum()

    def matrix(side):  # [i, j]: the weight of input pixel j in output pixel i
        index = torch.arange(-radius, side + radius)
        if border == "nearest":
            index = index.clamp(0, side - 1)
        else:  # index mod 2 side, the upper half mirrored: -1 -> 0, side -> side - 1
            index = index % (2 * side)
            index = torch.where(index >= side, 2 * side - 1 - index, index)
        taps = index.unfold(0, 2 * radius + 1, 1)  # side x taps: the input pixel under each tap
        weight = torch.zeros(side, side, dtype=torch.float64).scatter_add_(1, taps, weights.expand(side, -1))
        return weight.to(images.device, images.dtype)
    return matrix(images.shape[-2]) @ images @ matrix(images.shape[-1]).T

# ---- Noise --------------------------------------------------------------------------------------------------------
def gaussian_noise(images, sigma, generator):
    """Additive N(0, sigma^2) noise on [0, 1] values."""
    return images + sigma * torch.randn(images.shape, generator=generator, device=images.device)

def shot_noise(images, photons, generator):
    """Poisson noise: `photons` at full intensity."""
    return torch.poisson(images * photons, generator=generator) / photons

def impulse_noise(images, amount, generator):
    """Salt and pepper, as scikit-image's random_noise(mode="s&p"): each value, with probability `amount`, set to 0
    or 1 (even odds)."""
    hit, salt = torch.rand((2, *images.shape), generator=generator, device=images.device)
    return torch.where(hit < amount, (salt < 0.5).to(images.dtype), images)

# ---- Blur ---------------------------------------------------------------------------------------------------------
def defocus_blur(images, params, generator):
    """A disk of `radius` px on a 17 x 17 grid, anti-aliased by a 3 x 3 Gaussian of `alias_sigma`, then applied to
    each channel (reflected border: OpenCV's default)."""
    radius, alias_sigma = params
    offsets = torch.arange(-8, 9, device=images.device, dtype=images.dtype)
    disk = ((offsets[:, None] ** 2 + offsets ** 2) <= radius ** 2).to(images.dtype)
    kernel = TF.gaussian_blur((disk / disk.sum())[None, None], [3, 3], [alias_sigma, alias_sigma])
    padded = F.pad(images, (8, 8, 8, 8), mode="reflect")
    return F.conv2d(padded, kernel.expand(3, 1, 17, 17), groups=3)

def _motion_blur(images, radius, sigma, angle):
    """ImageMagick's motion blur along N x 1 x 1 `angle`s (degrees, clockwise from +x, rows growing downwards): a
    one-sided Gaussian of `sigma` px over 2 `radius` + 1 whole-pixel steps, the edge pixels repeated beyond the
    border."""
    angle = torch.deg2rad(angle)
    steps = torch.arange(2 * radius + 1, dtype=torch.float64)
    weights = torch.exp(-steps ** 2 / (2 * sigma ** 2))
    rows, cols = _pixel_grid(images)
    blurred = torch.zeros_like(images)
    for step, weight in zip(steps.tolist(), (weights / weights.sum()).tolist()):
        shifted = _sample(images, rows + (step * angle.sin()).round(), cols + (step * angle.cos()).round(), "nearest")
        blurred += weight * shifted
    return blurred

def motion_blur(images, params, generator):
    """ImageMagick's motion blur (_motion_blur) of `radius` and `sigma` along a random angle in [-45, 45] degrees."""
    radius, sigma = params
    return _motion_blur(images, radius, sigma, _uniform((len(images), 1, 1), -45, 45, generator, images.device))

def glass_blur(images, params, generator):
    """The paper's glass blur: a Gaussian blur of `sigma` px (skimage's: edge repeated, truncated at 4 sigma), the
    result in whole levels (np.uint8 there, which truncates; rounded here), `iterations` passes of local pixel moves,
    the Gaussian blur again. In a pass the paper visits the pixels (h, w), h and w from side - max_delta down to
    max_delta + 1, drawing (dx, dy) in [-max_delta, max_delta) each (np.random.randint), and runs
    `x[h, w], x[h', w'] = x[h', w'], x[h, w]` at (h', w') = (h + dy, w + dx). On NumPy arrays that is a copy, not a
    swap: x[h, w] is a view, overwritten before the second assignment reads it, so (h, w) takes its neighbour's pixel
    and the neighbour keeps it. With max_delta = 1 (every CIFAR severity) the neighbour is one up and/or left or the
    pixel itself, not visited yet in the pass, so the sequential loop reads only the pass's input: here a pass is one
    gather of all the pixels at once, the draws in the paper's order (per pass, image, visited row, visited column:
    dx, dy), and equal to the loop fed the same draws. Measured on the first 300 test images at severities 1-5
    against the paper's loop transcribed in NumPy, blurs in float64 (paper_pixel_moves and np_gaussian in
    tests/test_corruptions.py; a one-off script): 4 of the 5 x 921,600 values differ, by one level, at severities 3
    and 5, where a float32 and a float64 blur round a value either way (mean absolute difference 4e-6 levels); the
    moves alone are identical. A true sequential swap, what the paper's comment says, would differ by 7.0-13.9 levels
    on average. (A max_delta > 1 would let the loop read pixels it has already moved; the gather would not.)"""
    sigma, max_delta, iterations = params
    images = _levels(_gaussian_filter(images, sigma, 4.0, "nearest"))
    n, _, height, width = images.shape
    visited_rows = torch.arange(height - max_delta, max_delta, -1, device=images.device)
    visited_cols = torch.arange(width - max_delta, max_delta, -1, device=images.device)
    shape = (iterations, n, len(visited_rows), len(visited_cols), 2)
    offsets = _randint(-max_delta, max_delta, shape, generator, images.device)  # (dx, dy)
    batch = torch.arange(n, device=images.device)[:, None, None]
    pixels = images.permute(0, 2, 3, 1)  # N x H x W x C
    for dx, dy in zip(offsets[..., 0], offsets[..., 1]):  # a pass: N x rows x columns each
        moved = pixels.clone()
        moved[:, visited_rows[:, None], visited_cols] = pixels[batch, visited_rows[:, None] + dy, visited_cols + dx]
        pixels = moved
    return _gaussian_filter(pixels.permute(0, 3, 1, 2), sigma, 4.0, "nearest")

def clipped_zoom(images, zoom):
    """The paper's clipped_zoom: the central ceil(side / zoom) px, resized to round(that x zoom) px (bilinear, corners
    aligned, as scipy's zoom of order 1), the central side px kept. Whole pixels: a zoom of 1.01 changes nothing."""
    side = images.shape[-1]
    crop = math.ceil(side / zoom)
    top = (side - crop) // 2
    zoomed_side = round(crop * zoom)
    zoomed = F.interpolate(images[..., top:top + crop, top:top + crop], size=(zoomed_side, zoomed_side),
                           mode="bilinear", align_corners=True)
    trim = (zoomed_side - side) // 2
    return zoomed[..., trim:trim + side, trim:trim + side]

def zoom_blur(images, zooms, generator):
    """The mean of the image and of its clipped zooms by each factor in `zooms`."""
    blurred = images.clone()
    for zoom in zooms:
        blurred += clipped_zoom(images, zoom)
    return blurred / (len(zooms) + 1)

# ---- Weather, digital ---------------------------------------------------------------------------------------------
def plasma_fractal(n, decay, generator, device, size=32):
    """N x size x size fractal noise in [0, 1]: diamond-square, each step's random offsets `decay` times smaller
    than the last (the paper's plasma_fractal, from FLHerne/mapgen, batched)."""
    maps = torch.zeros(n, size, size, device=device)
    step, wibble = size, 100.0

    def wibbled_mean(total, wibble):  # the mean of four neighbours plus noise (wibble * U(-wibble, wibble), as there)
        return total / 4 + wibble * _uniform(total.shape, -wibble, wibble, generator, device)

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        total = corners + corners.roll(-1, 1)
        maps[:, half::step, half::step] = wibbled_mean(total + total.roll(-1, 2), wibble)  # squares' centres
        centres = maps[:, half::step, half::step]
        left_right = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        maps[:, ::step, half::step] = wibbled_mean(left_right, wibble)  # diamonds' centres, on the corners' rows
        up_down = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        maps[:, half::step, ::step] = wibbled_mean(up_down, wibble)  # and on the centres' rows
        step, wibble = half, wibble / decay
    maps -= maps.amin((1, 2), keepdim=True)
    return maps / maps.amax((1, 2), keepdim=True)

def fog(images, params, generator):
    """A plasma fractal of `thickness` added, the result scaled back by the image's peak / (peak + thickness)."""
    thickness, decay = params
    peak = images.amax((1, 2, 3), keepdim=True)
    fractal = plasma_fractal(len(images), decay, generator, images.device, images.shape[-1])
    return (images + thickness * fractal[:, None]) * peak / (peak + thickness)

def snow(images, params, generator):
    """The paper's snow: a flake layer of N(`mean`, `std`^2) noise, one value a pixel, clipped-zoomed by `zoom`, values
    below `threshold` set to 0, clipped to [0, 1] and in whole levels (a greyscale PNG there: np.uint8 truncates,
    rounded here), motion-blurred (ImageMagick's, _motion_blur) by `radius`, `sigma` along a random angle in [-135,
    -45] degrees, in whole levels again (ImageMagick's 8-bit PNG). The image is blended towards the maximum of itself
    and 1.5 x its grey (OpenCV's RGB2GRAY: 0.299 R + 0.587 G + 0.114 B) + 0.5, `blend` of the image kept, and the
    layer added twice, as it is and turned by 180 degrees."""
    mean, std, zoom, threshold, radius, sigma, blend = params
    n, _, height, width = images.shape
    flakes = clipped_zoom(_normal((n, 1, height, width), mean, std, generator, images.device), zoom)
    flakes = _levels(torch.where(flakes < threshold, 0.0, flakes))
    angle = _uniform((n, 1, 1), -135, -45, generator, images.device)
    flakes = _levels(_motion_blur(flakes, radius, sigma, angle))
    grey = (torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1) * images).sum(1, keepdim=True)
    images = blend * images + (1 - blend) * torch.maximum(images, grey * 1.5 + 0.5)
    return images + flakes + flakes.flip(-2, -1)

def contrast(images, factor, generator):
    """Each channel's distance from its mean times `factor`."""
    mean = images.mean((2, 3), keepdim=True)
    return (images - mean) * factor + mean

def _recolour(images, new_value, new_saturation):
    """Change HSV value and saturation, keeping the hue. In HSV every RGB channel is V (1 - S k), with k in [0, 1]
    fixed by the hue, so k = (V - channel) / (max - min); grey pixels get hue 0, k = (0, 1, 1), as in scikit-image."""
    value = images.amax(1, keepdim=True)
    spread = value - images.amin(1, keepdim=True)
    saturation = torch.where(value > 0, spread / value.clamp_min(1e-12), 0.0)
    grey = torch.tensor([0.0, 1.0, 1.0], device=images.device).view(1, 3, 1, 1)
    k = torch.where(spread > 0, (value - images) / spread.clamp_min(1e-12), grey)
    return new_value(value) * (1 - new_saturation(saturation) * k)

def brightness(images, shift, generator):
    """HSV value + `shift` (clipped at 1)."""
    return _recolour(images, lambda value: (value + shift).clamp(0, 1), lambda saturation: saturation)

def saturate(images, params, generator):
    """HSV saturation * `factor` + `offset` (clipped to [0, 1]): severities 1-2 wash colours out, 3-5 strengthen."""
    factor, offset = params
    return _recolour(images, lambda value: value, lambda saturation: (saturation * factor + offset).clamp(0, 1))

def _box_weights(n_in, n_out, device):
    """PIL's BOX resampling along one axis, as an n_out x n_in matrix: each output pixel the mean of the input pixels
    whose centres lie in its footprint, (-1/2, 1/2] of an output pixel (of an input pixel when upsampling)."""
    scale = n_in / n_out
    offsets = (torch.arange(n_in) + 0.5)[None, :] - (torch.arange(n_out) + 0.5)[:, None] * scale  # in input px
    offsets = offsets / max(scale, 1.0)
    inside = ((offsets > -0.5) & (offsets <= 0.5)).float()
    return (inside / inside.sum(1, keepdim=True)).to(device)

def pixelate(images, fraction, generator):
    """Down to int(32 `fraction`) px and back up to 32 px, both with PIL's BOX filter (as the paper does)."""
    size = images.shape[-1]
    side = int(size * fraction)
    down, up = _box_weights(size, side, images.device), _box_weights(side, size, images.device)
    return up @ (down @ images @ down.T) @ up.T

def jpeg_compression(images, quality, generator):
    """Saved as a JPEG of `quality` and read back by Pillow (its libjpeg, 4:2:0 chroma), an image at a time on the
    CPU, as the paper does."""
    decoded = []
    for image in to_uint8(images).permute(0, 2, 3, 1).cpu().numpy():
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, "JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(encoded).convert("RGB")))
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(images.device, images.dtype) / 255

def elastic_transform(images, params, generator):
    """The paper's two resamplings (bilinear both). First a random affine map, OpenCV's warpAffine: three points,
    the centre +-(size // 3) px in x and y (10 px: (26, 26), (26, 6), (6, 6), 14.1 px from the centre), each moved by
    up to `shift` px in x and y, and every output pixel read where the map sends it back, at coordinates rounded as
    OpenCV's fixed point does (to 1/1024 px in two parts, then to 1/32 px), BORDER_REFLECT_101 beyond the border.
    Then a displacement field, uniform noise in [-1, 1] smoothed by a Gaussian of `sigma` px (truncated at 3 sigma,
    half-sample reflected border: skimage's gaussian, mode='reflect') times `alpha` px, first draw along x, second
    along y, read from the warped image as scipy's map_coordinates(order=1, mode='reflect') does in SciPy >= 1.6
    (half-sample reflection, flat within half a pixel of the image's edge). In px: the paper gives them as fractions
    of the 32-px side. Measured on the first 300 test images at severities 1-5 against the NumPy transcription in
    tests/test_corruptions.py (paper_elastic), fed the same draws: at most one level apart, on values that sit on a
    half level and round either way in float32 and float64 (mean 0.004 levels at severity 1, below 0.0001 at 2-5);
    the single resampling this replaces was 0.18, 0.69, 2.23, 2.85, 2.93 levels off (13-47 % of values more than a
    level at 2-5). SciPy < 1.6, which the 2018 release may have used, read coordinates within half a pixel of the
    edge (c in (-1, 0) or (n - 1, n)) with mirrored taps: against that, 0.23-0.29 levels, 2.5-3.1 % of values more
    than a level apart at severities 2-5."""
    alpha, sigma, shift = params
    n, size = len(images), images.shape[-1]
    centre, half = size // 2, size // 3
    points = torch.tensor([[centre + half, centre + half], [centre + half, centre - half],
                           [centre - half, centre - half]], dtype=torch.float32, device=images.device)  # (x, y)
    moved = (points + _uniform((n, 3, 2), -shift, shift, generator, images.device)).double()  # summed in float32
    points = points.double()
    # The map from each output pixel back to where it is read: [x, y, 1] @ back, moved points to the original ones.
    back = torch.linalg.solve(F.pad(moved, (0, 1), value=1.0), points.expand(n, 3, 2))  # N x 3 x 2
    pixels = torch.arange(size, dtype=torch.float64, device=images.device)

    def fixed_point(axis):  # OpenCV: (round(1024 a x) + round(1024 (b y + c)) + 16) >> 5, in 1/32 px
        along_x = torch.round(back[:, 0, axis, None, None] * pixels * 1024)  # N x 1 x W
        along_y = torch.round((back[:, 1, axis, None, None] * pixels[:, None] + back[:, 2, axis, None, None]) * 1024)
        return torch.floor((along_x + along_y + 16) / 32) / 32  # N x H x W
    warped = _sample(images, fixed_point(1), fixed_point(0), padding="mirror")
    if alpha == 0:  # severity 1: no field (the paper reads the warped image at whole pixels, unchanged)
        return warped
    noise = _uniform((n, 2, size, size), -1, 1, generator, images.device)
    field = alpha * _gaussian_filter(noise, sigma, 3.0, "reflect")
    rows, cols = _pixel_grid(images)
    return _sample(warped, rows + field[:, 1], cols + field[:, 0], padding="symmetric")

# name (the official file's stem) -> (function, its parameter at severities 1-5), from make_cifar_c.py. Each function
# maps N x 3 x H x W floats in [0, 1], one severity's parameter and a torch.Generator to the same shape, unclipped.
# Zoom blur: the paper's factors exactly, np.arange(1, 1.06, 0.01) ... (7, 12, 16, 21, 26 of them): floating point, so
# severity 5's last is 1.2500000000000002, not 1.25, and its zoomed frame 33 px (round(26 x that) = 33), not 32.
CORRUPTIONS = {
    "gaussian_noise": (gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": (shot_noise, (500, 250, 100, 75, 50)),
    "impulse_noise": (impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "defocus_blur": (defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))),
    "glass_blur": (glass_blur, ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))),
    "motion_blur": (motion_blur, ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))),
    "zoom_blur": (zoom_blur, tuple(tuple(np.arange(1, stop, 0.01).tolist())
                                   for stop in (1.06, 1.11, 1.16, 1.21, 1.26))),
    "snow": (snow, ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
                    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))),
    "fog": (fog, ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))),
    "brightness": (brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    "contrast": (contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "elastic_transform": (elastic_transform, tuple((32 * a, 32 * s, 32 * m) for a, s, m in (
        (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)))),
    "pixelate": (pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
    "jpeg_compression": (jpeg_compression, (80, 65, 58, 50, 40)),
    "saturate": (saturate, ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))),
}

@torch.no_grad()
def corrupt(images, name, severity, seed=0, device=torch.device("cpu"), batch_size=256):
    """uint8 N x 3 x 32 x 32 images (on the CPU) -> the same, corrupted by `name` at `severity` (1-5), a batch at a
    time on `device`. The generator restarts at `seed` for every (corruption, severity), so the severities of a
    corruption draw the same noise and differ only in their parameters; the result depends on seed, device and
    batch size."""
    function, params = CORRUPTIONS[name]
    generator = torch.Generator(device).manual_seed(seed)
    corrupted = torch.empty_like(images)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device).float().div_(255)
        corrupted[start:start + batch_size] = to_uint8(function(batch, params[severity - 1], generator)).cpu()
    return corrupted

# ---- The official files (CIFAR-10-C.tar, 2.9 GB, from the paper's Zenodo record) -------------------------------
def read_official(folder, test_labels):
    """{name: memory-mapped N x 32 x 32 x 3 uint8 array} of each NAME.npy in the official CIFAR-10-C layout (`folder`
    or its CIFAR-10-C/) whose NAME is one of BENCHMARK or EXTRAS: five severities of N / 5 test images each, in
    test-set order, labels in labels.npy. Any other NAME.npy is skipped, with a line that says so, never counted.
    Every file read is checked, and the labels against the test set's; None when the folder holds no .npy file."""
    folder = Path(folder)
    if (folder / "CIFAR-10-C").is_dir():
        folder = folder / "CIFAR-10-C"
    if not folder.is_dir():
        raise UserError(f"--corruptions {folder} is not a folder: give the extracted CIFAR-10-C/ or 'generated'")
    files = {path.stem: path for path in sorted(folder.glob("*.npy"))}
    if not files:
        return None
    unknown = [name for name in files if name not in (*BENCHMARK, *EXTRAS, "labels")]
    for name in unknown:  # a stray or renamed file: said, and never averaged in
        print(f"skipped {files[name]}: not one of CIFAR-10-C's 15 benchmark or 4 extra corruptions")
        del files[name]
    arrays = {}
    for name, path in files.items():
        try:
            arrays[name] = np.load(path, mmap_mode="r")  # 150 MB each: read a severity at a time, never all
        except Exception as error:  # truncated, not a .npy, pickled objects
            raise UserError(f"{path} is not a readable .npy array ({type(error).__name__}): re-extract "
                            f"CIFAR-10-C.tar") from None
    labels = arrays.pop("labels", None)
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu" or not len(labels) or len(labels) % 5:
        raise UserError(f"{folder / 'labels.npy'} must hold the labels of 5 severities (a multiple of 5 "
                        f"integers): re-extract CIFAR-10-C.tar")
    if not any(name in arrays for name in BENCHMARK):
        raise UserError(f"{folder} holds none of CIFAR-10-C's 15 benchmark corruptions ({', '.join(BENCHMARK)}.npy): "
                        f"re-extract CIFAR-10-C.tar")
    per_severity, n = len(labels) // 5, len(test_labels)
    if n > per_severity:
        raise UserError(f"{files['labels']} holds {per_severity} images per severity, fewer than the {n} "
                        f"test images: use --subset {per_severity}")
    for name, images in arrays.items():
        if images.dtype != np.uint8 or images.shape != (len(labels), 32, 32, 3):
            raise UserError(f"{files[name]} must be a uint8 array of shape ({len(labels)}, 32, 32, 3), not "
                            f"{images.dtype} {images.shape}: re-extract CIFAR-10-C.tar")
    for start in range(0, len(labels), per_severity):
        if not np.array_equal(labels[start:start + n], np.asarray(test_labels)):
            raise UserError(f"{files['labels']}: the labels of images {start} to {start + n - 1} are not the "
                            f"test set's first {n}: it is not CIFAR-10-C's, or not in test-set order")
    return arrays

def severity_images(source, name, severity, clean, seed, device, batch_size):
    """uint8 N x 3 x 32 x 32: the first N of an official file's `severity`, or `clean` corrupted here."""
    if isinstance(source, str):  # "generated"
        return corrupt(clean, name, severity, seed, device, batch_size)
    start = len(source[name]) // 5 * (severity - 1)
    return torch.from_numpy(np.array(source[name][start:start + len(clean)])).permute(0, 3, 1, 2)  # a copy

# ---- The report: top-1 and ECE per corruption and severity, the means, the mCE --------------------------------
def corruption_summary(accuracy, clean_acc1, baseline=None):
    """From {corruption: top-1 at severities 1-5}: the mean corruption accuracy over every cell, the mean per severity,
    the relative drop (clean - mean) / clean; with `baseline` (model B's, in the same form), each corruption's error
    of A relative to B, CE_c = sum_s E_A / sum_s E_B, and their mean: the paper's mCE (eq. 1) with B as AlexNet."""
    table = torch.tensor(list(accuracy.values()), dtype=torch.float64)  # corruptions x severities
    mean = float(table.mean())
    summary = {"mean_acc1": mean, "mean_acc1_per_severity": table.mean(0).tolist(),
               "relative_drop": (clean_acc1 - mean) / clean_acc1 if clean_acc1 > 0 else math.nan}
    if baseline is not None:
        errors = {name: (sum(1 - a for a in accuracy[name]), sum(1 - b for b in baseline[name])) for name in accuracy}
        summary["ce"] = {name: a / b if b > 0 else math.nan for name, (a, b) in errors.items()}
        summary["mce"] = sum(summary["ce"].values()) / len(errors)
    return summary

def split_summary(accuracy, ece, clean_acc1, baseline=None):
    """{"benchmark": ..., "extras": ...}: corruption_summary and the mean ECE over the benchmark corruptions present
    (published CIFAR-10-C means and mCE are over the release's 15, as AugMix's cifar.py averages them), and apart over
    the extras present (None without any): an extra is never in the benchmark's means. Each block names its
    corruptions and the missing ones."""
    blocks = {}
    for key, names in (("benchmark", BENCHMARK), ("extras", EXTRAS)):
        present = [name for name in names if name in accuracy]
        blocks[key] = None
        if present:
            summary = corruption_summary({name: accuracy[name] for name in present}, clean_acc1, baseline)
            blocks[key] = {"corruptions": present, "missing": [name for name in names if name not in accuracy],
                           **summary, "mean_ece": float(np.mean([ece[name] for name in present]))}
    return blocks

def corruption_report(model, test_set, device, img_size, views=("identity",), temperature=1.0, average="softmax",
                      source="generated", batch_size=256, seed=0, baseline=None):
    """Top-1 and ECE on each corruption and severity of `test_set` (`source`: "generated", corruptions.py's
    CIFAR-10-C-style set, or corruptions.read_official's arrays), a (corruption, severity) cell at a time through
    common.predict, cells sharing batches when the test set is smaller than one; clean top-1; split_summary's
    benchmark and extras blocks (`baseline`: model B's top-1 per cell, for the CE). Prints the table and the images
    per second."""
    started, n = time.time(), len(test_set)
    clean = evaluate.report(model, test_set, device, img_size, views, temperature, average, batch_size)[0]
    available = CORRUPTIONS if isinstance(source, str) else source
    names = [name for name in (*BENCHMARK, *EXTRAS) if name in available]  # the benchmark's first, in its order
    cells = [(name, severity) for name in names for severity in range(1, 6)]
    accuracy, ece, group, images = {}, {}, [], []
    for index, (name, severity) in enumerate(cells):
        group.append(name)
        images.append(severity_images(source, name, severity, test_set.images, seed, device, batch_size))
        if len(group) * n < batch_size and index < len(cells) - 1:
            continue  # a small test set: several (corruption, severity) cells share batches, not one each
        dataset = common.CifarDataset(torch.cat(images), test_set.labels.repeat(len(group)))
        view_logits, _ = common.predict(model, dataset, device, img_size, views, batch_size)
        for cell_name, logits in zip(group, view_logits.split(n, dim=1)):  # severities in order
            cell, _ = evaluate.from_logits(logits, test_set.labels, temperature, average)
            accuracy.setdefault(cell_name, []).append(cell["acc1"])
            ece.setdefault(cell_name, []).append(cell["ece"])
        group, images = [], []
    seconds = time.time() - started
    result = {"source": source if isinstance(source, str) else "CIFAR-10-C (official files)", "seed": seed,
              "clean_acc1": clean["acc1"], "clean_ece": clean["ece"], "acc1": accuracy, "ece": ece,
              **split_summary(accuracy, ece, clean["acc1"], baseline), "images_per_severity": n,
              "views": list(views), "temperature": temperature, "seconds": seconds,
              "images_per_s": (5 * len(accuracy) + 1) * n / seconds}
    print_corruption_table(result)
    return result

def benchmark_note(block):
    """"14 of the 15 benchmark corruptions (no frost)", or "all 15 benchmark corruptions"."""
    if not block["missing"]:
        return f"all {len(BENCHMARK)} benchmark corruptions"
    missing = ", ".join(block["missing"])
    return f"{len(block['corruptions'])} of the {len(BENCHMARK)} benchmark corruptions (no {missing})"

def print_corruption_table(result):
    """The benchmark corruptions and their means, then the extras and theirs, apart."""
    label = "generated, CIFAR-10-C-style" if result["source"] == "generated" else result["source"]
    has_ce = "ce" in result["benchmark"]  # with --baseline
    print(f"corruptions ({label}): top-1 % at severities 1-5, {result['images_per_severity']} images each, "
          f"{len(result['views'])} view(s), ECE at T = {result['temperature']:.3g}")
    print(f"{'corruption':<18}" + "".join(f"{s:>7}" for s in range(1, 6)) + f"{'mean':>7}{'ECE':>7}"
          + (f"{'CE':>7}" if has_ce else ""))
    for key in ("benchmark", "extras"):
        block = result[key]
        if block is None:
            continue
        if key == "extras":
            print(f"extras, not in the benchmark means ({len(block['corruptions'])} of {len(EXTRAS)}):")
        for name in block["corruptions"]:
            accs = result["acc1"][name]
            ce = f"{block['ce'][name]:>7.3f}" if has_ce else ""
            print(f"{name:<18}" + "".join(f"{100 * a:>7.2f}" for a in accs) + f"{100 * np.mean(accs):>7.2f}"
                  f"{np.mean(result['ece'][name]):>7.3f}{ce}")
        mce = f"{block['mce']:>7.3f}  (mCE)" if has_ce else ""
        print(f"{key + ' mean':<18}" + "".join(f"{100 * a:>7.2f}" for a in block["mean_acc1_per_severity"])
              + f"{100 * block['mean_acc1']:>7.2f}{block['mean_ece']:>7.3f}{mce}")
    benchmark = result["benchmark"]
    print(f"clean top-1 {100 * result['clean_acc1']:.2f} %; over {benchmark_note(benchmark)}: mean corruption "
          f"accuracy {100 * benchmark['mean_acc1']:.2f} % (relative drop {100 * benchmark['relative_drop']:.1f} %)")
    print(f"{result['seconds']:.1f} s, {result['images_per_s']:.0f} img/s")

def plot_corruptions(result, path, title):
    """Heat map: corruption x severity, the top-1 in each cell, the benchmark corruptions first and the extras
    below a line, marked; the clean top-1 and the benchmark mean in the title."""
    benchmark, extras = result["benchmark"], result["extras"] or {"corruptions": []}
    names = benchmark["corruptions"] + extras["corruptions"]
    table = np.array([result["acc1"][name] for name in names])
    fig, axis = evaluate._pyplot().subplots(figsize=(6.5, 0.42 * len(table) + 1.8))
    axis.imshow(table, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(table):
        axis.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=8)
    if extras["corruptions"]:
        axis.axhline(len(benchmark["corruptions"]) - 0.5, color="black", linewidth=2)
    labels = benchmark["corruptions"] + [f"{name} (extra)" for name in extras["corruptions"]]
    axis.set(xticks=range(5), xticklabels=range(1, 6), yticks=range(len(table)), yticklabels=labels,
             xlabel="severity", title=f"top-1 %; clean {100 * result['clean_acc1']:.1f} %, benchmark mean "
                                      f"{100 * benchmark['mean_acc1']:.1f} % ({len(benchmark['corruptions'])} of "
                                      f"{len(BENCHMARK)})")
    evaluate._save(fig, path, title)
