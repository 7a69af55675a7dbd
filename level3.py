"""Level 3 - Level 2 plus gentler, longer fine-tuning: progressive unfreezing, discriminative LRs, EMA, exact resume.

What this level adds to level2.py:
  - progressive unfreezing (Howard & Ruder 2018, "ULMFiT", sec. 3.3): the head first, then layer4, layer3,
    ... one more group every --unfreeze-every epochs; a frozen group's BatchNorm statistics stay frozen,
    and each newly unfrozen group warms its LR up over --unfreeze-warmup-epochs;
  - discriminative learning rates (ULMFiT, sec. 3.2): each group's LR is --lr-decay times the LR of the group
    above it, one optimiser parameter group per stage, no weight decay on BatchNorm weights and biases;
  - an exponential moving average of the weights (EMA), evaluated beside the raw weights every epoch;
    the better of the two is kept as the best checkpoint;
  - regularisation control: dropout before the head, plus the weight decay, label smoothing and mixing flags;
  - long low-LR fine-tuning: --final-epochs at a small constant LR after the cosine;
  - exact resume (model, optimiser, schedule position, EMA, history, RNG) and --stop-after-epochs.

    python level3.py --epochs 30
    python level3.py --data-dir ../shared/data --weights none --img-size 64 --epochs 10
    python level3.py --resume checkpoints/level3_last.pth   # after Ctrl-C, or after --stop-after-epochs
    python evaluate.py checkpoints/level3_best.pth --tta
"""
import argparse
import json
import time
from pathlib import Path

import torch

import common

LEVEL = "level3"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py (default: ./data)")
    data.add_argument("--img-size", type=int, default=224,
                      help="side the 32-px images are upsampled to on the device; 224 is ImageNet's (default: 224)")
    data.add_argument("--subset", type=int, default=None, help="train on the first N training images (default: all)")
    data.add_argument("--eval-subset", type=int, default=None,
                      help="validate and test on the first N images only, for quick trials (default: all)")
    data.add_argument("-j", "--workers", type=int, default=common.default_workers(),
                      help=f"DataLoader worker processes (default: {common.default_workers()})")
    model = parser.add_argument_group("model")
    model.add_argument("--weights", default="imagenet",
                       help="imagenet, none (random init) or PATH to a state_dict/checkpoint (default: imagenet)")
    # Mild: RandAugment, MixUp/CutMix, smoothing and erasing already regularise strongly; more dropout on a
    # 2048-d pooled feature mostly slows the head down.
    model.add_argument("--dropout", type=float, default=0.1, help="dropout before the head (default: 0.1)")
    optim = parser.add_argument_group("optimisation")
    # Defaults from common fine-tuning practice, not tuned here (no ImageNet weights on our machines):
    # a linear probe tolerates a high LR (1e-3) and converges in a few epochs; full fine-tuning of a
    # pretrained network wants ~10x less (1e-4) so the ImageNet features are adapted, not overwritten;
    # AdamW's decoupled decay of 0.05 is the usual value for fine-tuning with AdamW (e.g. DeiT, ConvNeXt).
    optim.add_argument("--head-epochs", type=int, default=2, help="stage 1: epochs training the head only (default: 2)")
    optim.add_argument("--head-lr", type=float, default=1e-3, help="stage 1 learning rate (default: 0.001)")
    optim.add_argument("--epochs", type=int, default=30,
                       help="stage 2: epochs of the cosine, while the groups unfreeze (default: 30)")
    optim.add_argument("--lr", type=float, default=1e-4, help="stage 2 learning rate (default: 0.0001)")
    optim.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=0.05,
                       help="AdamW weight decay, not applied to BatchNorm and biases (default: 0.05)")
    optim.add_argument("-b", "--batch-size", type=int, default=128,
                       help="images per step, over all GPUs under torchrun (default: 128)")
    # Warmup keeps the first large updates (driven by a still-poor head) from wrecking pretrained features;
    # the head stage trains on frozen features and needs none, so there the schedule is cosine only.
    optim.add_argument("--warmup-epochs", type=float, default=1.0,
                       help="stage 2: linear LR warmup, in epochs (default: 1.0)")
    optim.add_argument("--min-lr", type=float, default=1e-6, help="LR at the end of each cosine (default: 1e-06)")
    unfreeze = parser.add_argument_group("progressive unfreezing, discriminative LRs, long low-LR fine-tuning")
    unfreeze.add_argument("--unfreeze-every", type=int, default=1,
                          help="stage 2: unfreeze one more group (layer4, layer3, ..., stem) every N epochs; "
                               "0 = all at once (default: 1)")
    unfreeze.add_argument("--unfreeze-warmup-epochs", type=float, default=0.5,
                          help="LR warmup of each newly unfrozen group, in epochs (default: 0.5)")
    # 0.7 per stage: the stem learns at 0.7^5 = 17 % of the head's LR. Lower layers hold generic features
    # (edges, textures) that transfer as they are (Yosinski et al. 2014), so they should move least.
    unfreeze.add_argument("--lr-decay", type=float, default=0.7,
                          help="each group's LR = this times the LR of the group above it (default: 0.7)")
    # After the cosine has annealed, a few epochs at a small constant LR let the weights settle (and give the
    # EMA a stable stretch to average); 5e-6 is 1/20 of --lr, above --min-lr so the weights still move.
    unfreeze.add_argument("--final-epochs", type=int, default=5,
                          help="epochs at --final-lr after the cosine, 0 = off (default: 5)")
    unfreeze.add_argument("--final-lr", type=float, default=5e-6, help="LR of the final epochs (default: 5e-06)")
    ema = parser.add_argument_group("EMA of weights")
    # 0.999 averages over the last ~1,000 steps: about 3 epochs of 45,000 images at batch 128.
    ema.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay per step, 0 = no EMA (default: 0.999)")
    aug = parser.add_argument_group("augmentation and regularisation")
    aug.add_argument("--randaug-n", type=int, default=2, help="RandAugment: ops per image, 0 = off (default: 2)")
    aug.add_argument("--randaug-m", type=int, default=9, help="RandAugment: magnitude, 0..30 (default: 9)")
    # MixUp/CutMix values of timm/DeiT (alpha 0.8 / 1.0, switch 0.5), applied to half of the batches as the
    # seed project did: with a short fine-tuning schedule, mixing every batch slows convergence.
    aug.add_argument("--mix-prob", type=float, default=0.5,
                     help="probability that a batch is mixed (MixUp or CutMix), 0 = off (default: 0.5)")
    aug.add_argument("--switch-prob", type=float, default=0.5,
                     help="probability of CutMix rather than MixUp for a mixed batch (default: 0.5)")
    aug.add_argument("--mixup-alpha", type=float, default=0.8, help="MixUp: lam ~ Beta(a, a), 0 = off (default: 0.8)")
    aug.add_argument("--cutmix-alpha", type=float, default=1.0, help="CutMix: lam ~ Beta(a, a), 0 = off (default: 1.0)")
    aug.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing epsilon (default: 0.1)")
    aug.add_argument("--erase-prob", type=float, default=0.25, help="random erasing probability (default: 0.25)")
    aug.add_argument("--tta-set", default="flip+translate", choices=list(common.TTA_SETS),
                     help="test-time augmentation views for the final test report (default: flip+translate)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cpu, ... (default: auto)")
    run.add_argument("--seed", type=int, default=0, help="seeds the split, augmentation and init (default: 0)")
    run.add_argument("--resume", default=None, help="continue from a checkpoint, e.g. checkpoints/level3_last.pth")
    run.add_argument("--stop-after-epochs", type=int, default=None,
                     help="save and stop after N epochs of this run, to --resume later (default: run to the end)")
    run.add_argument("--checkpoint-dir", default="checkpoints", help="where .pth files go (default: checkpoints)")
    run.add_argument("--results-dir", default="results", help="where JSON and PNG results go (default: results)")
    run.add_argument("--print-freq", type=int, default=50,
                     help="print a step line every N steps, 0 = never (default: 50)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model: faster steps after a first-epoch compile of ~1 min (default: off)")
    run.add_argument("--sync-bn", action="store_true",
                     help="under torchrun: BatchNorm statistics over the global batch (default: per GPU)")
    run.add_argument("--quick", action="store_true",
                     help="smoke run: tiny subset, 32 px, one epoch per stage, under checkpoints/quick/ (default: off)")
    run.add_argument("--overwrite", action="store_true",
                     help="allow replacing the best checkpoint of a longer run (default: refuse)")
    return parser


def validate_args(args):
    common.check_common_args(args)
    for name in ("mix_prob", "switch_prob", "erase_prob", "label_smoothing"):
        if not 0 <= getattr(args, name) <= 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be between 0 and 1 (got {getattr(args, name)})")
    if args.randaug_n < 0 or not 0 <= args.randaug_m <= 30:
        raise common.UserError("--randaug-n must be >= 0 and --randaug-m between 0 and 30")
    for name in ("dropout", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be in [0, 1) (got {getattr(args, name)})")
    if not 0 < args.lr_decay <= 1:
        raise common.UserError(f"--lr-decay must be in (0, 1] (got {args.lr_decay})")
    common.check_positive(args, "final_lr", "stop_after_epochs")
    common.check_non_negative(args, "final_epochs", "unfreeze_every")


# Unfreezing order, and each stage's depth below the head (its LR is --lr-decay ** depth times the head's).
UNFREEZE_ORDER = ("layer4", "layer3", "layer2", "layer1", "stem")
DEPTH = {"fc": 0, **{group: i + 1 for i, group in enumerate(UNFREEZE_ORDER)}}


def unfreeze_epoch(group, args):
    """The epoch (0-based) from which `group` trains: fc from the start, layer4 when stage 2 starts, then one
    more group every --unfreeze-every epochs (0: all together, as in Level 2)."""
    return 0 if group == "fc" else args.head_epochs + UNFREEZE_ORDER.index(group) * args.unfreeze_every


def trainable_groups(epoch, args):
    return [group for group in common.LAYER_GROUPS if unfreeze_epoch(group, args) <= epoch]


def make_optimizer(model, args, device):
    """One AdamW for the whole run: two parameter groups per stage (with and without weight decay), each
    tagged with its stage. Frozen parameters get no gradient, so AdamW leaves them (and their moments)
    alone until they unfreeze: no optimiser rebuilt mid-run, and resume restores one state."""
    param_groups = []
    for group in common.LAYER_GROUPS:
        parameters = [p for module in common.layer_group_modules(model)[group] for p in module.parameters()]
        for param_group in common.param_groups_no_bn_decay(parameters, args.weight_decay, args.lr,
                                                           only_trainable=False):
            param_groups.append({**param_group, "stage_name": group})
    return common.adamw(param_groups, args.lr, args.weight_decay, device)


def lr_at(step, group, steps_per_epoch, args):
    """The LR of stage `group` at optimiser `step` (counted from the start of the run): the base LR (head
    stage cosine | stage 2 warmup + cosine | constant --final-lr), times --lr-decay ** depth, times the
    group's own linear warmup from the step it was unfrozen."""
    head_steps, main_steps = args.head_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    if step < head_steps:
        base = common.warmup_cosine_lr(step, head_steps, 0, args.head_lr, args.min_lr)
    elif step < head_steps + main_steps:
        warmup_steps = round(args.warmup_epochs * steps_per_epoch)
        base = common.warmup_cosine_lr(step - head_steps, main_steps, warmup_steps, args.lr, args.min_lr)
    else:
        base = args.final_lr
    warmup_steps = round(args.unfreeze_warmup_epochs * steps_per_epoch)
    steps_unfrozen = step - unfreeze_epoch(group, args) * steps_per_epoch
    warmup = 1.0 if group == "fc" or warmup_steps == 0 else min(1.0, (steps_unfrozen + 1) / warmup_steps)
    return base * args.lr_decay ** DEPTH[group] * warmup


def set_group_lrs(optimizer, step, steps_per_epoch, args):
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr_at(step, param_group["stage_name"], steps_per_epoch, args)


def train_one_epoch(model, model_ema, trainable, loader, optimizer, scaler, device, args, epoch, stop, progress,
                    first_step, steps_per_epoch):
    """One pass over the training loader. The loss is summed on the device (no host sync per step) and read
    once at the end; `.item()` only happens on the steps that print. `first_step` is the run's step count
    at the start of this pass (the LR schedule is a function of it). The EMA follows every step."""
    common.train_mode(model, trainable)
    loss_sum = torch.zeros((), device=device)
    images_seen = steps = 0
    for images, labels in loader:
        set_group_lrs(optimizer, first_step + steps, steps_per_epoch, args)
        images = common.prepare_batch(images, device, args.img_size)
        labels = labels.to(device, non_blocking=True)
        targets = common.one_hot_smoothed(labels, smoothing=args.label_smoothing)
        images, targets, _ = common.mix_batch(images, targets, args.mix_prob, args.switch_prob, args.mixup_alpha,
                                              args.cutmix_alpha)
        images = common.random_erasing(images, args.erase_prob)
        with common.autocast(device):
            logits = model(images)
        loss = common.soft_target_cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16 only: a scaled loss (common.grad_scaler); else unchanged
        scaler.step(optimizer)  # fp16: unscales, skips the step if a gradient overflowed
        scaler.update()
        if model_ema is not None:
            model_ema.update(model)
        loss_sum += loss.detach() * len(labels)
        images_seen += len(labels)
        steps += 1
        if args.print_freq and steps % args.print_freq == 0:
            progress.step_line(epoch, steps, len(loader), loss.detach())
        if stop.requested:
            break
    progress.end_line()
    loss_sum, images_seen = common.sum_over_ranks(loss_sum, images_seen)
    return {"train_loss": loss_sum / max(images_seen, 1), "steps": steps, "images": int(images_seen)}


def make_checkpoint(model, optimizer, scaler, model_ema, epoch, step_in_epoch, best_val_acc, history, args,
                    model_source="raw", resumable=True):
    """Everything --resume needs: model, optimiser, EMA, position (completed epochs + steps into the next;
    the LR schedule is a function of it), best score, history, RNG state, args - and the library versions.
    `model` holds the weights named by `model_source` (raw or EMA), so evaluate.py reads any checkpoint.
    A best checkpoint (resumable=False) leaves out the averaged models' states: it is for evaluation."""
    weights = model_ema.module if model_source == "ema" else model
    return {"level": LEVEL, "model": weights.state_dict(), "model_source": model_source,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "resumable": resumable,
            "model_ema": model_ema.state_dict() if model_ema and resumable else None,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "best_val_acc": best_val_acc, "history": history,
            "rng": common.rng_state(), "args": vars(args), "versions": common.library_versions()}


def validate_epoch(model, model_ema, val_loader, device, args, dist):
    """Validation loss/accuracy of the raw weights and of the EMA; which of the two is better."""
    val_loss, val_acc = common.evaluate_loss_acc(model, val_loader, device, args.img_size, dist)
    row = {"val_loss": val_loss, "val_acc": val_acc, "val_loss_ema": None, "val_acc_ema": None, "better": "raw"}
    if model_ema is not None:
        row["val_loss_ema"], row["val_acc_ema"] = common.evaluate_loss_acc(model_ema.module, val_loader, device,
                                                                           args.img_size, dist)
        row["better"] = "ema" if row["val_acc_ema"] > val_acc else "raw"
    return row


def main(args):
    if args.quick:
        common.apply_quick(args)
    if not args.resume:
        common.check_overwrite(args.checkpoint_dir, LEVEL, args)
    dist, device = common.init_distributed(args.device)  # torchrun: one process per GPU; else one process
    if args.batch_size % dist.world_size:
        raise common.UserError(f"--batch-size {args.batch_size} is the global batch: make it a multiple of the "
                               f"{dist.world_size} processes")
    common.seed_everything(args.seed)
    print(f"{LEVEL}: device {common.device_name(device)}, {common.precision_name(device)}, {args.img_size} px, "
          f"weights {args.weights}")

    # Data: augmentation on 32-px uint8 images in the workers; upsampling and normalisation on the device.
    data = common.build_datasets(args, common.train_transform(args.randaug_n, args.randaug_m))
    train_sampler = common.EpochSampler(len(data.train), args.seed, dist.rank, dist.world_size)
    # drop_last: a last batch of one image would break BatchNorm (and small ones make noisy steps).
    # --batch-size is global: each of the world_size processes takes its share, so one GPU or eight give
    # the same optimisation (same LR, same steps per epoch) and no LR scaling rule is needed.
    train_loader = common.make_loader(data.train, args.batch_size // dist.world_size, train_sampler, args.workers,
                                      device, drop_last=True)
    val_loader = common.make_loader(common.shard(data.val, dist), 2 * args.batch_size, workers=args.workers,
                                    device=device)
    print(f"data: {len(data.train)} train, {len(data.val)} validation, {len(data.test)} test images")

    model = common.build_model(args.weights, args.dropout).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args, device)
    scaler = common.grad_scaler(device)  # fp16 loss scaling on pre-Ampere GPUs; a no-op otherwise
    model_ema = common.ModelEma(model, args.ema_decay) if args.ema_decay > 0 else None
    if args.sync_bn:  # after the EMA/SWA copies: those are evaluated on one process, with plain BatchNorm
        model = common.convert_sync_bn(model, device)
    total_epochs = args.head_epochs + args.epochs + args.final_epochs
    steps_per_epoch = len(train_sampler) // (args.batch_size // dist.world_size)  # before any resume skip
    checkpoint_dir, results_dir = Path(args.checkpoint_dir), Path(args.results_dir)

    # Resume: the position is (completed epochs, steps into the next one); schedule and unfreezing are
    # functions of it, so restoring model, optimiser, EMA and RNG continues the run exactly.
    start_epoch, skip_steps, best_val_acc, history = 0, 0, -1.0, []
    resumed = common.resume_from(args.resume, LEVEL, model, args) if args.resume else None
    if resumed:
        start_epoch, skip_steps = resumed["epoch"], resumed["step_in_epoch"]
        best_val_acc, history = resumed["best_val_acc"], resumed["history"]
        optimizer.load_state_dict(resumed["optimizer"])
        common.restore_scaler(scaler, resumed)
        if model_ema is not None and resumed["model_ema"] is not None:
            model_ema.load_state_dict(resumed["model_ema"])

    stop = common.StopOnInterrupt(enabled=not dist.enabled)
    progress = common.Progress(total_epochs, start_epoch)
    end_epoch = total_epochs if args.stop_after_epochs is None else min(total_epochs,
                                                                        start_epoch + args.stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        trainable = trainable_groups(epoch, args)
        common.set_trainable(model, trainable)
        if epoch == start_epoch or trainable != history[-1]["trainable"]:
            # Built again when the trainable set changes: DDP all-reduces what trains now.
            train_model = common.wrap_for_training(model, dist, device, args.compile)
        train_sampler.set_epoch(epoch, skip=skip_steps * args.batch_size)
        started = time.time()
        train_stats = train_one_epoch(train_model, model_ema, trainable, train_loader, optimizer, scaler, device,
                                      args, epoch, stop, progress, epoch * steps_per_epoch + skip_steps,
                                      steps_per_epoch)
        if stop.requested and train_stats["steps"] < len(train_loader):  # mid-epoch: save the exact position
            steps_done = skip_steps + train_stats["steps"]
            common.save_checkpoint(checkpoint_dir / f"{LEVEL}_last.pth", make_checkpoint(
                model, optimizer, scaler, model_ema, epoch, steps_done, best_val_acc, history, args))
            common.exit_interrupted(checkpoint_dir / f"{LEVEL}_last.pth")
        skip_steps = 0
        val = validate_epoch(model, model_ema, val_loader, device, args, dist)
        seconds = time.time() - started
        head_lr = next(group["lr"] for group in optimizer.param_groups if group["stage_name"] == "fc")
        row = {"epoch": epoch + 1, "trainable": trainable, "lr": head_lr, **train_stats, **val,
               "seconds": seconds, "images_per_s": train_stats["images"] / seconds}
        history.append(row)
        if max(val["val_acc"], val["val_acc_ema"] or -1.0) > best_val_acc:
            best_val_acc = max(val["val_acc"], val["val_acc_ema"] or -1.0)
            common.save_checkpoint(checkpoint_dir / f"{LEVEL}_best.pth", make_checkpoint(
                model, optimizer, scaler, model_ema, epoch + 1, 0, best_val_acc, history, args,
                model_source=val["better"], resumable=False))
        common.save_checkpoint(checkpoint_dir / f"{LEVEL}_last.pth", make_checkpoint(
            model, optimizer, scaler, model_ema, epoch + 1, 0, best_val_acc, history, args))
        elapsed, eta = progress.eta(epoch)
        ema_text = f" ema {val['val_acc_ema']:.4f}" if model_ema is not None else ""
        print(f"epoch {epoch + 1}/{total_epochs} [{'+'.join(trainable)}] lr {head_lr:.2e} train loss "
              f"{row['train_loss']:.4f} | val loss {val['val_loss']:.4f} acc {val['val_acc']:.4f}{ema_text} | "
              f"{row['images_per_s']:.0f} img/s | {elapsed:.0f} s elapsed, ETA {eta:.0f} s", flush=True)
        print("json: " + json.dumps(row), flush=True)
        if stop.requested:  # Ctrl-C in the epoch's last step or in validation: the whole epoch is saved
            common.exit_interrupted(checkpoint_dir / f"{LEVEL}_last.pth", training_done=epoch + 1 == total_epochs)
    common.cleanup_distributed(dist)  # no collective operation after this point
    if not dist.is_main:  # rank 0 alone evaluates the test set (the whole split: exact) and writes results
        return None
    if end_epoch < total_epochs:
        print(f"stopped after {end_epoch} of {total_epochs} epochs (--stop-after-epochs); continue with "
              f"--resume {checkpoint_dir / f'{LEVEL}_last.pth'}")
        return

    # Final: the best validation checkpoint (raw or EMA weights), evaluated once on the test set.
    best = common.load_checkpoint(checkpoint_dir / f"{LEVEL}_best.pth", LEVEL)
    model.load_state_dict(best["model"])
    test_loader = common.make_loader(data.test, 2 * args.batch_size, workers=args.workers, device=device)
    test, eval_images_per_s = common.timed_report(model, test_loader, device, args.img_size, data.classes)
    test_tta, tta_images_per_s = common.timed_report(model, test_loader, device, args.img_size, data.classes,
                                                     common.TTA_SETS[args.tta_set])
    results = {"level": LEVEL, "args": vars(args), "device": common.device_name(device), "commit": common.git_commit(),
               "versions": common.library_versions(), "history": history, "best_val_acc": best_val_acc,
               "best_epoch": best["epoch"], "best_model_source": best["model_source"], "test": test,
               "test_tta": test_tta, "tta_set": args.tta_set, "eval_images_per_s": eval_images_per_s,
               "tta_images_per_s": tta_images_per_s, "seconds": time.time() - progress.start}
    common.write_json(results_dir / f"{LEVEL}.json", results)
    common.plot_curves(history, results_dir / f"{LEVEL}_curves.png",
                       f"{LEVEL}: {args.weights} weights, {args.img_size} px",
                       extra_val_keys=("val_acc_ema",) if model_ema is not None else ())
    print(f"test ({test['num_images']} images, best epoch {best['epoch']}, {best['model_source']} weights): "
          f"acc1 {test['acc1']:.4f} ece {test['ece']:.4f} nll {test['nll']:.4f} | "
          f"{results['eval_images_per_s']:.0f} img/s")
    print(f"test with TTA {args.tta_set} ({len(common.TTA_SETS[args.tta_set])} views): acc1 {test_tta['acc1']:.4f} "
          f"ece {test_tta['ece']:.4f} | {results['tta_images_per_s']:.0f} img/s")
    print(f"final: acc1={test['acc1']:.4f} tta_acc1={test_tta['acc1']:.4f} val_acc1={best_val_acc:.4f} "
          f"ece={test['ece']:.4f} seconds={results['seconds']:.0f}")


if __name__ == "__main__":
    common.run_main(main, get_args_parser(), validate_args)
