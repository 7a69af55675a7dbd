"""Level 4 - Level 3 plus SWA, advanced TTA, calibration, error analysis and real ablation studies.

What this level adds to level3.py:
  - Stochastic Weight Averaging (Izmailov et al. 2018), run as its paper runs it: the cosine decays to --swa-lr, which
    --swa-epochs then hold (or cycle), averaging the weights once per epoch (or every --swa-every steps). This SWA
    phase replaces Level 3's final low-LR epochs (--final-epochs 0 here). Validation picks raw, EMA or SWA weights;
  - advanced TTA: every view set, softmax or logit averaging; temperature scaling (Guo et al. 2017) fitted on
    validation: ECE, NLL, Brier before and after, reliability diagrams (TTA predicts with T = 1: T only calibrates);
  - error analysis: confusion matrix, per-class precision/recall/F1, most-confused pairs, most confident mistakes;
  - --ablate: the recipe scaled down, each row switching one technique off, over paired seeds, with a 95 % interval
    and a verdict per row (rows that change only the measurement reuse the baseline's checkpoints); --summary. The
    study code is in study.py: it trains nothing itself, it calls this script's main for every run.

Each level is one self-contained script, as airbench's are: it repeats the previous level's lines on purpose, so that
`diff level3.py level4.py` shows exactly what this level adds.

    python level4.py --epochs 30
    python level4.py --ablate --ablate-epochs 6 --ablate-seeds 3  # results/ablation.{json,md,png}
    python level4.py --summary                                   # results/summary.{md,png} from results/level*.json
"""
import argparse
import math
import os
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

import common
import evaluate
import study

LEVEL = "level4"
# --resume keeps these as saved: they fixed the data split, the optimiser's decay, the schedule of the epochs run.
RESUME_FLAGS = ("seed", "subset", "train_on_all", "weight_decay", "head_epochs", "epochs", "warmup_epochs",
                "unfreeze_every", "unfreeze_warmup_epochs", "final_epochs", "swa_epochs", "swa_every")
# --quick: a smoke run that shows every stage working, in a minute or two on a CPU; its numbers mean nothing.
QUICK = {"subset": 128, "eval_subset": 128, "img_size": 32, "batch_size": 32, "head_epochs": 1, "epochs": 1,
         "overwrite": True, "swa_epochs": 1, "corruption_images": 16, "ablate_sizes": [48], "ablate_epochs": 1}
# Progressive unfreezing walks ResNet-50's stages from the output back to the input.
GROUPS = ("fc", "layer4", "layer3", "layer2", "layer1", "stem")
# The averages' BatchNorm statistics come from this many training images (0.3 s at 224 px on an H100).
BN_IMAGES = 2560

def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py (default: ./data)")
    data.add_argument("--img-size", type=int, default=224, help="side the images are upsampled to (default: 224)")
    data.add_argument("--subset", type=int, help="train on the first N training images (default: all)")
    data.add_argument("--eval-subset", type=int, help="validate and test on the first N images only (default: all)")
    data.add_argument("--train-on-all", action="store_true", help="all 50,000 images, no validation (default: off)")
    data.add_argument("-j", "--workers", type=int, default=min(8, max(1, os.cpu_count() - 1)),
                      help="DataLoader worker processes (default: CPU cores - 1, at most 8)")
    model = parser.add_argument_group("model")
    model.add_argument("--weights", default="imagenet", help="imagenet, none, or a checkpoint PATH (default: imagenet)")
    # Mild: RandAugment, mixing, smoothing and erasing already regularise strongly.
    model.add_argument("--dropout", type=float, default=0.1, help="dropout before the head (default: 0.1)")
    optim = parser.add_argument_group("optimisation")
    # Common fine-tuning values, not tuned here: a linear probe takes a high LR; fine-tuning a pretrained network
    # wants ~10x less, so the ImageNet features are adapted, not overwritten; AdamW's usual decay for fine-tuning.
    optim.add_argument("--head-epochs", type=int, default=2, help="stage 1: epochs training the head only (default: 2)")
    optim.add_argument("--head-lr", type=float, default=1e-3, help="stage 1 learning rate (default: 0.001)")
    optim.add_argument("--epochs", type=int, default=30, help="stage 2: epochs of the cosine (default: 30)")
    optim.add_argument("--lr", type=float, default=1e-4, help="stage 2 learning rate (default: 0.0001)")
    optim.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=0.05,
                       help="AdamW weight decay, none on BatchNorm and biases (default: 0.05)")
    optim.add_argument("-b", "--batch-size", type=int, default=128, help="images per step, all GPUs (default: 128)")
    # Warmup keeps the first large updates, driven by a still poor head, from wrecking the pretrained features; the
    # head stage trains on frozen features and needs none: its schedule is the cosine alone.
    optim.add_argument("--warmup-epochs", type=float, default=1.0, help="stage 2 LR warmup, in epochs (default: 1.0)")
    optim.add_argument("--min-lr", type=float, default=1e-6,
                       help="LR at the end of each cosine; with SWA, stage 2's ends at --swa-lr (default: 1e-06)")
    stages = parser.add_argument_group("progressive unfreezing, discriminative LRs, long low-LR fine-tuning")
    stages.add_argument("--unfreeze-every", type=int, default=1, help="epochs per new stage, 0 = all (default: 1)")
    stages.add_argument("--unfreeze-warmup-epochs", type=float, default=0.5, help="a stage's warmup (default: 0.5)")
    # 0.7 per stage: the stem learns at 0.7^5 = 17 % of the head's LR. ULMFiT's reason: lower layers hold generic
    # features (edges, textures) that transfer as they are (Yosinski et al. 2014). For an input-level shift such as
    # 32-px images upsampled, that is contested: Lee et al. (2023, "Surgical Fine-Tuning") find tuning the *first*
    # layers best under input-level shifts. So 0.7 is a default to test (--lr-decay 1: one LR), not a finding.
    stages.add_argument("--lr-decay", type=float, default=0.7, help="LR factor per stage below the head (default: 0.7)")
    # Level 3's low-LR tail is replaced here by the SWA phase, which holds a LR of its own: only without SWA.
    stages.add_argument("--final-epochs", type=int, default=0, help="epochs at --final-lr, needs --swa-epochs 0 "
                                                                     "(default: 0)")
    stages.add_argument("--final-lr", type=float, default=5e-6, help="LR of the final epochs (default: 5e-06)")
    swa = parser.add_argument_group("SWA (stochastic weight averaging)")
    # The SWA paper's schedule (its train.py): the LR decays to swa_lr, holds it, and a snapshot is averaged once per
    # epoch. Its CIFAR commands set swa_lr to 0.1-0.5 of the initial LR (SGD, 0.01-0.05 for 0.05-0.1); its ImageNet
    # runs, from pretrained models, cycle from 1e-3 to 1e-5. A fifth of --lr lies in that CIFAR range: high enough for
    # the weights to move about the basin the cosine found, low enough not to leave it.
    swa.add_argument("--swa-epochs", type=int, default=5, help="SWA epochs at the end, 0 = off (default: 5)")
    swa.add_argument("--swa-lr", type=float, help="SWA learning rate (default: --lr / 5, 2e-05 for the default --lr)")
    swa.add_argument("--swa-schedule", choices=["constant", "cyclic"], default="constant",
                     help="constant, or cyclic: --swa-lr down to a tenth in each cycle (default: constant)")
    swa.add_argument("--swa-every", type=int, default=0, help="average every N steps, 0 = each epoch (default: 0)")
    ema = parser.add_argument_group("EMA of weights")
    # 0.999 averages over about the last 1,000 steps: about 3 epochs of 45,000 images at batch 128.
    ema.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay per step, 0 = no EMA (default: 0.999)")
    # An average of weights needs BatchNorm statistics of its own, from the distribution its layers trained on: the
    # training images, augmented (torch.optim.swa_utils.update_bn runs over the training loader). "clean" is the
    # lesson that clean images are another distribution; "copy" takes the raw model's running statistics.
    ema.add_argument("--avg-bn", choices=["train", "clean", "copy"], default="train",
                     help="the averages' BatchNorm statistics: training images through the training augmentation, the "
                          "same images clean, or the raw model's (default: train)")
    aug = parser.add_argument_group("augmentation and regularisation")
    aug.add_argument("--randaug-n", type=int, default=2, help="RandAugment: ops per image, 0 = off (default: 2)")
    aug.add_argument("--randaug-m", type=int, default=9, help="RandAugment: magnitude, 0..30 (default: 9)")
    # timm's and DeiT's MixUp/CutMix values, on half the batches as the original notebooks did: with a short
    # fine-tuning schedule, mixing every batch slows convergence.
    aug.add_argument("--mix-prob", type=float, default=0.5, help="probability that a batch is mixed (default: 0.5)")
    aug.add_argument("--switch-prob", type=float, default=0.5, help="CutMix rather than MixUp (default: 0.5)")
    aug.add_argument("--mixup-alpha", type=float, default=0.8, help="MixUp lam ~ Beta(a, a), 0 = off (default: 0.8)")
    aug.add_argument("--cutmix-alpha", type=float, default=1.0, help="CutMix lam ~ Beta(a, a), 0 = off (default: 1.0)")
    aug.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing epsilon (default: 0.1)")
    aug.add_argument("--erase-prob", type=float, default=0.25, help="random erasing probability (default: 0.25)")
    aug.add_argument("--tta-set", default="flip+translate", choices=list(common.TTA_SETS),
                     help="test-time augmentation views of the final test (default: flip+translate)")
    aug.add_argument("--tta-average", choices=["softmax", "logit"], default="softmax", help="(default: softmax)")
    robust = parser.add_argument_group("robustness: CIFAR-10-C-style corruptions (evaluate.py --corruptions)")
    robust.add_argument("--corruption-images", type=int, help="test images per corruption and severity in the final "
                        "report, 0 = no report (default: all of the test set: 65 passes over it)")
    studies = parser.add_argument_group("ablation and summary")
    studies.add_argument("--ablate", action="store_true", help="run the ablation grid, not one run (default: off)")
    studies.add_argument("--ablate-epochs", type=int, default=6,
                       help="--epochs of each ablation run; every other phase scales with it (default: 6)")
    # One run's test top-1 varies by about 0.17 points at 97 % on 10,000 images (binomial; Jordan 2024): a few tenths
    # of a point between techniques needs paired seeds, as torchvision's recipe work uses 3-5 runs per change.
    studies.add_argument("--ablate-seeds", type=int, default=3, help="seeds per trained row, paired (default: 3)")
    studies.add_argument("--ablate-sizes", type=int, nargs="+", default=[128, 160, 224], help="(default: 128 160 224)")
    studies.add_argument("--ablate-rows", nargs="+", metavar="ROW", help="only these rows, and baseline (default: all)")
    studies.add_argument("--summary", action="store_true", help="only write results/summary.{md,png} (default: off)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cpu (default: auto)")
    run.add_argument("--seed", type=int, default=0, help="seeds the split, the augmentation and the head (default: 0)")
    run.add_argument("--resume", help="continue from a levelN_last.pth, at the epoch after it (default: off)")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run's checkpoints (default: off)")
    run.add_argument("--checkpoint-dir", default="checkpoints", help="where .pth files go (default: checkpoints)")
    run.add_argument("--results-dir", default="results", help="where JSON and PNG results go (default: results)")
    run.add_argument("--print-freq", type=int, default=50, help="a step line every N steps, 0 = none (default: 50)")
    # Dynamo guards on requires_grad: each unfreezing stage compiles the forward and backward again.
    run.add_argument("--compile", action="store_true", help="torch.compile the model, once per unfreezing stage: 6 "
                     "compiles (2 with --unfreeze-every 0); ResNet-50's first at 224 px took about 60 s on an H100 "
                     "(default: off)")
    run.add_argument("--sync-bn", action="store_true", help="torchrun, GPUs: BatchNorm over all GPUs (default: off)")
    run.add_argument("--quick", action="store_true", help="smoke run: 128 images, 32 px, in quick/ (default: off)")
    return parser

def validate_args(args):
    if args.quick:  # shrink first, then check what will run; quick/ folders keep real runs' files apart
        vars(args).update(QUICK, checkpoint_dir=f"{args.checkpoint_dir}/quick", results_dir=f"{args.results_dir}/quick")
    if args.swa_lr is None:  # the SWA paper's CIFAR runs hold 0.1-0.5 of the initial LR (see --swa-lr)
        args.swa_lr = args.lr / 5
    common.check_flags(args, positive=("epochs", "batch_size", "head_lr", "lr", "subset", "eval_subset", "swa_lr",
                                       "ablate_epochs", "ablate_seeds"),
                       non_negative=("head_epochs", "weight_decay", "workers", "print_freq", "warmup_epochs", "min_lr",
                                     "randaug_n", "mixup_alpha", "cutmix_alpha", "unfreeze_every", "corruption_images",
                                     "unfreeze_warmup_epochs", "final_epochs", "final_lr", "swa_epochs", "swa_every"),
                       fraction=("mix_prob", "switch_prob", "label_smoothing", "erase_prob", "lr_decay", "ema_decay"))
    if not (0 <= args.dropout < 1 and args.ema_decay < 1 and args.lr_decay > 0 and 0 <= args.randaug_m <= 30):
        raise common.UserError("need --dropout and --ema-decay in [0, 1), --lr-decay in (0, 1], --randaug-m in 0..30")
    if min(args.ablate_sizes) < 32:  # first: the rows named below are then all valid
        raise common.UserError(f"--ablate-sizes must be >= 32 (got {min(args.ablate_sizes)})")
    grid = study.ablation_grid(args)
    rows, unknown = " ".join(grid), sorted(set(args.ablate_rows or []) - set(grid))
    if unknown:
        raise common.UserError(f"unknown --ablate-rows {' '.join(unknown)}: choose among {rows}")
    if args.ablate_rows and not args.ablate:
        raise common.UserError("--ablate-rows needs --ablate")
    if args.ablate and (args.resume or "RANK" in os.environ):
        raise common.UserError("--ablate runs its rows itself: one process (python, not torchrun), no --resume")
    if args.ablate and args.ablate_epochs > args.epochs:
        raise common.UserError(f"--ablate-epochs scales the recipe down: at most --epochs ({args.epochs}), got "
                               f"{args.ablate_epochs}")
    if args.final_epochs and args.swa_epochs:
        raise common.UserError("--final-epochs needs --swa-epochs 0: in Level 4 the SWA phase replaces the final "
                               "low-LR epochs")
    if args.img_size < 32 or args.batch_size < 2 or (args.subset or 45000) < args.batch_size:
        raise common.UserError("need --img-size >= 32, --batch-size >= 2 (for BatchNorm), --subset >= --batch-size")

def setup_distributed(args):
    """torchrun starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE; without it, one process."""
    if "RANK" not in os.environ:
        return 0, 1, common.resolve_device(args.device)
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # first: else every process opens a context on GPU 0
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device

def train_transform(args):
    """CIFAR's standard augmentation, on the 32-px uint8 image: a random crop with 4-px zero padding, a random flip;
    then RandAugment: n random operations at magnitude m (of torchvision's 31 bins)."""
    steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    return v2.Compose(steps + ([v2.RandAugment(args.randaug_n, args.randaug_m)] if args.randaug_n else []))

def group_of(name):
    """The stage of a ResNet-50 parameter or module: stem, layer1 ... layer4, or fc (with the pooling and dropout)."""
    top = name.split(".")[0]
    return {"conv1": "stem", "bn1": "stem", "relu": "stem", "maxpool": "stem", "avgpool": "fc"}.get(top, top)

def unfreeze_epoch(group, args):
    """The epoch (0-based) from which `group` trains: the head from the start, layer4 when stage 2 starts, then one
    more stage every --unfreeze-every epochs (0: all at once, as in Level 2)."""
    return 0 if group == "fc" else args.head_epochs + (GROUPS.index(group) - 1) * args.unfreeze_every

def set_trainable(model, epoch, args):
    """Gradients and train mode for the stages unfrozen by `epoch`; the frozen ones keep BatchNorm in eval mode: their
    statistics stay ImageNet's instead of drifting towards CIFAR-10 while their weights cannot follow."""
    trainable = [group for group in GROUPS if unfreeze_epoch(group, args) <= epoch]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(group_of(name) in trainable)
    model.train()
    for name, child in model.named_children():
        child.train(group_of(name) in trainable)
    return trainable

def make_optimizer(model, args, device):
    """AdamW over every parameter (those without a gradient, the frozen ones, it skips); weight decay on conv and linear
    weights, none on BatchNorm weights and biases (Goyal et al. 2017, sec. 3). Fused: one kernel launch on CUDA.
    Two parameter groups per stage, tagged with it, so that each stage gets its own LR."""
    param_groups = []
    for group in GROUPS:
        params = [p for name, p in model.named_parameters() if group_of(name) == group]
        weights = {"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay, "group": group}
        norms_and_biases = {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "group": group}
        param_groups += [weights, norms_and_biases]
    return torch.optim.AdamW(param_groups, lr=args.lr, fused=device.type == "cuda")

def wrap(model, world_size, device, args):
    """DistributedDataParallel (built again when what trains changes: it registers those parameters), torch.compile."""
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model

def lr_at(step, group, steps_per_epoch, args):
    """The LR of stage `group` at optimiser `step` of the run: the base schedule (head cosine, stage-2 warmup and
    cosine, --final-lr without SWA, the SWA phase), times --lr-decay per stage below the head, times the stage's
    warmup since its unfreezing (0 before it). A pure function of the step, so that resume and tests need no
    scheduler state."""
    head_steps, main_steps = args.head_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    swa_start, swa_cycle = swa_steps(steps_per_epoch, args)
    # With SWA the cosine does not anneal to about zero and climb back: it ends at --swa-lr, where the SWA phase starts.
    cosine_end_lr = args.swa_lr if args.swa_epochs else args.min_lr
    if step < head_steps:
        base = common.warmup_cosine_lr(step, head_steps, 0, args.head_lr, args.min_lr)
    elif step < head_steps + main_steps:
        base = common.warmup_cosine_lr(step - head_steps, main_steps, round(args.warmup_epochs * steps_per_epoch),
                                       args.lr, cosine_end_lr)
    elif step < swa_start:
        base = args.final_lr
    elif args.swa_schedule == "cyclic":  # each cycle from --swa-lr down to a tenth (Izmailov et al. 2018, eq. 2)
        position = ((step - swa_start) % swa_cycle + 1) / swa_cycle
        base = args.swa_lr * (1 - 0.9 * position)
    else:
        base = args.swa_lr
    steps_unfrozen = step - unfreeze_epoch(group, args) * steps_per_epoch
    warmup_steps = round(args.unfreeze_warmup_epochs * steps_per_epoch)
    if steps_unfrozen < 0:
        warmup = 0.0  # not unfrozen yet
    elif group == "fc" or warmup_steps == 0:
        warmup = 1.0  # the head trains from the first step; no warmup asked
    else:
        warmup = min(1.0, (steps_unfrozen + 1) / warmup_steps)
    return base * args.lr_decay ** GROUPS.index(group) * warmup

def swa_steps(steps_per_epoch, args):
    """(The first step of the SWA phase, the steps per averaging cycle: --swa-every, or one epoch.)"""
    swa_start = (args.head_epochs + args.epochs + args.final_epochs) * steps_per_epoch
    return swa_start, args.swa_every or steps_per_epoch

def train_one_epoch(model, loader, optimizer, scaler, device, args, epoch, averages):
    """One pass over the training data. The loss is summed on the device and read once, at the end: `loss.item()` in
    every step would make the CPU wait for the GPU in every step. Returns the mean training loss."""
    loss_sum, (swa_start, swa_cycle) = torch.zeros((), device=device), swa_steps(len(loader), args)
    for step, (images, labels) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch * len(loader) + step, group["group"], len(loader), args)
        images = common.prepare_batch(images, device, args.img_size)  # to [0, 1], upsampled, normalised
        targets = common.smooth_one_hot(labels.to(device, non_blocking=True), args.label_smoothing)
        images, targets = common.mix_batch(images, targets, args.mix_prob, args.switch_prob, args.mixup_alpha,
                                           args.cutmix_alpha)
        images = common.random_erasing(images, args.erase_prob)
        with common.autocast(device):  # bf16 (fp16 before Ampere) on CUDA, fp32 elsewhere
            logits = model(images)
        loss = common.soft_cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16: the loss scaled up, so that small gradients do not underflow
        scaler.step(optimizer)  # fp16: unscales, and skips the step if a gradient overflowed
        scaler.update()
        if "ema" in averages:  # the EMA follows every step; SWA takes a snapshot at the end of each cycle
            averages["ema"].update(model)
        swa_done = epoch * len(loader) + step + 1 - swa_start  # steps of the SWA phase, this one included
        if "swa" in averages and swa_done > 0 and swa_done % swa_cycle == 0:
            averages["swa"].update(model)
        loss_sum += loss.detach()
        if args.print_freq and (step + 1) % args.print_freq == 0:
            print(f"  step {step + 1}/{len(loader)} loss {loss.item():.4f}", flush=True)  # the step's only sync
    return loss_sum.item() / len(loader)

def load_data(args, rank, world_size, device):
    """Training, validation and test sets, and the training loader (augmentation at 32 px in its workers)."""
    if world_size > 1 and rank > 0:
        torch.distributed.barrier()  # rank 0 first: it downloads CIFAR-10 if it is missing
    train_set, val_set, test_set = common.cifar10_datasets(args.data_dir, args.seed, args.subset, args.eval_subset,
                                                           args.train_on_all, train_transform(args))
    if world_size > 1 and rank == 0:
        torch.distributed.barrier()
    # DistributedSampler also with one process: its shuffle is a function of (seed, epoch) through set_epoch; under
    # torchrun each process takes every world_size-th image of it. drop_last: a batch of one would break BatchNorm.
    sampler = torch.utils.data.DistributedSampler(train_set, world_size, rank, seed=args.seed, drop_last=True)
    train_loader = torch.utils.data.DataLoader(
        train_set, args.batch_size // world_size, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        worker_init_fn=common.worker_init,  # Ctrl-C reaches the main process only, which stops the workers
        generator=torch.Generator().manual_seed(args.seed + rank))  # the workers' seeds, not from the global RNG
    return train_set, val_set, test_set, train_loader

def resume(args, model, averages, optimizer, scaler):
    """Continue after a levelN_last.pth, at the next epoch: weights, averages, optimiser, loss scale, best, history."""
    checkpoint = common.load_checkpoint(args.resume, LEVEL)
    common.check_resume(checkpoint, args, RESUME_FLAGS)
    model.load_state_dict(checkpoint["model"])
    for name, average in averages.items():  # an average the saved run did not have starts from its weights
        saved = checkpoint["averages"].get(name, {"module": checkpoint["model"], "num_updates": 0})
        average.module.load_state_dict(saved["module"])
        average.num_updates = saved["num_updates"]
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:  # empty when it was saved by a bf16 or fp32 run
        scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["epoch"], checkpoint["best_acc"], checkpoint["history"]

def history_key(figure, candidate):
    """The history column of a candidate's validation figure: val_acc for the raw weights, val_acc_ema for the EMA."""
    if candidate == "raw":
        return f"val_{figure}"
    return f"val_{figure}_{candidate}"

def bn_dataset(train_set, args):
    """The images the averages' BatchNorm statistics come from (--avg-bn): the first BN_IMAGES training images through
    this level's training augmentation (crop, flip, RandAugment; MixUp/CutMix and erasing act later, on the batch),
    drawn once with --seed so that every validation sees the same ones; or the same images clean."""
    if args.avg_bn == "train":
        return common.bn_images(train_set, BN_IMAGES, train_transform(args), args.seed)
    return common.bn_images(train_set, BN_IMAGES)

def set_average_bn(average_model, model, trainable, bn_set, device, args):
    """BatchNorm statistics of the average's own, recomputed on `bn_set`, or the raw model's (--avg-bn copy). The
    stages still frozen keep the statistics they train with, ImageNet's like the raw model's, and normalise with
    them during the recompute, as they do in training (eval mode)."""
    raw_buffers = dict(model.named_buffers())
    for name, buffer in average_model.named_buffers():
        if args.avg_bn == "copy" or group_of(name) not in trainable:
            buffer.copy_(raw_buffers[name])
    if args.avg_bn != "copy":
        norms = [module for name, module in average_model.named_modules()
                 if isinstance(module, torch.nn.BatchNorm2d) and group_of(name) in trainable]
        common.recompute_bn(average_model, bn_set, device, args.img_size, args.batch_size, norms)

def validate(model, averages, trainable, bn_set, val_set, device, args):
    """Validation loss and accuracy of the raw weights and of each average that has averaged something, after the
    average gets BatchNorm statistics of its own (set_average_bn), so that all are judged alike. Returns (figures,
    candidate models); with --train-on-all, no figures."""
    candidates = {"raw": model}
    for name, average in averages.items():
        if average.num_updates > 0:
            set_average_bn(average.module, model, trainable, bn_set, device, args)
            candidates[name] = average.module
    figures = {}
    if args.train_on_all:
        return figures, candidates
    for name, candidate in candidates.items():
        loss, accuracy = evaluate.loss_and_accuracy(candidate, val_set, device, args.img_size)
        figures[history_key("loss", name)] = loss
        figures[history_key("acc", name)] = accuracy
    return figures, candidates

def choose_candidate(candidates, row, args):
    """The weights for levelN_best.pth: the candidate with the best validation accuracy; with --train-on-all (no
    validation), the last average this level adds that has averaged something (SWA, else EMA), else the raw weights."""
    if not args.train_on_all:
        return max(candidates, key=lambda name: row[history_key("acc", name)])
    if "swa" in candidates:
        return "swa"
    if "ema" in candidates:
        return "ema"
    return "raw"

def save_checkpoints(model, candidates, averages, optimizer, scaler, history, best_acc, args, writer):
    """levelN_last.pth after every epoch, for --resume; levelN_best.pth when validation improved (with --train-on-all:
    every epoch, so the last one), holding the chosen candidate. Returns the best accuracy so far."""
    row, checkpoint_dir = history[-1], Path(args.checkpoint_dir)
    files = {}  # path -> checkpoint
    source = choose_candidate(candidates, row, args)
    checkpoint = {"level": LEVEL, "model": candidates[source].state_dict(), "model_source": source,
                  "epoch": row["epoch"], "history": history, "args": vars(args)}
    best_path = checkpoint_dir / f"{LEVEL}_best.pth"
    if args.train_on_all:
        files[best_path] = {**checkpoint, "selected_by": "last epoch (no validation)"}
    elif row[history_key("acc", source)] > best_acc:
        best_acc = row[history_key("acc", source)]
        files[best_path] = {**checkpoint, "selected_by": "validation accuracy"}
    saved_averages = {}
    for name, average in averages.items():
        if average.num_updates > 0:  # an average enters last.pth with its first update: no dead weight before
            saved_averages[name] = {"module": average.module.state_dict(), "num_updates": average.num_updates}
    files[checkpoint_dir / f"{LEVEL}_last.pth"] = {
        **checkpoint, "model": model.state_dict(), "model_source": "raw", "best_acc": best_acc,
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "averages": saved_averages}
    writer.save(files)  # a CPU copy now; serialised and written in the background while the next epoch trains
    return best_acc

def fit_temperatures(model, val_set, device, args):
    """One temperature per TTA view set, fitted on the validation logits of that set's own average (--tta-average):
    averaging views changes how confident the prediction is, so the T of one view miscalibrates the others.
    {set: {"temperature": T, "at_bound": bool}}; with --train-on-all no image is held out: T = 1 for every set."""
    if args.train_on_all:
        return {name: {"temperature": 1.0, "at_bound": False} for name in common.TTA_SETS}
    all_views = list(common.TTA_VIEWS)
    view_logits, labels = common.predict(model, val_set, device, args.img_size, all_views)  # each view once
    fits = {}
    for name, views in common.TTA_SETS.items():
        set_logits = view_logits[[all_views.index(view) for view in views]]
        temperature, at_bound = common.fit_temperature(set_logits, labels, args.tta_average)
        fits[name] = {"temperature": temperature, "at_bound": at_bound}
    return fits

def applied_temperature(fit):
    """A fit that ended at its search bound is no fit (chance-level logits): T = 1 then."""
    if fit["at_bound"]:
        return 1.0
    return fit["temperature"]

def final_test(model, val_set, test_set, device, args, history, info):
    """The selected weights (raw, EMA or SWA), a temperature per TTA set fitted on validation and stored in the
    checkpoint; the test set with every TTA view set at its own T, the calibration before and after, the errors:
    results/level4.json and PNGs."""
    path, results_dir = Path(args.checkpoint_dir) / f"{LEVEL}_best.pth", Path(args.results_dir)
    best = common.load_checkpoint(path)
    model.load_state_dict(best["model"])  # raw, EMA or SWA weights, as chosen on validation
    fits = fit_temperatures(model, val_set, device, args)
    one_view = fits["none"]
    common.save_checkpoint(path, {**best, "temperatures": fits, "temperature": one_view["temperature"],
                                  "temperature_at_bound": one_view["at_bound"]})
    calibrated_t = applied_temperature(one_view)
    logits, labels = common.predict(model, test_set, device, args.img_size)
    test, probs = evaluate.from_logits(logits, labels)  # T = 1: the raw calibration, as at every level
    calibrated, calibrated_probs = evaluate.from_logits(logits, labels, calibrated_t)
    if one_view["at_bound"]:
        print("warning: the temperature fit ended at its search bound, so it is not applied (T = 1)")
    print(f"T = {one_view['temperature']:.3g}: test ECE {test['ece']:.4f} -> {calibrated['ece']:.4f}, NLL "
          f"{test['nll']:.4f} -> {calibrated['nll']:.4f}")
    tta = {}
    for name, views in common.TTA_SETS.items():  # each set at its own T; predictions from the T = 1 average
        tta[name], _ = evaluate.report(model, test_set, device, args.img_size, views, applied_temperature(fits[name]),
                                       args.tta_average)
    print("TTA, each set at its own T: " + ", ".join(f"{name} ({len(r['views'])} views) acc1 {r['acc1']:.4f} T "
          f"{r['temperature']:.3g} ece {r['ece']:.4f} {r['images_per_s']:.0f} img/s" for name, r in tta.items()))
    evaluate.plot_reliability({"T = 1": (probs, labels), f"T = {calibrated_t:.3g}": (calibrated_probs, labels)},
                              results_dir / f"{LEVEL}_reliability.png", f"{LEVEL}: test set")
    evaluate.plot_confusion(test["confusion_matrix"], results_dir / f"{LEVEL}_confusion.png", f"{LEVEL}: test set")
    mistakes = evaluate.plot_mistakes(test_set, probs, results_dir / f"{LEVEL}_mistakes.png")
    best_val_acc = best["history"][-1].get(history_key("acc", best["model_source"]), math.nan)  # nan: no validation
    calibration = {"temperature": one_view["temperature"], "at_bound": one_view["at_bound"], "per_tta_set": fits,
                   "tta_average": args.tta_average, "fitted_on_images": len(val_set)}
    robustness = None
    if args.corruption_images != 0:  # one view at the fitted T; README, "Robustness"
        corruption_set = common.CifarDataset(test_set.images[:args.corruption_images],
                                             test_set.labels[:args.corruption_images])
        robustness = evaluate.corruption_report(model, corruption_set, device, args.img_size, temperature=calibrated_t)
    results = {"level": LEVEL, **info, "args": vars(args), "history": history, "best_epoch": best["epoch"],
               "selected_by": best["selected_by"], "model_source": best["model_source"], "best_val_acc": best_val_acc,
               "test": test, "test_calibrated": calibrated, "test_tta": tta[args.tta_set], "tta_sets": tta,
               "calibration": calibration, "most_confused": evaluate.most_confused(test["confusion_matrix"]),
               "confident_mistakes": mistakes, "corruptions_generated": robustness,
               "seconds": time.time() - info["started"],
               **evaluate.run_sessions(history, info)}
    evaluate.write_json(results_dir / f"{LEVEL}.json", results)
    evaluate.plot_curves(history, results_dir / f"{LEVEL}_curves.png", f"{LEVEL}, {args.img_size} px")
    print("most confused, true -> predicted: " + ", ".join(f"{t} -> {p} ({n})" for t, p, n in results["most_confused"]))
    print(f"final: acc1={test['acc1']:.4f} tta_acc1={tta[args.tta_set]['acc1']:.4f} val_acc1="
          f"{results['best_val_acc']:.4f} ece={test['ece']:.4f} ece_t={calibrated['ece']:.4f} temperature="
          f"{calibrated_t:.4f} epoch={best['epoch']} test_images={test['num_images']} seconds={results['seconds']:.0f}")
    return results

def main(args):
    if args.summary:
        return study.write_summary(args)
    if args.ablate:
        return study.run_ablation(args, main, BN_IMAGES)  # each trained (row, seed) is a call of this main
    rank, world_size, device = setup_distributed(args)
    master = rank == 0  # rank 0 alone validates, writes and prints; the others wait for it at a barrier
    common.start_ranks(LEVEL, args, rank, world_size)  # rank 0 checks the folders; its error stops every rank
    if args.sync_bn and device.type != "cuda":
        raise common.UserError(f"--sync-bn needs CUDA GPUs (the device is {device.type}): leave it out")
    if args.batch_size % world_size or args.batch_size // world_size < 2:
        raise common.UserError("--batch-size must be a multiple of the processes, 2 or more each")
    torch.manual_seed(args.seed + rank)  # each process draws its own augmentation; DDP gives all rank 0's weights
    torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN times its kernels once and keeps the fastest
    train_set, val_set, test_set, train_loader = load_data(args, rank, world_size, device)
    model = common.build_model(args.weights, args.dropout).to(device, memory_format=torch.channels_last)
    averages = {"ema": common.ModelEma(model, args.ema_decay)} if args.ema_decay > 0 else {}  # plain BatchNorm copies
    averages.update({"swa": common.SwaAverage(model)} if args.swa_epochs > 0 else {})
    bn_set = bn_dataset(train_set, args)
    if args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=common.amp_dtype(device) == torch.float16)  # fp16 only
    start_epoch, best_acc, history = resume(args, model, averages, optimizer, scaler) if args.resume else (0, -1.0, [])
    info = {**evaluate.run_info(device), "train_images": len(train_set), "started": time.time()}
    if master:
        print(f"{LEVEL}: {info['device']} x {world_size}, {info['precision']}, {args.img_size} px, {args.weights} "
              f"weights, epoch {start_epoch + 1} on; train images: {len(train_set)}, val {len(val_set)}, test "
              f"{len(test_set)}; Ctrl-C stops the run, {LEVEL}_last.pth keeps its last epoch", flush=True)

    writer = common.CheckpointWriter()  # one save in flight at most
    total_epochs, wrapped = args.head_epochs + args.epochs + args.final_epochs + args.swa_epochs, None
    for epoch in range(start_epoch, total_epochs):
        trainable = set_trainable(model, epoch, args)  # every epoch: validation leaves the model in eval mode
        if trainable != wrapped:  # what trains changed: wrap again
            train_model, wrapped = wrap(model, world_size, device, args), trainable
        stage = "+".join(trainable)
        train_loader.sampler.set_epoch(epoch)
        epoch_start = time.time()
        train_loss = train_one_epoch(train_model, train_loader, optimizer, scaler, device, args, epoch, averages)
        train_seconds = time.time() - epoch_start
        lr = optimizer.param_groups[0]["lr"]  # the head's
        row = {"epoch": epoch + 1, "stage": stage, "lr": lr, "train_loss": train_loss,
               "images_per_s": len(train_loader) * args.batch_size / train_seconds, "train_seconds": train_seconds,
               "session_started": info["started"], "command": info["command"]}  # a resumed run has several sessions
        figures, candidates = {}, {}
        if master:
            figures, candidates = validate(model, averages, trainable, bn_set, val_set, device, args)
        bad = [loss for loss in (train_loss, *figures.values()) if not math.isfinite(loss)]
        if bad:  # checked once per epoch: a check in every step would make the CPU wait for the GPU
            raise common.UserError(f"loss became {bad[0]} in epoch {epoch + 1} (lr {lr:.0e}): lower --lr/--head-lr")
        if master:
            history.append({**row, **figures})
            best_acc = save_checkpoints(model, candidates, averages, optimizer, scaler, history, best_acc, args,
                                        writer)
            history[-1]["epoch_seconds"] = time.time() - epoch_start  # training, validation, the save's copy
            elapsed = time.time() - info["started"]
            val_text = ""
            if figures:  # "val loss 0.51 acc 0.83 loss_ema 0.49 acc_ema 0.84"
                val_text = " | val " + " ".join(f"{key[4:]} {value:.4f}" for key, value in figures.items())
            print(f"epoch {epoch + 1}/{total_epochs} [{stage}] lr {lr:.1e} train loss {train_loss:.4f}{val_text} | "
                  f"{row['images_per_s']:.0f} img/s | {elapsed:.0f} s, ETA "
                  f"{elapsed / (epoch + 1 - start_epoch) * (total_epochs - epoch - 1):.0f} s", flush=True)
        if world_size > 1:
            torch.distributed.barrier()  # the others wait while rank 0 validates and saves

    writer.wait()  # the last epoch's files are on disk before the final test reads them; its error, if any
    del train_loader  # its worker processes stop now, rather than being waited for one by one at exit
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return final_test(model, val_set, test_set, device, args, history, info) if master else None

if __name__ == "__main__":
    common.run_main(main, get_args_parser(), validate_args)
