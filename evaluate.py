"""Evaluate any checkpoint of this suite (or a bare 10-class ResNet-50 state_dict) on CIFAR-10.

Prints top-1, per-class accuracy, ECE (15 equal-width bins), NLL and Brier score; writes a JSON and a
confusion-matrix PNG (counts and row-normalised). Validation uses the split seed stored in the checkpoint,
so it is the same 5,000 images the run selected its epoch on.

    python evaluate.py checkpoints/level1_best.pth
    python evaluate.py checkpoints/level2_best.pth --tta                  # the TTA views the level used
    python evaluate.py checkpoints/level4_best.pth --tta flip+translate+scale --split val
    python evaluate.py checkpoints/level4_best.pth --images my_photos/ cat.jpg    # your own pictures
"""
import argparse
from pathlib import Path

import numpy as np
import torch

import common


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("checkpoint", help="a .pth checkpoint of this project or a 10-class ResNet-50 state_dict")
    parser.add_argument("--tta", nargs="?", const="default", default=None, choices=["default", *common.TTA_SETS],
                        help="test-time augmentation view set; plain --tta uses the checkpoint's own set, or flip "
                             "(default: off)")
    parser.add_argument("--tta-average", choices=["softmax", "logit"], default="softmax",
                        help="average the views' probabilities or their logits (default: softmax)")
    parser.add_argument("--split", choices=["test", "val"], default="test", help="which split (default: test)")
    parser.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py (default: ./data)")
    parser.add_argument("--out", default="results", help="folder for the JSON and PNG (default: results)")
    parser.add_argument("-b", "--batch-size", type=int, default=256, help="images per batch (default: 256)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input side in px (default: the checkpoint's training size, else 224)")
    parser.add_argument("--subset", type=int, default=None, help="evaluate the first N images only (default: all)")
    parser.add_argument("--no-temperature", action="store_true",
                        help="ignore a calibration temperature stored in the checkpoint (default: apply it)")
    parser.add_argument("-j", "--workers", type=int, default=common.default_workers(),
                        help=f"DataLoader workers (default: {common.default_workers()})")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default: auto)")
    parser.add_argument("--images", nargs="+", default=None, metavar="PATH",
                        help="predict your own JPEG/PNG files or folders of them instead of a split (default: off)")
    return parser


def validate_args(args):
    common.check_positive(args, "batch_size", "subset")
    if args.img_size is not None and args.img_size < 32:
        raise common.UserError(f"--img-size must be at least 32 (got {args.img_size})")


def load_model(path):
    """(model, the checkpoint's training args or {}, the checkpoint dict or {}) from any supported file."""
    obj = common.load_file(path)
    state_dict = common.extract_state_dict(obj, path)
    head = state_dict.get("fc.weight")
    if head is None or head.shape[0] != common.NUM_CLASSES:
        raise common.UserError(f"{path} has no 10-class head: it is not a CIFAR-10 model of this project")
    model = common.build_model("none")
    common.load_backbone_weights(model, state_dict, path)
    checkpoint = obj if isinstance(obj, dict) and "model" in obj else {}
    return model, checkpoint.get("args", {}) or {}, checkpoint


def split_dataset(args, train_args):
    """The requested split, with the validation split made with the run's own seed."""
    cifar = common.load_cifar10(args.data_dir)
    if args.split == "test":
        images, labels = cifar.test_images, cifar.test_labels
    else:
        _, val_idx = common.split_train_val(cifar.train_labels, seed=train_args.get("seed", 0))
        images, labels = cifar.train_images[val_idx], cifar.train_labels[val_idx]
    if args.subset:
        images, labels = images[: args.subset], labels[: args.subset]
    return common.CifarDataset(images, labels), cifar.classes


def print_report(report, classes, header):
    print(header)
    print(f"top-1 {100 * report['acc1']:.2f} %   ECE {report['ece']:.4f}   NLL {report['nll']:.4f}   "
          f"Brier {report['brier']:.4f}")
    print(f"{'class':<12}{'accuracy':>10}{'precision':>11}{'recall':>9}{'F1':>8}")
    for name in classes:
        print(f"{name:<12}{100 * report['per_class_acc'][name]:>9.2f}%{report['precision'][name]:>11.4f}"
              f"{report['recall'][name]:>9.4f}{report['f1'][name]:>8.4f}")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def image_files(paths):
    """The JPEG/PNG files named by `paths` (files, or folders searched one level deep), in a stable order."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def load_as_cifar(path):
    """An image file -> 32x32x3 uint8, made as CIFAR-10's images were: a centre square, area-downsampled."""
    from PIL import Image
    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side))
        return np.asarray(square.resize((32, 32), Image.BOX))  # BOX = the mean over each source area


def predict_images(args, model, device, img_size, views, temperature):
    """Top-3 predictions for the user's own images, printed, plus a JSON and a PNG sheet."""
    images, names = [], []
    for path in image_files(args.images):
        try:
            images.append(load_as_cifar(path))
            names.append(str(path))
        except Exception as error:  # unreadable or not an image: say which, keep going
            print(f"skipped {path}: not a readable image ({type(error).__name__})")
    if not images:
        raise common.UserError("no readable JPEG/PNG image among --images: give image files or folders holding them")
    classes = common.CIFAR10_CLASSES
    dataset = common.CifarDataset(np.stack(images), np.zeros(len(images), dtype=np.int64))
    loader = common.make_loader(dataset, args.batch_size, workers=0, device=device)
    probs, _ = common.predict(model, loader, device, img_size, views, args.tta_average, temperature=temperature)
    rows, captions = [], []
    for name, p in zip(names, probs):
        top = p.topk(3)
        ranked = [(classes[i], float(q)) for q, i in zip(top.values, top.indices)]
        print(f"{name}: " + ", ".join(f"{c} {q:.3f}" for c, q in ranked))
        rows.append({"file": name, "top3": ranked, "probs": dict(zip(classes, p.tolist()))})
        captions.append(f"{Path(name).name[:18]}\n{ranked[0][0]} {ranked[0][1]:.2f}")
    out = Path(args.out)
    common.write_json(out / "predictions.json", {"checkpoint": str(args.checkpoint), "temperature": temperature,
                                                 "tta_views": views, "images": rows})
    common.plot_image_grid(np.stack(images), captions, out / "predictions.png", f"{Path(args.checkpoint).name}: top-1")
    print(f"wrote {out / 'predictions.json'} and {out / 'predictions.png'}")


def main(args):
    device = common.resolve_device(args.device)
    print(f"device: {common.device_name(device)}")
    model, train_args, checkpoint = load_model(args.checkpoint)
    model = model.to(device, memory_format=torch.channels_last)
    img_size = args.img_size or train_args.get("img_size", 224)
    tta_set = None if args.tta is None else (train_args.get("tta_set", "flip") if args.tta == "default" else args.tta)
    views = common.TTA_SETS[tta_set] if tta_set else ["identity"]
    temperature = 1.0 if args.no_temperature else float(checkpoint.get("temperature", 1.0))
    if temperature != 1.0:
        print(f"applying the calibration temperature stored in the checkpoint: T = {temperature:.4f}")
    if args.images:
        return predict_images(args, model, device, img_size, views, temperature)

    dataset, classes = split_dataset(args, train_args)
    loader = common.make_loader(dataset, args.batch_size, workers=args.workers, device=device)
    probs, labels = common.predict(model, loader, device, img_size, views, args.tta_average, temperature=temperature)
    report = common.classification_report(probs, labels, classes)

    tag = f"{Path(args.checkpoint).stem}_{args.split}" + (f"_tta-{tta_set}" if tta_set else "")
    out = Path(args.out)
    report.update({"checkpoint": str(args.checkpoint), "split": args.split, "img_size": img_size, "tta": tta_set,
                   "tta_views": views, "tta_average": args.tta_average, "temperature": temperature,
                   "device": common.device_name(device), "commit": common.git_commit()})
    common.write_json(out / f"eval_{tag}.json", report)
    common.plot_confusion_matrix(report["confusion_matrix"], classes, out / f"eval_{tag}_confusion.png",
                                 f"{Path(args.checkpoint).name} on {args.split} ({report['num_images']} images)")
    print_report(report, classes, f"{args.checkpoint} on {args.split} ({report['num_images']} images, {img_size} px, "
                                  f"TTA {tta_set or 'off'}):")
    print(f"wrote {out / f'eval_{tag}.json'} and {out / f'eval_{tag}_confusion.png'}")
    print(f"final: acc1={report['acc1']:.4f} ece={report['ece']:.4f} nll={report['nll']:.4f} "
          f"images={report['num_images']}")


if __name__ == "__main__":
    common.run_main(main, get_args_parser(), validate_args)
