"""torchrun + DistributedDataParallel on the CPU (gloo): two processes write one set of files, rank 0 alone prints."""
import json
import os

from conftest import TINY, final_line, run_script


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
