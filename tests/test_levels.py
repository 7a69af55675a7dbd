"""The four levels: what each stage freezes, that every technique flag changes what is trained, the schedules, the
choice between raw, EMA and SWA weights, resume after an interruption, --train-on-all, and each level end to end
with evaluate.py measuring its checkpoint."""
import copy
import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_LEVEL, assert_one_line_error, final_line, level_args, run_cli, run_level, summary_table

import common
import evaluate
import level1
import level2
import level3
import level4
from support import corruptions, evidence, files, study

CPU = torch.device("cpu")
IMAGES = np.random.default_rng(0).integers(0, 256, (32, 3, 32, 32), dtype=np.uint8)
LABELS = np.arange(32) % 10


def short_epoch(module, flags=(), epoch=None, steps=2, updates=None):
    """The weights (and weight averages) after `steps` steps of the level's own train_one_epoch, from the same
    initial weights and seed; `epoch` (default: the first with every layer training) sets the schedule's position."""
    args = module.get_args_parser().parse_args([*TINY, *TINY_LEVEL[int(module.LEVEL[-1])], *flags])
    module.validate_args(args)
    torch.manual_seed(0)
    model = common.build_model("none", getattr(args, "dropout", 0.0))
    if hasattr(module, "set_stage"):
        epoch = args.head_epochs if epoch is None else epoch
        module.set_stage(model, "head" if epoch < args.head_epochs else "full")
    else:
        epoch = max(module.unfreeze_epoch(g, args) for g in module.GROUPS) if epoch is None else epoch
        module.set_trainable(model, epoch, args)
    averages = {"ema": common.ModelEma(model, args.ema_decay)} if getattr(args, "ema_decay", 0) > 0 else {}
    averages.update({"swa": common.SwaAverage(model)} if getattr(args, "swa_epochs", 0) > 0 else {})
    for name, count in (updates or {}).items():  # an average that has seen earlier steps
        averages[name].num_updates = count
    dataset = common.CifarDataset(IMAGES[:16 * steps], LABELS[:16 * steps], module.train_transform(args))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    context = {"model": model, "loader": loader, "optimizer": module.make_optimizer(model, args, CPU),
               "scaler": scaler, "device": CPU, "args": args, "epoch": epoch, "averages": averages}
    module.train_one_epoch(**{k: context[k] for k in inspect.signature(module.train_one_epoch).parameters})
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return flat, {name: torch.cat([p.flatten() for p in a.module.parameters()]) for name, a in averages.items()}


def link_checkpoint(source, target):
    """A copy of a finished run's file for another test; a checkpoint (hundreds of MB) hard-linked instead: the suite
    replaces a .pth by renaming a new file over it and never writes into one, so the original stays as it was."""
    if str(source).endswith(".pth"):
        os.link(source, target)
    else:
        shutil.copy(source, target)


@pytest.fixture(scope="module")
def baseline_epoch():
    """baseline_epoch(module, flags, epoch, ...): short_epoch() of a baseline that several flag tests compare against,
    run once: short_epoch is deterministic (the same initial weights, seed and images), so a second run would give
    the same tensors. The weights are let go after this module (a ResNet-50 and its averages each)."""
    cache = {}

    def run(module, flags=(), epoch=None, **kwargs):
        key = repr((module.LEVEL, list(flags), epoch, kwargs))
        if key not in cache:
            cache[key] = short_epoch(module, flags, epoch, **kwargs)
        return cache[key]
    yield run
    cache.clear()


# ---- Level 1: the two stages -----------------------------------------------------------------------------------

def test_head_stage_freezes_backbone_weights_and_batchnorm_statistics():
    """Stage 1 changes only the head: no backbone weight and no BatchNorm statistic moves. Stage 2 moves them."""
    torch.manual_seed(0)
    model = common.build_model("none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = level1.get_args_parser().parse_args([*TINY, "--head-lr", "1e-2"])
    loader = torch.utils.data.DataLoader(common.CifarDataset(IMAGES, LABELS, level1.train_transform(args)), 16)
    optimizer = level1.make_optimizer(model, args, CPU)
    level1.set_stage(model, "head")
    level1.train_one_epoch(model, loader, optimizer, torch.amp.GradScaler("cpu", enabled=False), CPU, args)
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    assert changed == ["fc.bias", "fc.weight"]
    level1.set_stage(model, "full")
    level1.train_one_epoch(model, loader, optimizer, torch.amp.GradScaler("cpu", enabled=False), CPU, args)
    assert not torch.equal(model.layer1[0].bn1.running_mean, before["layer1.0.bn1.running_mean"])
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, data_root, cached_run):
    """--seed makes a CPU run bit-reproducible (fixed -j); another seed gives other weights."""
    weights = [torch.load(cached_run(level1)[1] / "level1_last.pth", weights_only=True)["model"]]  # seed 0
    for name, seed in (("a", 0), ("b", 2)):
        run_level(level1, tmp_path / name, data_root, "--seed", seed)
        weights.append(torch.load(tmp_path / name / "level1_last.pth", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


# ---- Every technique flag changes what is trained ------------------------------------------------------------

# (flag and value, the flags of the baseline it is set against, the epoch): MixUp and CutMix flags on mixed batches
# only; --min-lr where a cosine ends (the head stage: stage 2's first epoch is all warmup here).
LEVEL2_FLAGS = [(["--randaug-n", "0"], [], None), (["--randaug-m", "20"], [], None), (["--mix-prob", "0"], [], None),
                (["--mixup-alpha", "0.2"], ["--mix-prob", "1", "--switch-prob", "0"], None),
                (["--cutmix-alpha", "0.3"], ["--mix-prob", "1", "--switch-prob", "1"], None),
                (["--switch-prob", "1"], ["--mix-prob", "1", "--switch-prob", "0"], None),
                (["--label-smoothing", "0"], [], None), (["--erase-prob", "0"], [], None),
                (["--warmup-epochs", "0"], [], None), (["--min-lr", "1e-4"], [], 0), (["--lr", "3e-4"], [], None),
                (["--head-lr", "3e-3"], [], 0), (["--wd", "0.5"], [], None)]


@pytest.mark.parametrize("flags, baseline, epoch", LEVEL2_FLAGS, ids=[f[0][0] for f in LEVEL2_FLAGS])
def test_each_level2_flag_changes_the_trained_weights(flags, baseline, epoch, baseline_epoch):
    assert not torch.equal(baseline_epoch(level2, baseline, epoch)[0], short_epoch(level2, baseline + flags, epoch)[0])


# (flag and value, the epoch): by default the first epoch with every stage training (the stem unfreezes at epoch 6 of
# 1 head epoch + one stage per epoch), which here lies in the final, constant-LR epochs.
LEVEL3_FLAGS = [(["--dropout", "0.5"], None), (["--lr-decay", "0.3"], None), (["--unfreeze-every", "0"], 1),
                (["--unfreeze-warmup-epochs", "2"], None), (["--final-lr", "1e-4"], None)]


@pytest.mark.parametrize("flags, epoch", LEVEL3_FLAGS, ids=[f[0][0] for f in LEVEL3_FLAGS])
def test_each_level3_flag_changes_the_trained_weights(flags, epoch, baseline_epoch):
    assert not torch.equal(baseline_epoch(level3, [], epoch)[0], short_epoch(level3, flags, epoch)[0])


def test_final_epochs_run_at_the_final_lr(cached_run):
    """--final-epochs adds epochs after the cosine, at --final-lr (the head's LR, the last row's)."""
    results, _ = cached_run(level3)
    assert len(results["history"]) == 3 and results["history"][-1]["lr"] == results["args"]["final_lr"]
    assert results["history"][-2]["lr"] != results["args"]["final_lr"]


def test_ema_decay_changes_the_ema_and_not_the_weights():
    weights, averages = short_epoch(level3, updates={"ema": 1000})
    weights_other, averages_other = short_epoch(level3, ["--ema-decay", "0.9"], updates={"ema": 1000})
    assert torch.equal(weights, weights_other)
    assert not torch.allclose(averages["ema"], averages_other["ema"])


@pytest.mark.parametrize("flags", [["--swa-lr", "5e-5"], ["--swa-schedule", "cyclic"], ["--swa-every", "1"]],
                         ids=lambda f: f[0])
def test_each_swa_flag_changes_the_average(flags, baseline_epoch):
    """In the SWA phase (epoch 4 of 1 + 1 + 2), 2 steps per epoch: the LR flags change the weights, and
    --swa-every 1 takes a snapshot after each step instead of one at the end of the epoch."""
    base = ["--swa-epochs", "2"]
    _, averages = baseline_epoch(level4, base, epoch=3, updates={"swa": 1})
    _, averages_other = short_epoch(level4, base + flags, epoch=3, updates={"swa": 1})
    assert not torch.equal(averages["swa"], averages_other["swa"])


def test_swa_takes_one_snapshot_per_cycle_and_none_before_its_phase(monkeypatch):
    calls = []
    monkeypatch.setattr(common.SwaAverage, "update", lambda self, model: calls.append(1))
    short_epoch(level4, ["--swa-epochs", "2"], epoch=1, steps=2)  # epoch 2 (0-based 1): the cosine, before SWA
    assert calls == []
    short_epoch(level4, ["--swa-epochs", "2"], epoch=2, steps=2)
    assert len(calls) == 1
    short_epoch(level4, ["--swa-epochs", "2", "--swa-every", "1"], epoch=2, steps=2)
    assert len(calls) == 3


# ---- Schedules ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", [level3, level4])
def test_no_learning_rate_is_ever_negative_and_frozen_stages_get_none(module):
    """Issue 13, point 4: over a whole default schedule, every stage's LR is >= 0, exactly 0 while it is frozen and
    > 0 once it trains (59e8176 gave layer4 -2.8e-3 at step 0)."""
    args = module.get_args_parser().parse_args([])
    module.validate_args(args)
    steps_per_epoch = 10
    total = steps_per_epoch * (args.head_epochs + args.epochs + args.final_epochs + getattr(args, "swa_epochs", 0))
    for group in module.GROUPS:
        first = module.unfreeze_epoch(group, args) * steps_per_epoch
        lrs = [module.lr_at(step, group, steps_per_epoch, args) for step in range(total)]
        assert all(lr == 0 for lr in lrs[:first]), group
        assert all(lr > 0 for lr in lrs[first:]), group


def test_stages_unfreeze_one_per_epoch_with_decayed_learning_rates():
    args = level3.get_args_parser().parse_args(["--head-epochs", "2", "--unfreeze-every", "1"])
    model = common.build_model("none")
    assert level3.set_trainable(model, 1, args) == ["fc"]
    assert level3.set_trainable(model, 3, args) == ["fc", "layer4", "layer3"]
    assert not model.layer2.training and model.layer3.training and not model.bn1.training
    assert [p.requires_grad for p in (model.fc.weight, model.layer3[0].conv1.weight, model.layer2[0].conv1.weight)] \
        == [True, True, False]
    step = 20 * 10  # well inside the cosine, every stage warmed up
    ratio = level3.lr_at(step, "layer4", 10, args) / level3.lr_at(step, "fc", 10, args)
    assert ratio == pytest.approx(args.lr_decay)
    assert level3.lr_at(step, "stem", 10, args) / level3.lr_at(step, "fc", 10, args) == pytest.approx(0.7 ** 5)


# ---- Weight averages: BatchNorm statistics and the choice ------------------------------------------------------

@pytest.mark.parametrize("module", [level3, level4])
def test_avg_bn_flag_chooses_where_the_averages_statistics_come_from(module):
    """--avg-bn train: every average's BatchNorm statistics are common.recompute_bn's over BN_IMAGES training images
    through the level's training augmentation (drawn with --seed); clean: over the same images without it; copy: the
    raw model's. Either way a stage still frozen keeps the statistics it trains with: the raw model's."""
    args = level_args(module, "unused", "unused", "--avg-bn", "copy")
    torch.manual_seed(0)
    model = common.build_model("none")
    averages = {"ema": common.ModelEma(model, 0.9), "swa": common.SwaAverage(model)}
    for average in averages.values():
        average.num_updates = 5
    model.bn1.running_mean.fill_(3.0)
    model.layer4[0].bn1.running_mean.fill_(2.0)
    train_set = common.CifarDataset(IMAGES, LABELS, module.train_transform(args))
    module.validate(model, averages, list(module.GROUPS), module.bn_dataset(train_set, args), train_set, CPU, args)
    for average in averages.values():
        assert torch.equal(average.module.bn1.running_mean, model.bn1.running_mean)
    means = {}
    for source in ("train", "clean"):
        args.avg_bn = source
        bn_set = module.bn_dataset(train_set, args)
        module.validate(model, averages, list(module.GROUPS), bn_set, train_set, CPU, args)
        transform = module.train_transform(args) if source == "train" else None
        expected = copy.deepcopy(averages["ema"].module)
        common.recompute_bn(expected, common.bn_images(train_set, common.BN_IMAGES, transform, args.seed), CPU,
                            args.img_size, args.batch_size)
        for average in averages.values():
            assert torch.equal(average.module.layer1[0].bn1.running_mean, expected.layer1[0].bn1.running_mean)
        means[source] = averages["swa"].module.layer1[0].bn1.running_mean.clone()
    assert not torch.equal(means["train"], means["clean"])  # the augmentation changes the statistics
    module.validate(model, averages, ["fc", "layer4"], bn_set, train_set, CPU, args)  # stem, layer1-3 frozen
    for average in averages.values():
        assert torch.equal(average.module.bn1.running_mean, model.bn1.running_mean)
        assert not torch.equal(average.module.layer4[0].bn1.running_mean, model.layer4[0].bn1.running_mean)


def test_statistics_behind_a_frozen_stage_are_recomputed_as_in_training():
    """While stem..layer3 are frozen they run in eval mode with their (ImageNet) statistics in training; the
    average's recompute of layer4's statistics sees their output normalised the same way: layer4's first BatchNorm
    gets the mean of its inputs as a model in eval mode computes them (a hook, by hand), not as a model in train mode."""
    args = level_args(level4, "unused", "unused")
    torch.manual_seed(0)
    model = common.build_model("none")
    for module in model.modules():  # statistics away from their defaults, as pretrained ones are
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    average = common.ModelEma(model, 0.9)
    average.num_updates = 1
    bn_set = common.bn_images(common.CifarDataset(IMAGES, LABELS), 32)
    reference, inputs = copy.deepcopy(model).eval(), []
    reference.layer4[0].bn1.register_forward_hook(lambda module, x, y: inputs.append(x[0].mean((0, 2, 3))))
    with torch.no_grad():
        for images, _ in common.batches(bn_set, args.batch_size, CPU, drop_last=True):
            reference(common.prepare_batch(images, CPU, args.img_size))
    level4.validate(model, {"ema": average}, ["fc", "layer4"], bn_set, bn_set, CPU, args)
    torch.testing.assert_close(average.module.layer4[0].bn1.running_mean, torch.stack(inputs).mean(0), atol=1e-4,
                               rtol=1e-4)
    assert torch.equal(average.module.layer3[0].bn1.running_var, model.layer3[0].bn1.running_var)


def test_level4_cosine_decays_to_the_swa_lr_where_the_swa_phase_starts():
    """Issue 17 point 2: by default no final-epoch phase; stage 2's cosine ends at --swa-lr, which the SWA phase then
    holds (no anneal to about zero and climb back); without SWA the cosine ends at --min-lr as in Level 3."""
    args = level4.get_args_parser().parse_args([])
    level4.validate_args(args)
    assert args.final_epochs == 0 and args.swa_lr == args.lr / 5
    steps = 10
    swa_start, _ = level4.swa_steps(steps, args)
    assert swa_start == (args.head_epochs + args.epochs) * steps
    cosine = [level4.lr_at(step, "fc", steps, args) for step in range(args.head_epochs * steps + 20, swa_start)]
    assert all(a >= b >= args.swa_lr for a, b in zip(cosine, cosine[1:]))  # decays, never below --swa-lr
    assert cosine[-1] == pytest.approx(args.swa_lr, rel=1e-3)
    swa_phase = [level4.lr_at(step, "fc", steps, args) for step in range(swa_start, swa_start + args.swa_epochs * steps)]
    assert swa_phase == [args.swa_lr] * len(swa_phase)
    no_swa = level4.get_args_parser().parse_args(["--swa-epochs", "0"])
    level4.validate_args(no_swa)
    assert level4.lr_at(swa_start - 1, "fc", steps, no_swa) == pytest.approx(no_swa.min_lr, rel=1e-2)
    out = run_cli(level4, *TINY, "--final-epochs", "1", "--swa-epochs", "1")
    assert out.returncode == 2 and "--final-epochs needs --swa-epochs 0" in out.stderr


def test_the_best_candidate_is_saved_with_its_source(tmp_path):
    args = level4.get_args_parser().parse_args(["--checkpoint-dir", str(tmp_path)])
    model, other = common.build_model("none"), common.build_model("none")
    averages = {"ema": common.ModelEma(other, 0.9)}
    history = [{"epoch": 1, "val_acc": 0.5, "val_acc_ema": 0.6}]
    writer = files.CheckpointWriter()
    best = level4.save_checkpoints(model, {"raw": model, "ema": averages["ema"].module}, averages,
                                   level4.make_optimizer(model, args, CPU), torch.amp.GradScaler("cpu", enabled=False),
                                   history, -1.0, args, writer)
    writer.wait()
    saved = torch.load(tmp_path / "level4_best.pth", weights_only=True)
    assert best == 0.6 and saved["model_source"] == "ema"
    assert torch.equal(saved["model"]["fc.weight"], other.fc.weight)
    last = torch.load(tmp_path / "level4_last.pth", weights_only=True)
    assert torch.equal(last["model"]["fc.weight"], model.fc.weight) and last["averages"] == {}  # nothing averaged yet
    assert last["model_source"] == "raw"  # last.pth holds the raw weights, whichever candidate was best
    averages["ema"].num_updates = 3  # an average enters last.pth with its first update
    level4.save_checkpoints(model, {"raw": model}, averages, level4.make_optimizer(model, args, CPU),
                            torch.amp.GradScaler("cpu", enabled=False), history, best, args, writer)
    writer.wait()
    last = torch.load(tmp_path / "level4_last.pth", weights_only=True)
    assert list(last["averages"]) == ["ema"] and last["averages"]["ema"]["num_updates"] == 3


# ---- End to end, each level, then evaluate.py on its checkpoint ---------------------------------------------------

@pytest.mark.parametrize("module", [level1, level2, level3, level4])
def test_level_end_to_end_then_evaluate(module, cached_run, data_root):
    results, folder = cached_run(module)
    level = module.LEVEL
    assert len(results["history"]) == {"level1": 2, "level2": 2, "level3": 3, "level4": 3}[level]
    assert results["train_images"] == 64 and results["test"]["num_images"] == 32
    assert results["commit"] and results["device"].startswith("cpu") and "command" in results
    json.loads((folder / f"{level}.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert (folder / f"{level}_curves.png").stat().st_size > 0
    out = run_cli(evaluate, folder / f"{level}_best.pth", "--data-dir", data_root, "--subset", 32, "--device", "cpu",
                  "--out", folder / "eval", *([] if level == "level1" else ["--tta"]))
    assert out.returncode == 0, out.stderr
    measured = final_line(out.stdout)
    expected = results["test"] if level == "level1" else results["test_tta"]  # level 4: at the stored temperature
    assert measured["acc1"] == pytest.approx(expected["acc1"], abs=1e-4)
    assert measured["ece"] == pytest.approx(expected["ece"], abs=1e-4)


@pytest.mark.parametrize("module", [level1, level2, level3, level4])
def test_each_epoch_records_its_training_and_wall_seconds(module, cached_run):
    """support.benchmark --epochs reads these: the training steps' seconds within the epoch's, 64 images trained."""
    results, _ = cached_run(module)
    for row in results["history"]:
        assert 0 < row["train_seconds"] <= row["epoch_seconds"]
        assert row["images_per_s"] * row["train_seconds"] == pytest.approx(64)
    assert sum(row["epoch_seconds"] for row in results["history"]) <= results["seconds"]


def test_level4_reports_calibration_tta_sets_and_errors(cached_run):
    results, folder = cached_run(level4)
    assert set(results["tta_sets"]) == set(common.TTA_SETS)
    calibration = results["calibration"]
    assert calibration["fitted_on_images"] == 32 and calibration["temperature"] > 0
    # Each TTA set gets the T fitted on the validation logits of its own views and average, stored in best.pth.
    best = torch.load(folder / "level4_best.pth", weights_only=True)
    model = common.build_model("none", results["args"]["dropout"])
    model.load_state_dict(best["model"])
    _, val_set, _ = common.cifar10_datasets(results["args"]["data_dir"], 0, 64, 32)
    for name, views in common.TTA_SETS.items():
        view_logits, labels = common.predict(model, val_set, CPU, 32, views)
        expected, at_bound = common.fit_temperature(view_logits, labels, "softmax")
        fit = best["temperatures"][name]  # the level ran channels_last: the same logits up to rounding
        assert fit["temperature"] == pytest.approx(expected, rel=1e-4) and fit["at_bound"] == at_bound
        assert results["tta_sets"][name]["temperature"] == pytest.approx(1.0 if at_bound else expected, rel=1e-4)
    assert len({fit["temperature"] for fit in best["temperatures"].values()}) > 1  # not one T for every set
    # TTA predictions do not depend on the temperature: the same top-1 as an uncalibrated TTA report.
    model = common.build_model("none", results["args"]["dropout"])
    model.load_state_dict(torch.load(folder / "level4_best.pth", weights_only=True)["model"])
    _, _, test_set = common.cifar10_datasets(results["args"]["data_dir"], 0, eval_subset=32)
    plain, _ = evaluate.report(model, test_set, CPU, 32, common.TTA_SETS["flip+translate"])
    assert plain["acc1"] == pytest.approx(results["tta_sets"]["flip+translate"]["acc1"])
    for name in ("reliability", "confusion", "mistakes"):
        assert (folder / f"level4_{name}.png").stat().st_size > 0
    assert all(a != b for a, b, _ in results["most_confused"])
    robustness = results["corruptions_generated"]  # one view at the fitted T, on 4 images (conftest.TINY_LEVEL)
    assert robustness["images_per_severity"] == 4 and len(robustness["acc1"]) == len(corruptions.CORRUPTIONS) == 15
    assert robustness["views"] == ["identity"]
    assert robustness["temperature"] == pytest.approx(results["test_calibrated"]["temperature"])


@pytest.mark.parametrize("module, flags", [(level2, ["--tta-set", "flip"]), (level4, ["--tta-average", "logit"])])
def test_tta_flags_change_the_tta_results(module, flags, cached_run, data_root, tmp_path):
    """--tta-set (level 2) and --tta-average (level 4) change what the final test with TTA measures: the level's own
    final_test, run again on a copy of a finished run's checkpoints with the flag changed."""
    results, folder = cached_run(module)
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True, copy_function=link_checkpoint)
    args = level_args(module, tmp_path, data_root, *flags)
    _, val_set, test_set = common.cifar10_datasets(args.data_dir, args.seed, args.subset, args.eval_subset)
    model = common.build_model("none", getattr(args, "dropout", 0.0))
    other = module.final_test(model, *([val_set] if module is level4 else []), test_set, CPU, args, results["history"],
                              {"started": 0.0})["test_tta"]
    assert other["nll"] != results["test_tta"]["nll"]
    assert other["views"] == common.TTA_SETS["flip"] if module is level2 else other["tta_average"] == "logit"


# ---- Resume, and --train-on-all ----------------------------------------------------------------------------------

def test_interrupted_run_resumes_at_the_next_epoch_with_its_states(tmp_path, data_root, monkeypatch, cached_run):
    """Ctrl-C in the second epoch: levelN_last.pth holds the first; --resume ends with as many epochs as a straight
    run, and the optimiser's step count, the EMA's and SWA's updates and the LR schedule continue where they were."""
    straight, straight_folder = cached_run(level4)
    calls, original = [], level4.train_one_epoch

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(level4, "train_one_epoch", interrupted)
    out = run_cli(level4, *TINY, *TINY_LEVEL[4], "--data-dir", data_root, "--checkpoint-dir", tmp_path,
                  "--results-dir", tmp_path)
    assert out.returncode == 130 and "--resume" in out.stderr
    assert torch.load(tmp_path / "level4_last.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(level4, "train_one_epoch", original)
    out = run_cli(level4, *TINY, *TINY_LEVEL[4], "--data-dir", data_root, "--checkpoint-dir", tmp_path,
                  "--results-dir", tmp_path, "--resume", tmp_path / "level4_last.pth")
    assert out.returncode == 0, out.stderr
    assert "epoch 2 on" in out.stdout
    resumed = json.loads((tmp_path / "level4.json").read_text())
    assert [row["lr"] for row in resumed["history"]] == [row["lr"] for row in straight["history"]]
    sessions = resumed["sessions"]  # issue 19 point 4: every session's command, and the time of all of them
    assert [s["epochs"] for s in sessions] == [1, len(straight["history"]) - 1]
    assert "--resume" not in sessions[0]["command"] and "--resume" in sessions[1]["command"]
    assert resumed["total_seconds"] == pytest.approx(sum(s["seconds"] for s in sessions))
    assert resumed["total_seconds"] > sessions[1]["seconds"] > 0 and sessions[0]["seconds"] > 0
    a = torch.load(tmp_path / "level4_last.pth", weights_only=True)
    b = torch.load(straight_folder / "level4_last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == len(straight["history"])
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]
    assert [a["averages"][k]["num_updates"] for k in ("ema", "swa")] == \
        [b["averages"][k]["num_updates"] for k in ("ema", "swa")]


def test_resume_refuses_another_levels_checkpoint_folder_split_or_decay(cached_run, data_root, tmp_path):
    """Another level's checkpoint; the run's own checkpoint resumed into another folder (its best checkpoint would
    mix with another run's); another --seed (the validation split) or --wd (the optimiser's): one line each."""
    _, folder = cached_run(level1)
    out = run_cli(level2, *TINY, "--data-dir", data_root, "--checkpoint-dir", tmp_path, "--results-dir", tmp_path,
                  "--resume", folder / "level1_last.pth")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "level2_last.pth" in out.stderr
    for flags, fragment in ((["--checkpoint-dir", tmp_path], "--checkpoint-dir"),  # each names its flag (issue 19)
                            (["--checkpoint-dir", folder, "--seed", "5"], "--seed was 0 in the saved run, 5 now"),
                            (["--checkpoint-dir", folder, "--wd", "0.5"], "--weight-decay was 0.05")):
        out = run_cli(level1, *TINY, "--data-dir", data_root, "--results-dir", tmp_path, "--epochs", "2", *flags,
                      "--resume", folder / "level1_last.pth")
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and fragment in out.stderr, flags


def test_train_on_all_keeps_the_last_epoch_without_validation(tmp_path, data_root):
    """Issue 13, point 6: no validation split, the last epoch saved as best (Level 4: the SWA average), no
    temperature fitted; evaluate.py measures it, and refuses --split val."""
    results, folder = run_level(level4, tmp_path, data_root, "--train-on-all", "--head-epochs", "0", "--final-epochs", 0)
    best = torch.load(folder / "level4_best.pth", weights_only=True)
    assert best["selected_by"] == "last epoch (no validation)" and best["model_source"] == "swa"
    assert best["epoch"] == len(results["history"]) and all("val_acc" not in row for row in results["history"])
    assert results["calibration"]["fitted_on_images"] == 0 and best["temperature"] == 1.0
    assert results["train_images"] == 64
    out = run_cli(evaluate, folder / "level4_best.pth", "--data-dir", data_root, "--subset", 32, "--device", "cpu",
                  "--out", folder / "eval")
    assert out.returncode == 0, out.stderr
    assert run_cli(evaluate, folder / "level4_best.pth", "--data-dir", data_root, "--split", "val",
                   "--out", folder / "eval").returncode == 2


# ---- Level 4's studies -------------------------------------------------------------------------------------------

def test_summary_has_a_raw_and_a_calibrated_ece_column(tmp_path):
    """Issue 13, point 3: `ECE` is the raw figure for every level, `ECE (T)` the calibrated one where it exists."""
    row = {"test": {"acc1": 0.9, "ece": 0.05}, "history": [{}], "seconds": 10.0, "device": "cpu", "commit": "abc"}
    (tmp_path / "level1.json").write_text(json.dumps(row))
    (tmp_path / "level4.json").write_text(json.dumps({**row, "test_tta": {"acc1": 0.91}, "test_calibrated": {
        "ece": 0.01}, "corruptions_generated": {"benchmark": {"mean_acc1": 0.7}, "extras": {"mean_acc1": 0.1}}}))
    out = run_cli(level4, "--summary", "--results-dir", tmp_path)
    assert out.returncode == 0, out.stderr
    header, rows = summary_table(tmp_path)
    ece, ece_t = header.index("ECE"), header.index("ECE (T)")
    assert rows["level1"][ece] == "0.0500" and rows["level1"][ece_t] == "-"
    assert rows["level4"][ece] == "0.0500" and rows["level4"][ece_t] == "0.0100"
    corrupted = header.index("corruption acc")  # Level 4's mean accuracy on the generated CIFAR-10-C-style set
    assert rows["level1"][corrupted] == "-" and rows["level4"][corrupted] == "0.7000"


def test_quick_swa_averages_and_the_quick_ablation_is_small():
    """--quick: Level 4's one SWA epoch averages after every step (4 snapshots of 4 steps, not 1); with --ablate, two
    seeds and 64 images to validate and test on, so that the whole grid is a smoke run of minutes."""
    args = level4.get_args_parser().parse_args(["--quick"])
    level4.validate_args(args)
    steps_per_epoch = args.subset // args.batch_size
    assert study.swa_snapshots(args.swa_epochs, args.swa_every, steps_per_epoch) == 4
    assert args.ablate_seeds == 3 and args.eval_subset == 128
    args = level4.get_args_parser().parse_args(["--quick", "--ablate"])
    level4.validate_args(args)
    assert args.ablate_seeds == 2 and args.eval_subset == 64 and args.subset == 128


def test_ablation_runs_its_rows_keeps_finished_ones_and_names_unknown_rows(tmp_path, data_root, monkeypatch):
    """Real tiny runs: the baseline and no_ema (one seed) train, no_ema's weights are not the EMA's; another
    --ablate-rows reuses the finished runs; unknown rows, torchrun and a malformed ablation.json are one line each.
    Issue 25, point 1: a recipe of 3 SWA epochs scaled to a third keeps 1 SWA epoch of 6 steps, which still averages
    3 snapshots (one every 2 steps), and the EMA decay 0.999 becomes 1 - 0.003 = 0.997; level4.json records both."""
    ran = []
    original = level4.main

    def counting_main(args):
        ran.append(Path(args.checkpoint_dir).parent.name)
        return original(args)
    monkeypatch.setattr(level4, "main", counting_main)
    flags = [*TINY, *TINY_LEVEL[4], "--head-epochs", "0", "--data-dir", data_root, "--checkpoint-dir", tmp_path / "ck",
             "--results-dir", tmp_path, "--ablate", "--ablate-epochs", "1", "--ablate-seeds", "1", "--ablate-sizes",
             "32", "--subset", "96", "--epochs", "3", "--swa-epochs", "3"]  # 96 images at batch 16: 6 steps an epoch
    out = run_cli(level4, *flags, "--ablate-rows", "no_ema")
    assert out.returncode == 0, out.stderr
    assert "SWA snapshots 3, one every 2 steps (the full recipe's: 3); EMA decay 0.997" in out.stdout
    runs = json.loads((tmp_path / "ablation.json").read_text())["runs"]
    assert [(r["name"], r["seed"]) for r in runs] == [("baseline", 0), ("no_ema", 0)]
    assert [r["swa_snapshots"] for r in runs] == [3, 3] and runs[0]["args"]["swa_epochs"] == 1
    baseline = json.loads((tmp_path / "ablation" / "baseline" / "seed0" / "level4.json").read_text())
    assert baseline["swa_snapshots"] == 3 and baseline["ema_decay"] == pytest.approx(0.997)
    assert [row["swa_snapshots"] for row in baseline["history"]] == [0, 3]  # the cosine epoch, then the SWA epoch
    best = torch.load(tmp_path / "ck" / "ablation" / "baseline" / "seed0" / "level4_best.pth", weights_only=True)
    assert best["swa_snapshots"] == best["history"][-1]["swa_snapshots"]  # the chosen weights' epoch
    last = torch.load(tmp_path / "ck" / "ablation" / "baseline" / "seed0" / "level4_last.pth", weights_only=True)
    assert last["averages"]["swa"]["num_updates"] == 3
    assert "| no_ema |" in (tmp_path / "ablation.md").read_text()
    assert ran[1:] == ["baseline", "no_ema"]  # the first call is the --ablate command itself
    ran.clear()
    assert run_cli(level4, *flags, "--ablate-rows", "baseline").returncode == 0
    assert len(ran) == 1  # another --ablate-rows: the runs done with the same settings are kept, not run again
    out = run_cli(level4, *flags, "--ablate-rows", "no_such_row")
    assert out.returncode == 2 and "no_ema" in out.stderr
    monkeypatch.setenv("RANK", "0")  # under torchrun: the rows run one after another in one process
    assert run_cli(level4, *flags).returncode == 2
    monkeypatch.delenv("RANK")
    (tmp_path / "ablation.json").write_text("{not json")
    out = run_cli(level4, *flags)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "ablation.json" in out.stderr


def test_batch_larger_than_the_training_split_is_one_line_error(data_root, tmp_path):
    out = run_cli(level1, *TINY[:TINY.index("--subset")], "-b", "46000", "--data-dir", data_root,
                  "--checkpoint-dir", tmp_path, "--results-dir", tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1


def test_an_average_the_saved_run_did_not_have_starts_from_its_weights(tmp_path, data_root):
    """A run saved without EMA (--ema-decay 0), resumed with it: the EMA starts from the resumed weights."""
    run_level(level3, tmp_path, data_root, "--ema-decay", "0", "--final-epochs", "0")
    args = level_args(level3, tmp_path, data_root, "--resume", tmp_path / "level3_last.pth", "--final-epochs", "0")
    model = common.build_model("none", args.dropout)
    averages = {"ema": common.ModelEma(common.build_model("none", args.dropout))}
    files.resume(args, level3.LEVEL, level3.RESUME_FLAGS, model, level3.make_optimizer(model, args, CPU),
                 torch.amp.GradScaler("cpu", enabled=False), averages)
    assert all(torch.equal(a, b) for a, b in zip(averages["ema"].module.state_dict().values(),
                                                  model.state_dict().values()))
    assert averages["ema"].num_updates == 0


# ---- Level 4's ablation: the recipe scaled, paired seeds, evaluation-only rows (issue 18) -----------------------

def test_scaled_recipe_keeps_the_phases_in_proportion_and_what_the_averages_hold():
    """--ablate-epochs 6 of a 30-epoch recipe: every phase at a fifth, whole epochs, a phase the recipe has keeps one
    epoch or more, a phase it does not have stays 0; warmups (fractions of an epoch) scale exactly. Issue 25, point 1:
    the one SWA epoch left still averages the full recipe's 5 snapshots (45,000 // 128 = 351 steps: one every 70),
    and the EMA's horizon covers the same share of the run: 1 - 0.999 = 0.001 over a fifth, 1 - 0.005 = 0.995."""
    parse = level4.get_args_parser().parse_args
    scaled = study.scaled_recipe(parse(["--ablate-epochs", "6"]), 351)  # head 2, cosine 30, SWA 5, a stage per epoch
    assert scaled == {"epochs": 6, "head_epochs": 1, "swa_epochs": 1, "final_epochs": 0, "unfreeze_every": 1,
                      "warmup_epochs": pytest.approx(0.2), "unfreeze_warmup_epochs": pytest.approx(0.1),
                      "ema_decay": pytest.approx(0.995), "swa_every": 70}
    assert study.swa_snapshots(scaled["swa_epochs"], scaled["swa_every"], 351) == 5
    assert study.swa_snapshots(5, 0, 351) == 5  # the full recipe: one a epoch
    # A phase shorter than the snapshots wanted: one a step; a cadence that cannot give exactly 3: never fewer.
    assert study.scaled_swa_every(parse(["--swa-epochs", "5"]), 1, 4) == 1
    assert study.swa_snapshots(2, study.scaled_swa_every(parse(["--swa-epochs", "3"]), 2, 4), 4) == 4
    full = parse(["--ablate-epochs", "30", "--swa-every", "100"])  # unscaled: 1,755 // 100 = 17 snapshots, the EMA
    assert study.swa_snapshots(5, study.scaled_recipe(full, 351)["swa_every"], 351) == 17
    assert study.scaled_recipe(full)["ema_decay"] == 0.999
    assert study.scaled_recipe(parse(["--ablate-epochs", "6", "--ema-decay", "0"]))["ema_decay"] == 0.0
    longer = study.scaled_recipe(parse(["--ablate-epochs", "6", "--head-epochs", "10", "--swa-epochs", "10",
                                         "--unfreeze-every", "5"]))
    assert [longer[k] for k in ("head_epochs", "epochs", "swa_epochs", "unfreeze_every")] == [2, 6, 2, 1]
    half = study.scaled_recipe(parse(["--ablate-epochs", "15", "--swa-epochs", "5", "--unfreeze-every", "3"]))
    assert [half[k] for k in ("head_epochs", "swa_epochs", "unfreeze_every")] == [1, 3, 2]  # 1, 2.5, 1.5: half up


def test_ablation_pairs_seeds_and_its_evaluation_rows_train_nothing(cached_run, data_root, tmp_path, monkeypatch):
    """Trained rows call main once per seed (the same seeds as the baseline); no_tta, no_temperature, bn_clean and
    swa_weights_off are measured on the baseline's checkpoints of each seed without training; a second call reuses
    every finished run; the table has each row's paired differences with their intervals and verdicts, the plot is
    written. Issue 25: every row's decision figure is its validation top-1 at its own TTA views, measured alike for
    trained and evaluation rows; swa_weights_off measures the raw weights of level4_last.pth."""
    _, folder = cached_run(level4)
    calls = []

    def fake_main(row_args):  # a "training run": the cached checkpoints, and test figures by row and seed
        calls.append((row_args.seed, row_args.mix_prob))
        Path(row_args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        for name in ("level4_best.pth", "level4_last.pth"):
            link_checkpoint(folder / name, Path(row_args.checkpoint_dir) / name)
        acc1 = 0.5 + 0.01 * row_args.seed + 0.02 * (row_args.mix_prob == 0)
        return {"test": {"acc1": acc1}, "test_tta": {"acc1": acc1, "ece": 0.1}, "best_val_acc": acc1,
                "model_source": "swa", "swa_snapshots": 1, "device": "cpu", "commit": "test"}
    args = level_args(level4, tmp_path, data_root, "--ablate", "--ablate-seeds", 2, "--ablate-epochs", 1, "--seed", 3,
                      "--ablate-rows", "no_mixup_cutmix", "no_tta", "no_temperature", "bn_clean", "swa_weights_off")
    table = study.run_ablation(args, fake_main)
    assert sorted(calls) == [(3, 0.0), (3, 0.5), (4, 0.0), (4, 0.5)]  # baseline and no_mixup_cutmix, seeds 3 and 4
    assert [run["seed"] for run in table["no_tta"]] == [3, 4] and table["no_tta"][0]["evaluation_only"]
    best, last = (common.build_model("none", args.dropout) for _ in range(2))
    best.load_state_dict(torch.load(folder / "level4_best.pth", weights_only=True)["model"])
    last.load_state_dict(torch.load(folder / "level4_last.pth", weights_only=True)["model"])
    _, val_set, test_set = common.cifar10_datasets(data_root, 3, 64, 32)  # seed 3's validation images
    one_view, _ = evaluate.report(best, test_set, CPU, 32)
    assert table["no_tta"][0]["tta_acc1"] == pytest.approx(one_view["acc1"])
    tta_views = common.TTA_SETS[args.tta_set]
    for name, model, views in (("baseline", best, tta_views), ("no_tta", best, ("identity",)),
                               ("swa_weights_off", last, tta_views)):
        on_val, _ = evaluate.report(model, val_set, CPU, 32, views)
        assert table[name][0]["val_acc1"] == pytest.approx(on_val["acc1"]), name  # at the row's own views
    on_test, _ = evaluate.report(last, test_set, CPU, 32, tta_views)
    assert table["swa_weights_off"][0]["tta_acc1"] == pytest.approx(on_test["acc1"])
    assert table["swa_weights_off"][0]["model_source"] == "raw (last epoch)"
    markdown = (tmp_path / "ablation.md").read_text()
    line = next(row for row in markdown.splitlines() if row.startswith("| no_mixup_cutmix"))
    # Test top-1 +0.02 on both seeds (the fake's), but the same weights on validation: the decision sees no change.
    assert "+0.0200 [+0.0200, +0.0200]" in line and "MixUp/CutMix: no change" in line
    assert "evaluation only" in next(row for row in markdown.splitlines() if row.startswith("| no_tta"))
    assert "swa_weights_off: evaluation only: the baseline's own run, its raw weights at the end" in markdown
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    study.run_ablation(args, fake_main)
    assert len(calls) == 4  # every finished (row, seed) reused


# ---- Issue 25: the SWA LR, the rows of the grid, resume, each level's per-image figures, level against level ----

def test_swa_lr_above_lr_is_one_line_error():
    """Point 6: above --lr the cosine would climb into the SWA phase; --lr itself is allowed."""
    assert_one_line_error(run_cli(level4, *TINY, "--swa-lr", "2e-4"), "--swa-lr", "--lr")
    args = level4.get_args_parser().parse_args(["--swa-lr", "1e-4"])
    level4.validate_args(args)
    assert args.swa_lr == args.lr


def test_grid_splits_swa_into_its_average_and_its_schedule_and_tries_a_lower_swa_lr():
    """Point 2: no_swa_schedule trains Level 3's tail in the SWA phase's place, swa_weights_off only measures the
    baseline's raw weights; point 6: swa_lr_low trains at --lr / 20."""
    args = level4.get_args_parser().parse_args(["--ablate-epochs", "6"])
    level4.validate_args(args)
    grid = study.ablation_grid(args)
    assert "no_swa" not in grid
    assert grid["no_swa_schedule"] == ({"swa_epochs": 0, "final_epochs": 1}, False)
    assert grid["swa_weights_off"] == ({"weights": "raw, last epoch"}, True)
    assert grid["swa_lr_low"] == ({"swa_lr": pytest.approx(args.lr / 20)}, False)
    assert study.technique("swa_lr_low", args) == "--swa-lr 2e-05 (vs 5e-06)"
    assert study.technique("no_randaugment", args) == "RandAugment" and study.technique("no_ema", args) == "the EMA"


@pytest.mark.parametrize("module, flag, value", [
    (level1, "--lr", "3e-4"), (level1, "--head-lr", "3e-3"), (level2, "--lr", "3e-4"), (level2, "--min-lr", "0"),
    (level2, "--warmup-epochs", "0"), (level3, "--lr", "3e-4"), (level3, "--final-lr", "1e-5"),
    (level3, "--lr-decay", "1"), (level4, "--lr", "3e-4"), (level4, "--swa-lr", "1e-5"),
    (level4, "--swa-schedule", "cyclic")])
def test_resume_with_another_learning_rate_is_refused(module, flag, value, tmp_path, data_root):
    """Point 7: every flag that set the LR of an epoch already run is in RESUME_FLAGS: a resume with another value is
    one line, exit 2, before any weight is loaded."""
    saved = vars(level_args(module, tmp_path, data_root))
    checkpoint = {"level": module.LEVEL, "optimizer": {}, "model": {}, "args": saved}
    torch.save(checkpoint, tmp_path / f"{module.LEVEL}_last.pth")
    out = run_cli(module, *TINY, *TINY_LEVEL[int(module.LEVEL[-1])], "--data-dir", data_root, "--checkpoint-dir",
                  tmp_path, "--results-dir", tmp_path, "--resume", tmp_path / f"{module.LEVEL}_last.pth", flag, value)
    assert_one_line_error(out, flag, "in the saved run")


@pytest.mark.parametrize("module", [level1, level2, level3, level4])
def test_final_test_stores_each_test_images_figures_beside_the_results(module, cached_run):
    """Point 8: levelN_per_image.npz loads without pickle; its mean correctness is the test top-1, its confidences
    give the ECE at the level's T (Level 4: its fitted one-view T, the others T = 1), its mean NLL the NLL."""
    results, folder = cached_run(module)
    with np.load(folder / f"{module.LEVEL}_per_image.npz", allow_pickle=False) as arrays:
        figures = {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    assert set(figures) == {"labels", "preds", "correct", "confidence", "nll", "temperature"}
    assert len(figures["labels"]) == 32 and figures["correct"].dtype == torch.bool
    assert torch.equal(figures["correct"], figures["preds"] == figures["labels"])
    reported = results["test_calibrated"] if module is level4 else results["test"]
    assert float(figures["temperature"]) == pytest.approx(reported["temperature"])
    assert float(figures["correct"].double().mean()) == pytest.approx(results["test"]["acc1"])
    everyone = torch.arange(32)[None]
    ece = evidence.resampled_ece(figures["confidence"], figures["correct"], everyone)
    assert float(ece) == pytest.approx(reported["ece"], abs=1e-6)
    assert float(figures["nll"].mean()) == pytest.approx(reported["nll"], rel=1e-6)


def test_summary_compares_each_level_with_the_one_before_as_evaluate_compare_does(cached_run, data_root, tmp_path):
    """Point 8: `level4.py --summary` from the per-image files alone gives, for each consecutive pair, what
    `evaluate.py levelN+1_best.pth --compare levelN_best.pth` measures by running both models again on the same 32
    test images, each at its own T (Level 4 its fitted T, the others 1): the same Δ top-1, Δ ECE and bootstrap
    intervals, McNemar's b, c and p."""
    for module in (level1, level2, level3, level4):
        _, folder = cached_run(module)
        for name in (".json", "_per_image.npz", "_best.pth"):
            link_checkpoint(folder / f"{module.LEVEL}{name}", tmp_path / f"{module.LEVEL}{name}")
    out = run_cli(level4, "--summary", "--results-dir", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "## Each level against the one before" in (tmp_path / "summary.md").read_text()
    pairs = json.loads((tmp_path / "summary.json").read_text())["level_pairs"]
    assert [(pair["a"], pair["b"]) for pair in pairs] == [("level2", "level1"), ("level3", "level2"),
                                                          ("level4", "level3")]
    for pair in pairs:
        out_dir = tmp_path / f"compare_{pair['a']}"
        compared = run_cli(evaluate, tmp_path / f"{pair['a']}_best.pth", "--compare", tmp_path / f"{pair['b']}_best.pth",
                           "--data-dir", data_root, "--subset", 32, "--device", "cpu", "--out", out_dir)
        assert compared.returncode == 0, compared.stderr
        expected = json.loads(next(out_dir.glob("compare_*.json")).read_text())
        assert pair["num_images"] == expected["num_images"] == 32
        assert pair["temperatures"] == pytest.approx(expected["temperatures"])
        assert pair["mcnemar"] == {**expected["mcnemar"], "p": pytest.approx(expected["mcnemar"]["p"])}
        for name in ("acc1", "ece", "nll"):
            for key in ("a", "b", "difference"):
                assert pair[name][key] == pytest.approx(expected[name][key], abs=1e-6), (pair["a"], name, key)
            assert pair[name]["ci95"] == pytest.approx(expected[name]["ci95"], abs=1e-6), (pair["a"], name)
    level4_t = json.loads((tmp_path / "level4.json").read_text())["test_calibrated"]["temperature"]
    assert [pair["temperatures"] for pair in pairs] == [[1.0, 1.0], [1.0, 1.0], [pytest.approx(level4_t), 1.0]]
    rows = [line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| . | level")]
    acc1 = pairs[0]["acc1"]
    assert f"{acc1['difference']:+.4f} [{acc1['ci95'][0]:+.4f}, {acc1['ci95'][1]:+.4f}]" in rows[0]


def test_summary_names_a_pair_run_on_other_test_images(cached_run, tmp_path):
    """A level tested on other images (16 of them, or 32 with other labels) is not compared with its neighbour: a line
    says so; a level without a per-image file (an older run) too; the other pairs are still compared."""
    for module in (level1, level2, level3):
        _, folder = cached_run(module)
        for name in (".json", "_per_image.npz"):
            shutil.copy(folder / f"{module.LEVEL}{name}", tmp_path / f"{module.LEVEL}{name}")
    with np.load(tmp_path / "level1_per_image.npz", allow_pickle=False) as arrays:
        np.savez(tmp_path / "level1_per_image.npz", **{name: arrays[name][:16] if arrays[name].ndim else arrays[name]
                                                        for name in arrays.files})
    seed_folder = tmp_path / "seed1"
    seed_folder.mkdir()
    for level in ("level2", "level3"):
        shutil.copy(tmp_path / f"{level}.json", seed_folder / f"{level}.json")
    with np.load(tmp_path / "level2_per_image.npz", allow_pickle=False) as arrays:
        np.savez(seed_folder / "level2_per_image.npz", **{**{name: arrays[name] for name in arrays.files},
                                                          "labels": (arrays["labels"] + 1) % 10})
    out = run_cli(level4, "--summary", "--results-dir", tmp_path)
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [(pair["folder"], pair["a"]) for pair in saved["level_pairs"]] == [(".", "level3")]
    assert saved["not_compared"] == [
        "level2 vs level1 (.): not compared, tested on different images (32 and 16 test images)",
        "level3 vs level2 (seed1): not compared, no level3_per_image.npz (a run from before per-image files: run it "
        "again)"]
    (seed_folder / "level3.json").unlink()
    shutil.copy(tmp_path / "level3_per_image.npz", seed_folder / "level3_per_image.npz")
    shutil.copy(tmp_path / "level3.json", seed_folder / "level3.json")
    run_cli(level4, "--summary", "--results-dir", tmp_path)
    assert "level3 vs level2 (seed1): not compared, tested on different images (32 each, with other labels)" in \
        (tmp_path / "summary.md").read_text()
