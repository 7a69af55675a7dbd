"""torchrun + DistributedDataParallel on the CPU (gloo): each level runs with 2 processes, writes one set of
files, and trains like one process with the same global batch."""
import json
import os

import pytest
import torch
from conftest import run_script

TINY = ["--weights", "none", "--img-size", "32", "--subset", "64", "--eval-subset", "17", "--batch-size", "32",
        "-j", "0", "--head-epochs", "1", "--epochs", "1", "--seed", "3", "--print-freq", "100"]
ENV = {"OMP_NUM_THREADS": "1"}  # two processes on two cores


def torchrun(script, *args):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args, env=ENV)


def run_both(tmp_path, script, *args):
    """The same run in one process and under torchrun with 2 processes; returns both (results, last ckpt)."""
    out = {}
    runners = (("single", lambda *a: run_script(script, *a, env=ENV)), ("ddp", lambda *a: torchrun(script, *a)))
    for name, runner in runners:
        result = runner(*args, "--checkpoint-dir", tmp_path / name / "ck", "--results-dir", tmp_path / name / "res")
        assert result.returncode == 0, result.stderr[-3000:]
        level = script.removesuffix(".py")
        out[name] = (json.loads((tmp_path / name / "res" / f"{level}.json").read_text()),
                     torch.load(tmp_path / name / "ck" / f"{level}_last.pth", weights_only=True), result)
    # Exactly one set of files: rank 1 wrote nothing of its own (same names, no duplicates, no temp files).
    for kind in ("ck", "res"):
        assert sorted(os.listdir(tmp_path / "ddp" / kind)) == sorted(os.listdir(tmp_path / "single" / kind))
    return out


def assert_same_loss_trajectory(single, ddp, band):
    """Training and validation losses epoch by epoch within a relative `band`."""
    assert len(single["history"]) == len(ddp["history"])
    for a, b in zip(single["history"], ddp["history"]):
        assert a["images"] == b["images"]  # the epoch covered the same number of images over all ranks
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=band), (key, a["epoch"])


def test_level1_two_processes_match_one_process(tmp_path, data_root):
    """With --sync-bn (and level 1 has no mixing or dropout; crop/flip depend only on the image index), 2 processes
    x 16 images train like 1 process x 32. Tolerance: AdamW moves a weight by at most about lr per step, so
    float-rounding differences in the all-reduced gradients can change a weight by at most 2 x lr per step
    (a near-zero gradient whose sign flips); we allow exactly that."""
    out = run_both(tmp_path, "level1.py", *TINY, "--data-dir", data_root, "--sync-bn")
    (single, a, _), (ddp, b, _) = out["single"], out["ddp"]
    steps = 2  # per stage: 64 images / 32
    bound_fc = 2 * steps * (1e-3 + 1e-4) * 1.01  # fc trains in both stages (head-lr 1e-3, lr 1e-4)
    bound_rest = 2 * steps * 1e-4 * 1.01
    for key, value in a["model"].items():
        if "running" in key or "num_batches" in key:
            continue
        difference = (value - b["model"][key]).abs().max().item()
        assert difference <= (bound_fc if key.startswith("fc.") else bound_rest), (key, difference)
    # After the head stage the weights still agree to float precision, so the validation metrics of epoch 1,
    # over an odd-sized split (17 = 9 + 8 images per rank), must be the same: the all-reduce is exact.
    assert ddp["history"][0]["val_acc"] == single["history"][0]["val_acc"]
    assert ddp["history"][0]["val_loss"] == pytest.approx(single["history"][0]["val_loss"], rel=1e-5)
    assert ddp["test"]["num_images"] == single["test"]["num_images"] == 17
    assert_same_loss_trajectory(single, ddp, band=0.02)


def test_level4_under_torchrun(tmp_path, data_root):
    """Level 4 holds every technique of levels 2 and 3 (unfreezing, EMA, per-step LR) plus SWA. MixUp/CutMix
    pair images within each process's share of the batch, and erasing and dropout masks are drawn per share, so
    with those on two processes cannot follow one exactly (on such tiny runs the first losses differ by up to
    ~20 %); with them off and --sync-bn, the loss trajectory agrees within 2 %. The final validation (model
    choice, temperature) runs on rank 0 over the whole split: the same 17 images as in one process."""
    out = run_both(tmp_path, "level4.py", *TINY, "--data-dir", data_root, "--final-epochs", "0", "--swa-epochs", "1",
                   "--mix-prob", "0", "--erase-prob", "0", "--dropout", "0", "--sync-bn")
    assert_same_loss_trajectory(out["single"][0], out["ddp"][0], band=0.02)
    assert out["ddp"][1]["model_swa"]["num_averaged"] == 1
    assert set(out["ddp"][0]["val_final"]) == {"raw", "ema", "swa"}
    assert out["ddp"][0]["calibration"]["fitted_on"] == out["single"][0]["calibration"]["fitted_on"] == \
        "validation (17 images)"


def test_level3_resume_under_torchrun(tmp_path, data_root):
    flags = [*TINY, "--data-dir", data_root, "--final-epochs", "0", "--dropout", "0", "--mix-prob", "0",
             "--erase-prob", "0", "--sync-bn", "--checkpoint-dir", tmp_path / "ck", "--results-dir", tmp_path / "res"]
    first = torchrun("level3.py", *flags, "--stop-after-epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert torch.load(tmp_path / "ck" / "level3_last.pth", weights_only=True)["epoch"] == 1
    resumed = torchrun("level3.py", *flags, "--resume", tmp_path / "ck" / "level3_last.pth")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((tmp_path / "res" / "level3.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(row["images"] == 64 for row in history)  # both epochs covered the whole subset over both ranks


def test_level2_under_torchrun_writes_one_set_of_files(tmp_path, data_root):
    result = torchrun("level2.py", *TINY, "--data-dir", data_root, "--checkpoint-dir", tmp_path / "ck",
                      "--results-dir", tmp_path / "res")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ck")) == ["level2_best.pth", "level2_last.pth"]
    assert sorted(os.listdir(tmp_path / "res")) == ["level2.json", "level2_curves.png"]
    history = json.loads((tmp_path / "res" / "level2.json").read_text())["history"]
    assert [row["images"] for row in history] == [64, 64]  # both ranks' shares counted
    assert result.stdout.count("final:") == 1  # rank 0 alone prints
