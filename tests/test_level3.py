"""Level 3: the unfreezing schedule, discriminative LRs, technique flags, exact resume, Ctrl-C, end to end."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, cached_level_runs, final_line, run_cli, run_quick, run_script
from test_level1 import assert_one_line_error, run_in_process, tiny_loader

import common
import level3

TINY = ["--weights", "none", "--img-size", "32", "--subset", "32", "--eval-subset", "16", "--batch-size", "16",
        "-j", "0", "--head-epochs", "1", "--epochs", "1", "--final-epochs", "0", "--seed", "5", "--print-freq", "100"]


def schedule_args(**overrides):
    args = dict(head_epochs=1, epochs=4, final_epochs=2, unfreeze_every=1, unfreeze_warmup_epochs=0.5,
                warmup_epochs=0.0, lr=1e-4, head_lr=1e-3, min_lr=1e-6, final_lr=5e-6, lr_decay=0.5,
                weight_decay=0.05, label_smoothing=0.1, mix_prob=0.0, switch_prob=0.5, mixup_alpha=0.8,
                cutmix_alpha=1.0, erase_prob=0.0, img_size=32, print_freq=1000)
    return SimpleNamespace(**{**args, **overrides})


def test_unfreezing_schedule_groups_per_epoch():
    args = schedule_args(head_epochs=2, unfreeze_every=2)
    assert level3.trainable_groups(0, args) == ["fc"]
    assert level3.trainable_groups(1, args) == ["fc"]
    assert level3.trainable_groups(2, args) == ["layer4", "fc"]
    assert level3.trainable_groups(4, args) == ["layer3", "layer4", "fc"]
    assert level3.trainable_groups(10, args) == list(common.LAYER_GROUPS)


def test_frozen_groups_keep_weights_and_bn_statistics_while_trainable_ones_move():
    torch.manual_seed(0)
    args = schedule_args()
    model = common.build_model("none")
    optimizer = level3.make_optimizer(model, args, torch.device("cpu"))
    stop, progress = SimpleNamespace(requested=False), common.Progress(3)
    loader = tiny_loader(32, 16)
    for epoch in range(3):  # fc | layer4 + fc | layer3 + layer4 + fc
        trainable = level3.trainable_groups(epoch, args)
        common.set_trainable(model, trainable)
        assert all(p.requires_grad == (group in trainable) for group in common.LAYER_GROUPS
                   for p in common.group_parameters(model, group))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loader.sampler.set_epoch(epoch)
        level3.train_one_epoch(model, None, trainable, loader, optimizer, common.grad_scaler(torch.device("cpu")),
                               torch.device("cpu"), args, epoch, stop, progress, epoch * 2, 2)
        after = model.state_dict()
        for group, modules in common.layer_group_modules(model).items():
            prefixes = {"stem": ("conv1.", "bn1."), "fc": ("fc.",)}.get(group, (group + ".",))
            changed = [k for k in before if k.startswith(prefixes) and not torch.equal(before[k], after[k])]
            if group in trainable:
                assert changed, f"{group} should train in epoch {epoch}"
            else:
                assert not changed, f"{group} is frozen in epoch {epoch} but {changed[:3]} changed"


def test_parameter_group_lrs_follow_the_layer_decay_and_unfreeze_warmup():
    args = schedule_args()
    steps_per_epoch = 10
    # Epoch 4 (steps 40-49): every group up to layer2 is unfrozen and past its warmup.
    step = 45
    lrs = {group: level3.lr_at(step, group, steps_per_epoch, args) for group in ("fc", "layer4", "layer3", "layer2")}
    assert lrs["layer4"] == pytest.approx(lrs["fc"] * 0.5)
    assert lrs["layer3"] == pytest.approx(lrs["fc"] * 0.25)
    assert lrs["layer2"] == pytest.approx(lrs["fc"] * 0.125)
    # layer1 unfreezes at epoch 4 (step 40): 5 warmup steps, linear from 1/5.
    for k in range(6):
        expected = level3.lr_at(40 + k, "fc", steps_per_epoch, args) * 0.5 ** 4 * min(1.0, (k + 1) / 5)
        assert level3.lr_at(40 + k, "layer1", steps_per_epoch, args) == pytest.approx(expected)
    # The final epochs: constant --final-lr (times the group's scale).
    assert level3.lr_at(55, "fc", steps_per_epoch, args) == args.final_lr
    assert level3.lr_at(65, "layer4", steps_per_epoch, args) == pytest.approx(args.final_lr * 0.5)
    # The optimiser has one decayed and one undecayed group per stage; BN weights and biases are undecayed.
    optimizer = level3.make_optimizer(common.build_model("none"), args, torch.device("cpu"))
    level3.set_group_lrs(optimizer, step, steps_per_epoch, args)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(lrs.get(group["stage_name"], group["lr"]))
        assert all(p.ndim > 1 for p in group["params"]) == (group["weight_decay"] > 0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root):
    """Run level3 in-process with extra flags; returns (a layer4 weight, the last history row), cached."""
    def read(out):
        checkpoint = torch.load(out / "level3_last.pth", weights_only=True)
        return checkpoint["model"]["layer4.0.conv1.weight"], checkpoint["history"][-1]
    return cached_level_runs(level3, [*TINY, "--data-dir", data_root], tmp_path_factory, read)


# --dropout and --lr-decay change the weights; --ema-decay the EMA's accuracy; --final-lr needs final epochs.
@pytest.mark.parametrize("base,flags", [((), ("--dropout", "0.5")), ((), ("--lr-decay", "0.3")),
                                        ((), ("--unfreeze-warmup-epochs", "2")),
                                        (("--epochs", "2"), ("--unfreeze-every", "2")),
                                        (("--final-epochs", "1"), ("--final-lr", "1e-3"))])
def test_each_level3_flag_changes_the_trained_weights(tiny_run, base, flags):
    assert not torch.equal(tiny_run(*base, *flags)[0], tiny_run(*base)[0])


def test_ema_decay_changes_the_ema_model(tiny_run):
    # (0.05: below the warm-up decay (1 + n) / (10 + n) from the first step, so the two differ at once)
    a, b = tiny_run("--ema-decay", "0.05")[1], tiny_run("--ema-decay", "0.999")[1]
    assert (a["val_loss_ema"], a["val_acc_ema"]) != (b["val_loss_ema"], b["val_acc_ema"])
    assert tiny_run("--ema-decay", "0")[1]["val_acc_ema"] is None


def without_timing(history):
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in history]


def test_resume_is_exact(tmp_path, data_root):
    """2 epochs straight == 1 epoch, stop, --resume for the rest: same weights, EMA, optimiser and history."""
    common_flags = [*TINY, "--data-dir", str(data_root), "--mix-prob", "0.5", "--erase-prob", "0.5"]
    run_in_process(level3, [*common_flags, "--checkpoint-dir", str(tmp_path / "a"),
                            "--results-dir", str(tmp_path / "a")])
    run_in_process(level3, [*common_flags, "--checkpoint-dir", str(tmp_path / "b"),
                            "--results-dir", str(tmp_path / "b"), "--stop-after-epochs", "1"])
    assert torch.load(tmp_path / "b" / "level3_last.pth", weights_only=True)["epoch"] == 1
    run_in_process(level3, [*common_flags, "--checkpoint-dir", str(tmp_path / "b"),
                            "--results-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b" / "level3_last.pth")])
    a = torch.load(tmp_path / "a" / "level3_last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "level3_last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["model_ema"]["module"]:
        assert torch.equal(a["model_ema"]["module"][key], b["model_ema"]["module"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert without_timing(a["history"]) == without_timing(b["history"])
    results_a = json.loads((tmp_path / "a" / "level3.json").read_text())
    results_b = json.loads((tmp_path / "b" / "level3.json").read_text())
    assert results_a["test"]["acc1"] == results_b["test"]["acc1"]


def test_fp16_loss_scaling_runs_in_the_step_and_its_state_resumes(tmp_path, data_root, monkeypatch):
    """GPUs before Ampere (T4, V100, P100) train in fp16 with a GradScaler; simulated here with fp16 autocast
    on the CPU. Two head-only epochs (fast: no backward through the fp16 convolutions on the CPU)."""
    monkeypatch.setattr(common, "amp_dtype", lambda device: torch.float16)
    flags = [*TINY, "--head-epochs", "2", "--data-dir", str(data_root), "--checkpoint-dir", str(tmp_path),
             "--results-dir", str(tmp_path), "--stop-after-epochs", "1"]
    run_in_process(level3, flags)
    path = tmp_path / "level3_last.pth"
    checkpoint = torch.load(path, weights_only=True)
    scaler = checkpoint["scaler"]
    # Each of the 2 steps either overflowed (scale halved from 2**16, streak reset) or counted in the streak.
    halvings = round(math.log2(2.0**16 / scaler["scale"]))
    assert 1 <= halvings + scaler["_growth_tracker"] <= 2, scaler
    # A scale too small to overflow, saved and resumed: it must come back as it was (a fresh scaler
    # would start at 2**16 and could only have halved twice).
    checkpoint["scaler"].update(scale=4.0, _growth_tracker=0)
    torch.save(checkpoint, path)
    run_in_process(level3, [*flags, "--resume", str(path)])
    resumed = torch.load(path, weights_only=True)
    assert resumed["epoch"] == 2
    assert (resumed["scaler"]["scale"], resumed["scaler"]["_growth_tracker"]) == (4.0, 2)


def test_resume_from_another_level_or_corrupt_file_is_a_clear_error(tmp_path, synthetic_root):
    checkpoint = {"level": "level2", "model": common.build_model("none").state_dict(), "epoch": 1}
    common.save_checkpoint(tmp_path / "level2_last.pth", checkpoint)
    result = run_cli(level3, "--data-dir", synthetic_root, "--weights", "none", "--resume",
                        tmp_path / "level2_last.pth", "--checkpoint-dir", tmp_path)
    assert_one_line_error(result, "level2", "level3_last.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    result = run_cli(level3, "--data-dir", synthetic_root, "--weights", "none", "--resume",
                        tmp_path / "corrupt.pth", "--checkpoint-dir", tmp_path)
    assert_one_line_error(result, "corrupt.pth")


def test_sigint_saves_a_loadable_last_checkpoint_and_resume_finishes(tmp_path, data_root):
    flags = [*TINY, "--subset", "320", "--epochs", "2", "--print-freq", "1", "-j", "1", "--data-dir", str(data_root),
             "--checkpoint-dir", str(tmp_path), "--results-dir", str(tmp_path)]
    process = subprocess.Popen([sys.executable, "level3.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    for line in process.stdout:  # wait until training is under way, then press Ctrl-C
        if line.startswith("epoch 1 step 3/") or time.time() > deadline:
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    checkpoint = common.load_checkpoint(tmp_path / "level3_last.pth", "level3")
    assert checkpoint["epoch"] == 0 and checkpoint["step_in_epoch"] >= 3
    # Resume finishes the interrupted epoch (and stops there, to keep the test short).
    resumed = run_script("level3.py", *flags, "--resume", tmp_path / "level3_last.pth", "-j", "0",
                         "--stop-after-epochs", "1")
    assert resumed.returncode == 0, resumed.stderr
    finished = common.load_checkpoint(tmp_path / "level3_last.pth", "level3")
    assert finished["epoch"] == 1 and finished["step_in_epoch"] == 0
    assert finished["history"][0]["steps"] == 20 - checkpoint["step_in_epoch"]  # the rest of the epoch


def test_level3_quick_end_to_end_then_evaluate_both_checkpoints(tmp_path, data_root):
    result, results, checkpoints = run_quick("level3", tmp_path, data_root)
    assert results["best_model_source"] in ("raw", "ema")
    assert len(results["history"]) == 3  # one epoch per stage: head, cosine, final low LR
    assert all(row["val_acc_ema"] is not None for row in results["history"])
    assert final_line(result.stdout)["acc1"] == pytest.approx(results["test"]["acc1"], abs=1e-4)
    for name in ("level3_best.pth", "level3_last.pth"):
        evaluated = run_script("evaluate.py", checkpoints / name, "--data-dir", data_root, "--subset", "128",
                               "--out", tmp_path / "eval", "-j", "0")
        assert evaluated.returncode == 0, evaluated.stderr
        assert 0 <= final_line(evaluated.stdout)["acc1"] <= 1
    best_eval = json.loads((tmp_path / "eval" / "eval_level3_best_test.json").read_text())
    assert best_eval["acc1"] == pytest.approx(results["test"]["acc1"], abs=1e-6)
