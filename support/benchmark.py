"""Benchmark - how close each level's real training step comes to the bare model step, on the same device.
Run by you (`python -m support.benchmark`, from the repository's root) and by .ci/device-check; it calls each
level's own train_one_epoch and main.

For each level, image size and batch size it times, after warm-up steps and with device synchronisation:
  (a) the bare step: ResNet-50 forward + backward + fused AdamW, in the levels' mixed precision, channels_last, on
      random inputs already on the device: the ceiling that no data pipeline can beat;
  (b) the level's own step: its `train_one_epoch`, fed by its own DataLoader (workers, RandAugment at 32 px) on the
      real CIFAR-10, with every technique of its defaults on (MixUp/CutMix, erasing, per-step LRs, the EMA, ...);
and prints both, their ratio, the peak memory of (b), and evaluation images/s with one view and with TTA. With
--epochs N it also runs (c) the level's own epoch loop, its `main`: validation, BatchNorm recomputes and checkpoint
saves included, and prints the epoch line's images/s against (b) and the seconds per epoch outside the steps.

The goal is a loop that costs under 10 % of the bare step (ratio >= 0.90): then the GPU is fed, and only the model
step itself (size, batch, --compile) can make a run faster. On the CPU the ratio says little: the workers and the
model share the same cores there.

    python -m support.benchmark --data-dir ~/data                                  # levels 1-4, 224 px, batch 256
    python -m support.benchmark --level 2 --img-size 128 --json results/benchmark.json --markdown results/benchmark.md
    python -m support.benchmark --level 1 --compile --warmup-steps 20              # compiling happens in the warm-up
    python -m support.benchmark --epochs 3 --epoch-images 9000                     # (c): 3 epochs of 9,000 images each
    python -m support.benchmark --level 1 2 --img-size 32 -b 8 --steps 2 --warmup-steps 1 -j 0 --device cpu  # smoke
"""
import argparse
import contextlib
import inspect
import io
import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as `python support/benchmark.py`: the repository's root goes on the path first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402 (after the path)
import level1
import level2
import level3
import level4
from support import records, run
from support.errors import UserError

LEVELS = {1: level1, 2: level2, 3: level3, 4: level4}

def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--level", type=int, nargs="+", choices=sorted(LEVELS), default=sorted(LEVELS),
                        help="levels whose step is timed (default: 1 2 3 4)")
    parser.add_argument("--img-size", type=run.number(int, at_least=32), default=224,
                        help="side the images are upsampled to (default: 224)")
    parser.add_argument("-b", "--batch-size", type=run.number(int, at_least=2), default=256,
                        help="images per training step (default: 256)")
    parser.add_argument("--steps", type=run.positive_int, default=50, help="timed steps of each kind (default: 50)")
    parser.add_argument("--warmup-steps", type=run.non_negative_int, default=10,
                        help="untimed steps first: cuDNN autotuning, compiling, workers starting (default: 10)")
    parser.add_argument("--tta-set", default="flip+translate", choices=list(common.TTA_SETS),
                        help="views of the TTA evaluation (default: flip+translate)")
    parser.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py (default: ./data)")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default: auto)")
    parser.add_argument("-j", "--workers", type=run.non_negative_int,
                        default=level1.get_args_parser().get_default("workers"),
                        help="DataLoader workers of the levels' loader (default: the levels' default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both steps (default: off)")
    # A step costs the same whatever the weights, and the ImageNet file may not be on the machine.
    parser.add_argument("--weights", default="none", help="imagenet, none or PATH, as in the levels (default: none)")
    parser.add_argument("--epochs", type=run.non_negative_int, default=0,
                        help="(c): epochs of each level's own loop, the first one untimed, 0 = off (default: 0)")
    parser.add_argument("--epoch-images", type=run.number(int, above=0, at_most=45000, why="the training split holds "
                        "45,000 images"), default=9000,
                        help="(c): training images per epoch, a ninth as many validated, as in the full split; the "
                             "BatchNorm recomputes and the checkpoint copy weigh 45,000 / N times more than in a full "
                             "epoch (default: 9000)")
    parser.add_argument("--json", help="also write the figures to this JSON file (default: off)")
    parser.add_argument("--markdown", help="also write a Markdown table naming command, device, commit (default: off)")
    return parser

def validate_args(args):
    if args.epochs == 1 or args.epoch_images < args.batch_size:
        raise UserError("need --epochs 0 (off) or >= 2 (the first is warm-up), --epoch-images >= --batch-size")

def timed(device, run):
    """(seconds that run() takes, device work included, what it returned): the device runs asynchronously, so
    without a synchronisation the clock would stop before the work is done."""
    synchronize = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    synchronize()
    started = time.perf_counter()
    result = run()
    synchronize()
    return time.perf_counter() - started, result

def peak_memory_mb(device):
    """The device's peak allocation since the last reset on CUDA; elsewhere the process's peak resident memory so
    far, which cannot be reset (ru_maxrss is in KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host"

def bare_img_s(level_args, args, device):
    """(a): forward + backward + AdamW on random inputs that already sit on the device, no loader and no extras."""
    model = common.build_model(args.weights).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=level_args.lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=common.amp_dtype(device) == torch.float16)
    step_model = torch.compile(model) if args.compile else model
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(len(common.CLASSES), (args.batch_size,), device=device)

    def steps(count):
        for _ in range(count):
            with common.autocast(device):
                logits = step_model(images)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(F.cross_entropy(logits.float(), labels)).backward()
            scaler.step(optimizer)
            scaler.update()

    steps(args.warmup_steps)
    return args.steps * args.batch_size / timed(device, lambda: steps(args.steps))[0]

class Batches:
    """The next `count` batches of one live loader iterator, shaped like a DataLoader (len) for train_one_epoch: the
    workers keep prefetching between the warm-up and the timed steps, as they do inside a real epoch."""

    def __init__(self, stream, count):
        self.stream, self.count = stream, count

    def __len__(self):
        return self.count

    def __iter__(self):
        return itertools.islice(self.stream, self.count)

def level_img_s(module, level_args, args, device):
    """(b): the level's own train_one_epoch on its own loader, in its last stage (every layer training, the EMA on).
    Returns (images/s, peak memory, the trained model, the validation set)."""
    torch.manual_seed(level_args.seed)
    _, val_set, _, loader = module.load_data(level_args, 0, 1, device)
    if len(loader) == 0:
        raise UserError(f"{len(loader.dataset)} training images hold no batch of {args.batch_size}")
    model = common.build_model(args.weights, getattr(level_args, "dropout", 0.0))
    model = model.to(device, memory_format=torch.channels_last)
    if hasattr(module, "set_stage"):  # levels 1-2: the full stage
        module.set_stage(model, "full")
        epoch = level_args.head_epochs
    else:  # levels 3-4: the first epoch with every stage unfrozen
        epoch = max(module.unfreeze_epoch(group, level_args) for group in module.GROUPS)
        module.set_trainable(model, epoch, level_args)
    context = {"model": module.wrap(model, 1, device, level_args), "optimizer": module.make_optimizer(model, level_args,
               device), "scaler": torch.amp.GradScaler(device.type, enabled=common.amp_dtype(device) == torch.float16),
               "device": device, "args": level_args, "epoch": epoch,
               "averages": {"ema": common.ModelEma(model, level_args.ema_decay)} if hasattr(level_args, "ema_decay")
               else {}}  # level 4's SWA averages only in its last epochs: not in these steps
    parameters = inspect.signature(module.train_one_epoch).parameters
    unknown = [name for name in parameters if name not in context and name != "loader"]
    if unknown:  # a new parameter of a level fails here by name, not somewhere inside
        raise RuntimeError(f"support/benchmark.py cannot supply {module.LEVEL}.train_one_epoch's {unknown}: add them")
    stream = itertools.chain.from_iterable(loader for _ in itertools.count())  # epoch after epoch, one iterator each

    def train(count):
        return module.train_one_epoch(**{name: Batches(stream, count) if name == "loader" else context[name]
                                         for name in parameters})

    if args.warmup_steps:
        train(args.warmup_steps)
    seconds, _ = timed(device, lambda: train(args.steps))
    return args.steps * args.batch_size / seconds, peak_memory_mb(device), model, val_set

def eval_img_s(model, val_set, args, device):
    """common.predict's images/s over up to `steps` batches of 256 validation images (the levels' evaluation batch),
    whole batches only (a last, smaller one would be autotuned inside the clock), with one view and with TTA."""
    count = max(256, min(len(val_set), 256 * args.steps) // 256 * 256)
    images = common.CifarDataset(val_set.images[:count], val_set.labels[:count])
    warmup = common.CifarDataset(val_set.images[:256], val_set.labels[:256])
    rates = []
    for views in (["identity"], common.TTA_SETS[args.tta_set]):
        common.predict(model, warmup, device, args.img_size, views)  # cuDNN picks its kernels first
        seconds, (_, labels) = timed(device, lambda: common.predict(model, images, device, args.img_size, views))
        rates.append(len(labels) / seconds)
    return rates

# (c) runs the last stage only (every layer training, the EMA on) and ends with Level 4's SWA epoch, three candidates.
EPOCH_FLAGS = {1: [], 2: [], 3: ["--unfreeze-every", "0", "--final-epochs", "0"],
               4: ["--unfreeze-every", "0", "--final-epochs", "0", "--swa-epochs", "1"]}

def epoch_img_s(module, args, device):
    """(c): the level's own main into a temporary folder, every epoch in full (training, validation, BatchNorm
    recomputes, checkpoint saves); returns (training images per second of wall time over the epochs after the first,
    the mean seconds per epoch spent outside train_one_epoch) from the per-epoch times in its history."""
    level = int(module.LEVEL[-1])
    epochs = args.epochs - 1 if level == 4 else args.epochs  # + Level 4's one SWA epoch
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):  # its lines: not ours
        level_args = module.get_args_parser().parse_args([
            "--data-dir", args.data_dir, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--weights", args.weights, "--print-freq", "0", "--device", str(device),
            "--subset", str(args.epoch_images), "--eval-subset", str(max(args.batch_size, args.epoch_images // 9)),
            "--head-epochs", "0", "--epochs", str(epochs), "--checkpoint-dir", folder, "--results-dir", folder,
            *EPOCH_FLAGS[level], *(["--compile"] if args.compile else [])])
        module.validate_args(level_args)
        timed = module.main(level_args)["history"][1:]  # the first epoch starts workers, tunes cuDNN, compiles
    images = args.epoch_images // args.batch_size * args.batch_size  # whole batches (drop_last)
    outside = sum(row["epoch_seconds"] - row["train_seconds"] for row in timed) / len(timed)
    return images * len(timed) / sum(row["epoch_seconds"] for row in timed), outside

def benchmark_level(level, args, device):
    module = LEVELS[level]
    level_args = module.get_args_parser().parse_args([
        "--data-dir", args.data_dir, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--weights", args.weights, "--print-freq", "0"]
        + (["--compile"] if args.compile else []))
    module.validate_args(level_args)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    bare = bare_img_s(level_args, args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    real, (memory, memory_kind), model, val_set = level_img_s(module, level_args, args, device)
    plain, tta = eval_img_s(model, val_set, args, device)
    del model, val_set
    epoch = {}
    if args.epochs:
        epoch_rate, outside = epoch_img_s(module, args, device)
        epoch = {"epoch_img_s": round(epoch_rate, 2), "epoch_ratio": round(epoch_rate / real, 4),
                 "outside_s": round(outside, 3), "epoch_images": args.epoch_images, "epochs": args.epochs}
    return {"level": level, "img_size": args.img_size, "batch": args.batch_size, "bare_img_s": round(bare, 2),
            "level_img_s": round(real, 2), "ratio": round(real / bare, 4), "eval_img_s": round(plain, 1),
            "tta_img_s": round(tta, 1), "peak_mem_mb": round(memory), "peak_mem_kind": memory_kind, **epoch}

def main(args):
    run.set_stop_hint("the benchmark keeps nothing of a stopped run: start it again")  # not a level's --resume
    device = run.resolve_device(args.device)
    torch.backends.cudnn.benchmark = True  # as in the levels
    info = records.run_info(device)
    print(f"setup: {info['device']}, {info['precision']}, torch {info['torch']}, commit {info['commit']}, "
          f"{'compiled' if args.compile else 'eager'}, {args.workers} workers, {args.steps} timed steps after "
          f"{args.warmup_steps} warm-up", flush=True)
    rows = []
    for level in args.level:
        rows.append(benchmark_level(level, args, device))
        row = rows[-1]
        print(f"level{level}: {args.img_size} px, batch {args.batch_size}: bare step {row['bare_img_s']:.1f} img/s, "
              f"level step {row['level_img_s']:.1f} img/s = {100 * row['ratio']:.1f} % of bare (goal >= 90 %); "
              f"eval {row['eval_img_s']:.1f} img/s, TTA {args.tta_set} {row['tta_img_s']:.1f} img/s; peak memory "
              f"{row['peak_mem_mb']} MB ({row['peak_mem_kind']})", flush=True)
        if args.epochs:  # the goals of issue 21, at 224 px on a GPU
            print(f"level{level}: epoch line {row['epoch_img_s']:.1f} img/s = {100 * row['epoch_ratio']:.1f} % of the "
                  f"level step (goal >= {95 if level <= 2 else 90} %); {row['outside_s']:.2f} s per epoch outside the "
                  f"training steps ({args.epochs - 1} timed epochs of {args.epoch_images} images)", flush=True)
    for row in rows:
        print("benchmark: " + " ".join(f"{key}={value}" for key, value in row.items()))
    if args.json:
        records.write_json(args.json, [{**row, **info, "compile": args.compile, "steps": args.steps,
                                        "workers": args.workers} for row in rows])
    if args.markdown:
        header = ["level", "px", "batch", "bare step img/s", "level step img/s", "level / bare", "eval img/s",
                  f"TTA ({len(common.TTA_SETS[args.tta_set])} views) img/s", "peak memory MB"]
        if args.epochs:
            header += ["epoch line img/s", "epoch / level step", "s per epoch outside the steps"]
        records.write_table(args.markdown, f"`{info['command']}` on {info['device']}, {info['precision']}, torch "
                            f"{info['torch']}, commit {info['commit']}, {'compiled' if args.compile else 'eager'}, "
                            f"{args.workers} workers:", header, [markdown_cells(row, args) for row in rows])
    return rows

def markdown_cells(row, args):
    cells = [row["level"], row["img_size"], row["batch"], f"{row['bare_img_s']:,.0f}", f"{row['level_img_s']:,.0f}",
             f"{row['ratio']:.2f}", f"{row['eval_img_s']:,.0f}", f"{row['tta_img_s']:,.0f}", f"{row['peak_mem_mb']:,}"]
    if args.epochs:
        cells += [f"{row['epoch_img_s']:,.0f}", f"{row['epoch_ratio']:.2f}", f"{row['outside_s']:.2f}"]
    return cells

if __name__ == "__main__":
    run.run_main(main, get_args_parser(), validate_args)
