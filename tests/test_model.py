"""The model: --weights imagenet (offline: one line), a 1000-class state_dict (all but the head), a checkpoint of
this suite (whole, also with DDP's or torch.compile's key prefixes); --sync-bn needs GPUs."""
import torch
from conftest import TINY, assert_one_line_error, run_cli

import common
import level1


def saved_state(tmp_path, name, transform):
    torch.manual_seed(1)
    state = common.build_model("none").state_dict()
    path = tmp_path / name
    torch.save(transform(state), path)
    return state, path


def test_an_imagenet_state_dict_loads_all_but_the_head(tmp_path):
    state, path = saved_state(tmp_path, "imagenet.pth", lambda s: {**s, "fc.weight": torch.randn(1000, 2048),
                                                                   "fc.bias": torch.randn(1000)})
    torch.manual_seed(2)
    model = common.build_model(str(path))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state if not k.startswith("fc."))
    assert loaded["fc.weight"].shape == (10, 2048) and not torch.equal(loaded["fc.weight"], state["fc.weight"])


def test_a_checkpoint_of_this_suite_loads_whole_also_with_wrapper_prefixes(tmp_path):
    for prefix in ("", "module.", "_orig_mod."):
        state, path = saved_state(tmp_path, f"ck{prefix}.pth", lambda s: {"model": {prefix + k: v for k, v in s.items()},
                                                                           "epoch": 3})
        model = common.build_model(str(path), dropout=0.3)  # dropout keeps torchvision's key names
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), prefix


def test_imagenet_weights_offline_is_one_line_naming_the_file_and_the_alternatives(tmp_path, monkeypatch,
                                                                                    synthetic_root):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    result = run_cli(level1, *TINY, "--weights", "imagenet", "--data-dir", synthetic_root, "--checkpoint-dir",
                     tmp_path / "ck", "--results-dir", tmp_path / "res")
    assert_one_line_error(result, "resnet50-11ad3fa6.pth", str(tmp_path / "torch-home"), "--weights none",
                          "--weights PATH")


def test_sync_bn_without_gpus_is_one_line(tmp_path, synthetic_root):
    result = run_cli(level1, *TINY, "--sync-bn", "--data-dir", synthetic_root, "--checkpoint-dir", tmp_path,
                     "--results-dir", tmp_path)
    assert_one_line_error(result, "--sync-bn")
