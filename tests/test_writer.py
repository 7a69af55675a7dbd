"""files.CheckpointWriter (issue 21): checkpoints written in one background thread. What it writes equals what
save_checkpoint writes, taken when save() returns; its errors come back as one line at the next wait; a process
killed while it writes leaves the previous file whole."""
import argparse
import hashlib
import os
import signal
import subprocess
import sys
import threading
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
    with pytest.raises(UserError, match="No such file or directory"):
        writer.save({path: checkpoint})  # the next save waits first, so it raises the error as well
    writer.wait()  # reported once


def test_a_writer_error_is_one_line_and_exit_code_2(tmp_path):
    def main(args):
        writer = files.CheckpointWriter()
        writer.save({tmp_path / "gone" / "level1_last.pth": {"model": {"w": torch.ones(3)}}})
        writer.wait()

    script = SimpleNamespace(__file__="script.py", main=main, get_args_parser=argparse.ArgumentParser,
                             validate_args=lambda args: None)
    assert_one_line_error(run_cli(script), "writing", "level1_last.pth failed (No such file or directory)")


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
        lines = {child.stdout.readline().strip() for _ in range(2)}  # in either order: save() does not wait
        assert lines == {"writing", "save returned"}
        assert len(list(tmp_path.glob(".level1_last.pth.*.tmp"))) == 1  # the new file, not yet renamed
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    checkpoint = files.load_checkpoint(path)
    assert checkpoint["epoch"] == 1 and torch.equal(checkpoint["model"]["w"], torch.ones(1000))
