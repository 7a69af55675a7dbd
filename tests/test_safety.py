"""No run lost or silently wrong (issue 14): divergence, bad flags, output folders, rerun protection, the run lock,
orphaned temp files, out of memory, files that are not checkpoints, malformed results, the umask, crashes while
saving. Each bad input is one line on stderr starting "error:", exit code 2, no traceback."""
import hashlib
import json
import math
import os
import shutil
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
from conftest import ROOT, TINY, assert_one_line_error, final_line, run_cli

import common
import evaluate
import level1
import level2
import level4
from support import files
from support.errors import UserError

T = list(TINY)  # 64 training images at 32 px, batch 16, one head epoch and one full epoch, no workers
QUICK_FLAGS = ["--quick", "--weights", "none", "-j", "0"]


def fingerprint(path):
    """What changes if a file is replaced or rewritten: inode, mtime and a hash of its bytes."""
    stat = path.stat()
    with open(path, "rb") as f:
        return stat.st_ino, stat.st_mtime_ns, hashlib.file_digest(f, "sha1").hexdigest()


def linked_copy(source, dest):
    """A run folder copied by hard links (free): atomic_write renames new files in, so the source stays as it was.
    Locks and PNGs (written in place) are left out."""
    shutil.copytree(source, dest, copy_function=os.link, ignore=shutil.ignore_patterns("*.lock", "*.png"))
    return Path(dest)


def run_into(folder, data_dir, *extra, module=level1):
    """A tiny run writing checkpoints and results into `folder`."""
    return run_cli(module, *T, "--data-dir", data_dir, "--checkpoint-dir", folder, "--results-dir", folder, *extra)


def assert_no_nonfinite_checkpoint_and_strict_json(folder):
    """Every .pth under `folder` holds finite weights; every .json is strict JSON (no NaN or Infinity)."""
    for path in Path(folder).rglob("*.pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        assert all(v.isfinite().all() for v in state.values() if v.is_floating_point()), path
    for path in Path(folder).rglob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{path} holds {name}"))


# ---- One fixture for the subprocess runs: --quick twice, the lock between them, the umask --------------------------

@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory, synthetic_root):
    """Process A: `level1.py --quick` in a subprocess under umask 002. While it runs, run B into its folder (refused
    by the lock). After it: a snapshot of its finished run; then a stale lock and orphaned temp files are planted
    and a second --quick run goes in this process."""
    base = tmp_path_factory.mktemp("quick")
    flags = [*QUICK_FLAGS, "--data-dir", synthetic_root, "--checkpoint-dir", base / "ck", "--results-dir", base / "res"]
    lock = base / "ck" / "quick" / "level1.lock"
    process_a = subprocess.Popen([sys.executable, "level1.py", *map(str, flags)], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: os.umask(0o002),
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not lock.exists() and process_a.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    lock_seen = lock.exists()
    run_b = run_cli(level1, *flags) if lock_seen else None
    a_out, a_err = process_a.communicate(timeout=600)
    done = SimpleNamespace(base=base, flags=flags, pid_a=process_a.pid, lock_seen=lock_seen, run_b=run_b,
                           run_a=SimpleNamespace(returncode=process_a.returncode, stdout=a_out, stderr=a_err),
                           lock_after_a=lock.exists(), ck=base / "ck" / "quick", res=base / "res" / "quick")
    if process_a.returncode == 0:
        outputs = (done.ck / "level1_best.pth", done.ck / "level1_last.pth", done.res / "level1.json")
        done.modes_a = {p.name: p.stat().st_mode & 0o777 for p in outputs}
        done.finished = linked_copy(done.ck, base / "finished")
        os.link(done.res / "level1.json", done.finished / "level1.json")
        # The second --quick run finds a lock left by a dead process and temp files of interrupted saves.
        with pytest.raises(ProcessLookupError):
            os.kill(999999, 0)
        lock.write_text(f"999999 {socket.gethostname()}")
        done.orphans = [done.ck / ".level1_last.pth.abc123.tmp", done.res / ".level1.json.def456.tmp"]
        done.orphans[0].write_bytes(os.urandom(3 * 2**20))
        done.orphans[1].write_bytes(os.urandom(2**20 // 2))
        done.other_level_tmp = done.ck / ".level2_last.pth.xyz789.tmp"  # another level's save in flight: kept
        done.other_level_tmp.write_bytes(b"level2")
        done.run_2 = run_cli(level1, *flags)
        done.modes_2 = {p.name: p.stat().st_mode & 0o777 for p in outputs if p.exists()}
    return done


@pytest.fixture
def finished(quick_runs, tmp_path):
    """A private copy of process A's finished run: level1_best.pth, level1_last.pth, level1.json."""
    assert quick_runs.run_a.returncode == 0, quick_runs.run_a.stderr[-2000:]
    return linked_copy(quick_runs.finished, tmp_path / "F")


# ---- 1. Divergence -------------------------------------------------------------------------------------------------

def test_1_divergence_is_one_line_error(tmp_path, data_root):
    """A learning rate that blows the run up stops it with one line naming the epoch and the fix; no checkpoint with
    nan or inf weights and no non-strict JSON is left behind."""
    result = run_into(tmp_path, data_root, "--head-lr", "1e3", "--lr", "1e3")
    line = assert_one_line_error(result, "loss became", "lower --lr")
    assert line.startswith("error: loss became nan in epoch ") or line.startswith("error: loss became inf in epoch ")
    assert "final:" not in result.stdout
    assert_no_nonfinite_checkpoint_and_strict_json(tmp_path)


def test_1_divergence_keeps_the_earlier_run(finished, synthetic_root):
    """A rerun with --overwrite that diverges in its first epoch leaves the earlier run's files byte-identical."""
    names = ("level1_best.pth", "level1_last.pth", "level1.json")
    before = {name: fingerprint(finished / name) for name in names}
    result = run_into(finished, synthetic_root, "--head-lr", "1e20", "--overwrite")
    assert_one_line_error(result, "loss became nan in epoch 1", "lower --lr")
    assert {name: fingerprint(finished / name) for name in names} == before
    assert not list(finished.glob(".*.tmp"))


def test_1_absurd_finite_learning_rate_is_one_line_error(tmp_path, synthetic_root):
    """--head-lr 1e38 passes the finite check, but AdamW's first step overflows float32 inside the optimiser
    (lr / (1 - beta1) > 3.4e38): that too must end as one line, not a traceback."""
    result = run_into(tmp_path, synthetic_root, "--head-lr", "1e38")
    assert_one_line_error(result, "--head-lr")
    assert not list(tmp_path.glob("*.pth"))


def test_1_save_checkpoint_refuses_nan_weights_and_writes_nothing(tmp_path):
    path = tmp_path / "level1_last.pth"
    files.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    before = fingerprint(path)
    with pytest.raises(UserError, match="nan or inf"):
        files.save_checkpoint(path, {"model": {"w": torch.tensor([1.0, math.nan, 2.0])}, "epoch": 2})
    with pytest.raises(UserError, match="nan or inf"):
        files.save_checkpoint(tmp_path / "new.pth", {"model": {"w": torch.tensor([math.inf])}, "epoch": 2})
    assert fingerprint(path) == before and sorted(os.listdir(tmp_path)) == ["level1_last.pth"]


def test_1_evaluate_refuses_a_checkpoint_with_nan_weights(tmp_path, synthetic_root):
    state = common.build_model("none").state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = math.nan
    torch.save({"model": state, "epoch": 3}, tmp_path / "diverged.pth")
    result = run_cli(evaluate, tmp_path / "diverged.pth", "--data-dir", synthetic_root, "--out", tmp_path / "out")
    assert_one_line_error(result, str(tmp_path / "diverged.pth"), "non-finite")
    assert not (tmp_path / "out").exists()


# ---- 2. Flags ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module,flag,value,fragments", [
    (level1, "--head-lr", "nan", ("--head-lr must be a finite number (got nan)",)),
    (level1, "--lr", "inf", ("--lr must be a finite number (got inf)",)),
    (level1, "--lr=-inf", None, ("--lr must be a finite number (got -inf)",)),
    (level1, "--wd", "nan", ("--weight-decay must be a finite number (got nan)",)),
    (level2, "--mix-prob", "nan", ("--mix-prob must be a finite number (got nan)",)),
    (level1, "-b", "1", ("--batch-size must be >= 2 (got 1)",)),
    (level1, "--epochs", "abc", ("--epochs", "invalid int value: 'abc'"))])
def test_2_bad_flag_values_are_one_line_errors_before_anything_runs(module, flag, value, fragments, tmp_path,
                                                                    synthetic_root):
    """nan/inf pass every `x <= 0` check, so they are refused as not finite; -b 1 (issue 14 point 7) and a value
    argparse cannot parse too (no "usage:" line); each before a folder is made or data read."""
    result = run_cli(module, *T, "--data-dir", synthetic_root, "--checkpoint-dir", tmp_path / "ck",
                     "--results-dir", tmp_path / "res", flag, *([] if value is None else [value]))
    assert_one_line_error(result, *fragments)
    assert "usage:" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "ck").exists() and not (tmp_path / "res").exists()


# ---- 3. Output folders, checked before any data is read ------------------------------------------------------------

@pytest.fixture
def no_download(monkeypatch):
    """torchvision's CIFAR10 replaced: records that data loading started, then fails as offline."""
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    return calls


def test_3_checkpoint_dir_that_cannot_be_made_fails_before_data_is_read(tmp_path, no_download):
    """--checkpoint-dir /proc/x with a --data-dir that does not exist: the error is about the checkpoint folder."""
    started = time.time()
    result = run_cli(level1, *T, "--data-dir", tmp_path / "nodata", "--checkpoint-dir", "/proc/x",
                     "--results-dir", tmp_path / "res")
    line = assert_one_line_error(result, "--checkpoint-dir", "/proc/x")
    assert "CIFAR-10" not in line and "downloading" not in result.stdout and no_download == []
    assert time.time() - started < 20


def test_3_results_dir_that_is_a_file_fails_before_training(tmp_path, synthetic_root):
    (tmp_path / "results.txt").write_text("not a folder")
    result = run_cli(level1, *T, "--data-dir", synthetic_root, "--checkpoint-dir", tmp_path / "ck",
                     "--results-dir", tmp_path / "results.txt")
    assert_one_line_error(result, "--results-dir", str(tmp_path / "results.txt"))
    assert "train images" not in result.stdout and not list(tmp_path.rglob("*.pth"))
    assert (tmp_path / "results.txt").read_text() == "not a folder"


# ---- 4. Rerun protection -------------------------------------------------------------------------------------------

def test_4_rerun_without_resume_or_overwrite_is_refused(finished, synthetic_root):
    """Other flags into a folder holding a finished run: refused, naming both ways on; the files stay as they were."""
    names = ("level1_best.pth", "level1_last.pth", "level1.json")
    before = {name: fingerprint(finished / name) for name in names}
    result = run_into(finished, synthetic_root, "--seed", "1")
    assert_one_line_error(result, "--resume", "--overwrite", str(finished / "level1_last.pth"))
    assert {name: fingerprint(finished / name) for name in names} == before


def test_4_overwrite_lets_the_new_run_in(finished, synthetic_root, monkeypatch):
    """With --overwrite the same command passes the folder checks and goes on to read the data (stopped there); the
    earlier files stay until the new run saves (a whole --overwrite run: the second --quick run below)."""
    def stop(*args, **kwargs):
        raise UserError("data loading reached")

    monkeypatch.setattr(common, "cifar10_datasets", stop)
    before = fingerprint(finished / "level1_best.pth")
    assert_one_line_error(run_into(finished, synthetic_root, "--seed", "1", "--overwrite"), "data loading reached")
    assert fingerprint(finished / "level1_best.pth") == before


def test_4_resume_continues_the_earlier_run(finished, synthetic_root):
    """--resume F/level1_last.pth (the saved run's own flags) is let in: it starts after the saved epoch and keeps the
    saved history."""
    saved = files.load_checkpoint(finished / "level1_last.pth", "level1")
    same = [f"--{name.replace('_', '-')}={saved['args'][name]}" for name in level1.QUICK if name != "overwrite"]
    result = run_cli(level1, *same, "--weights", "none", "-j", "0", "--data-dir", synthetic_root, "--checkpoint-dir",
                     finished, "--results-dir", finished, "--resume", finished / "level1_last.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"epoch {saved['epoch'] + 1} on" in result.stdout and "final:" in result.stdout
    results = json.loads((finished / "level1.json").read_text())
    assert [row["epoch"] for row in results["history"]] == [row["epoch"] for row in saved["history"]]
    assert results["history"][0]["train_loss"] == pytest.approx(saved["history"][0]["train_loss"])


def test_4_quick_runs_twice_in_a_row(quick_runs):
    """--quick writes into checkpoints/quick and replaces its own earlier smoke run: a second one succeeds too (the
    first in a subprocess, as a user runs it; the second in this process)."""
    assert quick_runs.run_a.returncode == 0, quick_runs.run_a.stderr[-2000:]
    assert "final:" in quick_runs.run_a.stdout and (quick_runs.ck / "level1_best.pth").is_file()
    assert quick_runs.run_2.returncode == 0, quick_runs.run_2.stderr[-2000:]
    results = json.loads((quick_runs.res / "level1.json").read_text())
    assert final_line(quick_runs.run_2.stdout)["acc1"] == pytest.approx(results["test"]["acc1"], abs=1e-4)
    assert results["args"]["checkpoint_dir"] == str(quick_runs.ck) and results["args"]["subset"] == 128


# ---- 5. The run lock -----------------------------------------------------------------------------------------------

def test_5_second_run_into_a_running_folder_is_refused_naming_the_pid(quick_runs):
    """While process A runs, run B into the same folder stops at once, naming A's pid; A's lock goes with A."""
    assert quick_runs.lock_seen, quick_runs.run_a.stderr[-2000:]
    assert_one_line_error(quick_runs.run_b, f"held by process {quick_runs.pid_a}", str(quick_runs.ck / "level1.lock"))
    assert quick_runs.run_a.returncode == 0, quick_runs.run_a.stderr[-2000:]
    assert not quick_runs.lock_after_a


def test_5_stale_lock_of_a_dead_process_is_taken_over(quick_runs):
    """A lock naming a dead pid on this host: taken over with a warning line, and the run succeeds."""
    assert quick_runs.run_2.returncode == 0, quick_runs.run_2.stderr[-2000:]
    warnings = [line for line in quick_runs.run_2.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "999999" in warnings[0] and "no longer runs" in warnings[0], warnings


def test_5_lock_of_another_host_is_refused(tmp_path, synthetic_root):
    """A process on another machine cannot be checked from here: its lock is refused, not taken over."""
    (tmp_path / "level1.lock").write_text("4242 some-other-host")
    result = run_into(tmp_path, synthetic_root)
    assert_one_line_error(result, "held by process 4242 on some-other-host")
    assert (tmp_path / "level1.lock").read_text() == "4242 some-other-host" and not list(tmp_path.glob("*.pth"))


# ---- 6. Orphaned temp files ----------------------------------------------------------------------------------------

def test_6_orphaned_temp_files_are_removed_and_counted(quick_runs):
    """Temp files of saves that were killed are removed at the start of the next run of the level, with the MB freed;
    another level's temp file (maybe a save in flight) is left alone."""
    assert quick_runs.run_2.returncode == 0, quick_runs.run_2.stderr[-2000:]
    assert not any(path.exists() for path in quick_runs.orphans)
    freed = (3 * 2**20 + 2**20 // 2) / 2**20
    assert f"removed 2 temp files of interrupted saves: {freed:.0f} MB freed" in quick_runs.run_2.stdout
    assert quick_runs.other_level_tmp.read_bytes() == b"level2"


# ---- 7. Out of memory ----------------------------------------------------------------------------------------------

def test_7_cpu_allocator_failure_in_training_is_one_line_error(tmp_path, synthetic_root, monkeypatch):
    """PyTorch's CPU allocator says "can't allocate memory", not "out of memory": one line naming the fix."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 3288334336 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(level1, "train_one_epoch", out_of_memory)
    result = run_into(tmp_path, synthetic_root)
    assert_one_line_error(result, "out of memory", "--batch-size 16", "--img-size 32")


@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GB")],
                         ids=["MemoryError", "CUDA"])
def test_7_memory_errors_are_one_line_errors(error, tmp_path, synthetic_root, monkeypatch):
    def main(args):
        raise error

    monkeypatch.setattr(level1, "main", main)
    assert_one_line_error(run_into(tmp_path, synthetic_root), "out of memory", "halve --batch-size")


def test_7_other_runtime_errors_still_propagate(tmp_path, synthetic_root, monkeypatch):
    """A bug is not disguised as a memory problem: its traceback stays."""
    def main(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x2048 and 1000x10)")

    monkeypatch.setattr(level1, "main", main)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_into(tmp_path, synthetic_root)


# ---- 8. Files that are not checkpoints -----------------------------------------------------------------------------

class _RunsCode:
    """Unpickling it would run a shell command that creates `marker` (the classic malicious pickle)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Plain:
    """Any object of a class weights_only loading does not know."""


def _bad_checkpoint(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "html":  # what a failed download often saves
        path.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
                        "<body>Not Found</body></html>\n")
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    else:
        model = _RunsCode(tmp_path / "code_ran") if kind == "os_system" else _Plain()
        torch.save({"level": "level1", "model": model, "epoch": 1}, path)
    return path


@pytest.mark.parametrize("flag", ["--resume", "--weights"])
@pytest.mark.parametrize("kind", ["html", "random_bytes", "object", "os_system"])
def test_8_not_a_checkpoint_is_not_called_code(flag, kind, tmp_path, synthetic_root):
    """An HTML page or random bytes is "not a PyTorch checkpoint", never "could run code"; a real pickle of an
    object (a plain one, or one that would call os.system) is refused as code, and its code does not run."""
    path = _bad_checkpoint(tmp_path, kind)
    result = run_into(tmp_path / "run", synthetic_root, flag, path)
    if kind in ("object", "os_system"):
        line = assert_one_line_error(result, str(path), "could run code")
        assert "not a PyTorch checkpoint" not in line
    else:
        line = assert_one_line_error(result, str(path), "not a PyTorch checkpoint")
        assert "could run code" not in line
    assert not (tmp_path / "code_ran").exists() and not list((tmp_path / "run").glob("*.pth"))


# ---- 10. level4 --summary and --ablate -----------------------------------------------------------------------------

def _good_results(acc1):
    return {"level": "level3", "test": {"acc1": acc1, "ece": 0.0421}, "history": [{"epoch": 1}, {"epoch": 2}],
            "seconds": 61.0, "device": "cpu (2 cores)", "commit": "abc1234"}


def test_10_summary_skips_malformed_results_with_a_warning(tmp_path):
    (tmp_path / "level1.json").write_text('{"test": {"acc1": 0.9')  # cut off mid-write
    (tmp_path / "level2.json").write_text(json.dumps({"level": "level2", "history": []}))  # valid, keys missing
    (tmp_path / "level3.json").write_text(json.dumps(_good_results(0.8123)))
    result = run_cli(level4, "--summary", "--results-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and "level1.json" in warnings[0] and "level2.json" in warnings[1], warnings
    table = (tmp_path / "summary.md").read_text()
    assert "| level3 | 0.8123 |" in table and "| level1 |" not in table and "| level2 |" not in table
    assert (tmp_path / "summary.png").stat().st_size > 0


def test_10_summary_of_only_malformed_results_is_one_line_error(tmp_path):
    (tmp_path / "level1.json").write_text("not json at all")
    (tmp_path / "level2.json").write_text("[1, 2, 3]")
    assert_one_line_error(run_cli(level4, "--summary", "--results-dir", tmp_path), "no readable levelN.json",
                          str(tmp_path))
    assert not (tmp_path / "summary.md").exists()


def test_10_ablate_with_resume_is_one_line_error(tmp_path, no_download):
    result = run_cli(level4, "--ablate", "--resume", tmp_path / "level4_last.pth", "--data-dir", tmp_path / "nodata",
                     "--checkpoint-dir", tmp_path / "ck", "--results-dir", tmp_path / "res")
    assert_one_line_error(result, "--ablate", "--resume")
    assert not (tmp_path / "ck").exists()


# ---- 11. The umask -------------------------------------------------------------------------------------------------

def test_11_run_outputs_follow_the_umask(quick_runs):
    """Process A ran under umask 002 (a shared group folder): its checkpoints and results are 0664, as open() makes
    them, not mkstemp's 0600; the second run, in this process, follows this process's umask (0644 under 022)."""
    assert quick_runs.run_a.returncode == 0, quick_runs.run_a.stderr[-2000:]
    assert quick_runs.modes_a == {"level1_best.pth": 0o664, "level1_last.pth": 0o664, "level1.json": 0o664}
    umask = os.umask(0o022)
    os.umask(umask)
    assert quick_runs.run_2.returncode == 0, quick_runs.run_2.stderr[-2000:]
    assert quick_runs.modes_2 == dict.fromkeys(quick_runs.modes_a, 0o666 & ~umask)


def test_11_atomic_write_gives_the_mode_open_gives(tmp_path):
    """In this process: the same mode as a file made by a plain open(), and the bytes written."""
    (tmp_path / "plain").write_bytes(b"x")
    files.atomic_write(tmp_path / "atomic", b"hello")
    assert (tmp_path / "atomic").read_bytes() == b"hello"
    assert (tmp_path / "atomic").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert sorted(os.listdir(tmp_path)) == ["atomic", "plain"]


# ---- A crash while saving ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_crash_while_saving_keeps_the_previous_file(where, tmp_path, monkeypatch):
    """The new checkpoint is written to a temp file and renamed over the old one: a crash before the rename (a full
    disk at fsync, a failing rename) leaves the old file intact and no temp file behind."""
    path = tmp_path / "level1_last.pth"
    files.save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "epoch": 1})
    before = fingerprint(path)
    written = []

    def crash(*args):
        written.extend(p.name for p in tmp_path.glob(".*.tmp"))  # the temp file exists at this point
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, where, crash)
    with pytest.raises(UserError, match="No space left"):  # one line, not a traceback (issue 19)
        files.save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "epoch": 2})
    monkeypatch.undo()
    assert written and fingerprint(path) == before
    assert sorted(os.listdir(tmp_path)) == ["level1_last.pth"]
    assert files.load_checkpoint(path)["epoch"] == 1
