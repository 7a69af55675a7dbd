"""Level 4 - Level 3 plus SWA, advanced TTA, calibration, error analysis and real ablation studies.

What this level adds to level3.py:
  - Stochastic Weight Averaging (Izmailov et al. 2018): --swa-epochs at --swa-lr after Level 3's schedule, averaging
    the weights once per epoch (or every --swa-every steps); validation picks raw, EMA or SWA weights;
  - advanced TTA: every view set, softmax or logit averaging; temperature scaling (Guo et al. 2017) fitted on
    validation: ECE, NLL, Brier before and after, reliability diagrams (TTA predicts with T = 1: T only calibrates);
  - error analysis: confusion matrix, per-class precision/recall/F1, most-confused pairs, most confident mistakes;
  - --ablate: real, shorter runs that each switch one technique off; --summary: one table across the levels.

Each level is one self-contained script, as airbench's are: it repeats the previous level's lines on purpose, so that
`diff level3.py level4.py` shows exactly what this level adds.

    python level4.py --epochs 30
    python level4.py --ablate --ablate-epochs 5                  # results/ablation.{json,md,png}
    python level4.py --summary                                   # results/summary.{md,png} from results/level*.json
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

import common
import evaluate

LEVEL = "level4"
# --resume keeps these as saved: they fixed the data split, the optimiser's decay, the schedule of the epochs run.
RESUME_FLAGS = ("seed", "subset", "train_on_all", "weight_decay", "head_epochs", "epochs", "warmup_epochs",
                "unfreeze_every", "unfreeze_warmup_epochs", "final_epochs", "swa_epochs", "swa_every")
# --quick: a smoke run that shows every stage working, in a minute or two on a CPU; its numbers mean nothing.
QUICK = {"subset": 128, "eval_subset": 128, "img_size": 32, "batch_size": 32, "head_epochs": 1, "epochs": 1,
         "overwrite": True, "final_epochs": 1, "swa_epochs": 1}
# Progressive unfreezing walks ResNet-50's stages from the output back to the input.
GROUPS = ("fc", "layer4", "layer3", "layer2", "layer1", "stem")
# The EMA's and SWA's BatchNorm statistics come from this many clean training images (0.3 s at 224 px on an H100).
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
    optim.add_argument("--min-lr", type=float, default=1e-6, help="LR at the end of each cosine (default: 1e-06)")
    stages = parser.add_argument_group("progressive unfreezing, discriminative LRs, long low-LR fine-tuning")
    stages.add_argument("--unfreeze-every", type=int, default=1, help="epochs per new stage, 0 = all (default: 1)")
    stages.add_argument("--unfreeze-warmup-epochs", type=float, default=0.5, help="a stage's warmup (default: 0.5)")
    # 0.7 per stage: the stem learns at 0.7^5 = 17 % of the head's LR. Lower layers hold generic features (edges,
    # textures) that transfer as they are (Yosinski et al. 2014), so they should move least.
    stages.add_argument("--lr-decay", type=float, default=0.7, help="LR factor per stage below the head (default: 0.7)")
    # After the cosine, a few epochs at a small constant LR (above --min-lr, so the weights still move) give the EMA a
    # stable stretch to average.
    stages.add_argument("--final-epochs", type=int, default=5, help="epochs at --final-lr at the end (default: 5)")
    stages.add_argument("--final-lr", type=float, default=5e-6, help="LR of the final epochs (default: 5e-06)")
    swa = parser.add_argument_group("SWA (stochastic weight averaging)")
    # A fifth of --lr: the weights move about the basin the cosine found, without leaving it (Izmailov et al. 2018).
    swa.add_argument("--swa-epochs", type=int, default=5, help="SWA epochs at the end, 0 = off (default: 5)")
    swa.add_argument("--swa-lr", type=float, default=2e-5, help="SWA learning rate (default: 2e-05)")
    swa.add_argument("--swa-schedule", choices=["constant", "cyclic"], default="constant",
                     help="constant, or cyclic: --swa-lr down to a tenth in each cycle (default: constant)")
    swa.add_argument("--swa-every", type=int, default=0, help="average every N steps, 0 = each epoch (default: 0)")
    ema = parser.add_argument_group("EMA of weights")
    # 0.999 averages over about the last 1,000 steps: about 3 epochs of 45,000 images at batch 128.
    ema.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay per step, 0 = no EMA (default: 0.999)")
    ema.add_argument("--ema-bn", choices=["recompute", "copy"], default="recompute",
                     help="the EMA's BatchNorm statistics: recomputed, or copied from the model (default: recompute)")
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
    study = parser.add_argument_group("ablation and summary")
    study.add_argument("--ablate", action="store_true", help="run the ablation grid instead of one run (default: off)")
    study.add_argument("--ablate-epochs", type=int, default=5, help="--epochs of each ablation run (default: 5)")
    study.add_argument("--ablate-sizes", type=int, nargs="+", default=[128, 160, 224], help="(default: 128 160 224)")
    study.add_argument("--ablate-rows", nargs="+", metavar="ROW", help="only these rows, and baseline (default: all)")
    study.add_argument("--summary", action="store_true", help="only write results/summary.{md,png} (default: off)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cpu (default: auto)")
    run.add_argument("--seed", type=int, default=0, help="seeds the split, the augmentation and the head (default: 0)")
    run.add_argument("--resume", help="continue from a levelN_last.pth, at the epoch after it (default: off)")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run's checkpoints (default: off)")
    run.add_argument("--checkpoint-dir", default="checkpoints", help="where .pth files go (default: checkpoints)")
    run.add_argument("--results-dir", default="results", help="where JSON and PNG results go (default: results)")
    run.add_argument("--print-freq", type=int, default=50, help="a step line every N steps, 0 = none (default: 50)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    run.add_argument("--sync-bn", action="store_true", help="torchrun, GPUs: BatchNorm over all GPUs (default: off)")
    run.add_argument("--quick", action="store_true", help="smoke run: 128 images, 32 px, in quick/ (default: off)")
    return parser

def validate_args(args):
    if args.quick:  # shrink first, then check what will run; quick/ folders keep real runs' files apart
        vars(args).update(QUICK, checkpoint_dir=f"{args.checkpoint_dir}/quick", results_dir=f"{args.results_dir}/quick")
    common.check_flags(args, positive=("epochs", "batch_size", "head_lr", "lr", "subset", "eval_subset", "swa_lr",
                                       "ablate_epochs"),
                       non_negative=("head_epochs", "weight_decay", "workers", "print_freq", "warmup_epochs", "min_lr",
                                     "randaug_n", "mixup_alpha", "cutmix_alpha", "unfreeze_every",
                                     "unfreeze_warmup_epochs", "final_epochs", "final_lr", "swa_epochs", "swa_every"),
                       fraction=("mix_prob", "switch_prob", "label_smoothing", "erase_prob", "lr_decay", "ema_decay"))
    if not (0 <= args.dropout < 1 and args.ema_decay < 1 and args.lr_decay > 0 and 0 <= args.randaug_m <= 30):
        raise common.UserError("need --dropout and --ema-decay in [0, 1), --lr-decay in (0, 1], --randaug-m in 0..30")
    if min(args.ablate_sizes) < 32:  # first: the rows named below are then all valid
        raise common.UserError(f"--ablate-sizes must be >= 32 (got {min(args.ablate_sizes)})")
    rows, unknown = " ".join(ablation_grid(args)), sorted(set(args.ablate_rows or []) - set(ablation_grid(args)))
    if unknown:
        raise common.UserError(f"unknown --ablate-rows {' '.join(unknown)}: choose among {rows}")
    if args.ablate_rows and not args.ablate:
        raise common.UserError("--ablate-rows needs --ablate")
    if args.ablate and (args.resume or "RANK" in os.environ):
        raise common.UserError("--ablate runs its rows itself: one process (python, not torchrun), no --resume")
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
    for name, child in model.train().named_children():
        child.train(group_of(name) in trainable)
    return trainable

def make_optimizer(model, args, device):
    """AdamW over every parameter (those without a gradient, the frozen ones, it skips); weight decay on conv and linear
    weights, none on BatchNorm weights and biases (Goyal et al. 2017, sec. 3). Fused: one kernel launch on CUDA.
    Two parameter groups per stage, tagged with it, so that each stage gets its own LR."""
    param_groups = []
    for group in GROUPS:
        params = [p for name, p in model.named_parameters() if group_of(name) == group]
        param_groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
                         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        param_groups[-2]["group"] = param_groups[-1]["group"] = group
    return torch.optim.AdamW(param_groups, lr=args.lr, fused=device.type == "cuda")

def wrap(model, world_size, device, args):
    """DistributedDataParallel (built again when what trains changes: it registers those parameters), torch.compile."""
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model

def lr_at(step, group, steps_per_epoch, args):
    """The LR of stage `group` at optimiser `step` of the run: the base schedule (head cosine, stage-2 warmup and
    cosine, --final-lr), times --lr-decay per stage below the head, times the stage's warmup since its unfreezing (0
    before it). A pure function of the step, so that resume and tests need no scheduler state."""
    head_steps, main_steps = args.head_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    swa_start, swa_cycle = swa_steps(steps_per_epoch, args)
    if step >= swa_start:  # constant, or cyclic from --swa-lr down to a tenth (Izmailov et al. 2018, eq. 2)
        position = ((step - swa_start) % swa_cycle + 1) / swa_cycle if args.swa_schedule == "cyclic" else 0.0
        base = args.swa_lr * (1 - 0.9 * position)
    elif step < head_steps:
        base = common.warmup_cosine_lr(step, head_steps, 0, args.head_lr, args.min_lr)
    elif step < head_steps + main_steps:
        base = common.warmup_cosine_lr(step - head_steps, main_steps, round(args.warmup_epochs * steps_per_epoch),
                                       args.lr, args.min_lr)
    else:
        base = args.final_lr
    steps_unfrozen = step - unfreeze_epoch(group, args) * steps_per_epoch
    warmup_steps = 0 if group == "fc" else round(args.unfreeze_warmup_epochs * steps_per_epoch)
    warmup = 0.0 if steps_unfrozen < 0 else min(1.0, (steps_unfrozen + 1) / warmup_steps) if warmup_steps else 1.0
    return base * args.lr_decay ** GROUPS.index(group) * warmup

def swa_steps(steps_per_epoch, args):  # (the first step of the SWA phase, the steps per averaging cycle)
    return (args.head_epochs + args.epochs + args.final_epochs) * steps_per_epoch, args.swa_every or steps_per_epoch

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

def validate(model, averages, trainable, bn_set, val_set, device, args):
    """Validation loss and accuracy of the raw weights and of each average that has averaged something, after its
    BatchNorm statistics are recomputed on clean training images so that all are judged alike (with --ema-bn copy,
    the EMA's are the raw model's, which follow the last augmented batches). Returns (figures, candidate models)."""
    models = {"raw": model, **{name: average.module for name, average in averages.items() if average.num_updates}}
    for name, average in averages.items():
        copy = name == "ema" and args.ema_bn == "copy"
        if average.num_updates and not copy:
            common.recompute_bn(average.module, bn_set, device, args.img_size, args.batch_size)
        for (key, average_buffer), buffer in zip(average.module.named_buffers(), model.buffers()):
            if copy or group_of(key) not in trainable:  # frozen stages keep the statistics they train with
                average_buffer.copy_(buffer)
    val = {}
    for name, candidate in ({} if args.train_on_all else models).items():
        suffix = "" if name == "raw" else f"_{name}"
        val[f"val_loss{suffix}"], val[f"val_acc{suffix}"] = evaluate.loss_and_accuracy(candidate, val_set, device,
                                                                                       args.img_size)
    return val, models

def save_checkpoints(model, models, averages, optimizer, scaler, history, best_acc, args):
    """levelN_last.pth after every epoch, for --resume; levelN_best.pth when validation improved (with --train-on-all:
    every epoch, so the last one), holding the best of the candidate models. Returns the best accuracy so far."""
    row, checkpoint_dir = history[-1], Path(args.checkpoint_dir)
    score = {name: row.get("val_acc" + ("" if name == "raw" else f"_{name}"), -1.0) for name in models}
    source = list(models)[-1] if args.train_on_all else max(models, key=score.get)  # no validation: the last average
    checkpoint = {"level": LEVEL, "model": models[source].state_dict(), "model_source": source, "epoch": row["epoch"],
                  "history": history, "args": vars(args)}
    if args.train_on_all or score[source] > best_acc:
        best_acc = score[source]
        selected_by = "last epoch (no validation)" if args.train_on_all else "validation accuracy"
        common.save_checkpoint(checkpoint_dir / f"{LEVEL}_best.pth", {**checkpoint, "selected_by": selected_by})
    averages = {name: {"module": a.module.state_dict(), "num_updates": a.num_updates} for name, a in averages.items()}
    common.save_checkpoint(checkpoint_dir / f"{LEVEL}_last.pth", {
        **checkpoint, "model": model.state_dict(), "model_source": "raw", "best_acc": best_acc,
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "averages": averages})
    return best_acc

def final_test(model, val_set, test_set, device, args, history, info):
    """The selected weights (raw, EMA or SWA), their temperature fitted on validation and stored in the checkpoint; the
    test set with every TTA view set, the calibration before and after, the errors: results/level4.json and PNGs."""
    path, results_dir = Path(args.checkpoint_dir) / f"{LEVEL}_best.pth", Path(args.results_dir)
    best = common.load_checkpoint(path)
    model.load_state_dict(best["model"])  # raw, EMA or SWA weights, as chosen on validation
    temperature, at_bound = (1.0, False) if args.train_on_all else common.fit_temperature(  # no held-out images: T = 1
        common.predict(model, val_set, device, args.img_size)[0][0], val_set.labels)
    common.save_checkpoint(path, {**best, "temperature": temperature, "temperature_at_bound": at_bound})
    calibrated_t = 1.0 if at_bound else temperature
    logits, labels = common.predict(model, test_set, device, args.img_size)
    test, probs = evaluate.from_logits(logits, labels)  # T = 1: the raw calibration, as at every level
    calibrated, calibrated_probs = evaluate.from_logits(logits, labels, calibrated_t)
    print(f"{'warning: the fit ended at its bound, so it is not applied; ' if at_bound else ''}T = {temperature:.3g}: "
          f"test ECE {test['ece']:.4f} -> {calibrated['ece']:.4f}, NLL {test['nll']:.4f} -> {calibrated['nll']:.4f}")
    tta = {name: evaluate.report(model, test_set, device, args.img_size, views, calibrated_t, args.tta_average)[0]
           for name, views in common.TTA_SETS.items()}
    print(f"TTA (ECE at T = {calibrated_t:.3g}): " + ", ".join(f"{name} ({len(r['views'])} views) acc1 {r['acc1']:.4f} "
          f"ece {r['ece']:.4f} {r['images_per_s']:.0f} img/s" for name, r in tta.items()))
    evaluate.plot_reliability({"T = 1": (probs, labels), f"T = {calibrated_t:.3g}": (calibrated_probs, labels)},
                              results_dir / f"{LEVEL}_reliability.png", f"{LEVEL}: test set")
    evaluate.plot_confusion(test["confusion_matrix"], results_dir / f"{LEVEL}_confusion.png", f"{LEVEL}: test set")
    mistakes = evaluate.plot_mistakes(test_set, probs, results_dir / f"{LEVEL}_mistakes.png")
    results = {"level": LEVEL, **info, "args": vars(args), "history": history, "best_epoch": best["epoch"],
               "selected_by": best["selected_by"], "model_source": best["model_source"], "best_val_acc": best["history"]
               [-1].get("val_acc" + ("" if best["model_source"] == "raw" else f"_{best['model_source']}"), math.nan),
               "test": test, "test_calibrated": calibrated, "test_tta": tta[args.tta_set], "tta_sets": tta,
               "calibration": {"temperature": temperature, "at_bound": at_bound, "fitted_on_images": len(val_set)},
               "most_confused": evaluate.most_confused(test["confusion_matrix"]), "confident_mistakes": mistakes,
               "seconds": time.time() - info["started"]}
    evaluate.write_json(results_dir / f"{LEVEL}.json", results)
    evaluate.plot_curves(history, results_dir / f"{LEVEL}_curves.png", f"{LEVEL}, {args.img_size} px")
    print("most confused, true -> predicted: " + ", ".join(f"{t} -> {p} ({n})" for t, p, n in results["most_confused"]))
    print(f"final: acc1={test['acc1']:.4f} tta_acc1={tta[args.tta_set]['acc1']:.4f} val_acc1="
          f"{results['best_val_acc']:.4f} ece={test['ece']:.4f} ece_t={calibrated['ece']:.4f} temperature="
          f"{calibrated_t:.4f} epoch={best['epoch']} test_images={test['num_images']} seconds={results['seconds']:.0f}")
    return results

def ablation_grid(args):
    """The declared grid: each row switches one technique of the full recipe off, or changes the input size."""
    grid = {"baseline": {}, "no_randaugment": {"randaug_n": 0}, "no_mixup_cutmix": {"mix_prob": 0.0},
            "no_label_smoothing": {"label_smoothing": 0.0}, "no_random_erasing": {"erase_prob": 0.0},
            "no_ema": {"ema_decay": 0.0}, "no_swa": {"swa_epochs": 0}, "no_tta": {"tta_set": "none"},
            "no_progressive_unfreezing": {"unfreeze_every": 0}}
    return {**grid, **{f"img_size_{size}": {"img_size": size} for size in args.ablate_sizes if size != args.img_size}}

def run_ablation(args):
    """Each row (or each of --ablate-rows, and the baseline) a real run at --epochs --ablate-epochs; rows run earlier
    with the same settings are kept. Writes results/ablation.{json,md,png}."""
    path, rows = Path(args.results_dir) / "ablation.json", []
    try:
        done = {row["name"]: row for row in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    except (ValueError, KeyError, TypeError) as error:
        raise common.UserError(f"{path} is not this suite's ablation table ({type(error).__name__}): move it away")
    for name, change in ablation_grid(args).items():
        row_args = argparse.Namespace(**{**vars(args), "ablate": False, "epochs": args.ablate_epochs, **change,
                                         "checkpoint_dir": f"{args.checkpoint_dir}/ablation/{name}", "overwrite": True,
                                         "results_dir": f"{args.results_dir}/ablation/{name}"})
        settings = json.loads(json.dumps({k: v for k, v in vars(row_args).items() if not k.startswith("ablate")}))
        if name in done and done[name]["args"] == settings:
            rows.append(done[name])
        elif name == "baseline" or name in (args.ablate_rows or [name]):
            print(f"ablation row {name}: {change or 'the full recipe'}", flush=True)
            result = main(row_args)
            done[name] = {"name": name, "change": change, "args": settings, "acc1": result["test"]["acc1"], "tta_acc1":
                          result["test_tta"]["acc1"], "ece": result["test"]["ece"], **{k: result[k] for k in (
                              "model_source", "seconds", "device", "commit")}}
            rows.append(done[name])
            evaluate.write_json(path, {"rows": list(done.values())})  # an interrupted grid keeps its finished rows
    evaluate.write_json(path, {"rows": rows})
    baseline = rows[0]["tta_acc1"]
    print(evaluate.write_table(path.with_suffix(".md"), f"Ablation (`python level4.py --ablate`), --epochs "
                               f"{args.ablate_epochs} per row, on {rows[0]['device']}, commit {rows[0]['commit']}",
                               ["row", "change", "test acc1 (TTA)", "vs baseline", "acc1", "ECE", "weights", "seconds"],
                               [[r["name"], r["change"], r["tta_acc1"], f"{r['tta_acc1'] - baseline:+.4f}", r["acc1"],
                                 r["ece"], r["model_source"], f"{r['seconds']:.0f}"] for r in rows]))
    evaluate.plot_bars([r["name"] for r in rows], [r["tta_acc1"] for r in rows], path.with_suffix(".png"),
                       "ablation: test accuracy (each row's TTA)", "test top-1", reference=baseline)
    return rows

def write_summary(args):
    """results/summary.{md,png}: one row per results/levelN.json there; a malformed one is skipped, with a warning."""
    rows = []
    for path in sorted(Path(args.results_dir).glob("level[1-4].json")):
        try:
            r = json.loads(path.read_text())
            rows.append([path.stem, r["test"]["acc1"], r.get("test_tta", {}).get("acc1", "-"), r["test"]["ece"],
                         r.get("test_calibrated", {}).get("ece", "-"), len(r["history"]), f"{r['seconds']:.0f}",
                         r["device"], r["commit"]])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            print(f"warning: skipped {path}: not a results file of this suite ({type(error).__name__})")
    if not rows:
        raise common.UserError(f"no readable levelN.json in {args.results_dir}: run a level first")
    common.check_writable(args.results_dir, "--results-dir")  # one line, not a traceback between the table and plot
    print(evaluate.write_table(Path(args.results_dir) / "summary.md", "Summary (`python level4.py --summary`)",
                               ["level", "test acc1", "with TTA", "ECE", "ECE (T)", "epochs", "seconds", "device",
                                "commit"], rows))
    evaluate.plot_bars([r[0] for r in rows], [r[1] for r in rows], Path(args.results_dir) / "summary.png", "", "top-1")
    return rows

def main(args):
    if args.summary or args.ablate:
        return write_summary(args) if args.summary else run_ablation(args)
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
    bn_set = common.CifarDataset(train_set.images[:BN_IMAGES], train_set.labels[:BN_IMAGES])  # clean: no transform
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

    total_epochs, wrapped = args.head_epochs + args.epochs + args.final_epochs + args.swa_epochs, None
    for epoch in range(start_epoch, total_epochs):
        trainable = set_trainable(model, epoch, args)  # every epoch: validation leaves the model in eval mode
        if trainable != wrapped:  # what trains changed: wrap again
            train_model, wrapped = wrap(model, world_size, device, args), trainable
        stage = "+".join(trainable)
        train_loader.sampler.set_epoch(epoch)
        epoch_start = time.time()
        train_loss = train_one_epoch(train_model, train_loader, optimizer, scaler, device, args, epoch, averages)
        lr = optimizer.param_groups[0]["lr"]  # the head's
        row = {"epoch": epoch + 1, "stage": stage, "lr": lr, "train_loss": train_loss,
               "images_per_s": len(train_loader) * args.batch_size / (time.time() - epoch_start)}
        val, models = validate(model, averages, trainable, bn_set, val_set, device, args) if master else ({}, {})
        bad = [loss for loss in (train_loss, *val.values()) if not math.isfinite(loss)]
        if bad:  # checked once per epoch: a check in every step would make the CPU wait for the GPU
            raise common.UserError(f"loss became {bad[0]} in epoch {epoch + 1} (lr {lr:.0e}): lower --lr/--head-lr")
        if master:
            history.append({**row, **val})
            best_acc = save_checkpoints(model, models, averages, optimizer, scaler, history, best_acc, args)
            elapsed = time.time() - info["started"]
            val = " | val " + " ".join(f"{name[4:]} {value:.4f}" for name, value in val.items()) if val else ""
            print(f"epoch {epoch + 1}/{total_epochs} [{stage}] lr {lr:.1e} train loss {train_loss:.4f}{val} | "
                  f"{row['images_per_s']:.0f} img/s | {elapsed:.0f} s, ETA "
                  f"{elapsed / (epoch + 1 - start_epoch) * (total_epochs - epoch - 1):.0f} s", flush=True)
        if world_size > 1:
            torch.distributed.barrier()  # the others wait while rank 0 validates and saves

    del train_loader  # its worker processes stop now, rather than being waited for one by one at exit
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return final_test(model, val_set, test_set, device, args, history, info) if master else None

if __name__ == "__main__":
    common.run_main(main, get_args_parser(), validate_args)
