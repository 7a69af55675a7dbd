"""torchrun + DistributedDataParallel on the CPU (gloo): two processes write one set of files, rank 0 alone prints."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, final_line, run_script


def test_level3_under_torchrun_writes_one_set_of_files(tmp_path, data_root):
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "level3.py", *TINY,
                        "--final-epochs", "0", "--data-dir", data_root, "--checkpoint-dir", tmp_path / "ck",
                        "--results-dir", tmp_path / "res", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2" in result.stdout.splitlines()[0]  # the first line names the two processes
    assert result.stdout.count("final:") == 1 and result.stdout.count("epoch 2/2") == 1  # rank 0 alone prints
    assert final_line(result.stdout)["test_images"] == 32
    assert sorted(os.listdir(tmp_path / "ck")) == ["level3_best.pth", "level3_last.pth"]  # no lock, no temp file left
    assert sorted(os.listdir(tmp_path / "res")) == ["level3.json", "level3_curves.png", "level3_per_image.npz"]
    history = json.loads((tmp_path / "res" / "level3.json").read_text())["history"]
    # 64 images, global batch 16: 4 steps per epoch, each process taking 8 images of each batch; layer4 unfreezes in
    # epoch 2, so DDP is built again there
    assert len(history) == 2 and all("val_acc_ema" in row for row in history) and history[1]["stage"] == "fc+layer4"


def rank_pids(marker):
    """{rank: pid} of the processes whose command line holds `marker`, from torchrun's RANK in their environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # not a process, or it ended
            continue
        if marker.encode() in command:
            found.update({int(item[5:]): int(entry.name) for item in environment if item.startswith(b"RANK=")})
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' pids in /proc")
def test_27_13_a_rank_whose_rank_zero_was_killed_exits_without_a_traceback(tmp_path, data_root):
    """Rank 0 killed with -9 in the second epoch: rank 1's barrier or all-reduce loses its peer (gloo's "Connection
    reset by peer"); it exits 2 with no traceback (torchrun's table names rank 0's SIGKILL), or, if torchrun's SIGTERM
    reaches it first, with the one line of a SIGTERM."""
    flags = [*TINY, "--epochs", "50", "--data-dir", data_root, "--checkpoint-dir", tmp_path, "--results-dir", tmp_path]
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "level1.py", *map(str, flags)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not process.stdout.readline().startswith("epoch 1/"):
            assert process.poll() is None, process.stderr.read()[-3000:]
        os.kill(rank_pids(str(tmp_path))[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # torchrun and its ranks have ended
            os.killpg(process.pid, signal.SIGKILL)
    rank1 = [line for line in stderr.splitlines() if line.startswith("[rank1]:")]
    assert not any("Traceback" in line or "Error" in line for line in rank1), "\n".join(rank1)
    assert "exitcode  : -9" in stderr and ("exitcode  : 2 " in stderr or "exitcode  : 143 " in stderr), stderr[-3000:]
