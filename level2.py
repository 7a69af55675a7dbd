"""Level 2 - Level 1 plus the augmentation and regularisation that lift a fine-tuned ResNet-50 on CIFAR-10.

What this level adds to level1.py (each switchable from the command line, to see its effect):
  - RandAugment (Cubuk et al. 2020) on the 32-px images in the workers, after crop and flip;
  - MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) on whole batches on the device, soft targets;
  - label smoothing 0.1 (Szegedy et al. 2016), combined with MixUp/CutMix's soft targets;
  - random erasing (Zhong et al. 2020) of the normalised images on the device;
  - a learning rate set every step: linear warmup, then cosine decay (Loshchilov & Hutter 2017);
  - test-time augmentation: deterministic views (flip, 2-px shifts), softmax-averaged, with its cost.
Training accuracy is not reported: against mixed targets it means nothing; validation is clean.

    python level2.py                                      # ImageNet weights, 224 px, 2 + 15 epochs
    python level2.py --data-dir ../shared/data --weights none --img-size 64 --epochs 5
    python level2.py --mix-prob 0 --randaug-n 0          # switch techniques off to see what they add
    python evaluate.py checkpoints/level2_best.pth --tta
"""
import argparse
import json
import time
from pathlib import Path

import torch

import common

LEVEL = "level2"


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
    optim = parser.add_argument_group("optimisation")
    # Defaults from common fine-tuning practice, not tuned here (no ImageNet weights on our machines):
    # a linear probe tolerates a high LR (1e-3) and converges in a few epochs; full fine-tuning of a
    # pretrained network wants ~10x less (1e-4) so the ImageNet features are adapted, not overwritten;
    # AdamW's decoupled decay of 0.05 is the usual value for fine-tuning with AdamW (e.g. DeiT, ConvNeXt).
    optim.add_argument("--head-epochs", type=int, default=2, help="stage 1: epochs training the head only (default: 2)")
    optim.add_argument("--head-lr", type=float, default=1e-3, help="stage 1 learning rate (default: 0.001)")
    optim.add_argument("--epochs", type=int, default=15, help="stage 2: epochs fine-tuning everything (default: 15)")
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
    run.add_argument("--resume", default=None, help="continue from a checkpoint, e.g. checkpoints/level1_last.pth")
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


def make_optimizer(model, stage, args, device):
    """Stage 'head': only fc learns, at --head-lr. Stage 'full': every layer, at --lr."""
    trainable = ["fc"] if stage == "head" else list(common.LAYER_GROUPS)
    common.set_trainable(model, trainable)
    lr = args.head_lr if stage == "head" else args.lr
    groups = common.param_groups_no_bn_decay(model.parameters(), args.weight_decay, lr)
    return common.adamw(groups, lr, args.weight_decay, device), trainable


def lr_at(step, stage, steps_per_epoch, args):
    """The LR of optimiser `step` (counted from the start of the stage): warmup + cosine over the stage."""
    if stage == "head":
        return common.warmup_cosine_lr(step, args.head_epochs * steps_per_epoch, 0, args.head_lr, args.min_lr)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    return common.warmup_cosine_lr(step, args.epochs * steps_per_epoch, warmup_steps, args.lr, args.min_lr)


def train_one_epoch(model, trainable, loader, optimizer, scaler, device, args, epoch, stop, progress, stage, first_step,
                    steps_per_epoch):
    """One pass over the training loader. The loss is summed on the device (no host sync per step) and read
    once at the end; `.item()` only happens on the steps that print. `first_step` is the stage's step count
    at the start of this pass (the LR schedule is a function of it)."""
    common.train_mode(model, trainable)
    loss_sum = torch.zeros((), device=device)
    images_seen = steps = 0
    for images, labels in loader:
        common.set_lr(optimizer, lr_at(first_step + steps, stage, steps_per_epoch, args))
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


def make_checkpoint(model, optimizer, scaler, stage, epoch, step_in_epoch, best_val_acc, history, args):
    """Everything --resume needs: model, optimiser, position (completed epochs + steps into the next),
    best score, history, RNG state, args - plus the library versions that wrote it."""
    return {"level": LEVEL, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "stage": stage, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "best_val_acc": best_val_acc, "history": history,
            "rng": common.rng_state(), "args": vars(args), "versions": common.library_versions()}


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

    model = common.build_model(args.weights).to(device, memory_format=torch.channels_last)
    if args.sync_bn:
        model = common.convert_sync_bn(model, device)
    total_epochs = args.head_epochs + args.epochs
    steps_per_epoch = len(train_sampler) // (args.batch_size // dist.world_size)  # before any resume skip
    checkpoint_dir, results_dir = Path(args.checkpoint_dir), Path(args.results_dir)

    def stage_of(epoch):
        return "head" if epoch < args.head_epochs else "full"

    # Resume: the position is (completed epochs, steps into the next one); the optimiser state carries over
    # only if the next step is in the same stage as the one that saved it.
    start_epoch, skip_steps, best_val_acc, history = 0, 0, -1.0, []
    resumed = common.resume_from(args.resume, LEVEL, model, args) if args.resume else None
    if resumed:
        start_epoch, skip_steps = resumed["epoch"], resumed["step_in_epoch"]
        best_val_acc, history = resumed["best_val_acc"], resumed["history"]
    optimizer, trainable, stage = None, None, None
    scaler = common.grad_scaler(device)  # fp16 loss scaling on pre-Ampere GPUs; a no-op otherwise
    if resumed:
        common.restore_scaler(scaler, resumed)

    stop = common.StopOnInterrupt(enabled=not dist.enabled)
    progress = common.Progress(total_epochs, start_epoch)
    for epoch in range(start_epoch, total_epochs):
        if stage_of(epoch) != stage:
            stage = stage_of(epoch)
            optimizer, trainable = make_optimizer(model, stage, args, device)
            # Built again when the trainable set changes: DDP all-reduces what trains now.
            train_model = common.wrap_for_training(model, dist, device, args.compile)
            if resumed and resumed["stage"] == stage and epoch == start_epoch:
                optimizer.load_state_dict(resumed["optimizer"])
        train_sampler.set_epoch(epoch, skip=skip_steps * args.batch_size)
        started = time.time()
        stage_start = 0 if stage == "head" else args.head_epochs
        first_step = (epoch - stage_start) * steps_per_epoch + skip_steps
        train_stats = train_one_epoch(train_model, trainable, train_loader, optimizer, scaler, device, args, epoch,
                                      stop, progress, stage, first_step, steps_per_epoch)
        if stop.requested and train_stats["steps"] < len(train_loader):  # mid-epoch: save the exact position
            steps_done = skip_steps + train_stats["steps"]
            common.save_checkpoint(checkpoint_dir / f"{LEVEL}_last.pth", make_checkpoint(
                model, optimizer, scaler, stage, epoch, steps_done, best_val_acc, history, args))
            common.exit_interrupted(checkpoint_dir / f"{LEVEL}_last.pth")
        skip_steps = 0
        val_loss, val_acc = common.evaluate_loss_acc(model, val_loader, device, args.img_size, dist)
        seconds = time.time() - started
        row = {"epoch": epoch + 1, "stage": stage, "lr": optimizer.param_groups[0]["lr"], **train_stats,
               "val_loss": val_loss, "val_acc": val_acc, "seconds": seconds,
               "images_per_s": train_stats["images"] / seconds}
        history.append(row)
        if val_acc > best_val_acc:
            best_val_acc = val_acc
            common.save_checkpoint(checkpoint_dir / f"{LEVEL}_best.pth", make_checkpoint(
                model, optimizer, scaler, stage, epoch + 1, 0, best_val_acc, history, args))
        common.save_checkpoint(checkpoint_dir / f"{LEVEL}_last.pth", make_checkpoint(
            model, optimizer, scaler, stage, epoch + 1, 0, best_val_acc, history, args))
        elapsed, eta = progress.eta(epoch)
        print(f"epoch {epoch + 1}/{total_epochs} [{stage}] lr {row['lr']:.2e} train loss {row['train_loss']:.4f} "
              f"| val loss {val_loss:.4f} acc {val_acc:.4f} | "
              f"{row['images_per_s']:.0f} img/s | {elapsed:.0f} s elapsed, ETA {eta:.0f} s", flush=True)
        print("json: " + json.dumps(row), flush=True)
        if stop.requested:  # Ctrl-C in the epoch's last step or in validation: the whole epoch is saved
            common.exit_interrupted(checkpoint_dir / f"{LEVEL}_last.pth", training_done=epoch + 1 == total_epochs)

    common.cleanup_distributed(dist)  # no collective operation after this point
    if not dist.is_main:  # rank 0 alone evaluates the test set (the whole split: exact) and writes results
        return None
    # Final: the best validation checkpoint, evaluated once on the test set.
    best = common.load_checkpoint(checkpoint_dir / f"{LEVEL}_best.pth", LEVEL)
    model.load_state_dict(best["model"])
    test_loader = common.make_loader(data.test, 2 * args.batch_size, workers=args.workers, device=device)
    test, eval_images_per_s = common.timed_report(model, test_loader, device, args.img_size, data.classes)
    test_tta, tta_images_per_s = common.timed_report(model, test_loader, device, args.img_size, data.classes,
                                                     common.TTA_SETS[args.tta_set])
    results = {"level": LEVEL, "args": vars(args), "device": common.device_name(device), "commit": common.git_commit(),
               "versions": common.library_versions(), "history": history, "best_val_acc": best_val_acc,
               "best_epoch": best["epoch"], "test": test, "test_tta": test_tta, "tta_set": args.tta_set,
               "eval_images_per_s": eval_images_per_s,
               "tta_images_per_s": tta_images_per_s, "seconds": time.time() - progress.start}
    common.write_json(results_dir / f"{LEVEL}.json", results)
    common.plot_curves(history, results_dir / f"{LEVEL}_curves.png",
                       f"{LEVEL}: {args.weights} weights, {args.img_size} px")
    print(f"test ({test['num_images']} images, best epoch {best['epoch']}): acc1 {test['acc1']:.4f} "
          f"ece {test['ece']:.4f} nll {test['nll']:.4f} | {results['eval_images_per_s']:.0f} img/s")
    print(f"test with TTA {args.tta_set} ({len(common.TTA_SETS[args.tta_set])} views): acc1 {test_tta['acc1']:.4f} "
          f"ece {test_tta['ece']:.4f} | {results['tta_images_per_s']:.0f} img/s")
    print(f"final: acc1={test['acc1']:.4f} tta_acc1={test_tta['acc1']:.4f} val_acc1={best_val_acc:.4f} "
          f"ece={test['ece']:.4f} seconds={results['seconds']:.0f}")


if __name__ == "__main__":
    common.run_main(main, get_args_parser(), validate_args)
