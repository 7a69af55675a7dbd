"""Files that are never lost: atomic writes, checkpoints saved in the background and loaded with weights_only=True,
the run folder with its lock, and the checks of a --resume. Called by the levels (start_run through support.run,
CheckpointWriter, resume), by common.build_model (load_checkpoint, for --weights PATH), by evaluate.py and by
support.records (atomic_write, check_writable)."""
import argparse
import atexit
import concurrent.futures
import contextlib
import copy
import errno
import io
import itertools
import json
import os
import pickletools
import re
import socket
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from support.errors import UserError


def _current_umask():
    """The process's umask. It can only be read by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()  # atomic_write gives its files the mode a plain open() would
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # full, read-only, not allowed
# This process's run: its levelN_last.pth (start_run), its CheckpointWriters, whether one is handing a save to its
# thread, and whether a Ctrl-C or SIGTERM came meanwhile (support.run raises it once the save is handed over)
RUN = {"last": None, "writers": [], "saving": False, "interrupted": False}


def folder_gone(error):
    """Whether an OSError is a write into a folder that no longer exists (removed while the run ran)."""
    return isinstance(error, FileNotFoundError) and bool(error.filename) and not Path(error.filename).parent.is_dir()


def write_error(path, error):
    """The one line for a failed write: what is kept, and --resume only where a levelN_last.pth is there to resume."""
    last = RUN["last"]
    kept = last is not None and last.is_file()
    if folder_gone(error) or not Path(path).parent.is_dir():
        gone = f"cannot write {path}: its folder {Path(path).parent} was removed while the script ran"
        if kept:
            return UserError(f"{gone}; the run's checkpoints are whole in {last.parent}: --resume {last} (a finished "
                             f"run measures and writes its results again)")
        if last is not None:
            return UserError(f"{gone}, and no checkpoint of this run is left to resume: start it anew")
        return UserError(f"{gone}: make the folder again and rerun")
    hint = ""
    if kept:
        hint = f"; then --resume {last} (a finished run measures and writes its results again)"
    return UserError(f"cannot write {path} ({error.strerror or error}): free space on its disk or make it writable, "
                     f"the earlier files there are kept{hint}")


def atomic_write(path, data):
    """`data` (bytes) to a temp file beside `path`, fsync, rename: a crash leaves the old file or the new one, never
    half of one. The mode follows the umask, as a plain open() (mkstemp would leave 0600). A full or read-only disk
    is a UserError (also from a thread)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException as error:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and (error.errno in WRITE_ERRNOS or not Path(path).parent.is_dir()):
            raise write_error(path, error) from None
        raise


_READ = {}  # (reader, path) -> ((inode, size, mtime, ctime), what it read): the files read_once read, as they were


def read_once(reader, path):
    """reader(path), read again only when the file changed (replaced, resized or modified): --ablate, which runs
    the level once per row and seed in one process, and the tests read the six CIFAR-10 batches once, not each run.
    What it returns is shared: the caller must not change it in place."""
    try:
        stat = os.stat(path)
    except OSError:
        return reader(path)  # missing or unreadable: the reader's own one-line error
    version = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    cached = _READ.get((reader, str(path)))
    if cached is None or cached[0] != version:
        cached = (version, reader(path))
        _READ[(reader, str(path))] = cached
    return cached[1]


def save_checkpoint(path, checkpoint):
    """torch.save through atomic_write; weights that are not all finite are refused, never written."""
    if not all(v.isfinite().all() for v in checkpoint["model"].values() if v.is_floating_point()):
        raise UserError(f"not saving {path}: the weights hold nan or inf (the run diverged): lower --lr/--head-lr")
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path, level=None):
    """torch.load(weights_only=True), each failure one line; with `level`, that level's levelN_last.pth (--resume).
    argparse.Namespace (plain data: the `args` of torchvision's and timm's train.py) is allowed, and made a dict."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: give the path of a .pth file")
    if path.exists() and not path.is_file():  # open() of a named pipe would wait for a writer for ever
        raise UserError(f"{path} is not a regular file (a named pipe or a device): give the path of a .pth file")
    if not path.is_file():
        raise UserError(f"{path} is not there: give the path of a .pth file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        found = re.search(r"unsupported (global: )?GLOBAL (\S+)", str(error), re.IGNORECASE)  # a class or function
        if found:
            weights = "['model']"  # a checkpoint dict whose weights come with other objects
            if not _holds_a_dict(path):
                weights = ".state_dict()"  # a whole pickled model, torch.save(model)
            raise UserError(f"{path} was refused: it holds a pickled {found[2]}, which could run code; if you trust "
                            f"the file, convert it: torch.save(torch.load(PATH, weights_only=False){weights}, "
                            f"'weights.pth')") from None
        raise UserError(f"{path} is not a PyTorch checkpoint (empty, truncated, or another kind of file)") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = vars(checkpoint["args"])
    is_last = isinstance(checkpoint, dict) and checkpoint.get("level") == level and "optimizer" in checkpoint
    if level and not is_last:
        raise UserError(f"{path} is not a {level}_last.pth: --resume takes the last checkpoint of the same level")
    return checkpoint


def _holds_a_dict(path):
    """Whether a torch.save file's pickle starts with a dict (a checkpoint), read without unpickling anything: the
    first opcode after the protocol. False for a whole model (its class comes first) or an unreadable file."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            opcodes = pickletools.genops(io.BytesIO(archive.read(name)[:64]))
            _, (first, argument, _) = itertools.islice(opcodes, 2)  # PROTO, then what the object starts with
    except Exception:  # not a zip archive (an old torch.save format), a truncated pickle
        return True
    return first.name == "EMPTY_DICT" or argument == "collections OrderedDict"


def resume(args, level, flags, model, optimizer, scaler, averages=None):
    """--resume: the level's levelN_last.pth, checked by check_resume against `flags` (the level's RESUME_FLAGS), and
    every state it holds restored: weights, optimiser, loss scale, weight averages (one the saved run did not have
    starts from its weights). Returns (epochs done, best validation accuracy, history); without --resume, a fresh
    start: (0, -1.0, [])."""
    if not args.resume:
        return 0, -1.0, []
    checkpoint = load_checkpoint(args.resume, level)
    check_resume(checkpoint, args, flags)
    model.load_state_dict(checkpoint["model"])
    for name, average in (averages or {}).items():
        saved = checkpoint["averages"].get(name, {"module": checkpoint["model"], "num_updates": 0})
        average.module.load_state_dict(saved["module"])
        average.num_updates = saved["num_updates"]
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:  # empty when it was saved by a bf16 or fp32 run
        scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["epoch"], _best_acc(checkpoint, args), checkpoint["history"]


def _best_acc(checkpoint, args):
    """The best validation accuracy to beat. levelN_best.pth is written before levelN_last.pth: a run killed between
    the two left a best.pth of an epoch that last.pth does not hold, which the resumed run trains again (with other
    weights). Its history would not describe that best.pth, so the epoch run again replaces it whatever its score
    (-1.0, as at a fresh start); the weights of the earlier best epoch were already replaced by the killed run."""
    best_path = Path(args.resume).resolve().parent / f"{checkpoint['level']}_best.pth"
    best_epoch = load_checkpoint(best_path).get("epoch", 0)
    if best_epoch <= checkpoint["epoch"]:
        return checkpoint["best_acc"]
    print(f"warning: {best_path} is of epoch {best_epoch}, which {Path(args.resume).name} (epoch "
          f"{checkpoint['epoch']}) does not hold: the run stopped between the two writes; epoch "
          f"{checkpoint['epoch'] + 1} runs again and replaces it")
    return -1.0


def check_resume(checkpoint, args, flags):
    """--resume: in the run's own folder, which holds its best checkpoint, with the saved value of each of `flags`;
    a different value is refused."""
    folder = Path(args.resume).resolve().parent
    if folder != Path(args.checkpoint_dir).resolve():
        raise UserError(f"--resume {args.resume} is not in --checkpoint-dir {args.checkpoint_dir}: resume in the "
                        f"run's own folder")
    for name in flags:
        saved = checkpoint["args"].get(name)
        given = vars(args).get(name)
        if saved != given:
            raise UserError(f"--{name.replace('_', '-')} was {saved} in the saved run, {given} now: resume with the "
                            f"saved value (it fixed the epochs already run)")
    best = folder / f"{checkpoint['level']}_best.pth"
    if not best.is_file():
        raise UserError(f"{best} is missing, and the final test measures it: put it back, or start anew (--overwrite)")


def check_writable(folder, flag, probe_bytes=2**20):
    """`folder` made and a probe of a run's JSON and plots written: a full or read-only disk fails now, not later."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(bytes(probe_bytes))
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise UserError(f"cannot write to {flag} {folder} ({error.strerror or error}): choose another, or free "
                        f"space") from None


# ---- The run folder: made and test-written, locked, an earlier run kept ------------------------------------------
def start_run(level, checkpoint_dir, results_dir, resume=None, overwrite=False):
    """Before any data is read, so that a run fails in its first second, not after hours: both folders made and
    test-written, `levelN.lock` taken, an earlier run and its results kept unless --resume/--overwrite, orphaned temp
    files removed."""
    checkpoint_dir = Path(checkpoint_dir)
    results = Path(results_dir) / f"{level}.json"
    check_writable(checkpoint_dir, "--checkpoint-dir")
    check_writable(results_dir, "--results-dir")
    _take_lock(checkpoint_dir / f"{level}.lock")
    last = checkpoint_dir / f"{level}_last.pth"
    RUN["last"] = last
    earlier = [checkpoint_dir / f"{level}_best.pth", last]
    if not (resume or overwrite) and any(path.is_file() for path in earlier):
        way = f"(it saved no {last.name} to resume) "
        if last.is_file():
            way = f"continue it with --resume {last}, "
        raise UserError(f"{checkpoint_dir} holds an earlier {level} run: {way}replace it with --overwrite, or choose "
                        f"another --checkpoint-dir")
    if results.is_file() and not overwrite and not (resume and _results_of(results, level, resume)):
        raise UserError(f"{results} holds the results of another run: keep them with another --results-dir, or "
                        f"replace them with --overwrite")
    remove_orphans([checkpoint_dir, results_dir], f".{level}*.tmp")


def remove_orphans(folders, pattern, min_age_s=0):
    """The temp files of atomic writes that a killed process left (`pattern`, e.g. ".level1*.tmp"), removed with one
    line. start_run holds the folder's lock, so none of its level's is in flight; without a lock (evaluate.py, the
    studies) only files older than `min_age_s` go: a JSON in flight is renamed within a second."""
    now, orphans = time.time(), {}  # path -> bytes
    for folder in folders:
        for path in Path(folder).glob(pattern):
            with contextlib.suppress(OSError):  # removed meanwhile
                stat = path.stat()
                if path.is_file() and now - stat.st_mtime >= min_age_s:
                    orphans[path] = stat.st_size
    if orphans:
        print(f"removed {len(orphans)} temp files of interrupted saves: {sum(orphans.values()) / 2**20:.0f} MB freed")
        for path in orphans:
            path.unlink(missing_ok=True)


def _results_of(results, level, resume):
    """Whether levelN.json is of the run --resume continues: the same first epoch, as it reads back from JSON."""
    first = json.loads(json.dumps(load_checkpoint(resume, level)["history"][:1]))
    try:
        return json.loads(results.read_text())["history"][:1] == first
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _take_lock(path):
    """`path` holds "pid host" while a run writes to the folder; a dead process's lock is taken over."""
    me = f"{os.getpid()} {socket.gethostname()}"
    try:
        with open(path, "x") as f:  # "x": fails if it exists, so two runs starting at once cannot both succeed
            f.write(me)
    except FileExistsError:
        if not path.is_file():  # reading a named pipe would wait for ever, a directory cannot be read
            raise UserError(f"{path} is not a lock file (a directory or a named pipe): remove it, or choose another "
                            f"--checkpoint-dir") from None
        _take_over(path, me)
    except OSError as error:  # disk full: no empty lock left behind
        path.unlink(missing_ok=True)
        raise write_error(path, error) from None
    atexit.register(_release_lock, path, me)


def _take_over(path, me):
    """A lock from a dead process on this host is taken over; parsed robustly (a newline, an empty file)."""
    owner = path.read_text(errors="replace").split()
    pid = ""
    if owner and owner[0].isdigit():
        pid = owner[0]
    host = " ".join(owner[1:]) or socket.gethostname()
    if pid and host != socket.gethostname():
        raise UserError(f"{path} is held by process {pid} on {host}, which cannot be checked from here: if no run "
                        f"is active there (a restarted container or VM), delete {path}")
    if pid and int(pid) != os.getpid() and _alive(int(pid)):
        raise UserError(f"{path} is held by process {pid} on {host}: another run writes to this folder; wait for it "
                        f"to end, or choose another --checkpoint-dir")
    if pid != str(os.getpid()):
        print(f"warning: {path} was left by process {pid or '(none named)'}, which no longer runs: taking it over")
    path.write_text(me)  # a full disk here: run_main's one line


def _release_lock(path, me):
    try:
        if path.read_text() == me:
            path.unlink()
    except OSError:  # the folder became read-only: the next run here takes over a dead process's lock
        pass


def _alive(pid):
    try:
        return os.kill(pid, 0) is None  # signal 0 only checks that the process exists
    except OSError as error:
        return isinstance(error, PermissionError)  # another user's process


# ---- Checkpoints written in the background -------------------------------------------------------------------------
class CheckpointWriter:
    """save_checkpoint in one background thread while the next epoch trains. save({path: checkpoint}) returns once it
    holds a CPU copy of all (from CUDA: non-blocking copies to pinned memory, one sync), so later changes to the model
    cannot reach the files. One save in flight at most: save() and wait() wait for it first, and raise its error."""

    def __init__(self):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.pending = None  # the Future of the save in flight
        RUN["writers"].append(self)  # so that Ctrl-C or SIGTERM waits for its save

    def save(self, files):
        RUN["saving"] = True  # a Ctrl-C inside submit() would leave a write that no stop waits for, and a hung exit
        try:
            self.wait()
            memo = {}  # shared by the files: the weights that best and last both hold are copied once
            copies = {path: _cpu_copy(checkpoint, memo) for path, checkpoint in files.items()}
            if any(tensor.is_cuda for tensor, _ in memo.values()):
                torch.cuda.synchronize()  # the non-blocking copies have landed
            self.pending = self.executor.submit(_write_all, copies)
        finally:
            RUN["saving"] = False
        if RUN["interrupted"]:  # the signal that came during the hand-over, now that the stop can wait for it
            RUN["interrupted"] = False
            raise KeyboardInterrupt

    def busy(self):
        return self.pending is not None and not self.pending.done()

    def wait(self, timeout=None):
        """The save in flight finished, its error raised here (once); TimeoutError after `timeout` s in flight."""
        pending = self.pending
        if pending is None:
            return
        concurrent.futures.wait([pending], timeout)
        if not pending.done():
            raise TimeoutError(f"the checkpoint write in flight did not end in {timeout} s")
        self.pending = None
        pending.result()  # re-raises the writer thread's exception in this one


def _write_all(copies):
    for path, checkpoint in copies.items():
        try:
            save_checkpoint(path, checkpoint)
        except OSError as error:  # an I/O error atomic_write does not name: the previous file is still whole
            raise UserError(f"writing {path} failed ({error.strerror or error}); the previous one is intact: fix the "
                            f"disk, then --resume") from None


def _cpu_copy(value, memo):
    """A checkpoint's dicts, lists and tensors copied, tensors to the CPU; memo: id -> (tensor, its copy)."""
    if isinstance(value, dict):  # an OrderedDict stays one, and a state_dict keeps its _metadata (module versions)
        copied = type(value)((key, _cpu_copy(item, memo)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            copied._metadata = copy.deepcopy(value._metadata)
        return copied
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item, memo) for item in value)
    if not torch.is_tensor(value):
        return value  # numbers, strings, None: immutable
    if id(value) not in memo:
        if value.is_cuda:  # pinned: a DMA transfer that this thread need not wait for
            cpu = torch.empty_like(value, device="cpu", pin_memory=True)
            cpu.copy_(value.detach(), non_blocking=True)
        else:
            cpu = value.detach().to("cpu", copy=True)
        memo[id(value)] = (value, cpu)  # the source kept too: its id cannot be reused while the memo lives
    return memo[id(value)][1]
