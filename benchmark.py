"""Benchmark - how close each level's real training step comes to the bare model step, on the same device.

For a level, an image size and a batch size it times, after warm-up and with device synchronisation:
  (a) the bare model step: ResNet-50 forward + backward + fused AdamW, bf16 autocast (fp16 with loss scaling
      before Ampere), channels_last, on random inputs that already sit on the device - the ceiling no data
      pipeline can beat (DEVICE.md's table);
  (b) the level's own step: its `train_one_epoch`, fed by its real DataLoader (EpochSampler, workers,
      RandAugment on 32-px images), with every technique of its defaults on (MixUp/CutMix, erasing,
      per-step LR, EMA, ...), on the real CIFAR-10;
and prints the images/s of both, their ratio, the peak memory of (b), and evaluation images/s on the
validation split with one view and with the --tta-set views.

Why: the goal is that the training loop costs less than 10 % over the bare step (ratio >= 0.90): then the
GPU is fed and a faster run can only come from the model step itself (size, batch, compile), not from the
loop around it. DEVICE.md measured the input pipeline alone at 100 % of bare; this checks the levels.

    python benchmark.py --data-dir ../shared/data                          # levels 1-4, 224 px, batch 256
    python benchmark.py --level 2 --img-size 128 --json results/benchmark.json
    python benchmark.py --level 2 --compile                                # first compile: about 60 s on an H100
    python benchmark.py --level 1 2 --img-size 32 -b 8 --steps 2 --warmup-steps 1 -j 0 --device cpu  # smoke

Reading the ratio (level_img_s / bare_img_s): about 1.0 means the loop is free; 0.9 is the goal; below it,
look at the pipeline first (raise -j/--workers: if the ratio rises, the workers were the bottleneck), then at
the device-side extras of the level (MixUp, erasing, the EMA update). A ratio a little above 1 is noise.
On the CPU the ratio says little about a GPU: augmentation and model share the same cores there.
With --compile both steps (and the evaluation) are compiled; compiling happens in the warm-up steps, which
are not timed, so keep --warmup-steps >= 1 with it.
"""
import argparse
import gc
import inspect
import itertools
import resource
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import common
import level1
import level2
import level3
import level4

LEVELS = {1: level1, 2: level2, 3: level3, 4: level4}
NEVER = 10**9  # --print-freq for the levels: no step lines inside the timed region


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    what = parser.add_argument_group("what to time")
    what.add_argument("--level", type=int, nargs="+", choices=sorted(LEVELS), default=sorted(LEVELS),
                      help="levels whose training step is timed (default: 1 2 3 4)")
    what.add_argument("--img-size", type=int, default=224, help="side the images are upsampled to (default: 224)")
    what.add_argument("-b", "--batch-size", type=int, default=256, help="images per training step (default: 256)")
    what.add_argument("--steps", type=int, default=50,
                      help="timed training steps of each kind; evaluation times as many batches, at most one pass "
                           "over the validation split (default: 50)")
    what.add_argument("--warmup-steps", type=int, default=10,
                      help="untimed steps first: cuDNN autotuning, compile, DataLoader workers (default: 10)")
    what.add_argument("--tta-set", default="flip+translate", choices=list(common.TTA_SETS),
                      help="views of the TTA evaluation (default: flip+translate)")
    run = parser.add_argument_group("run")
    run.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py (default: ./data)")
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cpu, ... (default: auto)")
    run.add_argument("-j", "--workers", type=int, default=common.default_workers(),
                     help=f"DataLoader worker processes of the level's loader (default: {common.default_workers()})")
    run.add_argument("--compile", action="store_true", help="torch.compile the model of both steps (default: off)")
    # A step costs the same whatever the weights are, and no machine of ours has the ImageNet file.
    run.add_argument("--weights", default="none",
                     help="imagenet, none (random init) or PATH, as in the levels (default: none)")
    run.add_argument("--json", default=None, help="also write the figures to this JSON file (default: none)")
    run.add_argument("--markdown", default=None,
                     help="also write them as a Markdown table for the README, naming the command, device and "
                          "commit (default: none)")
    return parser


def validate_args(args):
    common.check_positive(args, "batch_size", "steps")
    common.check_non_negative(args, "warmup_steps", "workers")
    common.check_img_size(args)


# ----------------------------------------------------------------------------------------------------------
# Device helpers: honest clocks and peak memory


def synchronize(device):
    """CUDA and MPS run asynchronously: without this the clock stops before the device has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(device, run):
    """Seconds that `run()` takes, device work included; returns (seconds, what run returned)."""
    synchronize(device)
    started = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - started, result


def reset_peak_memory(device):
    gc.collect()  # free the previous phase's model before the new peak is counted
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device):
    """(MB, what it is): the device's peak allocation on CUDA; elsewhere the process's peak resident set,
    which cannot be reset, so it covers everything the process did so far (ru_maxrss is in KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host"


def device_token(device):
    """The device as one word for the parseable line: cpu, mps, NVIDIA_H100_80GB_HBM3."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return "_".join(name.split())


def maybe_compile(model, args):
    return torch.compile(model) if args.compile else model


# ----------------------------------------------------------------------------------------------------------
# (a) The bare model step


def bare_step_img_s(level_args, args, device):
    """Images/s of forward + backward + AdamW on random inputs already on the device (no loader, no extras)."""
    model = common.build_model(args.weights, getattr(level_args, "dropout", 0.0))  # the level's own network
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = common.adamw(model.parameters(), level_args.lr, level_args.weight_decay, device)
    scaler = common.grad_scaler(device)  # as the levels: fp16 loss scaling before Ampere, else a no-op
    step_model = maybe_compile(model, args)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(common.NUM_CLASSES, (args.batch_size,), device=device)

    def steps(count):
        for _ in range(count):
            with common.autocast(device):
                logits = step_model(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    steps(args.warmup_steps)
    seconds, _ = timed(device, lambda: steps(args.steps))
    return args.steps * args.batch_size / seconds


# ----------------------------------------------------------------------------------------------------------
# (b) The level's real step: its data, model, optimiser and averaging built as its main() builds them


def level_args_for(module, args):
    """The level's own defaults (so every technique is on as in a real run), with the benchmark's sizes."""
    level_args = module.get_args_parser().parse_args([
        "--data-dir", args.data_dir, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--weights", args.weights, "--device", args.device,
        "--print-freq", str(NEVER)])
    module.validate_args(level_args)
    return level_args


def level_transform(level_args):
    """Level 1 has no RandAugment flags; levels 2-4 pass theirs, as their main() does."""
    if hasattr(level_args, "randaug_n"):
        return common.train_transform(level_args.randaug_n, level_args.randaug_m)
    return common.train_transform()


def setup_two_stage(module, model, level_args, device, steps_per_epoch):
    """Levels 1-2: the 'full' stage (every layer trains), where a real run spends most of its steps."""
    optimizer, trainable = module.make_optimizer(model, "full", level_args, device)
    return optimizer, {"trainable": trainable, "stage": "full", "epoch": level_args.head_epochs, "first_step": 0}


def setup_unfreezing(module, model, level_args, device, steps_per_epoch):
    """Levels 3-4: the first epoch with every group unfrozen; the EMA follows each step as in a real run.
    Level 4's SWA copy is built as main() builds it (so it counts in the memory), but it is only updated
    once per epoch in the SWA phase at the end, so no update falls in the timed steps."""
    optimizer = module.make_optimizer(model, level_args, device)
    trainable = list(common.LAYER_GROUPS)
    common.set_trainable(model, trainable)
    epoch = max(module.unfreeze_epoch(group, level_args) for group in common.LAYER_GROUPS)
    model_ema = common.ModelEma(model, level_args.ema_decay) if level_args.ema_decay > 0 else None
    model_swa = common.SwaAverage(model) if getattr(level_args, "swa_epochs", 0) > 0 else None
    return optimizer, {"trainable": trainable, "epoch": epoch, "first_step": epoch * steps_per_epoch,
                       "model_ema": model_ema, "model_swa": model_swa}


SETUP = {1: setup_two_stage, 2: setup_two_stage, 3: setup_unfreezing, 4: setup_unfreezing}


def batch_stream(loader):
    """The loader's batches, epoch after epoch: one live iterator, so the workers keep prefetching between
    the warm-up and the timed steps instead of starting over (which a real run never does mid-epoch)."""
    if len(loader) == 0:
        raise common.UserError(f"{len(loader.dataset)} images give no full batch of {loader.batch_size}: "
                               f"lower --batch-size")
    for epoch in itertools.count():
        if loader.sampler is not None and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader


class FirstBatches:
    """The next `count` batches of a stream, shaped like a DataLoader for train_one_epoch (len, sampler)."""

    def __init__(self, stream, count, loader):
        self.stream, self.count = stream, count
        self.sampler, self.batch_size, self.dataset = loader.sampler, loader.batch_size, loader.dataset

    def __len__(self):
        return self.count

    def __iter__(self):
        return itertools.islice(self.stream, self.count)


def call_train_one_epoch(module, context, loader):
    """Call the level's own train_one_epoch, passing each parameter by name from `context`: the levels'
    signatures differ (stage, EMA, SWA, schedule position), and a new parameter fails here by name."""
    parameters = inspect.signature(module.train_one_epoch).parameters
    unknown = [name for name in parameters if name not in context and name != "loader"]
    if unknown:
        raise RuntimeError(f"benchmark.py cannot supply {module.LEVEL}.train_one_epoch's {unknown}: add them to "
                           f"its setup in SETUP")
    return module.train_one_epoch(**{name: loader if name == "loader" else context[name] for name in parameters})


def level_step(level, level_args, data, args, device):
    """Images/s of the level's real training step, peak memory, and the trained model (for evaluation)."""
    module = LEVELS[level]
    common.seed_everything(level_args.seed)
    sampler = common.EpochSampler(len(data.train), level_args.seed)
    # drop_last as in the levels: every step sees a full batch.
    loader = common.make_loader(data.train, args.batch_size, sampler, args.workers, device, drop_last=True)
    model = common.build_model(args.weights, getattr(level_args, "dropout", 0.0))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer, context = SETUP[level](module, model, level_args, device, len(data.train) // args.batch_size)
    context.update(model=maybe_compile(model, args), optimizer=optimizer, scaler=common.grad_scaler(device),
                   device=device, args=level_args, stop=SimpleNamespace(requested=False), progress=common.Progress(1),
                   steps_per_epoch=len(data.train) // args.batch_size)
    stream = batch_stream(loader)

    def train_steps(count):
        return call_train_one_epoch(module, context, FirstBatches(stream, count, loader))

    if args.warmup_steps:
        train_steps(args.warmup_steps)
    seconds, stats = timed(device, lambda: train_steps(args.steps))
    stream.close()  # ends the loader's iterator (and its prefetching) before the evaluation is timed
    return stats["images"] / seconds, peak_memory_mb(device), context["model"]


# ----------------------------------------------------------------------------------------------------------
# Evaluation with and without TTA


def eval_img_s(model, data, args, device):
    """Images/s of common.predict on the validation split (at most one pass), with one view and with TTA.
    The eval batch is the levels' (twice the training batch); drop_last keeps every batch the same shape,
    so a compiled model does not recompile for the last one inside the timed region."""
    loader = common.make_loader(data.val, 2 * args.batch_size, workers=args.workers, device=device, drop_last=True)
    stream = batch_stream(loader)
    count = min(args.steps, len(loader))
    rates = [predict_img_s(model, stream, loader, views, count, args, device)
             for views in (["identity"], common.TTA_SETS[args.tta_set])]
    stream.close()
    return rates


def predict_img_s(model, stream, loader, views, count, args, device):
    def predict(batches):
        return common.predict(model, FirstBatches(stream, batches, loader), device, args.img_size, views)

    if args.warmup_steps:  # one batch: cuDNN picks its kernels, compile traces the eval-mode graph
        predict(1)
    seconds, (_, labels) = timed(device, lambda: predict(count))
    return len(labels) / seconds


# ----------------------------------------------------------------------------------------------------------
# Reporting


def benchmark_level(level, args, device):
    """(a), (b) and evaluation for one level: the figures of its parseable line."""
    module = LEVELS[level]
    level_args = level_args_for(module, args)
    data = common.build_datasets(level_args, level_transform(level_args))
    for split, dataset, batch in (("training", data.train, args.batch_size), ("validation", data.val,
                                                                              2 * args.batch_size)):
        if len(dataset) < batch:  # both loaders drop the last, partial batch
            raise common.UserError(f"the {split} split ({len(dataset)} images) holds no full batch of {batch}: "
                                   f"lower --batch-size")
    reset_peak_memory(device)
    bare = bare_step_img_s(level_args, args, device)
    bare_memory, _ = peak_memory_mb(device)
    reset_peak_memory(device)
    real, (memory, memory_kind), model = level_step(level, level_args, data, args, device)
    plain, tta = eval_img_s(model, data, args, device)
    del model
    return {"level": level, "img_size": args.img_size, "batch": args.batch_size, "bare_img_s": round(bare, 2),
            "level_img_s": round(real, 2), "ratio": round(real / bare, 4), "eval_img_s": round(plain, 2),
            "tta_img_s": round(tta, 2), "peak_mem_mb": round(memory, 1), "device": device_token(device),
            "peak_mem_kind": memory_kind, "bare_peak_mem_mb": round(bare_memory, 1)}


LINE_FIELDS = ("level", "img_size", "batch", "bare_img_s", "level_img_s", "ratio", "eval_img_s", "tta_img_s",
               "peak_mem_mb", "device")


def print_block(row, args):
    memory = "device, training step" if row["peak_mem_kind"] == "device" else "host: process peak RSS so far"
    views = len(common.TTA_SETS[args.tta_set])
    print(f"level{row['level']}: {row['img_size']} px, batch {row['batch']}, {args.steps} timed steps after "
          f"{args.warmup_steps} warm-up, {args.workers} workers, {'compiled' if args.compile else 'eager'}")
    lines = [("bare model step (random inputs on the device)", f"{row['bare_img_s']:.1f} img/s"),
             (f"level{row['level']} training step (real data and pipeline)",
              f"{row['level_img_s']:.1f} img/s = {100 * row['ratio']:.1f} % of bare (goal: >= 90 %)"),
             ("evaluation, 1 view", f"{row['eval_img_s']:.1f} img/s"),
             (f"evaluation, TTA {args.tta_set} ({views} views)", f"{row['tta_img_s']:.1f} img/s"),
             (f"peak memory ({memory})", f"{row['peak_mem_mb']:.0f} MB (bare step: {row['bare_peak_mem_mb']:.0f} MB)")]
    for label, value in lines:
        print(f"  {label:<52} {value}")
    sys.stdout.flush()


def markdown_table(rows, args, commit, device):
    """The rows as a README table, preceded by the line that says what produced them (command, device, commit)."""
    flags = common.args_to_argv(get_args_parser(), args, skip=("json", "markdown"))
    command = " ".join(["python benchmark.py", *flags])
    views = len(common.TTA_SETS[args.tta_set])
    lines = [f"`{command}` on {common.device_name(device)}, torch {torch.__version__}, commit {commit}, "
             f"{common.precision_name(device)}, {'compiled' if args.compile else 'eager'}, {args.workers} workers:", "",
             f"| level | px | batch | bare step img/s | level step img/s | level / bare | eval img/s | "
             f"TTA ({views} views) img/s | peak memory MB ({rows[0]['peak_mem_kind']}) |", "|---" * 9 + "|"]
    for row in rows:
        lines.append(f"| {row['level']} | {row['img_size']} | {row['batch']} | {row['bare_img_s']:,.0f} | "
                     f"{row['level_img_s']:,.0f} | {row['ratio']:.2f} | {row['eval_img_s']:,.0f} | "
                     f"{row['tta_img_s']:,.0f} | {row['peak_mem_mb']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(args):
    device = common.resolve_device(args.device)
    commit = common.git_commit()  # once: the tree may change while the benchmark runs
    print(f"setup: device {common.device_name(device)} ({common.precision_name(device)}), torch {torch.__version__}, "
          f"commit {commit}", flush=True)
    rows = []
    for level in args.level:
        rows.append(benchmark_level(level, args, device))
        print_block(rows[-1], args)
    for row in rows:
        print("benchmark: " + " ".join(f"{key}={row[key]}" for key in LINE_FIELDS))
    if args.json:
        extra = {"commit": commit, "device_name": common.device_name(device), "torch": torch.__version__,
                 "steps": args.steps, "warmup_steps": args.warmup_steps, "workers": args.workers,
                 "compile": args.compile, "weights": args.weights, "tta_set": args.tta_set,
                 "precision": common.precision_name(device)}
        common.write_json(args.json, [{**row, **extra} for row in rows])
    if args.markdown:
        table = markdown_table(rows, args, commit, device)
        common.atomic_write(args.markdown, lambda f: f.write(table.encode()))
    return rows


if __name__ == "__main__":
    common.run_main(main, get_args_parser(), validate_args)
