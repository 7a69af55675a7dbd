"""Nothing lost, nothing stuck, every error one line, round three (issue 19): results never replaced by another run,
SIGTERM and Ctrl-C with workers, stale locks, full and read-only disks, checkpoints of torchvision's and timm's
train.py, one message per condition; round four (issue 27, tests named test_27_POINT_...): results replaced on resume
and compare, kills between two writes, named pipes and absurd sizes, a dozen tracebacks. Test names carry the issue's
point number; almost all call functions or `run_cli`: a few subprocesses check signals, kills and hangs as a user
meets them."""
import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from conftest import ROOT, TINY, TINY_LEVEL, assert_one_line_error, level_args, run_cli, summary_table

import common
import evaluate
import level1
import level2
import level3
import level4
from support import files, inputs, records, run
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
    at a barrier, get a DistBackendError from gloo/NCCL: they exit 2 silently. Rank 0, whose peer is gone (issue 27
    point 13, the mirror case), says so in one line; its other errors are not hidden."""
    def main(args):
        raise torch.distributed.DistBackendError("Connection closed by peer [127.0.0.1]:29500")
    parser = argparse.ArgumentParser()
    monkeypatch.setattr(sys, "argv", ["level1.py"])
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_:
        run.run_main(main, parser, lambda args: None)
    assert exit_.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_:
        run.run_main(main, parser, lambda args: None)
    assert exit_.value.code == 2 and "another process of this run stopped" in capsys.readouterr().err

    def bug(args):
        raise torch.distributed.DistBackendError("NCCL error: invalid usage")
    with pytest.raises(torch.distributed.DistBackendError):
        run.run_main(bug, parser, lambda args: None)


def test_a_sigterm_while_the_runner_reads_an_error_is_one_line(monkeypatch, capsys):
    """torchrun's SIGTERM reaches rank 1 just as it reads the error of its lost peer (seen in CI: DDP's broadcast
    lost rank 0, the SIGTERM came inside the handler): the stop's one line and 143, not a KeyboardInterrupt
    traceback."""
    def main(args):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:25789")

    def lost_peer_as_torchrun_stops_us(text):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at once to run_main's handler, which raises
        return True
    monkeypatch.setattr(run, "_lost_peer", lost_peer_as_torchrun_stops_us)
    monkeypatch.setattr(sys, "argv", ["level1.py"])
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(BaseException) as exit_:  # a KeyboardInterrupt escaping would stop the suite, not fail here
        run.run_main(main, argparse.ArgumentParser(), lambda args: None)
    assert exit_.type is SystemExit and exit_.value.code == 128 + signal.SIGTERM
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("SIGTERM: interrupted")


# ==== Round four (issue 27): the writer under repeated signals, results replaced, hangs, tracebacks, messages =========
# The signal cases run in subprocesses in tests/test_writer.py (point 1) and tests/test_distributed.py (point 13).

def saved_files(folder):
    """{name: fingerprint} of every file in `folder` but the lock: what a refused command must leave as it was."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) for path in folder.iterdir()
            if path.suffix != ".lock"}


def refused_before_the_work(module, monkeypatch):
    """`module.main` replaced by a stand-in that fails with "the work started": a flag that should be refused at
    parse time fails the test at once, rather than hanging it (a --randaug-n of 1e12 never ends an epoch)."""
    def started(args):
        raise UserError("the work started")
    monkeypatch.setattr(module, "main", started)


def test_27_2_a_finished_run_resumed_at_another_img_size_is_refused_and_kept(tmp_path, data_root):
    """A finished 32-px Level 4 run resumed with --img-size 64: one line naming the flag (RESUME_FLAGS), exit 2, and
    level4.json and level4_best.pth as they were (before, the final test was measured again at 64 px)."""
    history = [{"epoch": 1, "train_loss": 2.0}]
    saved = {"level": "level4", "optimizer": {}, "model": {}, "epoch": 3, "best_acc": 0.5, "history": history,
             "args": vars(level_args(level4, tmp_path, data_root))}
    torch.save(saved, tmp_path / "level4_last.pth")
    torch.save(saved, tmp_path / "level4_best.pth")
    (tmp_path / "level4.json").write_text(json.dumps({"history": history}))
    before = saved_files(tmp_path)
    result = run_cli(level4, *TINY, *TINY_LEVEL[4], "--data-dir", data_root, "--checkpoint-dir", tmp_path,
                     "--results-dir", tmp_path, "--resume", tmp_path / "level4_last.pth", "--img-size", 64)
    assert_one_line_error(result, "--img-size was 32 in the saved run, 64 now")
    assert saved_files(tmp_path) == before


def test_27_3_20_compare_keeps_another_pairs_file_and_removes_its_old_temp_files(tmp_path, state_dict,
                                                                               synthetic_root, monkeypatch):
    """x/level1_best.pth --compare y/level4_best.pth, then z/level1_best.pth --compare w/level4_best.pth: the same
    file name; the second is refused before the work (one line naming the first pair and --overwrite) and the first
    pair's JSON kept. A compare removes the temp files a killed write of its JSON left (older than a minute)."""
    monkeypatch.setattr(evaluate, "plot_disagreements", lambda *args: Path(args[3]).write_bytes(b""))
    torch.save({"model": state_dict, "args": {"img_size": 32}}, tmp_path / "weights.pth")
    paths = {}
    for folder, name in (("x", "level1_best"), ("y", "level4_best"), ("z", "level1_best"), ("w", "level4_best")):
        (tmp_path / folder).mkdir()
        paths[folder] = tmp_path / folder / f"{name}.pth"
        os.link(tmp_path / "weights.pth", paths[folder])
    out = tmp_path / "out"
    out.mkdir()
    old, fresh = (out / f".compare_level1_best_vs_level4_best_test.json.{key}.tmp" for key in ("killed", "inflight"))
    old.write_bytes(b"x" * 2**20)
    fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 120, time.time() - 120))
    flags = ["--data-dir", synthetic_root, "--device", "cpu", "--subset", 16, "--resamples", 100, "--out", out]
    first = run_cli(evaluate, paths["x"], "--compare", paths["y"], *flags)
    assert first.returncode == 0, first.stderr
    assert "removed 1 temp files of interrupted saves" in first.stdout and not old.exists() and fresh.exists()
    written = out / "compare_level1_best_vs_level4_best_test.json"
    before = written.read_bytes()
    second = run_cli(evaluate, paths["z"], "--compare", paths["w"], *flags)
    assert_one_line_error(second, str(written), f"{paths['x']} vs {paths['y']}", "--overwrite")
    assert written.read_bytes() == before


def test_27_3b_corruption_results_are_named_by_their_source(tmp_path):
    """--corruptions generated and --corruptions DIR (the official .npy files) write two files, not one over the
    other; a DIR without .npy files is measured on generated corruptions, and named so."""
    args = argparse.Namespace(checkpoint=str(tmp_path / "run" / "level4_best.pth"), split="test", images=None,
                              bn_stats="checkpoint", out=str(tmp_path / "out"), overwrite=False,
                              corruptions="generated")
    assert inputs.output_path(args, None).name == "eval_run-level4_best_corruptions.json"
    (tmp_path / "empty").mkdir()
    args.corruptions = str(tmp_path / "empty")
    assert inputs.output_path(args, None).name == "eval_run-level4_best_corruptions.json"
    (tmp_path / "official" / "CIFAR-10-C").mkdir(parents=True)
    np.save(tmp_path / "official" / "CIFAR-10-C" / "fog.npy", np.zeros(5, dtype=np.uint8))
    args.corruptions = str(tmp_path / "official")
    assert inputs.output_path(args, "flip").name == "eval_run-level4_best_corruptions-official_tta-flip.json"


KILLED_BETWEEN_BEST_AND_LAST = """
import sys, time
import evaluate, level1
from support import files, run
scores, loss_and_accuracy, save_checkpoint = [], evaluate.loss_and_accuracy, files.save_checkpoint

def improving(*args):  # each epoch validates better than the one before: epoch 2 writes level1_best.pth
    scores.append(0.1 * (len(scores) + 1))
    return loss_and_accuracy(*args)[0], scores[-1]

def killed_after_best(path, checkpoint):  # the process is killed between the two renames of epoch 2
    save_checkpoint(path, checkpoint)
    if path.name == "level1_best.pth" and checkpoint["epoch"] == 2:
        print("best written", flush=True)
        time.sleep(120)

evaluate.loss_and_accuracy, files.save_checkpoint = improving, killed_after_best
sys.argv = ["level1.py", *sys.argv[1:]]
run.run_main(level1.main, level1.get_args_parser(), level1.validate_args)
"""


def test_27_4_a_resume_after_a_kill_between_best_and_last_measures_what_the_history_describes(tmp_path, data_root,
                                                                                            monkeypatch):
    """Killed (-9) after epoch 2's level1_best.pth, before its level1_last.pth: the resumed run trains epoch 2 again,
    with other weights, which validate worse than epoch 1 did. The killed session's best.pth must not survive: the
    final test measures the weights of the epoch 2 that the history holds (support.files._best_acc)."""
    flags = [*TINY, "--subset", 32, "--data-dir", data_root, "--checkpoint-dir", tmp_path, "--results-dir", tmp_path]
    child = subprocess.Popen([sys.executable, "-c", KILLED_BETWEEN_BEST_AND_LAST, *map(str, flags)], cwd=ROOT,
                             text=True, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        while child.poll() is None and child.stdout.readline().strip() != "best written":
            pass
        assert child.poll() is None, "the child ended before epoch 2's level1_best.pth"
    finally:
        child.kill()
        child.wait(30)
    killed_best = files.load_checkpoint(tmp_path / "level1_best.pth")
    assert killed_best["epoch"] == 2 and files.load_checkpoint(tmp_path / "level1_last.pth")["epoch"] == 1
    loss_and_accuracy = evaluate.loss_and_accuracy
    monkeypatch.setattr(evaluate, "loss_and_accuracy", lambda *args: (loss_and_accuracy(*args)[0], 0.0))
    result = run_cli(level1, *flags, "--resume", tmp_path / "level1_last.pth")
    assert result.returncode == 0, result.stderr
    assert "epoch 2 runs again and replaces it" in result.stdout
    history = json.loads((tmp_path / "level1.json").read_text())["history"]
    best = files.load_checkpoint(tmp_path / "level1_best.pth")
    assert best["epoch"] == 2 and best["history"][-1]["session_started"] == history[1]["session_started"]
    assert best["history"][-1]["session_started"] != killed_best["history"][-1]["session_started"]


def test_27_4b_swa_every_longer_than_the_swa_phase_is_refused(tmp_path):
    result = run_cli(level4, *TINY, "--swa-epochs", 1, "--swa-every", 1000, "--data-dir", tmp_path,
                     "--checkpoint-dir", tmp_path / "ck", "--results-dir", tmp_path / "res")
    assert_one_line_error(result, "--swa-every 1000", "SWA phase has (4:", "never average")
    assert not (tmp_path / "ck").exists()


@contextlib.contextmanager
def unblocked_after(fifo, seconds=5):
    """The test of a named pipe bounded in time: a reader the code under test left blocked on `fifo` is released
    after `seconds` (its writer opens and closes the pipe: the reader gets an empty file), so that a hang fails the
    test instead of stopping the suite."""
    def release():
        with contextlib.suppress(OSError):  # ENXIO: nobody is reading it, nothing to release
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    timer = threading.Timer(seconds, release)
    timer.start()
    started = time.time()
    try:
        yield
    finally:
        timer.cancel()
    assert time.time() - started < seconds, f"blocked on {fifo}"


def test_27_5_11_named_pipes_as_a_batch_a_lock_or_among_images_do_not_hang(tmp_path):
    """open() of a named pipe waits for a writer for ever: a FIFO as data_batch_2 or as level1.lock is one line, one
    in an --images folder is skipped with a line (each bounded by unblocked_after: before, they hung)."""
    os.mkfifo(tmp_path / "data_batch_2")
    with unblocked_after(tmp_path / "data_batch_2"), pytest.raises(UserError, match="is not a regular file"):
        common.read_batch(tmp_path / "data_batch_2")
    (tmp_path / "photos").mkdir()
    os.mkfifo(tmp_path / "photos" / "cat.png")
    with unblocked_after(tmp_path / "photos" / "cat.png"), pytest.raises(UserError, match="no readable JPEG/PNG"):
        evaluate.predict_images(argparse.Namespace(images=[tmp_path / "photos"]), None, None, 32, ["identity"], 1.0,
                                None)
    os.mkfifo(tmp_path / "level1.lock")
    with unblocked_after(tmp_path / "level1.lock"), pytest.raises(UserError, match="level1.lock is not a lock file"):
        files.start_run("level1", tmp_path, tmp_path)


@pytest.mark.parametrize("module, flags, fragment", [
    (evaluate, ["x.pth", "--resamples", "1000000000000"], "--resamples must be >= 100 and <= 100000"),
    (evaluate, ["x.pth", "--resamples", "1"], "--resamples must be >= 100"),  # point 18: no interval from 1
    (level2, ["--randaug-n", "1000000000000"], "--randaug-n must be <= 14"),
    (level1, ["-j", "1000000000000"], "--workers must be <= "),
    (level1, ["--img-size", "1000000000000"], "--img-size must be <= 1024"),
    (evaluate, ["x.pth", "--img-size", "1000000000000"], "--img-size must be <= 1024"),
    (level4, ["--ablate", "--ablate-sizes", "64", "5000"], "--ablate-sizes must be <= 1024 (got 5000)"),
    (level2, ["--warmup-epochs", "1e308"], "--warmup-epochs must be <= 1000"),  # point 12: OverflowError
    (level3, ["--unfreeze-warmup-epochs", "1e308"], "--unfreeze-warmup-epochs must be <= 1000"),
    (level1, ["--wd", "1e308"], "--weight-decay must be <= 10")])  # point 17: it blamed --lr
def test_27_6_12_17_18_values_beyond_what_can_run_are_refused_naming_the_flag_and_why(module, flags, fragment,
                                                                                    tmp_path, monkeypatch):
    refused_before_the_work(module, monkeypatch)
    line = assert_one_line_error(run_cli(module, *flags, "--data-dir", tmp_path), fragment)
    assert line.count(":") >= 2 and "--lr" not in line  # the reason, after the bound


def test_27_6_benchmark_epoch_images_beyond_the_training_split_is_refused(monkeypatch):
    from support import benchmark
    refused_before_the_work(benchmark, monkeypatch)
    assert_one_line_error(run_cli(benchmark, "--epochs", 2, "--epoch-images", 10**12), "--epoch-images must be",
                          "<= 45000", "45,000 images")


def test_27_7_14_a_folder_removed_mid_run_says_what_survived(tmp_path):
    """The results folder removed before the final JSON: one line saying the checkpoints are whole, where, and to
    --resume; the checkpoint folder removed before a save: one line saying nothing is left to resume (no --resume).
    A plot into a removed folder (a write outside atomic_write) is one line too."""
    checkpoints, results = tmp_path / "ck", tmp_path / "res"

    def results_removed(args):
        files.start_run("level1", checkpoints, results)
        files.save_checkpoint(checkpoints / "level1_last.pth", {"model": {"w": torch.ones(3)}})
        shutil.rmtree(results)
        records.write_json(results / "level1.json", {"test": 1})

    assert_one_line_error(run_cli(fake_script(results_removed)), f"{results} was removed",
                          f"checkpoints are whole in {checkpoints}", f"--resume {checkpoints / 'level1_last.pth'}")

    def checkpoints_removed(args):
        files.start_run("level1", tmp_path / "ck2", tmp_path / "res2")
        shutil.rmtree(tmp_path / "ck2")
        writer = files.CheckpointWriter()
        writer.save({tmp_path / "ck2" / "level1_last.pth": {"model": {"w": torch.ones(3)}}})
        writer.wait()

    line = assert_one_line_error(run_cli(fake_script(checkpoints_removed)), "ck2 was removed",
                                 "no checkpoint of this run is left to resume")
    assert "--resume" not in line and "intact" not in line

    def plot_removed(args):
        files.start_run("level1", tmp_path / "ck3", tmp_path / "res3")
        files.save_checkpoint(tmp_path / "ck3" / "level1_last.pth", {"model": {"w": torch.ones(3)}})
        shutil.rmtree(tmp_path / "res3")
        evaluate.plot_curves([{"epoch": 1, "train_loss": 1.0}], tmp_path / "res3" / "level1_curves.png", "curves")

    assert_one_line_error(run_cli(fake_script(plot_removed)), "res3 was removed", "--resume")


def test_27_8_compare_of_hand_made_checkpoints_is_one_line_or_runs(tmp_path, state_dict, synthetic_root, monkeypatch):
    """--compare of a checkpoint whose args is None gets past its checks (before: AttributeError); one whose stored
    tta_set is unknown, or whose img_size is a string, is one line (before: KeyError, TypeError)."""
    def reached(*args, **kwargs):
        raise UserError("the checks passed")
    monkeypatch.setattr(common, "cifar10_datasets", reached)
    paths = {}
    for name, saved_args in (("none", None), ("bogus", {"tta_set": "bogus"}), ("text", {"img_size": "32"}),
                             ("good", {"img_size": 32})):
        paths[name] = tmp_path / f"{name}.pth"
        torch.save({"model": state_dict, "args": saved_args}, paths[name])
    flags = ["--data-dir", synthetic_root, "--device", "cpu", "--out", tmp_path / "out"]
    assert_one_line_error(run_cli(evaluate, paths["none"], "--compare", paths["good"], *flags), "the checks passed")
    assert_one_line_error(run_cli(evaluate, paths["bogus"], "--compare", paths["good"], "--tta", *flags),
                          "names the TTA set 'bogus'")
    assert_one_line_error(run_cli(evaluate, paths["good"], "--compare", paths["text"], *flags),
                          "stores img_size '32'", "give --img-size")


@pytest.mark.parametrize("stored, expected", [({"img_size": 8}, "stores img_size 8"), ({"img_size": 10**9}, "10000"),
                                              ({"img_size": None}, None), ({}, None)])
def test_27_4b_8_17_a_stored_img_size_the_command_line_would_refuse_is_one_line(stored, expected):
    """A checkpoint storing img_size 8 was measured at 8 px (the command line refuses < 32); an absurd one overflowed
    with a line blaming --lr. None or absent: 224."""
    args = argparse.Namespace(img_size=None)
    if expected is None:
        assert inputs.input_size(args, stored, "x.pth") == 224
    else:
        with pytest.raises(UserError, match=f"{expected}.*from 32 to 1024: give --img-size"):
            inputs.input_size(args, stored, "x.pth")
    assert inputs.input_size(argparse.Namespace(img_size=64), stored, "x.pth") == 64


def test_27_8_temperatures_without_at_bound_or_not_a_number(capsys):
    args = argparse.Namespace(no_temperature=False, tta_average="softmax")
    assert evaluate.choose_temperature({"temperatures": {"none": {"temperature": 1.5}}}, args, None) == 1.5
    assert evaluate.choose_temperature({"temperatures": {"none": {"temperature": "warm"}}}, args, None) == 1.0
    assert evaluate.choose_temperature({"temperatures": {"none": 1.5}}, args, None) == 1.0
    assert capsys.readouterr().out.count("warning:") == 2


def test_27_9_bn_stats_of_a_checkpoint_with_partial_args(tmp_path, state_dict, synthetic_root, fast_plots):
    """--bn-stats train on a level checkpoint whose args lack some flags: the level's defaults fill them in."""
    path = tmp_path / "run" / "level2_best.pth"
    path.parent.mkdir()
    torch.save({"model": state_dict, "level": "level2", "epoch": 3, "args": {"seed": 0, "subset": 16, "img_size": 32}},
               path)
    result = evaluate_cli(path, synthetic_root, tmp_path / "out", "--bn-stats", "train")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "eval_run-level2_best_test_bn-train.json").is_file()


def test_27_10_20_summary_skips_nan_strings_and_missing_figures_and_ablation_checks_its_runs(tmp_path):
    """--summary: a bare NaN, a string where a figure belongs, a test_tta that is not an object: each file skipped
    with a warning (before: "nan" as a mean, or a traceback); an old temp file of summary.md removed. An ablation.json
    whose run lacks its args (or holds NaN) is one line (before: KeyError)."""
    good = {"test": {"acc1": 0.5, "ece": 0.1}, "history": [{}], "seconds": 1.0, "device": "cpu", "commit": "abc"}
    (tmp_path / "level1.json").write_text(json.dumps(good))
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "level1.json").write_text(json.dumps(good).replace('"acc1": 0.5', '"acc1": NaN'))
    (tmp_path / "level2.json").write_text(json.dumps({**good, "test_tta": {"acc1": "high"}}))
    (tmp_path / "level3.json").write_text(json.dumps({**good, "test_tta": "none"}))
    orphan = tmp_path / ".summary.md.abc123.tmp"
    orphan.write_bytes(b"x")
    os.utime(orphan, (time.time() - 120, time.time() - 120))
    result = run_cli(level4, "--summary", "--results-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if line.startswith("warning: skipped")]
    assert len(skipped) == 3 and not orphan.exists(), result.stdout
    _, rows = summary_table(tmp_path)
    assert rows["level1"][2] == "0.5000" and rows["level1"][7] == "1" and set(rows) == {"level1"}
    runs = [{"name": "baseline", "seed": 0, "change": {}}]
    (tmp_path / "ablation.json").write_text(json.dumps({"runs": runs}))
    assert_one_line_error(run_cli(level4, "--ablate", "--results-dir", tmp_path), "ablation.json is not this suite's")
    (tmp_path / "ablation.json").write_text('{"runs": [{"name": "baseline", "seed": 0, "acc1": NaN}]}')
    assert_one_line_error(run_cli(level4, "--ablate", "--results-dir", tmp_path), "ablation.json is not this suite's")


def test_27_11_a_lock_that_is_a_directory_is_one_line(tmp_path):
    """(Before: IsADirectoryError; a named pipe as the lock: test_27_5_11.)"""
    (tmp_path / "level1.lock").mkdir()
    with pytest.raises(UserError, match="level1.lock is not a lock file"):
        files.start_run("level1", tmp_path, tmp_path)


def test_27_12_a_device_that_holds_no_data_is_one_line(tmp_path):
    """--device meta: tensors without data ("unsupported scalarType" tracebacks in the levels and evaluate.py)."""
    with pytest.raises(UserError, match="device 'meta' is not usable here"):
        run.resolve_device("meta")
    assert_one_line_error(run_cli(level1, *TINY, "--device", "meta", "--data-dir", tmp_path, "--checkpoint-dir",
                                  tmp_path / "ck"), "device 'meta'")


def test_27_16_17_an_interrupt_says_what_to_do_for_each_script(tmp_path, state_dict, monkeypatch, synthetic_root):
    """Ctrl-C in --ablate: run the same command again (it refuses --resume); in evaluate.py and the benchmark no
    levelN_last.pth to resume; in a level before its first epoch ended, nothing to resume."""
    from support import benchmark, study

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(study, "ablation_run", interrupted)
    monkeypatch.setattr(evaluate, "load_model", interrupted)
    monkeypatch.setattr(benchmark, "benchmark_level", interrupted)
    monkeypatch.setattr(level1, "load_data", interrupted)
    results = {
        "ablate": run_cli(level4, "--ablate", "--results-dir", tmp_path, "--checkpoint-dir", tmp_path, "--data-dir",
                          synthetic_root, "-b", "16"),
        "evaluate": run_cli(evaluate, tmp_path / "x.pth"),
        "benchmark": run_cli(benchmark, "--device", "cpu"),
        "level1": run_cli(level1, *TINY, "--data-dir", tmp_path, "--checkpoint-dir", tmp_path / "ck",
                          "--results-dir", tmp_path / "ck")}
    lines = {}
    for name, result in results.items():
        lines[name] = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 130 and len(lines[name]) == 1, (name, result.stderr)
    assert lines["ablate"][0] == ("SIGINT: interrupted; run the same --ablate command again (finished rows are "
                                  "reused)")
    assert lines["evaluate"][0] == "SIGINT: interrupted"
    assert "levelN_last.pth" not in lines["benchmark"][0] and "--resume" not in lines["benchmark"][0]
    assert "no level1_last.pth to resume" in lines["level1"][0] and "--resume" not in lines["level1"][0]


class _Tiny(torch.nn.Linear):
    """A whole model pickled with torch.save(model), as some tutorials save them."""


def test_27_17_messages_that_name_the_right_thing(tmp_path):
    """A pickled whole model: convert with .state_dict() (not ['model'] of a module); out of memory in evaluate.py
    without --img-size: no "--img-size None"; --data-dir naming a file: no line about downloading."""
    torch.save(_Tiny(2, 2), tmp_path / "model.pth")
    with pytest.raises(UserError, match=r"weights_only=False\)\.state_dict\(\)") as error:
        files.load_checkpoint(tmp_path / "model.pth")
    assert "['model']" not in str(error.value)
    torch.save({"model": _Tiny(2, 2)}, tmp_path / "checkpoint.pth")
    with pytest.raises(UserError, match=r"weights_only=False\)\['model'\]"):
        files.load_checkpoint(tmp_path / "checkpoint.pth")

    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory")
    parser = evaluate.get_args_parser()
    script = SimpleNamespace(__file__="evaluate.py", main=out_of_memory, get_args_parser=lambda: parser,
                             validate_args=lambda args: None)
    line = assert_one_line_error(run_cli(script, "x.pth"), "out of memory at --batch-size 256")
    assert "None" not in line
    (tmp_path / "afile").write_text("x")
    result = run_cli(level1, *TINY, "--data-dir", tmp_path / "afile", "--checkpoint-dir", tmp_path / "ck")
    assert "download" not in assert_one_line_error(result, "--data-dir", "is a file, not the folder")


def test_27_19_a_large_photo_is_read_without_pillows_warning(tmp_path, monkeypatch):
    """Pillow warns (3 lines) above Image.MAX_IMAGE_PIXELS, 89 megapixels (lowered here, so that a small image
    stands for a 100-megapixel photo); the image is read and reduced like any other, without the warning."""
    from PIL import Image
    Image.fromarray(np.full((64, 48, 3), 200, dtype=np.uint8)).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 64 x 48 = 3,072 pixels: above it, below twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = evaluate.load_as_cifar(tmp_path / "large.png")
    assert image.shape == (3, 32, 32) and (image == 200).all()
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
