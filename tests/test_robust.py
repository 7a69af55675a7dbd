"""Nothing lost, nothing stuck, every error one line, round three (issue 19): results never replaced by another run,
SIGTERM and Ctrl-C with workers, stale locks, full and read-only disks, checkpoints of torchvision's and timm's
train.py, one message per condition. Test names carry the issue's point number; almost all call functions or
`run_cli`: two subprocess runs check the signals as a user meets them."""
import argparse
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from conftest import ROOT, TINY, assert_one_line_error, level_args, run_cli

import common
import evaluate
import level1
import level3
import level4
from support import files, records, run
from support.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def state_dict():
    """A random 10-class ResNet-50's weights, as a CIFAR-10 checkpoint of any trainer holds them."""
    torch.manual_seed(0)
    return common.build_model("none").state_dict()


@pytest.fixture
def fast_plots(monkeypatch):
    """evaluate.py's confusion plot replaced by an empty file (matplotlib is not what these tests check)."""
    monkeypatch.setattr(evaluate, "plot_confusion", lambda cm, path, title: Path(path).write_bytes(b""))


def fake_script(main):
    """run_cli's view of a script whose main is `main` and which takes no flags."""
    return SimpleNamespace(__file__="fake.py", main=main, get_args_parser=argparse.ArgumentParser,
                           validate_args=lambda args: None)


def evaluate_cli(checkpoint, data_root, out, *extra):
    return run_cli(evaluate, checkpoint, "--data-dir", data_root, "--device", "cpu", "--out", out, "--subset", 10,
                   "--img-size", 32, *extra)


# ---- 1. A run never replaces another run's results -----------------------------------------------------------------

def test_1_results_of_another_run_are_kept_unless_overwrite(tmp_path):
    """results/level1.json of run A: a run in B is refused (one line naming the file and --overwrite), and so is a
    --resume of B; a --resume of A is let in, and --overwrite lets B in."""
    results, runs = tmp_path / "results", {"A": tmp_path / "A", "B": tmp_path / "B"}
    results.mkdir()
    for name, folder in runs.items():
        folder.mkdir()
        history = [{"epoch": 1, "train_loss": 2.0 if name == "A" else 2.5}]
        torch.save({"level": "level1", "optimizer": {}, "history": history}, folder / "level1_last.pth")
    (results / "level1.json").write_text(json.dumps({"history": [{"epoch": 1, "train_loss": 2.0}]}))
    with pytest.raises(UserError, match="level1.json holds the results of another run.*--overwrite"):
        files.start_run("level1", tmp_path / "C", results)
    with pytest.raises(UserError, match="level1.json holds the results of another run"):
        files.start_run("level1", runs["B"], results, resume=str(runs["B"] / "level1_last.pth"))
    files.start_run("level1", runs["A"], results, resume=str(runs["A"] / "level1_last.pth"))
    files.start_run("level1", tmp_path / "D", results, overwrite=True)


def test_1_evaluate_names_outputs_by_checkpoint_and_keeps_another_checkpoints_file(tmp_path, state_dict,
                                                                                 synthetic_root, fast_plots):
    """run1/level1_best.pth and run2/level1_best.pth into one --out: two files. a/run1/x.pth and b/run1/x.pth share
    a name: the second is refused (one line, before any work) unless --overwrite; --images names its files too."""
    paths = [tmp_path / folder / "level1_best.pth" for folder in ("run1", "run2", "b/run1")]
    for path in paths:
        path.parent.mkdir(parents=True)
        torch.save({"model": state_dict, "args": {"img_size": 32}}, path)
    out = tmp_path / "out"
    for path in paths[:2]:
        assert evaluate_cli(path, synthetic_root, out).returncode == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["eval_run1-level1_best_test.json",
                                                         "eval_run2-level1_best_test.json"]
    before = (out / "eval_run1-level1_best_test.json").read_text()
    assert_one_line_error(evaluate_cli(paths[2], synthetic_root, out), "eval_run1-level1_best_test.json",
                          str(paths[0]), "--overwrite")
    assert (out / "eval_run1-level1_best_test.json").read_text() == before
    assert evaluate_cli(paths[2], synthetic_root, out, "--overwrite").returncode == 0
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    result = run_cli(evaluate, paths[1], "--images", tmp_path / "cat.png", "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert (out / "predictions_run2-level1_best.json").is_file() and not (out / "predictions.json").exists()


# ---- 2. 16-bit images ----------------------------------------------------------------------------------------------

def test_2_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    """A 0..65535 ramp in a 16-bit greyscale PNG becomes the 0..255 ramp (value / 257), not 0, 255, 255, ..."""
    from PIL import Image
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    image = evaluate.load_as_cifar(tmp_path / "ramp16.png")
    expected = np.tile((ramp / 257).round(), (3, 1, 1))
    assert image.dtype == np.uint8 and np.abs(image.astype(float) - expected).max() <= 1


# ---- 3. and 16. --resume with other flags: one line naming the flag, its saved and its given value ------------------

def saved_run(module, folder, data_root, *changed):
    """A levelN_last.pth and _best.pth in `folder`, saved with a tiny run's flags (no weights: the flag checks come
    first); returns the parsed arguments of a --resume of it with the `changed` flags."""
    saved = vars(level_args(module, folder, data_root))
    checkpoint = {"level": module.LEVEL, "optimizer": {}, "model": {}, "args": saved}
    torch.save(checkpoint, folder / f"{module.LEVEL}_last.pth")
    torch.save(checkpoint, folder / f"{module.LEVEL}_best.pth")
    return level_args(module, folder, data_root, "--resume", folder / f"{module.LEVEL}_last.pth", *changed)


@pytest.mark.parametrize("module, changed, fragment", [
    (level3, ["--epochs", "2"], "--epochs was 1 in the saved run, 2 now"),
    (level3, ["--final-epochs", "3"], "--final-epochs was 1 in the saved run, 3 now"),
    (level1, ["--seed", "7"], "--seed was 0 in the saved run, 7 now"),
    (level1, ["--wd", "0.1"], "--weight-decay was 0.05 in the saved run, 0.1 now")])
def test_3_16_resume_with_another_schedule_or_split_names_the_flag(module, changed, fragment, tmp_path, data_root):
    args = saved_run(module, tmp_path, data_root, *changed)
    with pytest.raises(UserError, match=fragment):
        files.check_resume(files.load_checkpoint(args.resume, module.LEVEL), args, module.RESUME_FLAGS)


def test_3_16_level_resume_refuses_a_longer_schedule_before_loading_weights(tmp_path, data_root):
    """files.resume itself (model and optimiser not needed: the check comes first)."""
    args = saved_run(level3, tmp_path, data_root, "--epochs", "2")
    with pytest.raises(UserError, match="--epochs was 1"):
        files.resume(args, level3.LEVEL, level3.RESUME_FLAGS, None, None, None, {})


def test_3_level1_extends_with_a_longer_epochs(tmp_path, data_root):
    """Level 1's LR is constant per stage: a longer --epochs extends the run, as the README says."""
    args = saved_run(level1, tmp_path, data_root, "--epochs", "3")
    files.check_resume(files.load_checkpoint(args.resume, "level1"), args, level1.RESUME_FLAGS)


# ---- 4. A stored temperature that is no temperature ----------------------------------------------------------------

@pytest.mark.parametrize("stored", [float("nan"), -2.0, 0.0])
def test_4_nan_or_negative_stored_temperature_is_not_applied(stored, capsys):
    args = argparse.Namespace(no_temperature=False, tta_average="softmax")
    assert evaluate.choose_temperature({"temperature": stored}, args, None) == 1.0
    assert "not applied" in capsys.readouterr().out


# ---- 5. and 6. Signals and locks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, workers, group", [(signal.SIGTERM, 0, False), (signal.SIGINT, 1, True)])
def test_5_6_sigterm_and_ctrl_c_stop_cleanly(sig, workers, group, tmp_path, synthetic_root):
    """A run in a subprocess, stopped in its second epoch: SIGTERM to the process (a preemption), or SIGINT to the
    whole process group with a DataLoader worker (Ctrl-C in a terminal). One line naming the signal, no traceback
    (none from the worker), exit 128 + signal, the lock released, levelN_last.pth intact."""
    flags = [*TINY, "--subset", 32, "--eval-subset", 16, "--epochs", 100, "-j", workers, "--data-dir", synthetic_root,
             "--checkpoint-dir", tmp_path, "--results-dir", tmp_path]
    process = subprocess.Popen([sys.executable, "level1.py", *map(str, flags)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    while not any(line.startswith("epoch 1/") for line in lines) and process.poll() is None:
        lines.append(process.stdout.readline())
    time.sleep(0.3)
    os.killpg(process.pid, sig) if group else process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + sig, (process.returncode, "".join(lines) + stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    err = [line for line in stderr.splitlines() if line.strip()]
    assert len(err) == 1 and signal.Signals(sig).name in err[0] and "interrupted" in err[0], stderr
    assert not (tmp_path / "level1.lock").exists()
    assert files.load_checkpoint(tmp_path / "level1_last.pth", "level1")["epoch"] >= 1


def test_5_lock_of_another_host_says_to_delete_it(tmp_path):
    lock = tmp_path / "level1.lock"
    lock.write_text("4242 some-other-host\n")
    with pytest.raises(UserError, match=f"held by process 4242 on some-other-host.*delete {lock}"):
        files.start_run("level1", tmp_path, tmp_path)
    assert lock.read_text() == "4242 some-other-host\n"


@pytest.mark.parametrize("content", [f"999999 {socket.gethostname()}\n", "", "garbage"])
def test_5_lock_content_is_parsed_robustly(content, tmp_path, capsys):
    """A dead process's lock with a trailing newline, an empty lock, a damaged one: taken over with one warning."""
    lock = tmp_path / "level1.lock"
    lock.write_text(content)
    files.start_run("level1", tmp_path, tmp_path)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no longer runs" in warnings[0] and "process ," not in warnings[0]
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}"


def test_6_dataloader_workers_ignore_sigint():
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        run.worker_init(0)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def test_6_a_worker_ending_during_an_interrupt_is_part_of_it():
    """DataLoader's "worker exited unexpectedly" after a Ctrl-C: the interrupt's line and exit code 130."""
    def main(args):
        run._STOP["signal"] = signal.SIGINT
        raise RuntimeError("DataLoader worker (pid(s) 1234) exited unexpectedly")
    result = run_cli(fake_script(main))
    assert result.returncode == 130 and "SIGINT: interrupted" in result.stderr and "Traceback" not in result.stderr


# ---- 7.-10. Full and read-only disks -------------------------------------------------------------------------------

def test_7_disk_full_while_saving_is_one_line_and_keeps_the_file(tmp_path, monkeypatch):
    path = tmp_path / "level1_last.pth"
    files.save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    before = path.read_bytes()
    monkeypatch.setattr(files.os, "fsync", enospc)
    result = run_cli(fake_script(lambda args: files.save_checkpoint(path, {"model": {"w": torch.zeros(3)}})))
    assert_one_line_error(result, f"cannot write {path}", "No space left on device")
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_7_earlier_run_message_names_only_files_that_are_there(tmp_path):
    """A run that saved level1_best.pth but no level1_last.pth (disk full): no --resume of a missing file."""
    (tmp_path / "level1_best.pth").write_bytes(b"x")
    with pytest.raises(UserError, match="holds an earlier level1 run") as error:
        files.start_run("level1", tmp_path, tmp_path)
    assert "--resume" not in str(error.value) and "--overwrite" in str(error.value)


def test_8_full_disk_is_found_at_start(tmp_path, monkeypatch):
    """start_run writes a probe: a full disk is one line before any data is read, and no lock is left."""
    monkeypatch.setattr(files.os, "fsync", enospc)
    result = run_cli(level1, *TINY, "--data-dir", tmp_path / "nodata", "--checkpoint-dir", tmp_path / "ck",
                     "--results-dir", tmp_path / "res")
    assert_one_line_error(result, "--checkpoint-dir", "No space left on device")
    assert not list(tmp_path.rglob("*.lock"))


def test_8_results_that_cannot_be_written_say_how_to_get_them_back(tmp_path, monkeypatch):
    """At the end of a run: the line names --resume of the run's levelN_last.pth, which measures again."""
    files.start_run("level1", tmp_path, tmp_path)
    (tmp_path / "level1_last.pth").write_bytes(b"x")
    monkeypatch.setattr(files.os, "fsync", enospc)
    with pytest.raises(UserError, match=f"cannot write .*level1.json.*--resume {tmp_path / 'level1_last.pth'}"):
        records.write_json(tmp_path / "level1.json", {"test": 1})


def test_9_full_disk_while_taking_the_lock_leaves_no_empty_lock(tmp_path, monkeypatch):
    real_open = open

    def open_then_full(path, mode="r", *args, **kwargs):  # the file is made, writing it fails
        real_open(path, mode, *args, **kwargs).close()
        enospc()
    monkeypatch.setattr(files, "open", open_then_full, raising=False)
    with pytest.raises(UserError, match="No space left"):
        files._take_lock(tmp_path / "level1.lock")
    assert not (tmp_path / "level1.lock").exists()


def test_9_lock_removal_on_a_read_only_folder_is_silent(tmp_path, monkeypatch):
    """The exit-time removal of the lock in a folder turned read-only: no second traceback."""
    lock = tmp_path / "level1.lock"
    lock.write_text("1 host")
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: enospc())
    files._release_lock(lock, "1 host")


def test_10_evaluate_out_that_is_a_file_fails_before_the_work(tmp_path, state_dict, synthetic_root, monkeypatch):
    path = tmp_path / "run" / "best.pth"
    path.parent.mkdir()
    torch.save(state_dict, path)
    (tmp_path / "out").write_text("a file")
    monkeypatch.setattr(common, "cifar10_datasets", lambda *args, **kwargs: pytest.fail("the work started"))
    assert_one_line_error(evaluate_cli(path, synthetic_root, tmp_path / "out"), "--out", str(tmp_path / "out"))


def test_10_summary_into_a_full_folder_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "level1.json").write_text(json.dumps({"test": {"acc1": 0.5, "ece": 0.1}, "history": [{}],
                                                      "seconds": 1.0, "device": "cpu", "commit": "abc"}))
    monkeypatch.setattr(files.os, "fsync", enospc)
    assert_one_line_error(run_cli(level4, "--summary", "--results-dir", tmp_path), "--results-dir", "No space left")
    assert not (tmp_path / "summary.md").exists()


# ---- 11. --seed range ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_11_seed_out_of_range_is_one_line(seed, tmp_path):
    result = run_cli(level1, *TINY, "--seed", seed, "--data-dir", tmp_path, "--checkpoint-dir", tmp_path)
    assert_one_line_error(result, "--seed", seed)


# ---- 12. Under torchrun, rank 0's error stops every rank ----------------------------------------------------------

def test_12_rank_zeros_error_reaches_every_rank(tmp_path, monkeypatch, capsys):
    """Rank 0 finds an earlier run: it raises the one line and sends it to the other ranks, which exit 2 silently
    (torch.distributed.broadcast_object_list replaced by its effect: rank 0's list arrives at every rank)."""
    sent = []
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objects: sent.append(list(objects)))
    (tmp_path / "level1_last.pth").write_bytes(b"x")
    args = argparse.Namespace(checkpoint_dir=tmp_path, results_dir=tmp_path, resume=None, overwrite=False)
    with pytest.raises(UserError, match="holds an earlier level1 run"):
        run._start_ranks("level1", args, 0, 2)
    assert len(sent) == 1 and "holds an earlier level1 run" in sent[0][0]
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objects: objects.__setitem__(0, sent[0][0]))
    with pytest.raises(SystemExit) as exit_:
        run._start_ranks("level1", args, 1, 2)
    assert exit_.value.code == 2 and capsys.readouterr().err == ""


# ---- 13.-15. Hand-made checkpoints, torchvision's and timm's ---------------------------------------------------------

def test_13_hand_made_checkpoints_without_args_or_with_an_unknown_tta_set(tmp_path, state_dict, synthetic_root,
                                                                         fast_plots):
    path = tmp_path / "run" / "hand.pth"
    path.parent.mkdir()
    torch.save({"model": state_dict, "args": None}, path)
    assert evaluate_cli(path, synthetic_root, tmp_path / "out").returncode == 0
    torch.save({"model": state_dict, "args": {"tta_set": "rotate"}}, path)
    assert_one_line_error(evaluate_cli(path, synthetic_root, tmp_path / "out", "--tta"), "'rotate'", "--tta")


def test_14_torchvision_train_py_checkpoint_loads(tmp_path, state_dict, synthetic_root, fast_plots):
    """torchvision's references/classification/train.py: model, optimizer, lr_scheduler, epoch, args (a Namespace)."""
    path = tmp_path / "tv" / "checkpoint.pth"
    path.parent.mkdir()
    torch.save({"model": state_dict, "optimizer": {}, "lr_scheduler": {}, "epoch": 3,
                "args": argparse.Namespace(lr=0.1, epochs=90, output_dir="out")}, path)
    assert files.load_checkpoint(path)["args"] == {"lr": 0.1, "epochs": 90, "output_dir": "out"}
    result = evaluate_cli(path, synthetic_root, tmp_path / "out")
    assert result.returncode == 0, result.stderr


class _Trusted:
    """A class weights_only loading does not know."""


def test_14_other_globals_are_named_with_how_to_convert(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {}, "extra": _Trusted()}, path)
    with pytest.raises(UserError, match="_Trusted.*could run code.*weights_only=False"):
        files.load_checkpoint(path)


def test_15_timm_state_dict_layout_evaluates(tmp_path, state_dict, synthetic_root, fast_plots):
    """timm's train.py: {"epoch", "arch", "state_dict", "optimizer", "args": Namespace(img_size=None, ...)}."""
    path = tmp_path / "timm" / "model_best.pth.tar"
    path.parent.mkdir()
    torch.save({"epoch": 9, "arch": "resnet50", "state_dict": state_dict, "optimizer": {},
                "args": argparse.Namespace(img_size=None, seed=42)}, path)
    result = evaluate_cli(path, synthetic_root, tmp_path / "out")
    assert result.returncode == 0, result.stderr


# ---- 16. One message per condition ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragment, absent", [
    (["--ablate-rows", "no_ema"], "--ablate-rows needs --ablate", "--resume"),
    (["--ablate", "--ablate-sizes", "16"], "--ablate-sizes must be >= 32 (got 16)", "img_size_16"),
    (["--ablate", "--ablate-rows", "no_such"], "unknown --ablate-rows no_such", "--resume")])
def test_16_ablation_checks_each_say_what_failed(flags, fragment, absent, tmp_path):
    line = assert_one_line_error(run_cli(level4, *flags, "--results-dir", tmp_path), fragment)
    assert absent not in line


def test_16_sync_bn_on_the_cpu_names_only_sync_bn(tmp_path):
    result = run_cli(level1, *TINY, "--sync-bn", "--device", "cpu", "--data-dir", tmp_path, "--checkpoint-dir",
                     tmp_path, "--results-dir", tmp_path)
    assert "--batch-size" not in assert_one_line_error(result, "--sync-bn")


# ---- 17. A missing best checkpoint is found at resume --------------------------------------------------------------

def test_17_resume_without_the_best_checkpoint_fails_at_once(tmp_path, data_root):
    args = saved_run(level1, tmp_path, data_root)
    (tmp_path / "level1_best.pth").unlink()
    with pytest.raises(UserError, match="level1_best.pth is missing"):
        files.resume(args, level1.LEVEL, level1.RESUME_FLAGS, None, None, None)


# ---- 18. --data-dir given as the cifar-10-batches-py folder --------------------------------------------------------

def test_18_data_dir_may_be_the_batches_folder_itself(synthetic_root, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *args, **kwargs: pytest.fail("download tried"))
    train, _, test = common.cifar10_datasets(synthetic_root / "cifar-10-batches-py", 0, subset=8, eval_subset=8)
    assert len(train) == len(test) == 8


# ---- 19. The commit of the project, not of an enclosing repository -------------------------------------------------

def test_19_commit_of_an_enclosing_repository_is_not_recorded(tmp_path, monkeypatch):
    outer = tmp_path / "outer"
    (outer / "project").mkdir(parents=True)
    git = ["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "outer"], check=True)
    monkeypatch.setattr(records, "ROOT", outer / "project")
    assert records.run_info(torch.device("cpu"))["commit"] == "unknown"
    monkeypatch.setattr(records, "ROOT", outer)  # the repository's own folder: its commit
    assert records.run_info(torch.device("cpu"))["commit"] not in ("", "unknown")


def test_12_a_rank_whose_rank_zero_stopped_mid_run_exits_2_without_a_traceback(monkeypatch, capsys):
    """Later in a run (a nan loss on rank 0's validation, say): rank 0 prints its line and exits; the others, waiting
    at a barrier, get a DistBackendError from gloo/NCCL: they exit 2 silently. Rank 0's own such error is not hidden."""
    def main(args):
        raise torch.distributed.DistBackendError("Connection closed by peer [127.0.0.1]:29500")
    parser = argparse.ArgumentParser()
    monkeypatch.setattr(sys, "argv", ["level1.py"])
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_:
        run.run_main(main, parser, lambda args: None)
    assert exit_.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(torch.distributed.DistBackendError):
        run.run_main(main, parser, lambda args: None)
