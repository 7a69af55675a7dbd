"""Speed by design: no host-device synchronisation inside any level's per-step loop."""
import ast
import inspect
import textwrap

import pytest

import level1
import level2
import level3
import level4

# Calls that wait for the device when given a CUDA tensor: these methods, and these built-ins (float(t) syncs;
# the method t.float() is only a cast and does not).
SYNCING_METHODS = {"item", "cpu", "tolist", "numpy", "synchronize"}
SYNCING_BUILTINS = {"float", "int", "bool", "print"}


def step_loop(module):
    """The `for images, labels in loader:` loop of the level's train_one_epoch, as an AST node."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(module.train_one_epoch)))
    loops = [node for node in ast.walk(tree) if isinstance(node, ast.For)]
    assert len(loops) == 1
    return loops[0]


def called_names(node):
    """Method calls as "name", built-in/function calls as "name()"."""
    names = []
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        function = call.func
        names.append(function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "") + "()")
    return names


def syncing_calls(node):
    return {name for name in called_names(node)
            if name in SYNCING_METHODS or (name.endswith("()") and name[:-2] in SYNCING_BUILTINS)}


@pytest.mark.parametrize("module", [level1, level2, level3, level4])
def test_no_host_sync_inside_the_step_loop(module):
    loop = step_loop(module)
    assert not syncing_calls(loop)
    # The only read of a device value is the step line, every --print-freq steps (0 = never).
    assert "step_line" in called_names(loop)


def test_the_check_can_fail():
    def train_one_epoch(loader):
        for images, labels in loader:
            print(images.sum().item())
    fake = type("Fake", (), {"train_one_epoch": staticmethod(train_one_epoch)})
    assert syncing_calls(step_loop(fake)) == {"print()", "item"}
