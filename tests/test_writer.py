"""files.CheckpointWriter (issue 21): checkpoints written in one background thread. What it writes equals what
save_checkpoint writes, taken when save() returns; its errors come back as one line at the next wait; a process
killed while it writes leaves the previous file whole."""
import argparse
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, assert_one_line_error, run_cli

from support import files
from support.errors import UserError


def fingerprint(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_checkpoint():
    """A level's last.pth in miniature: a state_dict with BatchNorm (its _metadata holds module versions), AdamW's
    state after one step, history and args."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    optimizer.step()
    checkpoint = {"level": "level1", "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1,
                  "history": [{"epoch": 1, "val_acc": 0.5}], "args": {"lr": 1e-4, "ablate_sizes": [128, 224]}}
    return model, optimizer, checkpoint


def test_the_background_file_equals_the_synchronous_one_whatever_changes_after_save(tmp_path, monkeypatch):
    """The writer is held back until the model, the optimiser and the history have all changed: the file must still
    be byte for byte the one save_checkpoint writes from the state at save()."""
    model, optimizer, checkpoint = small_checkpoint()
    files.save_checkpoint(tmp_path / "sync.pth", checkpoint)
    release, save_checkpoint = threading.Event(), files.save_checkpoint

    def held_back(path, checkpoint):
        assert release.wait(30)
        save_checkpoint(path, checkpoint)

    monkeypatch.setattr(files, "save_checkpoint", held_back)
    writer = files.CheckpointWriter()
    writer.save({tmp_path / "background.pth": checkpoint, tmp_path / "again.pth": checkpoint})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    optimizer.step()
    checkpoint["history"].append({"epoch": 2, "val_acc": 0.6})
    checkpoint["args"]["ablate_sizes"].append(32)
    assert not (tmp_path / "background.pth").exists()  # still held back: the write is in the background
    release.set()
    writer.wait()
    assert fingerprint(tmp_path / "background.pth") == fingerprint(tmp_path / "sync.pth")
    assert fingerprint(tmp_path / "again.pth") == fingerprint(tmp_path / "sync.pth")


def test_a_writer_error_comes_back_at_the_next_wait_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "level1_last.pth"
    _, _, checkpoint = small_checkpoint()
    writer = files.CheckpointWriter()
    writer.save({path: checkpoint})
    writer.wait()
    before = fingerprint(path)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    writer.save({path: {**checkpoint, "epoch": 2}})  # returns: the error is raised in the writer thread
    with pytest.raises(UserError, match=f"cannot write {path} .No space left on device.*earlier files .* kept"):
        writer.wait()
    assert fingerprint(path) == before and sorted(os.listdir(tmp_path)) == ["level1_last.pth"]
    writer.save({tmp_path / "gone" / "level1_last.pth": checkpoint})  # a folder that vanished
    with pytest.raises(UserError, match="its folder .*gone was removed"):
        writer.save({path: checkpoint})  # the next save waits first, so it raises the error as well
    writer.wait()  # reported once


def test_a_writer_error_is_one_line_and_exit_code_2(tmp_path):
    def main(args):
        writer = files.CheckpointWriter()
        writer.save({tmp_path / "gone" / "level1_last.pth": {"model": {"w": torch.ones(3)}}})
        writer.wait()

    script = SimpleNamespace(__file__="script.py", main=main, get_args_parser=argparse.ArgumentParser,
                             validate_args=lambda args: None)
    assert_one_line_error(run_cli(script), "cannot write", "level1_last.pth: its folder", "was removed")


CHILD = """
import os, sys, time
import torch
from support import files
path = sys.argv[1]
files.save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "epoch": 1})
def stuck_fsync(fd):  # the temp file is written; the rename has not happened yet
    print("writing", flush=True)
    time.sleep(120)
os.fsync = stuck_fsync
writer = files.CheckpointWriter()
writer.save({path: {"model": {"w": torch.zeros(1000)}, "epoch": 2}})
print("save returned", flush=True)
writer.wait()
"""


def test_a_process_killed_while_its_writer_writes_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "level1_last.pth"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        printed = ""  # both lines, in either order (save() does not wait), maybe interleaved by the two threads
        while not ("writing" in printed and "save returned" in printed) and child.poll() is None:
            printed += child.stdout.readline()
        assert "writing" in printed and "save returned" in printed, printed
        assert len(list(tmp_path.glob(".level1_last.pth.*.tmp"))) == 1  # the new file, not yet renamed
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    checkpoint = files.load_checkpoint(path)
    assert checkpoint["epoch"] == 1 and torch.equal(checkpoint["model"]["w"], torch.ones(1000))
    # Issue 27 point 20: the next run in the folder removes the killed write's temp file, as support/README.md says
    files.start_run("level1", tmp_path, tmp_path, resume=str(path))
    assert sorted(os.listdir(tmp_path)) == ["level1.lock", "level1_last.pth"]


# ---- Issue 27: a second and third signal while the writer writes; a failed write, then Ctrl-C ----------------------

STOPPED_CHILD = """
import argparse, time
import torch
from support import files, run
save_checkpoint = files.save_checkpoint

def slow_disk(path, checkpoint):  # the finished epoch's save takes seconds, as 472 MB on a slow disk do
    print("writing", flush=True)
    time.sleep(1)
    save_checkpoint(path, checkpoint)

def main(args):
    files.start_run("level1", args.folder, args.folder)  # the lock, and the levelN_last.pth the stop's line names
    files.save_checkpoint = slow_disk
    last = f"{args.folder}/level1_last.pth"
    files.CheckpointWriter().save({last: {"model": {"w": torch.ones(10**6)}, "epoch": 1}})
    # The next epoch trains: the signals come here, and during the stop's wait for the writer. Python code between
    # short waits, as a training loop is: a signal that lands just before one long C-level sleep (after the hand-over)
    # would have its handler run only when that sleep ends (CPython runs handlers at bytecode checks, not on arrival).
    for _ in range(600):
        time.sleep(0.1)

parser = argparse.ArgumentParser()
parser.add_argument("folder")
parser.add_argument("--wait", type=float, default=run.WRITE_WAIT_S)
run.WRITE_WAIT_S = parser.parse_args().wait
run.run_main(main, parser, lambda args: None)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_27_1_more_signals_while_the_writer_writes_keep_the_finished_epoch(sig, tmp_path):
    """Ctrl-C (to the process group, as a terminal sends it) or SIGTERM again and again, every 0.1 s, while the
    background writer writes the finished epoch and until the process has ended: the stop waits for the write (the
    later signals ignored, also while Python exits), one line, exit 128 + signal, levelN_last.pth holds that epoch,
    no temp file, the lock released. Before, the second signal broke the wait and the third the writer thread's join
    ("Exception ignored in threading._shutdown"): no file, tracebacks; one during Python's exit killed it (-15)."""
    child = subprocess.Popen([sys.executable, "-c", STOPPED_CHILD, str(tmp_path)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    try:
        assert child.stdout.readline().strip() == "writing"
        deadline = time.time() + 60
        while child.poll() is None and time.time() < deadline:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(child.pid, sig)
            time.sleep(0.1)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert child.returncode == 128 + sig, (child.returncode, stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{signal.Signals(sig).name}: interrupted"), stderr
    assert f"--resume {tmp_path / 'level1_last.pth'}" in lines[0] and "waiting for the checkpoint write" in stdout
    assert files.load_checkpoint(tmp_path / "level1_last.pth")["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["level1_last.pth"]  # no temp file, no lock


def test_27_15_a_failed_background_write_then_ctrl_c_shows_the_write_error_first(tmp_path, monkeypatch):
    """Disk full in a background write, then Ctrl-C: the write's line (what is kept), then the interrupt's."""
    path = tmp_path / "level1_last.pth"

    def main(args):
        writer = files.CheckpointWriter()
        writer.save({path: {"model": {"w": torch.ones(3)}}})
        writer.pending.exception()  # the write has failed in the background
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    script = SimpleNamespace(__file__="script.py", main=main, get_args_parser=argparse.ArgumentParser,
                             validate_args=lambda args: None)
    result = run_cli(script)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 2 and lines[0].startswith(f"error: cannot write {path} (No space left on device)"), lines
    assert lines[1] == "SIGINT: interrupted" and not path.exists()


def test_27_1_a_ctrl_c_while_a_save_is_handed_to_the_writer_still_waits_for_it(tmp_path, monkeypatch):
    """Ctrl-C (a real SIGINT to this process) inside ThreadPoolExecutor.submit, after the write was queued but before
    save() held its Future: the stop must still wait for that write. Before, it did not (and in a script, the exit
    then hung for ever joining the writer thread, found by the signal storm above)."""
    path, save_checkpoint = tmp_path / "level1_last.pth", files.save_checkpoint

    def slow_disk(path, checkpoint):
        time.sleep(1)
        save_checkpoint(path, checkpoint)

    def main(args):
        writer = files.CheckpointWriter()
        submit = writer.executor.submit

        def submit_then_ctrl_c(*args):
            future = submit(*args)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # Python runs the handler here, inside submit
            return future
        writer.executor.submit = submit_then_ctrl_c
        writer.save({path: {"model": {"w": torch.ones(3)}, "epoch": 1}})
        time.sleep(30)  # the next epoch

    monkeypatch.setattr(files, "save_checkpoint", slow_disk)
    script = SimpleNamespace(__file__="script.py", main=main, get_args_parser=argparse.ArgumentParser,
                             validate_args=lambda args: None)
    result = run_cli(script)
    assert result.returncode == 130 and "waiting for the checkpoint write" in result.stdout, result.stderr
    assert files.load_checkpoint(path)["epoch"] == 1


def test_27_1_a_write_stuck_longer_than_the_stop_waits_is_abandoned_with_one_line(tmp_path):
    """A hung disk: the stop waits WRITE_WAIT_S (0.5 s here, for a write of 1 s), then says so in one line and
    ends without joining the writer thread; the previous files are whole (here: none yet, no temp file)."""
    child = subprocess.Popen([sys.executable, "-c", STOPPED_CHILD, str(tmp_path), "--wait", "0.5"], cwd=ROOT,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    try:
        assert child.stdout.readline().strip() == "writing"
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert child.returncode == 143 and len(lines) == 1, stderr
    assert "did not end in 0.5 s and was abandoned" in lines[0] and not list(tmp_path.glob("*.pth"))
