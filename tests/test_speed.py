"""Speed by design: no host-device synchronisation inside any level's step loop, except the step line's loss read."""
import ast
import inspect
import textwrap

import pytest

import level1
import level2
import level3
import level4

# Calls that wait for the device when given a CUDA tensor: these methods, and these built-ins (float(t) waits; the
# method t.float() is a cast and does not).
SYNCING_METHODS = {"item", "cpu", "tolist", "numpy", "synchronize"}
SYNCING_BUILTINS = {"float", "int", "bool"}


def step_loop(function):
    """The `for ... in enumerate(loader):` loop of a train_one_epoch, as an AST node."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    loops = [node for node in ast.walk(tree) if isinstance(node, ast.For)
             and "loader" in ast.unparse(node.iter)]
    assert len(loops) == 1
    return loops[0]


def syncing_calls(node):
    """Waiting calls in `node`, leaving out those under an `if` on args.print_freq (the step line)."""
    found = set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "print_freq" in ast.unparse(child.test):
            continue
        if isinstance(child, ast.Call):
            function = child.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "") + "()"
            if name in SYNCING_METHODS or name.removesuffix("()") in SYNCING_BUILTINS and name.endswith("()"):
                found.add(name)
        found |= syncing_calls(child)
    return found


@pytest.mark.parametrize("module", [level1, level2, level3, level4])
def test_no_host_sync_inside_the_step_loop(module):
    loop = step_loop(module.train_one_epoch)
    assert not syncing_calls(loop)
    guarded = [child for child in ast.walk(loop) if isinstance(child, ast.If) and "print_freq" in ast.unparse(child.test)]
    assert len(guarded) == 1 and "item" in ast.unparse(guarded[0])  # the one read: the step line's loss


def test_the_check_can_fail():
    def train_one_epoch(loader, args):
        for step, (images, labels) in enumerate(loader):
            total = float(images.sum()) + labels.max().item()
            if args.print_freq:
                print(total.item())
    assert syncing_calls(step_loop(train_one_epoch)) == {"float()", "item"}
