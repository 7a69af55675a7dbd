"""Level 1 - baseline transfer learning: an ImageNet ResNet-50 fine-tuned on CIFAR-10.

Two stages, the classic recipe (e.g. Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?"):
  1. backbone frozen - its weights *and* its BatchNorm statistics - and only the new 10-class head trains;
  2. everything unfrozen and fine-tuned with AdamW at a learning rate ten times lower.
Augmentation is the CIFAR standard (random crop with 4-px padding, horizontal flip) on the 32-px images in
the DataLoader workers; the GPU upsamples to --img-size and normalises. Validation (5,000 held-out training
images) picks the best epoch; the official 10,000-image test set is evaluated once, at the end.

    python level1.py                                      # ImageNet weights, 224 px, 2 + 10 epochs
    python level1.py --data-dir ../shared/data --weights none --img-size 64 --epochs 5
    python level1.py --resume checkpoints/level1_last.pth   # continue an interrupted run
    python evaluate.py checkpoints/level1_best.pth
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common

LEVEL = "level1"


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
    optim.add_argument("--epochs", type=int, default=10, help="stage 2: epochs fine-tuning everything (default: 10)")
    optim.add_argument("--lr", type=float, default=1e-4, help="stage 2 learning rate (default: 0.0001)")
    optim.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=0.05,
                       help="AdamW weight decay, not applied to BatchNorm and biases (default: 0.05)")
    optim.add_argument("-b", "--batch-size", type=int, default=128,
                       help="images per step, over all GPUs under torchrun (default: 128)")
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


def make_optimizer(model, stage, args, device):
    """Stage 'head': only fc learns, at --head-lr. Stage 'full': every layer, at --lr."""
    trainable = ["fc"] if stage == "head" else list(common.LAYER_GROUPS)
    common.set_trainable(model, trainable)
    lr = args.head_lr if stage == "head" else args.lr
    groups = common.param_groups_no_bn_decay(model.parameters(), args.weight_decay, lr)
    return common.adamw(groups, lr, args.weight_decay, device), trainable


def train_one_epoch(model, trainable, loader, optimizer, scaler, device, args, epoch, stop, progress):
    """One pass over the training loader. Loss and accuracy are summed on the device (no host sync per step)
    and read once at the end; `.item()` only happens on the steps that print."""
    common.train_mode(model, trainable)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    images_seen = steps = 0
    for images, labels in loader:
        images = common.prepare_batch(images, device, args.img_size)
        labels = labels.to(device, non_blocking=True)
        with common.autocast(device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16 only: a scaled loss (common.grad_scaler); else unchanged
        scaler.step(optimizer)  # fp16: unscales, skips the step if a gradient overflowed
        scaler.update()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.detach().argmax(-1) == labels).sum()
        images_seen += len(labels)
        steps += 1
        if args.print_freq and steps % args.print_freq == 0:
            progress.step_line(epoch, steps, len(loader), loss.detach())
        if stop.requested:
            break
    progress.end_line()
    loss_sum, correct, images_seen = common.sum_over_ranks(loss_sum, correct, images_seen)
    return {"train_loss": loss_sum / max(images_seen, 1), "train_acc": correct / max(images_seen, 1),
            "steps": steps, "images": int(images_seen)}


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
    data = common.build_datasets(args, common.train_transform())
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
        train_stats = train_one_epoch(train_model, trainable, train_loader, optimizer, scaler, device, args, epoch,
                                      stop, progress)
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
              f"acc {row['train_acc']:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f} | "
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
    probs, labels = common.predict(model, test_loader, device, args.img_size)
    test = common.classification_report(probs, labels, data.classes)
    results = {"level": LEVEL, "args": vars(args), "device": common.device_name(device), "commit": common.git_commit(),
               "versions": common.library_versions(), "history": history, "best_val_acc": best_val_acc,
               "best_epoch": best["epoch"], "test": test, "seconds": time.time() - progress.start}
    common.write_json(results_dir / f"{LEVEL}.json", results)
    common.plot_curves(history, results_dir / f"{LEVEL}_curves.png",
                       f"{LEVEL}: {args.weights} weights, {args.img_size} px")
    print(f"test ({test['num_images']} images, best epoch {best['epoch']}): acc1 {test['acc1']:.4f} "
          f"ece {test['ece']:.4f} nll {test['nll']:.4f}")
    print(f"final: acc1={test['acc1']:.4f} val_acc1={best_val_acc:.4f} ece={test['ece']:.4f} "
          f"seconds={results['seconds']:.0f}")


if __name__ == "__main__":
    common.run_main(main, get_args_parser(), validate_args)
