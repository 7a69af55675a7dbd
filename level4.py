"""Level 4 - Level 3 plus SWA, advanced TTA, calibration, error analysis and real ablation studies.

What this level adds to level3.py:
  - Stochastic Weight Averaging (Izmailov et al. 2018), run as its paper runs it: the cosine decays to --swa-lr, which
    --swa-epochs then hold (or cycle), averaging the weights once per epoch (or every --swa-every steps). This SWA
    phase replaces Level 3's final low-LR epochs (--final-epochs 0 here). Validation picks raw, EMA or SWA weights;
  - advanced TTA: every view set, softmax or logit averaging; temperature scaling (Guo et al. 2017) fitted on
    validation: ECE, NLL, Brier before and after, reliability diagrams (TTA predicts with T = 1: T only calibrates);
  - error analysis: confusion matrix, per-class precision/recall/F1, most-confused pairs, most confident mistakes;
  - --ablate and --summary: is a technique worth it? The study (support/study.py) trains nothing itself: it runs
    this script's main for every row and seed of a scaled-down recipe, each row switching one technique off.

The levels own their whole recipe and loop, and each repeats the lines of the one before it on purpose, as
airbench's scripts do: `diff level1.py level2.py` (then 2 -> 3, 3 -> 4) shows exactly what a level adds. The run
machinery is called from support/ in one line per concern: skip it on a first read.

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
from support import records, run, study
from support.errors import UserError
from support.files import CheckpointWriter, load_checkpoint, resume, save_checkpoint

LEVEL = "level4"
# A resume with another value of one of these is refused: they fixed the data split, the input size, the batch (the
# steps of an epoch), the optimiser's decay and the learning rate of the epochs already run, and the final test.
RESUME_FLAGS = ("seed", "subset", "train_on_all", "img_size", "batch_size", "weight_decay", "head_epochs", "head_lr",
                "lr", "epochs", "warmup_epochs", "min_lr", "tta_set", "unfreeze_every", "unfreeze_warmup_epochs",
                "lr_decay", "final_epochs", "final_lr", "swa_epochs", "swa_every", "swa_lr", "swa_schedule",
                "tta_average")
# --quick: every stage in a minute or two on a CPU, numbers meaningless; SWA averages each step (4 snapshots, not 1).
QUICK = {"subset": 128, "eval_subset": 128, "img_size": 32, "batch_size": 32, "head_epochs": 1, "epochs": 1,
         "overwrite": True, "swa_epochs": 1, "swa_every": 1}
# Progressive unfreezing walks ResNet-50's stages from the output back to the input.
GROUPS = ("fc", "layer4", "layer3", "layer2", "layer1", "stem")
# The stage of each of torchvision's top-level modules; the others (layer1 ... layer4, fc) are stages themselves.
# avgpool goes with the head: with --dropout it holds the dropout, which must train (and be on) with the head.
STAGE_OF = {"conv1": "stem", "bn1": "stem", "relu": "stem", "maxpool": "stem", "avgpool": "fc"}

def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py (default: ./data)")
    data.add_argument("--img-size", type=run.number(int, at_least=32), default=224,
                      help="side the 32-px images are upsampled to (default: 224)")
    data.add_argument("--subset", type=run.positive_int, help="train on the first N training images (default: all)")
    data.add_argument("--eval-subset", type=run.positive_int, help="validate, and measure the final test, "
                      "on the first N images only (default: all)")
    data.add_argument("--train-on-all", action="store_true", help="all 50,000 images, no validation (default: off)")
    data.add_argument("-j", "--workers", type=run.non_negative_int, default=min(8, max(1, os.cpu_count() - 1)),
                      help="DataLoader worker processes (default: CPU cores - 1, at most 8)")
    model = parser.add_argument_group("model")
    model.add_argument("--weights", default="imagenet", help="imagenet, none, or a checkpoint PATH (default: imagenet)")
    # Mild: RandAugment, mixing, smoothing and erasing already regularise strongly.
    model.add_argument("--dropout", type=run.number(float, at_least=0, below=1), default=0.1,
                       help="dropout before the head (default: 0.1)")
    optim = parser.add_argument_group("optimisation")
    # Common fine-tuning values, not tuned here: a linear probe takes a high LR; fine-tuning a pretrained network
    # wants ~10x less, so the ImageNet features are adapted, not overwritten; AdamW's usual decay for fine-tuning.
    optim.add_argument("--head-epochs", type=run.non_negative_int, default=2,
                       help="stage 1: epochs training the head only (default: 2)")
    optim.add_argument("--head-lr", type=run.positive_float, default=1e-3,
                       help="stage 1 learning rate (default: 0.001)")
    optim.add_argument("--epochs", type=run.positive_int, default=30, help="stage 2: the cosine's epochs (default: 30)")
    optim.add_argument("--lr", type=run.positive_float, default=1e-4, help="stage 2 learning rate (default: 0.0001)")
    optim.add_argument("--wd", "--weight-decay", dest="weight_decay", type=run.non_negative_float, default=0.05,
                       help="AdamW weight decay, none on BatchNorm and biases (default: 0.05)")
    optim.add_argument("-b", "--batch-size", type=run.number(int, at_least=2), default=128,  # 2: for BatchNorm
                       help="images per step, all GPUs (default: 128)")
    # Warmup keeps the first large updates, driven by a still poor head, from wrecking the pretrained features; the
    # head stage trains on frozen features and needs none: its schedule is the cosine alone.
    optim.add_argument("--warmup-epochs", type=run.non_negative_float, default=1.0,
                       help="stage 2 LR warmup, in epochs (default: 1.0)")
    optim.add_argument("--min-lr", type=run.non_negative_float, default=1e-6,
                       help="LR at the end of each cosine; with SWA, stage 2's ends at --swa-lr (default: 1e-06)")
    stages = parser.add_argument_group("progressive unfreezing, discriminative LRs, long low-LR fine-tuning")
    stages.add_argument("--unfreeze-every", type=run.non_negative_int, default=1,
                        help="epochs per new stage, 0 = all at once (default: 1)")
    stages.add_argument("--unfreeze-warmup-epochs", type=run.non_negative_float, default=0.5,
                        help="each stage's LR warmup after its unfreezing, in epochs (default: 0.5)")
    # 0.7 per stage: the stem learns at 0.7^5 = 17 % of the head's LR. ULMFiT's reason: lower layers hold generic
    # features (edges, textures) that transfer as they are (Yosinski et al. 2014). For an input-level shift such as
    # 32-px images upsampled, that is contested: Lee et al. (2023, "Surgical Fine-Tuning") find tuning the *first*
    # layers best under input-level shifts. So 0.7 is a default to test (--lr-decay 1: one LR), not a finding.
    stages.add_argument("--lr-decay", type=run.number(float, above=0, at_most=1), default=0.7,
                        help="discriminative LRs, not a schedule: each stage below the head learns at this factor "
                             "times the LR of the stage above (default: 0.7)")
    # Level 3's low-LR tail is replaced here by the SWA phase, which holds a LR of its own; it stays for runs without
    # SWA, such as the ablation's row that runs Level 3's tail in the SWA phase's place.
    stages.add_argument("--final-epochs", type=run.non_negative_int, default=0,
                        help="epochs at --final-lr, needs --swa-epochs 0 (default: 0)")
    stages.add_argument("--final-lr", type=run.non_negative_float, default=5e-6,
                        help="LR of the final epochs (default: 5e-06)")
    swa = parser.add_argument_group("SWA (stochastic weight averaging)")
    # The SWA paper's schedule (its train.py): the LR decays to swa_lr, holds it, and a snapshot is averaged once per
    # epoch. Its CIFAR commands set swa_lr to 0.1-0.5 of the initial LR (SGD from scratch); its ImageNet runs, from
    # pretrained models, cycle from 1e-3 to 1e-5. So --lr / 5 is a default to test for AdamW fine-tuning (the
    # ablation's swa_lr_low row tries --lr / 20), not a known value. Above --lr, the cosine would climb into the phase.
    swa.add_argument("--swa-epochs", type=run.non_negative_int, default=5,
                     help="SWA epochs at the end, 0 = off (default: 5)")
    swa.add_argument("--swa-lr", type=run.positive_float,
                     help="SWA learning rate, at most --lr (default: --lr / 5, 2e-05 for the default --lr)")
    swa.add_argument("--swa-schedule", choices=["constant", "cyclic"], default="constant",
                     help="constant, or cyclic: --swa-lr down to a tenth in each cycle (default: constant)")
    swa.add_argument("--swa-every", type=run.non_negative_int, default=0,
                     help="average every N steps, 0 = each epoch (default: 0)")
    ema = parser.add_argument_group("EMA of weights")
    # 0.999 averages over about the last 1,000 steps: about 3 epochs of 45,000 images at batch 128.
    ema.add_argument("--ema-decay", type=run.number(float, at_least=0, below=1), default=0.999,
                     help="EMA decay per step, 0 = no EMA (default: 0.999)")
    # An average of weights needs BatchNorm statistics of its own, from the distribution its layers trained on: the
    # training images, augmented (torch.optim.swa_utils.update_bn runs over the training loader). "clean" is the
    # lesson that clean images are another distribution; "copy" takes the raw model's running statistics.
    ema.add_argument("--avg-bn", choices=["train", "clean", "copy"], default="train",
                     help="the averages' BatchNorm statistics: training images through the training augmentation, the "
                          "same images clean, or the raw model's (default: train)")
    aug = parser.add_argument_group("augmentation and regularisation")
    aug.add_argument("--randaug-n", type=run.non_negative_int, default=2,
                     help="RandAugment: ops per image, 0 = off (default: 2)")
    aug.add_argument("--randaug-m", type=run.number(int, at_least=0, at_most=30), default=9,
                     help="RandAugment: magnitude, 0..30 (default: 9)")
    # timm's and DeiT's MixUp/CutMix values, on half the batches as the original notebooks did: with a short
    # fine-tuning schedule, mixing every batch slows convergence.
    aug.add_argument("--mix-prob", type=run.fraction, default=0.5,
                     help="probability that a batch is mixed (default: 0.5)")
    aug.add_argument("--switch-prob", type=run.fraction, default=0.5, help="CutMix rather than MixUp (default: 0.5)")
    aug.add_argument("--mixup-alpha", type=run.non_negative_float, default=0.8,
                     help="MixUp lam ~ Beta(a, a), 0 = off (default: 0.8)")
    aug.add_argument("--cutmix-alpha", type=run.non_negative_float, default=1.0,
                     help="CutMix lam ~ Beta(a, a), 0 = off (default: 1.0)")
    aug.add_argument("--label-smoothing", type=run.fraction, default=0.1, help="label smoothing epsilon (default: 0.1)")
    aug.add_argument("--erase-prob", type=run.fraction, default=0.25, help="random erasing probability (default: 0.25)")
    aug.add_argument("--tta-set", default="flip+translate", choices=list(common.TTA_SETS),
                     help="test-time augmentation views of the final test (default: flip+translate)")
    aug.add_argument("--tta-average", choices=["softmax", "logit"], default="softmax",
                     help="average the views' probabilities (softmax) or their logits (default: softmax)")
    study.add_arguments(parser)  # --ablate, --summary, --corruption-images and their flags
    run.add_arguments(parser)  # --device --seed --resume --overwrite, folders, --print-freq --compile --sync-bn --quick
    return parser

def train_transform(args):
    """CIFAR's standard augmentation, on the 32-px uint8 image: a random crop with 4-px zero padding, a random flip;
    then RandAugment: n random operations at magnitude m (of torchvision's 31 bins)."""
    steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    if args.randaug_n:
        steps.append(v2.RandAugment(args.randaug_n, args.randaug_m))
    return v2.Compose(steps)

def group_of(name):
    """The stage of a ResNet-50 parameter, buffer or module by its name: stem, layer1 ... layer4, or fc."""
    top = name.split(".")[0]
    return STAGE_OF.get(top, top)

def unfreeze_epoch(group, args):
    """The epoch (0-based) from which `group` trains: the head from the start, layer4 when stage 2 starts, then one
    more stage every --unfreeze-every epochs (0: all at once, as in Level 2)."""
    if group == "fc":
        return 0
    return args.head_epochs + (GROUPS.index(group) - 1) * args.unfreeze_every

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
    weights, none on BatchNorm's weights and biases (Goyal et al. 2017, sec. 5.1) nor on any bias ("no bias decay",
    He et al. 2019, "Bag of Tricks", sec. 3.1). Fused: one kernel launch on CUDA.
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
    if args.compile:
        model = torch.compile(model)
    return model

def lr_at(step, group, steps_per_epoch, args):
    """The LR of stage `group` at optimiser `step` of the run: the base schedule (head cosine, stage-2 warmup and
    cosine, --final-lr without SWA, the SWA phase), times --lr-decay per stage below the head, times the stage's
    warmup since its unfreezing (0 before it). A pure function of the step, so that resume and tests need no
    scheduler state."""
    head_steps = args.head_epochs * steps_per_epoch
    main_steps = args.epochs * steps_per_epoch
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
    depth = GROUPS.index(group)  # stages below the head: 0 for fc, 5 for the stem
    return base * args.lr_decay ** depth * warmup

def swa_steps(steps_per_epoch, args):
    """(The first step of the SWA phase, the steps per averaging cycle: --swa-every, or one epoch.)"""
    swa_start = (args.head_epochs + args.epochs + args.final_epochs) * steps_per_epoch
    return swa_start, args.swa_every or steps_per_epoch

def swa_rules(args):
    """--swa-lr's default, a fifth of --lr (see the flag's comment), and the SWA phase's two rules."""
    if args.swa_lr is None:
        args.swa_lr = args.lr / 5
    if args.swa_lr > args.lr:
        raise UserError(f"--swa-lr ({args.swa_lr:g}) must not exceed --lr ({args.lr:g}): the cosine would climb back")
    if args.final_epochs and args.swa_epochs:
        raise UserError("--final-epochs needs --swa-epochs 0: in Level 4 the SWA phase replaces the final epochs")

def train_one_epoch(model, loader, optimizer, scaler, device, args, epoch, averages):
    """One pass over the training data. The loss is summed on the device and read once, at the end: `loss.item()` in
    every step would make the CPU wait for the GPU in every step. Returns the mean training loss."""
    loss_sum = torch.zeros((), device=device)
    swa_start, swa_cycle = swa_steps(len(loader), args)
    for step, (images, labels) in enumerate(loader):
        run_step = epoch * len(loader) + step  # the optimiser step of the whole run, 0-based
        for group in optimizer.param_groups:
            group["lr"] = lr_at(run_step, group["group"], len(loader), args)
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
        swa_steps_done = run_step + 1 - swa_start  # steps of the SWA phase so far, this one included
        ends_swa_cycle = swa_steps_done > 0 and swa_steps_done % swa_cycle == 0
        if "swa" in averages and ends_swa_cycle:
            averages["swa"].update(model)
        loss_sum += loss.detach()
        if args.print_freq and (step + 1) % args.print_freq == 0:
            print(f"  step {step + 1}/{len(loader)} loss {loss.item():.4f}", flush=True)  # the step's only sync
    return loss_sum.item() / len(loader)

def load_data(args, rank, world_size, device):
    """Training, validation and test sets, and the training loader (augmentation at 32 px in its workers)."""
    with run.rank_zero_first(rank, world_size):  # under torchrun, rank 0 downloads CIFAR-10 if it is missing
        train_set, val_set, test_set = common.cifar10_datasets(args.data_dir, args.seed, args.subset, args.eval_subset,
                                                               args.train_on_all, train_transform(args))
    # DistributedSampler also with one process: its shuffle is a function of (seed, epoch) through set_epoch; under
    # torchrun each process takes every world_size-th image of it. drop_last: a batch of one would break BatchNorm.
    sampler = torch.utils.data.DistributedSampler(train_set, world_size, rank, seed=args.seed, drop_last=True)
    train_loader = torch.utils.data.DataLoader(
        train_set, args.batch_size // world_size, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        worker_init_fn=run.worker_init,  # Ctrl-C reaches the main process only, which stops the workers
        generator=torch.Generator().manual_seed(args.seed + rank))  # the workers' seeds, not from the global RNG
    return train_set, val_set, test_set, train_loader

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
        return common.bn_images(train_set, common.BN_IMAGES, train_transform(args), args.seed)
    return common.bn_images(train_set, common.BN_IMAGES)

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
    """Validation loss and accuracy of the raw weights and of each average that has averaged something, all on the
    same validation images. They are not judged alike in one respect: the raw model keeps the running statistics it
    trained with (of MixUp/CutMix and erased batches), each average gets its own, recomputed from unmixed images
    (set_average_bn). Returns (figures, candidate models); with --train-on-all, no figures."""
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
    row = history[-1]
    checkpoint_dir = Path(args.checkpoint_dir)
    to_save = {}  # path -> checkpoint
    source = choose_candidate(candidates, row, args)
    checkpoint = {"level": LEVEL, "model": candidates[source].state_dict(), "model_source": source,
                  "epoch": row["epoch"], "history": history, "args": vars(args)}
    if args.train_on_all:
        to_save[checkpoint_dir / f"{LEVEL}_best.pth"] = {**checkpoint, "selected_by": "last epoch (no validation)"}
    elif row[history_key("acc", source)] > best_acc:
        best_acc = row[history_key("acc", source)]
        to_save[checkpoint_dir / f"{LEVEL}_best.pth"] = {**checkpoint, "selected_by": "validation accuracy"}
    saved_averages = {}
    for name, average in averages.items():
        if average.num_updates > 0:  # an average enters last.pth with its first update: no dead weight before
            saved_averages[name] = {"module": average.module.state_dict(), "num_updates": average.num_updates}
    to_save[checkpoint_dir / f"{LEVEL}_last.pth"] = {
        **checkpoint, "model": model.state_dict(), "model_source": "raw", "best_acc": best_acc,
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "averages": saved_averages}
    writer.save(to_save)  # a CPU copy now; serialised and written in the background while the next epoch trains
    return best_acc

def fit_temperatures(model, val_set, device, args):
    """One temperature per TTA view set, fitted on the validation logits of that set's own average (--tta-average):
    averaging views changes how confident the prediction is, so the T of one view miscalibrates the others.
    {set: {"temperature": T, "at_bound": bool}}; with --train-on-all no image is held out: T = 1 for every set."""
    if args.train_on_all:
        return {name: {"temperature": 1.0, "at_bound": False} for name in common.TTA_SETS}
    view_logits, labels = common.predict(model, val_set, device, args.img_size, common.TTA_VIEWS)  # each view once
    fits = {}
    for name, views in common.TTA_SETS.items():
        set_logits = evaluate.views_of(view_logits, views)
        temperature, at_bound = common.fit_temperature(set_logits, labels, args.tta_average)
        fits[name] = {"temperature": temperature, "at_bound": at_bound}
    return fits

def final_test(model, val_set, test_set, device, args, history, info):
    """The selected weights (raw, EMA or SWA), a temperature per TTA set fitted on validation and stored in the
    checkpoint; the test set with every TTA view set at its own T, the calibration before and after, the errors:
    results/level4.json and PNGs."""
    path = Path(args.checkpoint_dir) / f"{LEVEL}_best.pth"
    results_dir = Path(args.results_dir)
    best = load_checkpoint(path)
    model.load_state_dict(best["model"])  # raw, EMA or SWA weights, as chosen on validation
    fits = fit_temperatures(model, val_set, device, args)
    one_view = fits["none"]
    snapshots = best["history"][-1].get("swa_snapshots")  # the SWA average's at the epoch chosen; None: an old run
    save_checkpoint(path, {**best, "temperatures": fits, "temperature": one_view["temperature"],
                           "temperature_at_bound": one_view["at_bound"], "swa_snapshots": snapshots})
    calibrated_t = common.applied_temperature(one_view)  # T = 1 where the fit ended at its search bound
    view_logits, labels = common.predict(model, test_set, device, args.img_size, common.TTA_VIEWS)  # each view once
    logits = evaluate.views_of(view_logits, ["identity"])  # the one-view test
    test, probs = evaluate.from_logits(logits, labels)  # T = 1: the raw calibration, as at every level
    calibrated, calibrated_probs = evaluate.from_logits(logits, labels, calibrated_t)
    records.write_per_image(results_dir, LEVEL, logits, labels, calibrated_t)  # one view at T, as --compare measures
    if one_view["at_bound"]:
        print("warning: the temperature fit ended at its search bound, so it is not applied (T = 1)")
    print(f"T = {one_view['temperature']:.3g}: test ECE {test['ece']:.4f} -> {calibrated['ece']:.4f}, NLL "
          f"{test['nll']:.4f} -> {calibrated['nll']:.4f}")
    tta = {}
    for name, views in common.TTA_SETS.items():  # each set at its own T; predictions from the T = 1 average
        temperature = common.applied_temperature(fits[name])
        tta[name], _ = evaluate.views_report(view_logits, labels, views, temperature, args.tta_average)
    print("TTA, each set at its own T: " + ", ".join(f"{name} ({len(r['views'])} views) acc1 {r['acc1']:.4f} T "
          f"{r['temperature']:.3g} ece {r['ece']:.4f}" for name, r in tta.items()))
    evaluate.plot_reliability({"T = 1": (probs, labels), f"T = {calibrated_t:.3g}": (calibrated_probs, labels)},
                              results_dir / f"{LEVEL}_reliability.png", f"{LEVEL}: test set")
    evaluate.plot_confusion(test["confusion_matrix"], results_dir / f"{LEVEL}_confusion.png", f"{LEVEL}: test set")
    mistakes = evaluate.plot_mistakes(test_set, probs, results_dir / f"{LEVEL}_mistakes.png")
    best_val_acc = best["history"][-1].get(history_key("acc", best["model_source"]), math.nan)  # nan: no validation
    calibration = {"temperature": one_view["temperature"], "at_bound": one_view["at_bound"], "per_tta_set": fits,
                   "tta_average": args.tta_average, "fitted_on_images": len(val_set)}
    figures = {"best_epoch": best["epoch"], "selected_by": best["selected_by"], "model_source": best["model_source"],
               "best_val_acc": best_val_acc, "test": test, "test_calibrated": calibrated,
               "test_tta": tta[args.tta_set], "tta_sets": tta, "calibration": calibration,
               "most_confused": evaluate.most_confused(test["confusion_matrix"]), "confident_mistakes": mistakes,
               "corruptions_generated": study.robustness(model, test_set, device, args, calibrated_t),
               "swa_snapshots": history[-1].get("swa_snapshots"), "ema_decay": args.ema_decay}  # the run's averages
    results = records.write_results(results_dir / f"{LEVEL}.json", LEVEL, args, history, info, figures)
    evaluate.plot_curves(history, results_dir / f"{LEVEL}_curves.png", f"{LEVEL}, {args.img_size} px")
    print("most confused, true -> predicted: " + ", ".join(f"{t} -> {p} ({n})" for t, p, n in results["most_confused"]))
    print(f"final: acc1={test['acc1']:.4f} tta_acc1={tta[args.tta_set]['acc1']:.4f} "
          f"val_acc1={results['best_val_acc']:.4f} ece={test['ece']:.4f} ece_t={calibrated['ece']:.4f} "
          f"temperature={calibrated_t:.4f} epoch={best['epoch']} test_images={test['num_images']} "
          f"seconds={results['seconds']:.0f}")
    return results

def main(args):
    if args.summary or args.ablate:
        return study.run(args, main)  # --summary, or --ablate: each trained (row, seed) is a call of this main
    rank, world_size, device = run.start(LEVEL, args)  # torchrun's processes, the device, the run folder and lock
    master = rank == 0  # rank 0 alone validates, writes and prints; the others wait for it at a barrier
    torch.manual_seed(args.seed + rank)  # each process draws its own augmentation; DDP gives all rank 0's weights
    torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN times its kernels once and keeps the fastest
    train_set, val_set, test_set, train_loader = load_data(args, rank, world_size, device)
    model = common.build_model(args.weights, args.dropout).to(device, memory_format=torch.channels_last)
    # The averages are copied before --sync-bn converts the model: recompute_bn looks for nn.BatchNorm2d layers.
    averages = {}
    if args.ema_decay > 0:
        averages["ema"] = common.ModelEma(model, args.ema_decay)
    if args.swa_epochs > 0:
        averages["swa"] = common.SwaAverage(model)
    bn_set = bn_dataset(train_set, args)
    if args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=common.amp_dtype(device) == torch.float16)  # fp16 only
    # --resume: every state of levelN_last.pth restored (a changed flag of RESUME_FLAGS is refused); else epoch 0
    start_epoch, best_acc, history = resume(args, LEVEL, RESUME_FLAGS, model, optimizer, scaler, averages)
    info = records.start_session(LEVEL, args, device, world_size, start_epoch, (train_set, val_set, test_set), master)

    writer = CheckpointWriter()  # one save in flight at most
    total_epochs = args.head_epochs + args.epochs + args.final_epochs + args.swa_epochs
    wrapped_for = None  # the stages that trained when train_model was wrapped
    for epoch in range(start_epoch, total_epochs):
        trainable = set_trainable(model, epoch, args)  # every epoch: validation leaves the model in eval mode
        if trainable != wrapped_for:  # what trains changed: wrap again
            train_model = wrap(model, world_size, device, args)
            wrapped_for = trainable
        stage = "+".join(trainable)
        train_loader.sampler.set_epoch(epoch)
        epoch_start = time.time()
        train_loss = train_one_epoch(train_model, train_loader, optimizer, scaler, device, args, epoch, averages)
        train_seconds = time.time() - epoch_start
        lr = optimizer.param_groups[0]["lr"]  # the head's
        row = {"epoch": epoch + 1, "stage": stage, "lr": lr, "train_loss": train_loss,
               "images_per_s": len(train_loader) * args.batch_size / train_seconds, "train_seconds": train_seconds,
               "session_started": info["started"], "command": info["command"]}  # a resumed run has several sessions
        row["swa_snapshots"] = averages["swa"].num_updates if "swa" in averages else 0  # what the SWA average holds
        figures, candidates = {}, {}
        if master:
            figures, candidates = validate(model, averages, trainable, bn_set, val_set, device, args)
        run.check_finite(epoch, lr, train_loss, *figures.values())  # nan or inf: one line, nothing saved
        if master:
            history.append({**row, **figures})
            best_acc = save_checkpoints(model, candidates, averages, optimizer, scaler, history, best_acc, args,
                                        writer)
            history[-1]["epoch_seconds"] = time.time() - epoch_start  # training, validation, the save's copy
            records.print_epoch(history[-1], total_epochs, start_epoch, info)
        run.barrier(world_size)  # under torchrun, the others wait while rank 0 validates and saves

    run.finish(writer, world_size)  # the last files on disk (the final test reads them); torchrun's group closed
    del train_loader  # its worker processes stop now, rather than being waited for one by one at exit
    return final_test(model, val_set, test_set, device, args, history, info) if master else None  # rank 0 alone

# ---- Run plumbing: not part of the lesson ----------------------------------------------------------------------
def validate_args(args):
    run.prepare_args(args, QUICK)  # --quick's sizes applied; at least one batch of training images
    study.prepare_arguments(args)  # --ablate, --summary, --corruption-images: their --quick sizes, checks
    swa_rules(args)  # --swa-lr's default and the SWA phase's rules (a lesson: beside the SWA schedule)

if __name__ == "__main__":
    run.run_main(main, get_args_parser(), validate_args)
