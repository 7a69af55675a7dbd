"""Measure any checkpoint of this suite, or a bare 10-class ResNet-50 state_dict, on CIFAR-10.

Top-1, per-class accuracy, precision, recall and F1, ECE (15 equal-width bins), NLL and Brier score, the confusion
matrix; a JSON and a PNG under --out. The levels measure their final test with this script's functions (report,
from_logits), so a level's figures and this script's agree. The validation split is rebuilt with the checkpoint's
own --seed: the images the run chose on.

    python evaluate.py checkpoints/level1_best.pth
    python evaluate.py checkpoints/level4_best.pth --tta                        # the level's own TTA views
    python evaluate.py checkpoints/level4_best.pth --tta flip+translate+scale --split val
    python evaluate.py checkpoints/level4_best.pth --split val --bn-stats clean      # what BatchNorm statistics do
    python evaluate.py checkpoints/level4_best.pth --images my_photos/ cat.jpg   # your own pictures
"""
import argparse
import importlib
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from support import inputs, records, run
from support.errors import UserError
from support.files import load_checkpoint

# ---- Metrics, on CPU tensors (each checked against a hand-computed answer in tests/test_evaluate.py) -------------
def confusion_matrix(preds, labels, num_classes=len(common.CLASSES)):
    """K x K counts: row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + preds, minlength=num_classes**2).view(num_classes, num_classes)

def precision_recall_f1(cm):
    """Per class: precision = diagonal / column sums, recall (= per-class accuracy) = diagonal / row sums, F1; 0
    where a class was never predicted or never present."""
    tp = cm.diag().double()
    precision, recall = torch.nan_to_num(tp / cm.sum(0)), torch.nan_to_num(tp / cm.sum(1))
    return precision, recall, torch.nan_to_num(2 * precision * recall / (precision + recall))

def calibration_bins(probs, labels, n_bins=15, preds=None):
    """Per equal-width confidence bin (lo, hi]: (count, accuracy, mean confidence), the confidence being the probability
    of the predicted class (by default the most probable one)."""
    preds = probs.argmax(-1) if preds is None else preds
    confidence = probs.double().gather(1, preds[:, None]).squeeze(1)
    bins = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1
    count = torch.bincount(bins, minlength=n_bins).double()
    correct = torch.bincount(bins, (preds == labels).double(), minlength=n_bins)
    summed = torch.bincount(bins, confidence, minlength=n_bins)
    return count, correct / count.clamp_min(1), summed / count.clamp_min(1)

def expected_calibration_error(probs, labels, n_bins=15, preds=None):
    """ECE (Naeini et al. 2015; Guo et al. 2017, eq. 3): sum over bins of |bin| / N * |accuracy - confidence|."""
    count, accuracy, confidence = calibration_bins(probs, labels, n_bins, preds)
    return float((count / count.sum() * (accuracy - confidence).abs()).sum())

def calibration_table(probs, labels, preds=None):
    """calibration_bins as JSON: per bin (its upper edge), the images, their accuracy and mean confidence (null in an
    empty bin): what the ECE sums, and the counts a reliability diagram needs to be read."""
    count, accuracy, confidence = calibration_bins(probs, labels, preds=preds)
    occupied = (count > 0).tolist()
    return {"upper_edges": [(b + 1) / len(count) for b in range(len(count))], "count": count.long().tolist(),
            "accuracy": [a if full else None for a, full in zip(accuracy.tolist(), occupied)],
            "confidence": [c if full else None for c, full in zip(confidence.tolist(), occupied)]}

def metrics(probs, labels, preds=None, nll=None):
    """Every figure for one set of N x K probabilities; `preds` (default: their arg-max) give top-1 and the per-class
    figures, the probabilities give ECE (with its bins) and Brier (1950), and NLL unless `nll` is given (from_logits
    gives the exact one; from probabilities alone it is clamped at 1e-12, so that a sure mistake stays finite)."""
    preds = probs.argmax(-1) if preds is None else preds
    if nll is None:
        nll = float(-probs.double().gather(1, labels[:, None]).clamp_min(1e-12).log().mean())
    cm = confusion_matrix(preds, labels)
    precision, recall, f1 = precision_recall_f1(cm)
    per_class = lambda values: dict(zip(common.CLASSES, values.tolist()))  # noqa: E731
    ece = expected_calibration_error(probs, labels, preds=preds)
    return {"acc1": float((preds == labels).double().mean()), "ece": ece, "nll": nll,
            "brier": float(((probs.double() - F.one_hot(labels, probs.shape[1])) ** 2).sum(1).mean()),
            "per_class_acc": per_class(recall), "precision": per_class(precision), "recall": per_class(recall),
            "f1": per_class(f1), "confusion_matrix": cm.tolist(),
            "calibration_bins": calibration_table(probs, labels, preds), "num_images": len(labels)}

def most_confused(cm, k=5):
    """The k largest off-diagonal cells of a confusion matrix: (true class, predicted class, count), count > 0."""
    off_diagonal = torch.as_tensor(cm) * (1 - torch.eye(len(cm), dtype=torch.long))
    counts, cells = off_diagonal.flatten().sort(descending=True, stable=True)
    return [(common.CLASSES[c // len(cm)], common.CLASSES[c % len(cm)], n) for n, c in
            zip(counts[:k].tolist(), cells[:k].tolist()) if n > 0]

def confident_mistakes(probs, labels, k=24):
    """Indices of the k wrong predictions made with the highest confidence, the most confident first."""
    confidence, preds = probs.max(-1)
    wrong = torch.nonzero(preds != labels).flatten()
    return wrong[confidence[wrong].argsort(descending=True, stable=True)][:k].tolist()

def from_logits(view_logits, labels, temperature=1.0, average="softmax"):
    """metrics() of V x N x K logits: the prediction from the T = 1 average of the views, the probabilities and the
    exact NLL at `temperature` (Guo et al. 2017: T only calibrates; it must not change a prediction).
    Returns (report, probs)."""
    probs = common.average_views(view_logits, temperature, average)
    preds = common.average_views(view_logits, 1.0, average).argmax(-1)
    nll = float(common.nll_per_image(view_logits, labels, temperature, average).mean())
    return {**metrics(probs, labels, preds, nll), "temperature": temperature, "tta_average": average}, probs

def report(model, dataset, device, img_size, views=("identity",), temperature=1.0, average="softmax", batch_size=256):
    """Run `model` over `dataset` with the TTA `views` and measure it (see from_logits); adds the images per second.
    Returns (report, probs)."""
    started = time.time()
    view_logits, labels = common.predict(model, dataset, device, img_size, views, batch_size)
    result, probs = from_logits(view_logits, labels, temperature, average)
    return {**result, "views": list(views), "images_per_s": len(labels) / (time.time() - started)}, probs

def views_of(view_logits, views):
    """The logits of `views` out of predict()'s logits of all of common.TTA_VIEWS (in its order): every TTA set
    measured from one pass per view."""
    all_views = list(common.TTA_VIEWS)
    if len(view_logits) != len(all_views):
        raise ValueError(f"views_of takes the logits of all {len(all_views)} views, got {len(view_logits)}")
    return view_logits[[all_views.index(view) for view in views]]

def views_report(all_view_logits, labels, views, temperature=1.0, average="softmax"):
    """from_logits() of the TTA set `views`, from the logits of every view (predict(..., common.TTA_VIEWS))."""
    result, probs = from_logits(views_of(all_view_logits, views), labels, temperature, average)
    return {**result, "views": list(views)}, probs

def loss_and_accuracy(model, dataset, device, img_size):
    """Validation loss (cross-entropy) and top-1 of one view, with one wait for the device."""
    logits, labels = common.predict(model, dataset, device, img_size)
    return float(F.cross_entropy(logits[0], labels)), float((logits[0].argmax(-1) == labels).double().mean())

# ---- Per image, for --compare (the statistics are in support/evidence.py) --------------------------------------------
def per_image(view_logits, labels, temperature=1.0, average="softmax"):
    """Per image: the T = 1 prediction, right or not, its confidence at `temperature`, the exact NLL there."""
    preds = common.average_views(view_logits, 1.0, average).argmax(-1)
    probs = common.average_views(view_logits, temperature, average).double()
    return {"preds": preds, "correct": preds == labels, "confidence": probs.gather(1, preds[:, None]).squeeze(1),
            "nll": common.nll_per_image(view_logits, labels, temperature, average)}

# ---- Plots -------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib  # imported when a plot is drawn: training runs start faster without it
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    return plt

def _save(fig, path, title):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)

def plot_curves(history, path, title):
    """Loss and accuracy per epoch: training (on augmented, mixed batches) and validation (clean), plus the EMA's."""
    fig, (ax_loss, ax_acc) = _pyplot().subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in history]
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    for key, axis in (("val_loss", ax_loss), ("val_acc", ax_acc), ("val_acc_ema", ax_acc), ("val_acc_swa", ax_acc)):
        if any(row.get(key) is not None for row in history):
            axis.plot(epochs, [row.get(key) for row in history], label=key.replace("_", " "))
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1", title="validation accuracy")
    for axis in (ax_loss, ax_acc):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # with --train-on-all there is no validation curve
            axis.legend()
    _save(fig, path, title)

def plot_confusion(cm, path, title):
    """Counts, and each row divided by its total (the diagonal is then the per-class accuracy)."""
    cm = np.asarray(cm)
    fig, axes = _pyplot().subplots(1, 2, figsize=(14, 6))
    for axis, matrix, fmt in ((axes[0], cm, "d"), (axes[1], cm / cm.sum(1, keepdims=True).clip(1), ".2f")):
        axis.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            axis.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7,
                      color="white" if value > matrix.max() / 2 else "black")
        axis.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true")
        axis.set_xticklabels(common.CLASSES, rotation=45, ha="right")
        axis.set_yticklabels(common.CLASSES)
    _save(fig, path, title)

def plot_reliability(panels, path, title):
    """Reliability diagrams (Guo et al. 2017, fig. 1): accuracy per confidence bin against the diagonal, the ECE
    they sum to in each panel's title, and under the bars the images in each bin (log scale: a bin of 3 images is
    seen next to one of 3,000, and told from an empty one). `panels`: {name: (probs, labels)}."""
    fig, axes = _pyplot().subplots(2, len(panels), figsize=(5 * len(panels), 6), squeeze=False,
                                   gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for column, (name, (probs, labels)) in enumerate(panels.items()):
        count, accuracy, _ = calibration_bins(probs, labels)
        ece = expected_calibration_error(probs, labels)
        centres = ((torch.arange(len(count)) + 0.5) / len(count)).tolist()
        bars, counts = axes[0, column], axes[1, column]
        bars.bar(centres, accuracy.tolist(), width=1 / len(count), edgecolor="black", label="accuracy")
        bars.plot([0, 1], [0, 1], "r--", label="perfect calibration")
        bars.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{name}: ECE {ece:.4f}")
        bars.legend(loc="upper left")
        counts.bar(centres, count.tolist(), width=1 / len(count), edgecolor="black", color="tab:gray")
        for centre, n in zip(centres, count.long().tolist()):
            counts.text(centre, max(n, 1), str(n), ha="center", va="bottom", fontsize=7)
        counts.set(yscale="log", ylim=(0.8, 5 * max(1.0, float(count.max()))), xlabel="confidence",
                   ylabel="images")
    _save(fig, path, title)

def plot_images(images, captions, path, title, columns=8):
    """uint8 N x 3 x 32 x 32 images in a grid, each with its caption."""
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = _pyplot().subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, images, captions):
        axis.imshow(np.asarray(image).transpose(1, 2, 0), interpolation="nearest")
        axis.set_title(caption, fontsize=7)
    _save(fig, path, title)

def plot_mistakes(dataset, probs, path, k=24):
    """The k most confident mistakes as an image grid (true -> predicted, confidence); returns their indices."""
    mistakes = confident_mistakes(probs, dataset.labels, k)
    confidence, preds = probs.max(-1)
    plot_images(dataset.images[mistakes], [f"{common.CLASSES[dataset.labels[i]]} -> {common.CLASSES[preds[i]]}\n"
                                           f"p={confidence[i]:.2f}" for i in mistakes], path, "most confident mistakes")
    return mistakes

def plot_disagreements(dataset, a, b, path, title, k=8):
    """Up to k images A gets right and B wrong, then k the other way (per_image dicts), most confident error first."""
    images, captions = [], []
    for right, wrong, label in ((a, b, "A right, B wrong"), (b, a, "B right, A wrong")):
        chosen = torch.nonzero(right["correct"] & ~wrong["correct"]).flatten()
        chosen = chosen[wrong["confidence"][chosen].argsort(descending=True, stable=True)][:k].tolist()
        images += [dataset.images[i] for i in chosen]
        captions += [f"{label}\n{common.CLASSES[dataset.labels[i]]}, not {common.CLASSES[wrong['preds'][i]]}"
                     for i in chosen]
    plot_images(images, captions, path, title)

# ---- Command line ------------------------------------------------------------------------------------------------
def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a .pth checkpoint of this suite or a 10-class ResNet-50 state_dict")
    parser.add_argument("--tta", nargs="?", const="default", choices=["default", *common.TTA_SETS],
                        help="test-time augmentation views; plain --tta: the checkpoint's own set (default: off)")
    parser.add_argument("--tta-average", choices=["softmax", "logit"], default="softmax",
                        help="average the views' probabilities or their logits (default: softmax)")
    parser.add_argument("--split", choices=["test", "val"], default="test", help="which split (default: test)")
    parser.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py (default: ./data)")
    parser.add_argument("--out", default="results", help="folder for the JSON and PNG (default: results)")
    parser.add_argument("--overwrite", action="store_true", help="replace another checkpoint's results (default: off)")
    parser.add_argument("-b", "--batch-size", type=run.positive_int, default=256,
                        help="images per batch (default: 256)")
    parser.add_argument("--img-size", type=run.number(int, at_least=32),
                        help="input side in px (default: the checkpoint's, else 224)")
    parser.add_argument("--subset", type=run.positive_int, help="evaluate the first N images only (default: all)")
    parser.add_argument("--no-temperature", action="store_true",
                        help="ignore a calibration temperature stored in the checkpoint (default: apply it)")
    parser.add_argument("--bn-stats", choices=["checkpoint", "train", "clean"], default="checkpoint",
                        help="BatchNorm statistics: the stored ones, or recomputed on the run's training images "
                             "through its level's training augmentation, or on the same images clean "
                             "(default: checkpoint)")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default: auto)")
    parser.add_argument("--compare", metavar="B.pth", help="compare the checkpoint with B.pth on the same images: "
                        "paired bootstrap CIs, McNemar's exact test (default: off)")
    # A 95 % percentile interval needs enough resamples to have a 2.5th and a 97.5th percentile; each takes about
    # 2 ms for 10,000 images on 2 CPU cores, so 100,000 take minutes.
    parser.add_argument("--resamples", type=run.number(int, at_least=100, at_most=100_000, why="a percentile interval "
                        "needs 100, and 100,000 take minutes"), default=2000,
                        help="bootstrap resamples of --compare, 100 to 100,000 (default: 2000)")
    parser.add_argument("--images", nargs="+", metavar="PATH",
                        help="predict your own JPEG/PNG files, or folders of them, instead of a split (default: off)")
    parser.add_argument("--corruptions", metavar="DIR|generated",
                        help="robustness on the test set: the official CIFAR-10-C .npy files in DIR, or 'generated' "
                             "CIFAR-10-C-style corruptions, also used when DIR holds no .npy file (default: off)")
    parser.add_argument("--baseline", metavar="B.pth", help="with --corruptions: the corruption error relative to "
                        "this checkpoint's, per corruption and its mean (mCE) (default: none)")
    return parser

def validate_args(args):
    if args.compare and (args.images or args.corruptions or args.bn_stats != "checkpoint"):
        raise UserError("--compare measures two checkpoints as they are, on a split: not with --images, "
                        "--corruptions or --bn-stats")
    if args.baseline and not args.corruptions:
        raise UserError("--baseline needs --corruptions DIR|generated")

def load_model(path):
    """(model, checkpoint dict) from a checkpoint of this suite or a bare state_dict with a 10-class head."""
    checkpoint = load_checkpoint(path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict) and "model" not in checkpoint:
        checkpoint = {**checkpoint, "model": checkpoint["state_dict"]}  # timm's train.py layout
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)):
        checkpoint = {"model": checkpoint}  # a bare state_dict
    if not isinstance(checkpoint.get("args"), dict):  # hand-made: None, absent, another type
        checkpoint = {**checkpoint, "args": {}}
    model = common.build_model("none")
    common.load_weights(model, checkpoint, path)  # anything but a ResNet-50 is a one-line error there
    if not any(k.endswith("fc.weight") and v.shape[0] == len(common.CLASSES) for k, v in checkpoint["model"].items()):
        raise UserError(f"{path} has no 10-class head: it is not a CIFAR-10 model of this suite")
    return model, checkpoint

def choose_temperature(checkpoint, args, tta_set):
    """The T fitted for the views measured: Level 4 stores one per TTA set (`temperatures`, for its --tta-average),
    older checkpoints one for a single view. T = 1 with --no-temperature, and with a warning where the checkpoint has
    no T for these views, the stored T is not a positive number, or the fit hit its search bound (then it is no fit)."""
    if args.no_temperature:
        return 1.0
    tta_set = tta_set or "none"
    fits = checkpoint.get("temperatures")
    if fits is None and "temperature" in checkpoint:  # one T, fitted on a single view
        fits = {"none": {"temperature": checkpoint["temperature"],
                         "at_bound": checkpoint.get("temperature_at_bound", False)}}
    if not fits:
        return 1.0
    if not isinstance(fits, dict) or not all(isinstance(fit, dict) for fit in fits.values()):
        print("warning: the checkpoint's temperatures are not {set: {temperature, at_bound}}: T = 1")
        return 1.0
    train_args = checkpoint.get("args") or {}
    fitted_average = train_args.get("tta_average", "softmax")
    if tta_set not in fits or (tta_set != "none" and args.tta_average != fitted_average):
        print(f"warning: the checkpoint holds no temperature fitted for TTA set {tta_set} with {args.tta_average} "
              f"averaging: T = 1")
        return 1.0
    stored = fits[tta_set].get("temperature")
    if isinstance(stored, bool) or not isinstance(stored, (int, float)):
        print(f"warning: the stored temperature {stored!r} is not a number: not applied")
        return 1.0
    fit = {"temperature": float(stored), "at_bound": fits[tta_set].get("at_bound") is True}  # absent: no bound hit
    if not (math.isfinite(fit["temperature"]) and fit["temperature"] > 0):
        print(f"warning: the stored temperature {fit['temperature']} is not a positive number: not applied")
        return 1.0
    if fit["at_bound"]:
        print(f"warning: the stored temperature {fit['temperature']:.3g} lies at the end of its search range, so it is "
              f"no fit (validation logits near chance level?): not applied")
    return common.applied_temperature(fit)

# ResNet-50's stages that hold BatchNorm layers (the head, fc, has none), named as Levels 3-4 name them
BN_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

def bn_stage(name):
    """The stage of a BatchNorm layer by its module name: bn1 is the stem's, layerN.* belong to layerN."""
    top = name.split(".")[0]
    if top == "bn1":
        return "stem"
    return top

def trained_stages(checkpoint):
    """The stages whose BatchNorm layers trained (train mode) in the epoch the checkpoint ends, by its level's own
    rule: Levels 1-2 train the head alone for --head-epochs, the backbone in eval mode, then every stage; Levels 3-4
    unfreeze one stage more every --unfreeze-every epochs (their unfreeze_epoch). The others kept ImageNet's."""
    level = importlib.import_module(checkpoint["level"])  # one of the four level scripts
    defaults = vars(level.get_args_parser().parse_args([]))  # for flags an older or hand-made checkpoint lacks
    train_args = argparse.Namespace(**{**defaults, **checkpoint["args"]})
    epoch = checkpoint["epoch"] - 1  # 0-based, as the levels count: the checkpoint holds the end of this epoch
    if hasattr(level, "unfreeze_epoch"):  # Levels 3-4: progressive unfreezing
        return [stage for stage in BN_STAGES if level.unfreeze_epoch(stage, train_args) <= epoch]
    if epoch < train_args.head_epochs:  # Levels 1-2, the head stage
        return []
    return list(BN_STAGES)

def recompute_trained_bn(model, checkpoint, bn_set, device, img_size, batch_size):
    """The BatchNorm statistics of the stages trained_stages names recomputed on `bn_set` (common.recompute_bn); the
    frozen stages keep theirs as saved, and normalise with them meanwhile, as in training. Returns those stages."""
    stages = trained_stages(checkpoint)
    norms = [module for name, module in model.named_modules()
             if isinstance(module, torch.nn.BatchNorm2d) and bn_stage(name) in stages]
    if norms:
        common.recompute_bn(model, bn_set, device, img_size, batch_size, norms)
    return stages

def recompute_statistics(model, checkpoint, args, device, img_size):
    """--bn-stats train|clean: the BatchNorm statistics recomputed as the levels recompute an average's
    (common.bn_images, recompute_trained_bn): only in the stages that trained at the checkpoint's epoch, on the run's
    own first common.BN_IMAGES training images (its --seed split), through the training augmentation of the
    checkpoint's level (train), or clean (clean), in batches of its --batch-size. Returns the stages recomputed."""
    train_args = checkpoint.get("args") or {}
    if (checkpoint.get("level") not in ("level1", "level2", "level3", "level4") or "seed" not in train_args
            or "epoch" not in checkpoint):
        raise UserError(f"--bn-stats {args.bn_stats} needs a levelN_best.pth of this suite (its level, epoch and "
                        f"args give the training images, augmentation and trained stages): use --bn-stats checkpoint")
    level = importlib.import_module(checkpoint["level"])  # one of the four level scripts, for its train_transform
    # The level's defaults under the stored flags: a hand-edited or older checkpoint may lack some of them
    train_args = argparse.Namespace(**{**vars(level.get_args_parser().parse_args([])), **train_args})
    train_set, _, _ = common.cifar10_datasets(args.data_dir, train_args.seed, train_args.subset,
                                              train_on_all=train_args.train_on_all)
    transform = None
    if args.bn_stats == "train":
        transform = level.train_transform(train_args)
    bn_set = common.bn_images(train_set, common.BN_IMAGES, transform, train_args.seed)
    stages = recompute_trained_bn(model, checkpoint, bn_set, device, img_size, train_args.batch_size)
    kept = [stage for stage in BN_STAGES if stage not in stages]
    print(f"--bn-stats {args.bn_stats}: BatchNorm statistics recomputed in {', '.join(stages) or 'no stage'} (those "
          f"that trained in epoch {checkpoint['epoch']}), kept as saved in {', '.join(kept) or 'none'}")
    return stages

def load_as_cifar(path):
    """An image file -> uint8 3 x 32 x 32, made as CIFAR-10's were: a centre square, area-averaged down to 32 px."""
    from PIL import Image  # torchvision depends on Pillow
    # Pillow warns (3 lines, at open and at crop) above 89 megapixels and refuses above twice that (a decompression
    # bomb, skipped by the caller); a photo between the two is read and reduced like any other, without the warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16 bits per pixel (a 16-bit PNG): scaled to 8, not clipped at 255
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255)
                                        .astype(np.uint8))
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            square = image.crop((left, top, left + side, top + side)).resize((32, 32), Image.BOX)
            return np.asarray(square).transpose(2, 0, 1)

def predict_images(args, model, device, img_size, views, temperature, json_path):
    """Top-3 classes for the user's own images: printed, and written as a JSON and a PNG sheet under --out."""
    files = [f for p in map(Path, args.images) for f in (sorted(p.iterdir()) if p.is_dir() else [p])
             if f.suffix.lower() in (".png", ".jpg", ".jpeg") or not p.is_dir()]
    images, names = [], []
    for path in files:
        if path.exists() and not path.is_file():  # a named pipe would block open() for ever
            print(f"skipped {path}: not a regular file (a folder, a named pipe or a device)")
            continue
        try:
            images.append(load_as_cifar(path))
            names.append(str(path))
        except Exception as error:  # unreadable or not an image: say which, go on
            print(f"skipped {path}: not a readable image ({type(error).__name__})")
    if not images:
        raise UserError("no readable JPEG/PNG image among --images: give image files or folders of them")
    dataset = common.CifarDataset(np.stack(images), np.zeros(len(images), dtype=np.int64))
    view_logits, _ = common.predict(model, dataset, device, img_size, views, args.batch_size)
    probs = common.average_views(view_logits, temperature, args.tta_average)
    rows, order = [], common.average_views(view_logits, 1.0, args.tta_average).argsort(descending=True)  # T = 1 ranks
    for name, p, ranked in zip(names, probs, order):
        top = [(common.CLASSES[i], float(p[i])) for i in ranked[:3]]
        print(f"{name}: " + ", ".join(f"{c} {q:.3f}" for c, q in top))
        rows.append({"file": name, "top3": top})
    records.write_json(json_path, {"checkpoint": args.checkpoint, "temperature": temperature, "views": views,
                                   "images": rows, **records.run_info(device)})
    plot_images(images, [f"{Path(r['file']).name[:18]}\n{r['top3'][0][0]} {r['top3'][0][1]:.2f}" for r in rows],
                json_path.with_suffix(".png"), f"{Path(args.checkpoint).name}: top-1")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")

def compare(args, device):
    """A.pth --compare B.pth: both on the same images and views (plain --tta: A's set), each at its own temperature
    and input size unless told otherwise; prints a table, writes compare_<A>_vs_<B>_<split>.{json,png} under --out."""
    paths = (args.checkpoint, args.compare)
    loaded = [load_model(path) for path in paths]
    train_args = [checkpoint["args"] for _, checkpoint in loaded]
    tta_set = inputs.tta_set_of(args, train_args[0], args.checkpoint)
    img_sizes = [inputs.input_size(args, own_args, path) for own_args, path in zip(train_args, paths)]
    seeds = {a.get("seed", 0) for a in train_args}
    if args.split == "val" and (len(seeds) > 1 or any(a.get("train_on_all") for a in train_args)):
        raise UserError("--split val needs two checkpoints trained with the same --seed and not "
                        "--train-on-all (the same validation images): use --split test")
    resolved = [Path(p).resolve().with_suffix("") for p in paths]
    names = [p.name for p in resolved]
    if names[0] == names[1]:  # seed1/level4_best.pth against seed2/level4_best.pth: name the folders that differ
        shared = len(Path(os.path.commonpath(resolved)).parts)
        names = ["-".join(p.parts[shared:]) or p.name for p in resolved]
    tag = f"compare_{names[0]}_vs_{names[1]}_{args.split}" + (f"_tta-{tta_set}" if tta_set else "")
    json_path = inputs.claim_output(args, tag, {"a": args.checkpoint, "b": args.compare})  # before the work
    _, val_set, test_set = common.cifar10_datasets(args.data_dir, seeds.pop(), eval_subset=args.subset)
    dataset = val_set if args.split == "val" else test_set
    scored, temperatures = [], []
    for (model, checkpoint), img_size in zip(loaded, img_sizes):
        model = model.to(device, memory_format=torch.channels_last)
        temperatures.append(choose_temperature(checkpoint, args, tta_set))
        view_logits, labels = common.predict(model, dataset, device, img_size, common.TTA_SETS[tta_set or "none"],
                                             args.batch_size)
        scored.append(per_image(view_logits, labels, temperatures[-1], args.tta_average))
    from support import evidence  # the statistics of a comparison: loaded only by --compare
    figures = evidence.compare_figures(*scored, args.resamples, seed=0)
    setup = {"a": args.checkpoint, "b": args.compare, "split": args.split, "tta": tta_set, "img_sizes": img_sizes,
             "temperatures": temperatures, "num_images": len(dataset), "resamples": args.resamples, "bootstrap_seed": 0}
    records.write_json(json_path, {**setup, **figures, **records.run_info(device)})
    plot_disagreements(dataset, *scored, json_path.with_suffix(".png"), f"A = {names[0]}, B = {names[1]}")
    print(f"A = {args.checkpoint} (T = {temperatures[0]:.3g}), B = {args.compare} (T = {temperatures[1]:.3g}): "
          f"{args.split}, {len(dataset)} images, TTA {tta_set or 'off'}")
    print(f"{'':8}{'A':>8}{'B':>9}{'A - B':>10}   95 % CI (paired bootstrap, {args.resamples} resamples)")
    for key, label in (("acc1", "top-1"), ("ece", "ECE"), ("nll", "NLL")):
        figure = figures[key]
        low, high = figure["ci95"]
        print(f"{label:<8}{figure['a']:>8.4f}{figure['b']:>9.4f}{figure['difference']:>+10.4f}   "
              f"[{low:+.4f}, {high:+.4f}]")
    mcnemar = figures["mcnemar"]
    print(f"McNemar: b = {mcnemar['b']} (A right, B wrong), c = {mcnemar['c']} (B right, A wrong), exact two-sided "
          f"p = {mcnemar['p']:.4g}")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    print(f"final: acc1_a={figures['acc1']['a']:.4f} acc1_b={figures['acc1']['b']:.4f} "
          f"difference={figures['acc1']['difference']:.4f} p={mcnemar['p']:.4g} images={len(dataset)}")

def print_report(result, header):
    print(header)
    print(f"top-1 {100 * result['acc1']:.2f} %   ECE {result['ece']:.4f}   NLL {result['nll']:.4f}   "
          f"Brier {result['brier']:.4f}   (T = {result['temperature']:.3g})")
    print(f"{'class':<12}{'accuracy':>10}{'precision':>11}{'recall':>9}{'F1':>8}")
    for name in common.CLASSES:
        print(f"{name:<12}{100 * result['per_class_acc'][name]:>9.2f}%{result['precision'][name]:>11.4f}"
              f"{result['recall'][name]:>9.4f}{result['f1'][name]:>8.4f}")

def robustness(args, model, device, img_size, views, temperature, test_set, tta_set, json_path, bn_stages=None):
    """--corruptions: support.corruptions' report (and --baseline's checkpoint's first), a JSON and a heat map; the
    final line gives the benchmark's figures, never the extras'."""
    from support import corruptions  # the corruptions and their report: loaded only by --corruptions
    official = None  # {name: memory-mapped array} of CIFAR-10-C's files; None: the corruptions are generated
    if args.corruptions != "generated":
        official = corruptions.read_official(args.corruptions, test_set.labels)
        if official is None:
            print(f"{args.corruptions} holds no .npy file: using generated CIFAR-10-C-style corruptions instead")
    source = official or "generated"  # what corruption_report takes
    baseline, baseline_acc1 = None, None
    if args.baseline:
        baseline_model, baseline_checkpoint = load_model(args.baseline)
        baseline_model = baseline_model.to(device, memory_format=torch.channels_last)
        baseline_size = inputs.input_size(args, baseline_checkpoint["args"], args.baseline)
        baseline_temperature = choose_temperature(baseline_checkpoint, args, tta_set)
        print(f"baseline {args.baseline} ({baseline_size} px):")
        baseline = corruptions.corruption_report(baseline_model, test_set, device, baseline_size, views,
                                                 baseline_temperature, args.tta_average, source, args.batch_size)
        baseline = {"checkpoint": args.baseline, **baseline}
        baseline_acc1 = baseline["acc1"]
    print(f"{args.checkpoint} ({img_size} px, TTA {tta_set or 'off'}):")
    result = corruptions.corruption_report(model, test_set, device, img_size, views, temperature, args.tta_average,
                                           source, args.batch_size, baseline=baseline_acc1)
    records.write_json(json_path, {**result, "checkpoint": args.checkpoint, "img_size": img_size, "tta": tta_set,
                                   "bn_stats": args.bn_stats, "bn_stages": bn_stages, "baseline": baseline,
                                   **records.run_info(device)})
    label = "generated CIFAR-10-C-style corruptions" if official is None else result["source"]
    corruptions.plot_corruptions(result, json_path.with_suffix(".png"), f"{Path(args.checkpoint).name}: {label}")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    benchmark = result["benchmark"]  # the published figures' set: the extras are never in these means
    mce = f" mce={benchmark['mce']:.4f}" if baseline else ""
    print(f"final: acc1={result['clean_acc1']:.4f} corruption_acc1={benchmark['mean_acc1']:.4f} relative_drop="
          f"{benchmark['relative_drop']:.4f} ece={benchmark['mean_ece']:.4f}{mce} benchmark_corruptions="
          f"{len(benchmark['corruptions'])}/{len(corruptions.BENCHMARK)} images={result['images_per_severity']} "
          f"seconds={result['seconds']:.1f}")

def main(args):
    device = run.resolve_device(args.device)
    if args.compare:
        return compare(args, device)
    model, checkpoint = load_model(args.checkpoint)
    model = model.to(device, memory_format=torch.channels_last)
    train_args = checkpoint["args"]  # {} for a hand-made checkpoint without them
    img_size = inputs.input_size(args, train_args, args.checkpoint)
    tta_set = inputs.tta_set_of(args, train_args, args.checkpoint)
    views = common.TTA_SETS[tta_set or "none"]
    temperature = choose_temperature(checkpoint, args, tta_set)
    if not args.images and args.split == "val" and train_args.get("train_on_all"):
        raise UserError(f"{args.checkpoint} was trained on all 50,000 training images (--train-on-all): it has "
                        f"no validation split; use --split test")
    json_path = inputs.output_path(args, tta_set)
    bn_stages = None  # the stages whose statistics --bn-stats recomputed
    if args.bn_stats != "checkpoint":
        bn_stages = recompute_statistics(model, checkpoint, args, device, img_size)
    if args.images:
        return predict_images(args, model, device, img_size, views, temperature, json_path)
    _, val_set, test_set = common.cifar10_datasets(args.data_dir, train_args.get("seed", 0), eval_subset=args.subset)
    if args.corruptions:
        return robustness(args, model, device, img_size, views, temperature, test_set, tta_set, json_path,
                          bn_stages)
    result, _ = report(model, val_set if args.split == "val" else test_set, device, img_size, views, temperature,
                       args.tta_average, args.batch_size)
    confusion_path = json_path.with_name(f"{json_path.stem}_confusion.png")
    records.write_json(json_path, {**result, "checkpoint": args.checkpoint, "split": args.split,
                                   "img_size": img_size, "tta": tta_set, "bn_stats": args.bn_stats,
                                   "bn_stages": bn_stages, **records.run_info(device)})
    plot_confusion(result["confusion_matrix"], confusion_path,
                   f"{Path(args.checkpoint).name} on {args.split} ({result['num_images']} images)")
    print_report(result, f"{args.checkpoint} on {args.split} ({result['num_images']} images, {img_size} px, TTA "
                         f"{tta_set or 'off'}, BatchNorm statistics: {args.bn_stats}):")
    print(f"wrote {json_path} and {confusion_path}")
    print(f"final: acc1={result['acc1']:.4f} ece={result['ece']:.4f} nll={result['nll']:.4f} "
          f"images={result['num_images']}")

if __name__ == "__main__":
    run.run_main(main, get_args_parser(), validate_args)
