"""CIFAR-10-C-style corruptions (Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations"): 13 of the paper's 19, in torch, on whole uint8 batches on the device, seeded; and
the reader of the official files. Imported by evaluate.py only (`evaluate.py CKPT --corruptions generated|DIR`),
and by Level 4's final test (support.study.robustness): the images and their report.
The five severities of each are the parameters of the paper's own CIFAR-10 generator, hendrycks/robustness
`ImageNet-C/create_c/make_cifar_c.py` (NumPy, scikit-image, OpenCV, ImageMagick); motion blur follows
ImageMagick's kernel as bethgelab/imagecorruptions re-implements it. The code here is this project's own, and the
images are *not* the released ones: figures on them are not comparable to published CIFAR-10-C numbers.
Left out: frost (needs the paper's frost photographs), snow and spatter (ImageMagick's motion blur, OpenCV's edge
and distance transforms), glass blur (a per-pixel swapping loop), speckle noise and Gaussian blur (two of the four
extra corruptions, left out to keep the set at 13 x 5 = 65 passes).
"""
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF

import common
import evaluate
from support.errors import UserError

def to_uint8(images):
    """[0, 1] floats -> uint8, rounded (the paper's np.uint8 truncates, which darkens every image by half a level)."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)

def _uniform(shape, low, high, generator, device):
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)

def _pixel_grid(images):
    """(rows, cols): N x H x W pixel coordinates, 0 at the first pixel's centre."""
    n, _, height, width = images.shape
    rows, cols = torch.meshgrid(torch.arange(height, device=images.device, dtype=images.dtype),
                                torch.arange(width, device=images.device, dtype=images.dtype), indexing="ij")
    return rows.expand(n, -1, -1), cols.expand(n, -1, -1)

def _sample(images, rows, cols, mode="bilinear", padding="border"):
    """Each image read at N x H x W pixel coordinates (rows, cols), bilinear or nearest, as scipy's map_coordinates."""
    height, width = images.shape[-2:]
    grid = torch.stack([2 * cols / (width - 1) - 1, 2 * rows / (height - 1) - 1], dim=-1)
    return F.grid_sample(images, grid, mode=mode, padding_mode=padding, align_corners=True)

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

def motion_blur(images, params, generator):
    """ImageMagick's motion blur: a one-sided Gaussian of `sigma` px over 2 `radius` + 1 whole-pixel steps along a
    random angle in [-45, 45] degrees, the edge pixels repeated beyond the border."""
    radius, sigma = params
    angle = torch.deg2rad(_uniform((len(images), 1, 1), -45, 45, generator, images.device))
    steps = torch.arange(2 * radius + 1, dtype=torch.float64)
    weights = torch.exp(-steps ** 2 / (2 * sigma ** 2))
    rows, cols = _pixel_grid(images)
    blurred = torch.zeros_like(images)
    for step, weight in zip(steps.tolist(), (weights / weights.sum()).tolist()):
        shifted = _sample(images, rows + (step * angle.sin()).round(), cols + (step * angle.cos()).round(), "nearest")
        blurred += weight * shifted
    return blurred

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
    """Encoded and decoded by libjpeg at `quality`, on the CPU (torchvision.io)."""
    encoded = torchvision.io.encode_jpeg(list(to_uint8(images).cpu()), quality=quality)
    decoded = torch.stack(torchvision.io.decode_jpeg(encoded))
    return decoded.to(images.device, images.dtype) / 255

def elastic_transform(images, params, generator):
    """A random affine map (three points 10 px from the centre each moved by up to `shift` px), then a displacement
    field of uniform noise smoothed by a Gaussian of `sigma` px (truncated at 3 sigma) times `alpha` px; reflected
    border. In px: the paper gives them as fractions of the 32-px side."""
    alpha, sigma, shift = params
    n, size = len(images), images.shape[-1]
    centre, half = size // 2, size // 3
    points = torch.tensor([[centre + half, centre + half], [centre + half, centre - half],
                           [centre - half, centre - half]], dtype=images.dtype, device=images.device)  # (x, y)
    moved = points + _uniform((n, 3, 2), -shift, shift, generator, images.device)
    # The map from each output pixel back to where it is read: [x, y, 1] @ back, moved points to the original ones.
    back = torch.linalg.solve(F.pad(moved, (0, 1), value=1.0), points.expand(n, 3, 2))
    rows, cols = _pixel_grid(images)
    if alpha > 0:
        radius = int(3 * sigma + 0.5)
        noise = _uniform((n, 2, size, size), -1, 1, generator, images.device)
        field = alpha * TF.gaussian_blur(noise, [2 * radius + 1] * 2, [sigma, sigma])
        rows, cols = rows + field[:, 0], cols + field[:, 1]
    source = torch.stack([cols, rows, torch.ones_like(rows)], dim=-1) @ back[:, None]  # N x H x W x (x, y)
    return _sample(images, source[..., 1], source[..., 0], padding="reflection")

# name (the official file's stem) -> (function, its parameter at severities 1-5), from make_cifar_c.py. Each function
# maps N x 3 x H x W floats in [0, 1], one severity's parameter and a torch.Generator to the same shape, unclipped.
# Zoom blur: the factors np.arange(1, 1.06, 0.01) ... there gives (7, 12, 16, 21, 26 of them, floating point).
CORRUPTIONS = {
    "gaussian_noise": (gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": (shot_noise, (500, 250, 100, 75, 50)),
    "impulse_noise": (impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "defocus_blur": (defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))),
    "motion_blur": (motion_blur, ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))),
    "zoom_blur": (zoom_blur, tuple(tuple(1 + i / 100 for i in range(n)) for n in (7, 12, 16, 21, 26))),
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
    or its CIFAR-10-C/): five severities of N / 5 test images each, in test-set order, labels in labels.npy. Every
    file is checked, and the labels against the test set's; None when the folder holds no .npy file."""
    folder = Path(folder)
    if (folder / "CIFAR-10-C").is_dir():
        folder = folder / "CIFAR-10-C"
    if not folder.is_dir():
        raise UserError(f"--corruptions {folder} is not a folder: give the extracted CIFAR-10-C/ or 'generated'")
    files = {path.stem: path for path in sorted(folder.glob("*.npy"))}
    if not files:
        return None
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
    if not arrays:
        raise UserError(f"{folder} holds labels.npy but no corruption (NAME.npy): re-extract CIFAR-10-C.tar")
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

def corruption_report(model, test_set, device, img_size, views=("identity",), temperature=1.0, average="softmax",
                      source="generated", batch_size=256, seed=0, baseline=None):
    """Top-1 and ECE on each corruption and severity of `test_set` (`source`: "generated", corruptions.py's
    CIFAR-10-C-style set, or corruptions.read_official's arrays), a (corruption, severity) cell at a time through
    common.predict, cells sharing batches when the test set is smaller than one; clean top-1; corruption_summary
    (`baseline`: model B's top-1 per cell, for the CE). Prints the table and the images per second."""
    started, n = time.time(), len(test_set)
    clean = evaluate.report(model, test_set, device, img_size, views, temperature, average, batch_size)[0]
    cells = [(name, severity) for name in (CORRUPTIONS if isinstance(source, str) else source)
             for severity in range(1, 6)]
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
              "mean_ece": float(np.mean(list(ece.values()))), **corruption_summary(accuracy, clean["acc1"], baseline),
              "images_per_severity": n, "views": list(views), "temperature": temperature, "seconds": seconds,
              "images_per_s": (5 * len(accuracy) + 1) * n / seconds}
    print_corruption_table(result)
    return result

def print_corruption_table(result):
    label = "generated, CIFAR-10-C-style" if result["source"] == "generated" else result["source"]
    print(f"corruptions ({label}): top-1 % at severities 1-5, {result['images_per_severity']} images each, "
          f"{len(result['views'])} view(s), ECE at T = {result['temperature']:.3g}")
    print(f"{'corruption':<18}" + "".join(f"{s:>7}" for s in range(1, 6)) + f"{'mean':>7}{'ECE':>7}"
          + (f"{'CE':>7}" if "ce" in result else ""))
    for name, accs in result["acc1"].items():
        ce = f"{result['ce'][name]:>7.3f}" if "ce" in result else ""
        print(f"{name:<18}" + "".join(f"{100 * a:>7.2f}" for a in accs) + f"{100 * np.mean(accs):>7.2f}"
              f"{np.mean(result['ece'][name]):>7.3f}{ce}")
    print(f"{'mean':<18}" + "".join(f"{100 * a:>7.2f}" for a in result["mean_acc1_per_severity"])
          + f"{100 * result['mean_acc1']:>7.2f}{result['mean_ece']:>7.3f}"
          + (f"{result['mce']:>7.3f}  (mCE)" if "ce" in result else ""))
    print(f"clean top-1 {100 * result['clean_acc1']:.2f} %, mean corruption accuracy {100 * result['mean_acc1']:.2f} "
          f"% (relative drop {100 * result['relative_drop']:.1f} %); {result['seconds']:.1f} s, "
          f"{result['images_per_s']:.0f} img/s")

def plot_corruptions(result, path, title):
    """Heat map: corruption x severity, the top-1 in each cell, and the clean top-1 in the title."""
    table = np.array(list(result["acc1"].values()))
    fig, axis = evaluate._pyplot().subplots(figsize=(6.5, 0.42 * len(table) + 1.6))
    axis.imshow(table, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(table):
        axis.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=8)
    axis.set(xticks=range(5), xticklabels=range(1, 6), yticks=range(len(table)), yticklabels=list(result["acc1"]),
             xlabel="severity", title=f"top-1 %, clean {100 * result['clean_acc1']:.1f} %, mean corrupted "
                                      f"{100 * result['mean_acc1']:.1f} %")
    evaluate._save(fig, path, title)
