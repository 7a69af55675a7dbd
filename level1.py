"""Level 1 - baseline transfer learning: an ImageNet ResNet-50 fine-tuned on CIFAR-10.

LP-FT, linear probing then fine-tuning (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution"), in two stages:
  1. the backbone is frozen - its weights and its BatchNorm statistics - and only a new 10-class head trains;
  2. then every layer is fine-tuned with AdamW (Loshchilov & Hutter 2019) at a ten times lower learning rate.
Why the head first: a random head sends large, arbitrary gradients into the backbone and distorts the pretrained
features before the head is any good; a head trained first makes the fine-tuning gradients small and meaningful.
Augmentation is CIFAR's standard (a crop with 4-px padding, a flip) on the 32-px images in the DataLoader workers;
the GPU upsamples them to --img-size and normalises them. 5,000 held-out training images pick the best epoch; the
10,000 test images are measured once, at the end, by evaluate.py.

The levels own their whole recipe and loop, and each repeats the lines of the one before it on purpose, as
airbench's scripts do: `diff level1.py level2.py` (then 2 -> 3, 3 -> 4) shows exactly what a level adds. The run
machinery is called from support/ in one line per concern: skip it on a first read.

    python level1.py                                        # ImageNet weights, 224 px, 2 + 10 epochs
    python level1.py --quick                                # a smoke run of a minute or two, on any machine
    python level1.py --resume checkpoints/level1_last.pth   # continue after an interruption
    torchrun --nproc_per_node=4 level1.py                   # four GPUs
"""
import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import common
import evaluate
from support import records, run
from support.files import CheckpointWriter, load_checkpoint, resume

LEVEL = "level1"
# A resume with another value of one of these is refused: they fixed the data split, the input size, the batch (the
# steps of an epoch), the optimiser's decay and the learning rate of the epochs already run.
RESUME_FLAGS = ("seed", "subset", "train_on_all", "img_size", "batch_size", "weight_decay", "head_epochs", "head_lr",
                "lr")
# --quick: a smoke run that shows every stage working, in a minute or two on a CPU; its numbers mean nothing.
QUICK = {"subset": 128, "eval_subset": 128, "img_size": 32, "batch_size": 32, "head_epochs": 1, "epochs": 1,
         "overwrite": True}

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
    optim = parser.add_argument_group("optimisation")
    # Common fine-tuning values, not tuned here: a linear probe takes a high LR; fine-tuning a pretrained network
    # wants ~10x less, so the ImageNet features are adapted, not overwritten; AdamW's usual decay for fine-tuning.
    optim.add_argument("--head-epochs", type=run.non_negative_int, default=2,
                       help="stage 1: epochs training the head only (default: 2)")
    optim.add_argument("--head-lr", type=run.positive_float, default=1e-3,
                       help="stage 1 learning rate (default: 0.001)")
    optim.add_argument("--epochs", type=run.positive_int, default=10,
                       help="stage 2: epochs fine-tuning everything (default: 10)")
    optim.add_argument("--lr", type=run.positive_float, default=1e-4, help="stage 2 learning rate (default: 0.0001)")
    optim.add_argument("--wd", "--weight-decay", dest="weight_decay", type=run.non_negative_float, default=0.05,
                       help="AdamW weight decay, none on BatchNorm and biases (default: 0.05)")
    optim.add_argument("-b", "--batch-size", type=run.number(int, at_least=2), default=128,  # 2: for BatchNorm
                       help="images per step, all GPUs (default: 128)")
    run.add_arguments(parser)  # --device --seed --resume --overwrite, folders, --print-freq --compile --sync-bn --quick
    return parser

def train_transform(args):
    """CIFAR's standard augmentation, on the 32-px uint8 image: a random crop with 4-px zero padding, a random flip."""
    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])

def set_stage(model, stage):
    """'head': only the new head learns, and the frozen backbone's BatchNorm stays in eval mode: its statistics stay
    ImageNet's instead of drifting towards CIFAR-10 while its weights cannot follow. 'full': every layer learns."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(stage == "full" or name.startswith("fc."))
    model.train(stage == "full")  # the new head has no BatchNorm (and here no dropout): eval mode changes nothing

def make_optimizer(model, args, device):
    """AdamW over every parameter (those without a gradient, the frozen ones, it skips); weight decay on conv and linear
    weights, none on BatchNorm's weights and biases (Goyal et al. 2017, sec. 5.1) nor on any bias ("no bias decay",
    He et al. 2019, "Bag of Tricks", sec. 3.1). Fused: one kernel launch on CUDA."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, fused=device.type == "cuda")

def wrap(model, world_size, device, args):
    """DistributedDataParallel (built again when what trains changes: it registers those parameters), torch.compile."""
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    return model

def train_one_epoch(model, loader, optimizer, scaler, device, args):
    """One pass over the training data. The loss is summed on the device and read once, at the end: `loss.item()` in
    every step would make the CPU wait for the GPU in every step. Returns the mean training loss."""
    loss_sum = torch.zeros((), device=device)
    for step, (images, labels) in enumerate(loader):
        images = common.prepare_batch(images, device, args.img_size)  # to [0, 1], upsampled, normalised
        labels = labels.to(device, non_blocking=True)
        with common.autocast(device):  # bf16 (fp16 before Ampere) on CUDA, fp32 elsewhere
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16: the loss scaled up, so that small gradients do not underflow
        scaler.step(optimizer)  # fp16: unscales, and skips the step if a gradient overflowed
        scaler.update()
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

def save_checkpoints(model, optimizer, scaler, history, best_acc, args, writer):
    """levelN_last.pth after every epoch, for --resume; levelN_best.pth when validation improved (with --train-on-all:
    every epoch, so the last one). Returns the best validation accuracy so far."""
    row = history[-1]
    checkpoint_dir = Path(args.checkpoint_dir)
    to_save = {}  # path -> checkpoint
    checkpoint = {"level": LEVEL, "model": model.state_dict(), "epoch": row["epoch"], "history": history,
                  "args": vars(args)}
    if args.train_on_all:
        to_save[checkpoint_dir / f"{LEVEL}_best.pth"] = {**checkpoint, "selected_by": "last epoch (no validation)"}
    elif row["val_acc"] > best_acc:
        best_acc = row["val_acc"]
        to_save[checkpoint_dir / f"{LEVEL}_best.pth"] = {**checkpoint, "selected_by": "validation accuracy"}
    to_save[checkpoint_dir / f"{LEVEL}_last.pth"] = {
        **checkpoint, "best_acc": best_acc, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
    writer.save(to_save)  # a CPU copy now; serialised and written in the background while the next epoch trains
    return best_acc

def final_test(model, test_set, device, args, history, info):
    """The selected checkpoint, measured once on the test set by evaluate.py; results/levelN.json and the curves."""
    best = load_checkpoint(Path(args.checkpoint_dir) / f"{LEVEL}_best.pth")
    model.load_state_dict(best["model"])
    logits, labels = common.predict(model, test_set, device, args.img_size)
    test, _ = evaluate.from_logits(logits, labels)
    records.write_per_image(args.results_dir, LEVEL, logits, labels)  # each image's figures, for level4.py --summary
    figures = {"best_epoch": best["epoch"], "selected_by": best["selected_by"],
               "best_val_acc": best["history"][-1].get("val_acc", math.nan), "test": test}
    results = records.write_results(Path(args.results_dir) / f"{LEVEL}.json", LEVEL, args, history, info, figures)
    evaluate.plot_curves(history, Path(args.results_dir) / f"{LEVEL}_curves.png", f"{LEVEL}, {args.img_size} px")
    print(f"final: acc1={test['acc1']:.4f} val_acc1={results['best_val_acc']:.4f} ece={test['ece']:.4f} "
          f"nll={test['nll']:.4f} epoch={best['epoch']} test_images={test['num_images']} "
          f"seconds={results['seconds']:.0f}")
    return results

def main(args):
    rank, world_size, device = run.start(LEVEL, args)  # torchrun's processes, the device, the run folder and lock
    master = rank == 0  # rank 0 alone validates, writes and prints; the others wait for it at a barrier
    torch.manual_seed(args.seed + rank)  # each process draws its own augmentation; DDP gives all rank 0's weights
    torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN times its kernels once and keeps the fastest
    train_set, val_set, test_set, train_loader = load_data(args, rank, world_size, device)
    model = common.build_model(args.weights).to(device, memory_format=torch.channels_last)
    if args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=common.amp_dtype(device) == torch.float16)  # fp16 only
    # --resume: every state of levelN_last.pth restored (a changed flag of RESUME_FLAGS is refused); else epoch 0
    start_epoch, best_acc, history = resume(args, LEVEL, RESUME_FLAGS, model, optimizer, scaler)
    info = records.start_session(LEVEL, args, device, world_size, start_epoch, (train_set, val_set, test_set), master)

    writer = CheckpointWriter()  # one save in flight at most
    total_epochs = args.head_epochs + args.epochs
    wrapped_stage = None  # the stage train_model was wrapped for
    for epoch in range(start_epoch, total_epochs):
        stage = "head" if epoch < args.head_epochs else "full"
        set_stage(model, stage)  # every epoch: validation leaves the model in eval mode
        if stage != wrapped_stage:  # what trains changed: wrap again
            train_model = wrap(model, world_size, device, args)
            wrapped_stage = stage
        lr = args.head_lr if stage == "head" else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loader.sampler.set_epoch(epoch)
        epoch_start = time.time()
        train_loss = train_one_epoch(train_model, train_loader, optimizer, scaler, device, args)
        train_seconds = time.time() - epoch_start
        row = {"epoch": epoch + 1, "stage": stage, "lr": lr, "train_loss": train_loss,
               "images_per_s": len(train_loader) * args.batch_size / train_seconds, "train_seconds": train_seconds,
               "session_started": info["started"], "command": info["command"]}  # a resumed run has several sessions
        if master and not args.train_on_all:
            row["val_loss"], row["val_acc"] = evaluate.loss_and_accuracy(model, val_set, device, args.img_size)
        run.check_finite(epoch, lr, train_loss, row.get("val_loss", 0.0))  # nan or inf: one line, nothing saved
        if master:
            history.append(row)
            best_acc = save_checkpoints(model, optimizer, scaler, history, best_acc, args, writer)
            history[-1]["epoch_seconds"] = time.time() - epoch_start  # training, validation, the save's copy
            records.print_epoch(history[-1], total_epochs, start_epoch, info)
        run.barrier(world_size)  # under torchrun, the others wait while rank 0 validates and saves

    run.finish(writer, world_size)  # the last files on disk (the final test reads them); torchrun's group closed
    del train_loader  # its worker processes stop now, rather than being waited for one by one at exit
    return final_test(model, test_set, device, args, history, info) if master else None  # rank 0 alone

# ---- Run plumbing: not part of the lesson ----------------------------------------------------------------------
def validate_args(args):
    run.prepare_args(args, QUICK)  # --quick's sizes applied; at least one batch of training images

if __name__ == "__main__":
    run.run_main(main, get_args_parser(), validate_args)
