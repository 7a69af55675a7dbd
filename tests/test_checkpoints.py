"""Checkpoint writing/loading and model construction from every kind of weights file."""
import os
import pickle

import pytest
import torch
import torchvision

import common


def test_checkpoint_round_trip(tmp_path):
    model = common.build_model("none")
    checkpoint = {"model": model.state_dict(), "epoch": 3, "best_val_acc": 0.5, "args": {"lr": 1e-4, "name": "x"},
                  "history": [{"epoch": 1, "val_acc": 0.4}], "level": "level1", "rng": common.rng_state(),
                  "versions": common.library_versions()}
    path = tmp_path / "a" / "ckpt.pth"
    common.save_checkpoint(path, checkpoint)
    loaded = common.load_checkpoint(path, "level1")
    assert loaded["epoch"] == 3 and loaded["args"] == {"lr": 1e-4, "name": "x"}
    assert loaded["history"] == checkpoint["history"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    with pytest.raises(common.UserError, match="written by level1, not level3"):
        common.load_checkpoint(path, "level3")


def test_crash_while_saving_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    common.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    before = path.read_bytes()

    def crashing_save(obj, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        common.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pth"]  # no temp file left behind


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    payload = _RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": payload}, f)
    with pytest.raises(common.UserError, match="refused"):
        common.load_file(path)
    # torch.save's zip format too
    torch.save({"model": payload, "epoch": 1}, tmp_path / "evil_zip.pth")
    with pytest.raises(common.UserError, match="refused"):
        common.load_file(tmp_path / "evil_zip.pth")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random", "directory"])
def test_unreadable_files_are_one_line_errors(tmp_path, kind):
    path = tmp_path / "bad.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"model": {"w": torch.ones(1000)}, "epoch": 1}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(common.UserError) as error:
        common.load_file(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_imagenet_state_dict_loads_all_but_the_head(tmp_path):
    imagenet = torchvision.models.resnet50(weights=None)  # stands in for the real ImageNet weights
    path = tmp_path / "resnet50_imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    model = common.build_model(str(path))
    assert model.fc.out_features == 10
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[2].bn3.running_var, imagenet.layer4[2].bn3.running_var)


def test_ten_class_checkpoint_loads_whole_including_prefixed_keys(tmp_path):
    trained = common.build_model("none")
    prefixed = {"module._orig_mod." + k: v for k, v in trained.state_dict().items()}
    torch.save({"state_dict": prefixed}, tmp_path / "seed_format.pth")
    model = common.build_model(str(tmp_path / "seed_format.pth"))
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize("kind", ["resnet18", "five_classes", "not_a_state_dict"])
def test_wrong_architecture_or_classes_is_a_clear_error(tmp_path, kind):
    if kind == "resnet18":
        state = torchvision.models.resnet18(num_classes=10).state_dict()
    elif kind == "five_classes":
        state = torchvision.models.resnet50(num_classes=5).state_dict()
    else:
        state = {"epoch": 3}
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(common.UserError) as error:
        common.build_model(str(tmp_path / "other.pth"))
    assert "\n" not in str(error.value)


def test_dropout_keeps_torchvision_key_names():
    plain, with_dropout = common.build_model("none"), common.build_model("none", dropout=0.3)
    assert plain.state_dict().keys() == with_dropout.state_dict().keys()
    with_dropout.train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    a = with_dropout(x)
    torch.manual_seed(1)
    assert not torch.equal(a, with_dropout(x))  # dropout is active in training mode


class CtrlCAlreadyPressed:
    """StopOnInterrupt as it is after a Ctrl-C that came during the first step."""

    def __init__(self, enabled=True):
        self.requested = True


def tiny_flags(level, subset, out, data_dir, head_epochs=1):
    """A run of `level` with `head_epochs` + 1 epochs and subset / 16 steps per epoch."""
    return ["--weights", "none", "--img-size", "32", "--subset", str(subset), "--eval-subset", "16",
            "--batch-size", "16", "-j", "0", "--head-epochs", str(head_epochs), "--epochs", "1",
            *(["--final-epochs", "0"] if level in ("level3", "level4") else []),
            *(["--swa-epochs", "0"] if level == "level4" else []),
            "--data-dir", str(data_dir), "--checkpoint-dir", str(out), "--results-dir", str(out)]


@pytest.mark.parametrize("level", ["level1", "level2", "level3", "level4"])
def test_ctrl_c_in_an_epochs_last_step_finishes_and_saves_that_epoch(level, tmp_path, synthetic_root, monkeypatch):
    """One-step epochs: the step Ctrl-C lands in is the epoch's last, so the epoch is validated and saved as
    complete (epoch 1, step 0) - not saved as 'epoch 0 + all its steps', which resumed into an empty epoch."""
    import importlib

    from conftest import run_cli
    module = importlib.import_module(level)
    monkeypatch.setattr(common, "StopOnInterrupt", CtrlCAlreadyPressed)
    flags = tiny_flags(level, 16, tmp_path, synthetic_root)
    result = run_cli(module, *flags)
    assert result.returncode == 130, result.stderr
    last = common.load_checkpoint(tmp_path / f"{level}_last.pth", level)
    assert (last["epoch"], last["step_in_epoch"]) == (1, 0)
    assert [row["steps"] for row in last["history"]] == [1]
    assert (tmp_path / f"{level}_best.pth").is_file()
    assert f"interrupted: saved {tmp_path / f'{level}_last.pth'}; continue with --resume" in result.stdout
    assert "training is complete" not in result.stdout
    # The same in the last epoch: training is then complete, and the message says resume only evaluates.
    result = run_cli(module, *flags, "--resume", tmp_path / f"{level}_last.pth")
    assert result.returncode == 130, result.stderr
    assert "(training is complete: it only runs the final evaluation)" in result.stdout
    assert common.load_checkpoint(tmp_path / f"{level}_last.pth", level)["epoch"] == 2


@pytest.mark.parametrize("level", ["level1", "level2", "level3", "level4"])
def test_resume_from_the_middle_of_an_epoch_is_exact(level, tmp_path, synthetic_root, monkeypatch):
    """Three-step epochs, Ctrl-C after the first step of the first one, then --resume: the same weights and
    optimiser state as a straight run (the LR schedule must not be computed from the shortened epoch)."""
    import importlib

    from conftest import run_cli
    module = importlib.import_module(level)
    straight = run_cli(module, *tiny_flags(level, 48, tmp_path / "a", synthetic_root, 0))
    assert straight.returncode == 0, straight.stderr
    with monkeypatch.context() as patch:
        patch.setattr(common, "StopOnInterrupt", CtrlCAlreadyPressed)
        interrupted = run_cli(module, *tiny_flags(level, 48, tmp_path / "b", synthetic_root, 0))
    assert interrupted.returncode == 130, interrupted.stderr
    last = tmp_path / "b" / f"{level}_last.pth"
    saved = common.load_checkpoint(last, level)
    assert (saved["epoch"], saved["step_in_epoch"]) == (0, 1)
    resumed = run_cli(module, *tiny_flags(level, 48, tmp_path / "b", synthetic_root, 0), "--resume", last)
    assert resumed.returncode == 0, resumed.stderr
    a = common.load_checkpoint(tmp_path / "a" / f"{level}_last.pth", level)
    b = common.load_checkpoint(last, level)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][index]["exp_avg"]), index
    assert [row["lr"] for row in a["history"]] == [row["lr"] for row in b["history"]]


def test_restore_scaler_accepts_states_without_loss_scaling():
    """A bf16/fp32 run saves {} (disabled scaler), an older checkpoint no key: an fp16 scaler starts afresh."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for checkpoint in ({}, {"scaler": {}}):
        common.restore_scaler(scaler, checkpoint)
        assert scaler.get_scale() == 2.0**16
    saved = torch.amp.GradScaler("cpu", init_scale=8.0).state_dict()
    common.restore_scaler(scaler, {"scaler": saved})
    assert scaler.get_scale() == 8.0


def test_resume_names_the_flags_that_differ_from_the_saved_run(tmp_path, capsys):
    from types import SimpleNamespace
    model = common.build_model("none")
    saved_args = {"lr": 1e-4, "epochs": 10, "seed": 0, "subset": None, "batch_size": 128, "quick": False,
                  "workers": 4, "resume": None, "img_size": 224, "weights": "imagenet"}
    common.save_checkpoint(tmp_path / "level2_last.pth", {
        "level": "level2", "model": model.state_dict(), "epoch": 3, "step_in_epoch": 0, "rng": common.rng_state(),
        "args": saved_args})
    # Only flags that change nothing differ (the checkpoint's weights replace --weights).
    same = SimpleNamespace(**{**saved_args, "workers": 8, "resume": "x.pth", "weights": "none"})
    common.resume_from(tmp_path / "level2_last.pth", "level2", model, same)
    assert "warning" not in capsys.readouterr().out
    longer = SimpleNamespace(**{**saved_args, "epochs": 20, "lr": 3e-4})
    common.resume_from(tmp_path / "level2_last.pth", "level2", model, longer)
    warning = capsys.readouterr().out.splitlines()[-1]
    assert warning.startswith("warning: flags differ from the run that saved it")
    assert "--epochs: 20 (was 10), --lr: 0.0003 (was 0.0001)" in warning
    # The split and the position in the epoch depend on these: refused, before anything is loaded.
    for name, value in (("seed", 1), ("subset", 5000), ("batch_size", 256), ("quick", True)):
        with pytest.raises(common.UserError, match=f"--{name.replace('_', '-')} {saved_args[name]} "
                                                   rf"\(this run: {value}\)"):
            common.resume_from(tmp_path / "level2_last.pth", "level2", model,
                               SimpleNamespace(**{**saved_args, name: value}))
