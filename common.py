"""What every script needs (errors, data, model, precision, checkpoints), then the hand-written techniques, each
under its banner and tested against a library or a hand-computed answer (tests/test_techniques.py). No flag parsing,
distributed training, plots or metrics here: each level owns its recipe, evaluate.py owns the measurement."""
import argparse
import atexit
import concurrent.futures
import copy
import errno
import functools
import io
import json
import math
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The pretrained backbone saw ImageNet images normalised with these statistics, so ours must match them.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_WEIGHTS = torchvision.models.ResNet50_Weights.IMAGENET1K_V2

# ---- Errors: bad input is one line on stderr and exit code 2, never a traceback -----------------------------------
class UserError(Exception):
    """A problem with the input, files or machine that the user can fix."""

def fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)

def _on_signal(signum, frame):  # Ctrl-C, or SIGTERM (what Colab, Kaggle, Slurm, Kubernetes send at preemption)
    _RUN["stopping"] = signum
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a DataLoader worker that ends now is part of the stop, no error
    raise KeyboardInterrupt

def _stop(signum):
    print(f"\n{signal.Signals(signum).name}: interrupted (a level's levelN_last.pth holds its last finished epoch: "
          f"--resume it)", file=sys.stderr)
    sys.exit(128 + signum)

def _finish_writes():  # a stop first lets the save in flight end: levelN_last.pth then holds the last finished epoch
    for writer in _RUN.get("writers", []):
        try:
            writer.wait()
        except UserError:  # a failed write leaves the previous file whole; the stop's line is the one to print
            pass

def worker_init(worker_id):
    """DataLoader workers leave SIGINT to the main process, which stops them; SIGTERM ends them quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

def run_main(main, parser, validate):
    """Parse, validate, run: a UserError, a bad flag, a full or read-only disk or running out of memory is one line and
    exit code 2; Ctrl-C and SIGTERM one line and 128 + the signal's number."""
    parser.error = lambda message: fail(f"{message} (see --help)")  # the parser's usage + error, as one line
    args = parser.parse_args()
    handlers = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    _RUN.clear()
    try:
        validate(args)
        return main(args)
    except UserError as error:
        fail(error)
    except KeyboardInterrupt:
        _finish_writes()
        _stop(_RUN.get("stopping", signal.SIGINT))
    except OSError as error:  # a write outside atomic_write, e.g. a plot
        if error.errno not in WRITE_ERRNOS:
            raise
        fail(write_error(error.filename or "a file", error))
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        text = str(error).lower()
        if "dataloader worker" in text and "stopping" in _RUN:  # it ended in the same Ctrl-C or SIGTERM
            _stop(_RUN["stopping"])
        if os.environ.get("RANK", "0") != "0" and isinstance(error, torch.distributed.DistBackendError):
            sys.exit(2)  # torchrun: rank 0 stopped (with its own one line) while this rank waited for it
        if "overflow" in text:  # e.g. AdamW given --lr 1e38
            fail(f"a number overflowed ({text.splitlines()[0][:80]}): lower --lr/--head-lr")
        if not isinstance(error, MemoryError) and "out of memory" not in text and "allocate memory" not in text:
            raise
        fail(f"out of memory at --batch-size {getattr(args, 'batch_size', '?')} and --img-size "
             f"{getattr(args, 'img_size', '?')}: halve --batch-size, or lower --img-size")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

def check_flags(args, positive=(), non_negative=(), fraction=()):
    """Every float flag finite (nan fails every comparison: `lr <= 0` lets it through), each named one in range."""
    floats = [name for name, value in vars(args).items() if isinstance(value, float)]
    for names, test, text in ((floats, math.isfinite, "a finite number"), (positive, lambda v: v > 0, "> 0"),
                              (non_negative, lambda v: v >= 0, ">= 0"), (fraction, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for name in names:
            if getattr(args, name) is not None and not test(getattr(args, name)):
                raise UserError(f"--{name.replace('_', '-')} must be {text} (got {getattr(args, name)})")
    if not 0 <= getattr(args, "seed", 0) < 2**32:  # numpy's generators take no other seed
        raise UserError(f"--seed must be in [0, 2**32 - 1] (got {args.seed})")

# ---- Data: CIFAR-10 (Krizhevsky 2009) from its python pickles; batches prepared on the device ---------------------
class _ArraysOnly(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (dicts, lists, str, numpy arrays), nothing that could run code."""

    def find_class(self, module, name):
        if module.split(".")[0] in ("numpy", "_codecs") and name in ("ndarray", "dtype", "_reconstruct", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

def read_batch(path):
    """One batch file -> (N x 3 x 32 x 32 uint8 images, N int64 labels), every field checked."""
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()
    except OSError as error:
        raise UserError(f"{path} cannot be read ({error.strerror or error}): fix or re-extract it") from None
    except Exception as error:  # truncated, random bytes, objects: not a CIFAR-10 batch either way
        raise UserError(f"{path} is not a CIFAR-10 batch ({type(error).__name__}): re-extract it") from None
    data, labels = (batch.get("data"), np.asarray(batch.get("labels"))) if isinstance(batch, dict) else (None, None)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), not "
                        f"{getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')}: re-extract it")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or not ((labels >= 0) & (labels <= 9)).all():
        raise UserError(f"{path}: 'labels' must be {len(data)} integers in 0..9: re-extract it")
    # Each row is channel-planar (1,024 red, then green, then blue values, row-major): a plain reshape gives CHW.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)

def split_indices(labels, seed, val_per_class=500):
    """Stratified: `val_per_class` images per class held out; the rest shuffled, so the first N are a fair sample."""
    rng = np.random.default_rng(seed)
    val = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:val_per_class] for c in range(10)]))
    return rng.permutation(np.setdiff1d(np.arange(len(labels)), val)), val

class CifarDataset(torch.utils.data.Dataset):
    """uint8 N x 3 x 32 x 32 images and labels; `transform` runs in the DataLoader workers, at 32 px: cheap there."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = torch.as_tensor(images), torch.as_tensor(labels), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return (self.transform or (lambda image: image))(self.images[index]), self.labels[index]

def cifar10_datasets(data_dir, seed, subset=None, eval_subset=None, train_on_all=False, transform=None):
    """(train, val, test): the training set split 45,000 / 5,000 by `seed` (50,000 / 0 with `train_on_all`), the first
    `subset` / `eval_subset` images; a missing folder downloaded by torchvision (offline: a one-line error)."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    if (Path(data_dir) / "data_batch_1").is_file():  # --data-dir given as the cifar-10-batches-py folder itself
        folder = Path(data_dir)
    elif not folder.is_dir():
        print(f"{folder} not found: downloading CIFAR-10 (170 MB) with torchvision ...", flush=True)
        socket.setdefaulttimeout(30)  # offline, give up after 30 s instead of hanging
        try:
            torchvision.datasets.CIFAR10(str(data_dir), train=True, download=True)
        except Exception as error:
            raise UserError(f"CIFAR-10 is not at {folder} and could not be downloaded ({type(error).__name__}): "
                            f"extract cifar-10-python.tar.gz so that {folder}/data_batch_1 exists") from None
    parts = [read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    images, labels = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    test_images, test_labels = read_batch(folder / "test_batch")
    train, val = split_indices(labels, seed, val_per_class=0 if train_on_all else 500)
    train, val = train[:subset], val[:eval_subset]
    return (CifarDataset(images[train], labels[train], transform), CifarDataset(images[val], labels[val]),
            CifarDataset(test_images[:eval_subset], test_labels[:eval_subset]))

def batches(dataset, batch_size, device, drop_last=False):
    """Evaluation batches: slices of the uint8 tensors, pinned on CUDA; no DataLoader workers to start or wait for."""
    images = dataset.images.pin_memory() if device.type == "cuda" else dataset.images
    for start in range(0, len(images) - (len(images) % batch_size if drop_last else 0), batch_size):
        yield images[start:start + batch_size], dataset.labels[start:start + batch_size]

@functools.lru_cache(maxsize=None)
def _imagenet_stats(device):  # once per device: built from Python numbers, they would be copied to it every step
    return [torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD)]

def prepare_batch(images, device, img_size, view=None):
    """uint8 N x 3 x 32 x 32 batch -> on the device: [0, 1], a TTA `view` (at 32 px), upsampled to `img_size`,
    ImageNet-normalised, channels_last (the fast memory layout for convolutions in mixed precision)."""
    images = images.to(device, non_blocking=True).float().div_(255)
    images = view(images) if view is not None else images
    if images.shape[-1] != img_size:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    mean, std = _imagenet_stats(device)
    return ((images - mean) / std).contiguous(memory_format=torch.channels_last)

def resolve_device(name):
    """'auto': CUDA, else Apple's MPS, else the CPU; any other name is checked and taken as given."""
    name = ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu") \
        if name == "auto" else name
    try:
        torch.empty(1, device=name)
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"device {name!r} is not usable here ({str(error)[:80]}): use --device cpu or auto") from None
    return torch.device(name)

@functools.lru_cache(maxsize=None)
def amp_dtype(device):
    """Mixed precision (Micikevicius et al. 2018): bf16 where GPUs compute it natively (NVIDIA from compute capability
    8.0, AMD); fp16, which needs a GradScaler, on older NVIDIA GPUs (T4, V100, P100); None (fp32) elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16

def autocast(device):
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp_dtype(device) is not None)

# ---- Model: torchvision's ResNet-50 (He et al. 2016) with a new 10-class head -------------------------------------
def build_model(weights="imagenet", dropout=0.0):
    """ResNet-50 with a new 10-class head; `weights`: imagenet (IMAGENET1K_V2), none (random init) or a state_dict or
    checkpoint path. Dropout (Srivastava et al. 2014) after the pooling keeps torchvision's key names."""
    model = torchvision.models.resnet50()
    model.fc = nn.Linear(model.fc.in_features, len(CLASSES))
    if dropout > 0:
        model.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(dropout))
    if weights == "imagenet":
        socket.setdefaulttimeout(30)
        try:
            state_dict = IMAGENET_WEIGHTS.get_state_dict(progress=False)
        except Exception as error:
            raise UserError(f"ImageNet weights {os.path.basename(IMAGENET_WEIGHTS.url)} are not in "
                            f"{torch.hub.get_dir()}/checkpoints and could not be downloaded ({type(error).__name__}): "
                            f"copy the file there, or use --weights none (random init) or --weights PATH") from None
        load_weights(model, state_dict, "ImageNet weights")
    elif weights != "none":
        load_weights(model, load_checkpoint(weights), weights)
    return model

def load_weights(model, state_dict, source):
    """A state_dict or a checkpoint's `model` into `model`: a 10-class one whole, an ImageNet one but its head; keys
    lose DDP's `module.` and torch.compile's `_orig_mod.` prefixes. Mismatches and nan are one-line errors."""
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict)) if isinstance(state_dict, dict) \
        else state_dict
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise UserError(f"{source} holds no model state_dict: give a ResNet-50 state_dict or checkpoint")
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    if getattr(state_dict.get("fc.weight"), "shape", (0,))[0] == 1000:  # ImageNet's head: keep the new one
        state_dict.update({"fc.weight": model.fc.weight, "fc.bias": model.fc.bias})
    if not all(v.isfinite().all() for v in state_dict.values() if v.is_floating_point()):
        raise UserError(f"{source} holds non-finite weights (nan or inf): it comes from a diverged run")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise UserError(f"{source} is not a 10-class ResNet-50 ({' '.join(str(error).split()[6:])[:150]})") from None

# ---- Checkpoints and run folders: written to a temp file and renamed; loaded with weights_only=True ---------------
os.umask(UMASK := os.umask(0o022))  # the umask can only be read by setting it: set it back at once
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # full, read-only, not allowed
_RUN = {}  # this process's run: its levelN_last.pth (start_run), the signal that stops it (run_main)

def write_error(path, error):  # the one line for a failed write; --resume only where a levelN_last.pth is there
    last = _RUN.get("last", Path("-"))
    hint = f"; then --resume {last} (a finished run measures and writes its results again)" if last.is_file() else ""
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
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            raise write_error(path, error) from None
        raise

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
    if not path.is_file():
        raise UserError(f"{path} is {'a directory' if path.is_dir() else 'not there'}: give the path of a .pth file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        found = re.search(r"unsupported (global: )?GLOBAL (\S+)", str(error), re.IGNORECASE)  # a class or function
        if found:
            raise UserError(f"{path} was refused: it holds a pickled {found[2]}, which could run code; if you trust "
                            f"the file, convert it: torch.save(torch.load(PATH, weights_only=False)['model'], "
                            f"'weights.pth')") from None
        raise UserError(f"{path} is not a PyTorch checkpoint (empty, truncated, or another kind of file)") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = vars(checkpoint["args"])
    if level and not (isinstance(checkpoint, dict) and checkpoint.get("level") == level and "optimizer" in checkpoint):
        raise UserError(f"{path} is not a {level}_last.pth: --resume takes the last checkpoint of the same level")
    return checkpoint

def check_resume(checkpoint, args, flags):
    """--resume: in the run's own folder, which holds its best checkpoint, with the saved value of each of `flags`."""
    folder = Path(args.resume).resolve().parent
    if folder != Path(args.checkpoint_dir).resolve():
        raise UserError(f"--resume {args.resume} is not in --checkpoint-dir {args.checkpoint_dir}: resume in the "
                        f"run's own folder")
    for name in flags:
        saved, given = checkpoint["args"].get(name), vars(args).get(name)
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
        raise UserError(f"cannot write to {flag} {folder} ({error.strerror or error}): choose another, or free space") \
            from None

def start_run(level, checkpoint_dir, results_dir, resume=None, overwrite=False):
    """Before any data is read, so that a run fails in its first second, not after hours: both folders made and
    test-written, `levelN.lock` taken, an earlier run and its results kept unless --resume/--overwrite, orphaned temp
    files removed."""
    checkpoint_dir, results = Path(checkpoint_dir), Path(results_dir) / f"{level}.json"
    for folder, flag in ((checkpoint_dir, "--checkpoint-dir"), (Path(results_dir), "--results-dir")):
        check_writable(folder, flag)
    _take_lock(checkpoint_dir / f"{level}.lock")
    last = _RUN["last"] = checkpoint_dir / f"{level}_last.pth"
    if not (resume or overwrite) and any(checkpoint_dir.glob(f"{level}_[bl][ea]st.pth")):  # _best, _last
        way = f"continue it with --resume {last}, " if last.is_file() else f"(it saved no {last.name} to resume) "
        raise UserError(f"{checkpoint_dir} holds an earlier {level} run: {way}replace it with --overwrite, or choose "
                        f"another --checkpoint-dir")
    if results.is_file() and not overwrite and not (resume and _results_of(results, level, resume)):
        raise UserError(f"{results} holds the results of another run: keep them with another --results-dir, or "
                        f"replace them with --overwrite")
    orphans = {p for folder in (checkpoint_dir, results_dir) for p in Path(folder).glob(f".{level}*.tmp")}
    if orphans:
        print(f"removed {len(orphans)} temp files of interrupted saves: "
              f"{sum(p.stat().st_size for p in orphans) / 2**20:.0f} MB freed")
        for p in orphans:
            p.unlink()

def start_ranks(level, args, rank, world_size):
    """start_run on rank 0; under torchrun its error stops every rank: rank 0 prints it, the others exit 2 silently
    (rather than with the traceback of a barrier whose peer is gone)."""
    message = [None]
    try:
        if rank == 0:
            start_run(level, args.checkpoint_dir, args.results_dir, args.resume, args.overwrite)
    except UserError as error:
        message = [str(error)]
    if world_size > 1:
        torch.distributed.broadcast_object_list(message)  # from rank 0
    if message[0] and rank == 0:
        raise UserError(message[0])
    if message[0]:
        sys.exit(2)

def _results_of(results, level, resume):  # whether levelN.json is of the run --resume continues: its first epoch
    first = json.loads(json.dumps(load_checkpoint(resume, level)["history"][:1]))  # as it reads back from JSON
    try:
        return json.loads(results.read_text())["history"][:1] == first
    except (OSError, ValueError, KeyError, TypeError):
        return False

def _take_lock(path):  # `path` holds "pid host" while a run writes to the folder; a dead process's lock is taken over
    me = f"{os.getpid()} {socket.gethostname()}"
    try:
        with open(path, "x") as f:  # "x": fails if it exists, so two runs starting at once cannot both succeed
            f.write(me)
    except FileExistsError:
        _take_over(path, me)
    except OSError as error:  # disk full: no empty lock left behind
        path.unlink(missing_ok=True)
        raise write_error(path, error) from None
    atexit.register(_release_lock, path, me)

def _take_over(path, me):  # a lock from a dead process on this host; parsed robustly (a newline, an empty file)
    owner = path.read_text(errors="replace").split()
    pid = owner[0] if owner and owner[0].isdigit() else ""
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

class CheckpointWriter:
    """save_checkpoint in one background thread while the next epoch trains. save({path: checkpoint}) returns once it
    holds a CPU copy of all (from CUDA: non-blocking copies to pinned memory, one sync), so later changes to the model
    cannot reach the files. One save in flight at most: save() and wait() wait for it first, and raise its error."""

    def __init__(self):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.pending = None  # the Future of the save in flight
        _RUN.setdefault("writers", []).append(self)  # so that Ctrl-C or SIGTERM waits for its save

    def save(self, files):
        self.wait()
        memo = {}  # shared by the files: the weights that best and last both hold are copied once
        copies = {path: _cpu_copy(checkpoint, memo) for path, checkpoint in files.items()}
        if any(tensor.is_cuda for tensor, _ in memo.values()):
            torch.cuda.synchronize()  # the non-blocking copies have landed
        self.pending = self.executor.submit(_write_all, copies)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()  # re-raises the writer thread's exception in this one

def _write_all(copies):
    for path, checkpoint in copies.items():
        try:
            save_checkpoint(path, checkpoint)
        except OSError as error:  # a full disk, a folder that vanished: the previous file is still whole
            raise UserError(f"writing {path} failed ({error.strerror or error}); the previous one is intact: free "
                            f"space or restore the folder, then --resume") from None

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

# ---- Label smoothing and soft targets (Szegedy et al. 2016, "Rethinking the Inception Architecture", sec. 7) ------
def smooth_one_hot(labels, smoothing=0.0, num_classes=len(CLASSES)):
    """N labels -> N x K soft targets: 1 - smoothing on the true class, plus smoothing / K on every class."""
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes

def soft_cross_entropy(logits, targets):
    """Cross-entropy against soft targets (rows summing to 1): the batch mean of -sum_k t_k log p_k."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()

# ---- MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019), on whole batches on the device -----------------------
def mixup(images, targets, lam):
    """MixUp, eq. 1: images (N x C x H x W) and soft targets (N x K) blended with their neighbours (roll by one)."""
    return lam * images + (1 - lam) * images.roll(1, 0), lam * targets + (1 - lam) * targets.roll(1, 0)

def cutmix(images, targets, lam):
    """CutMix, sec. 3.1: a box of area fraction 1 - lam with a uniform centre, clipped at the border, pasted from the
    neighbour; the targets are weighted by the area actually pasted."""
    height, width = images.shape[-2:]
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images.roll(1, 0)[..., top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (height * width)
    return mixed, lam * targets + (1 - lam) * targets.roll(1, 0)

def mix_batch(images, targets, mix_prob, switch_prob, mixup_alpha, cutmix_alpha):
    """With probability `mix_prob`, CutMix (`switch_prob`) or MixUp of the batch, lam ~ Beta(alpha, alpha), drawn on
    the CPU so that nothing waits for the device."""
    if mix_prob <= 0 or max(mixup_alpha, cutmix_alpha) <= 0 or float(torch.rand(())) >= mix_prob:
        return images, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand(())) < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return cutmix(images, targets, lam) if use_cutmix else mixup(images, targets, lam)

# ---- Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation", alg. 1), vectorised on the device -----
def random_erasing(images, prob, area=(0.02, 0.33), log_ratio=(math.log(0.3), math.log(3.3))):
    """Each normalised image, with probability `prob`, gets one rectangle of `area` fraction and aspect ratio in
    exp(`log_ratio`) replaced by N(0, 1) noise; a rectangle that would not fit is clipped, not re-drawn."""
    if prob <= 0:
        return images
    n, _, height, width = images.shape
    uniform = torch.rand(5, n, 1, 1, device=images.device)  # per image: erase?, area, ratio, top, left
    target_area = (area[0] + (area[1] - area[0]) * uniform[1]) * height * width
    ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform[2])
    h = (target_area * ratio).sqrt().round().clamp(1, height)
    w = (target_area / ratio).sqrt().round().clamp(1, width)
    top, left = (uniform[3] * (height - h + 1)).floor(), (uniform[4] * (width - w + 1)).floor()
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & (uniform[0] < prob)
    return torch.where(inside.unsqueeze(1), torch.randn_like(images), images)

# ---- Learning rate: linear warmup (Goyal et al. 2017), then cosine decay (Loshchilov & Hutter 2017, "SGDR") -------
def warmup_cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr=0.0, warmup_start_factor=0.01):
    """The LR at optimiser `step` (0-based), a pure function of it: equal to torch's SequentialLR of
    LinearLR(warmup_start_factor, 1, warmup_steps) and CosineAnnealingLR(total_steps - warmup_steps, min_lr)."""
    if step < warmup_steps:
        return base_lr * (warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

# ---- Weight averages: EMA (Polyak & Juditsky 1992), SWA (Izmailov et al. 2018), and their BatchNorm statistics ----
class ModelEma:
    """Exponential moving average of the weights after each step: ema = d ema + (1 - d) w, with d = min(decay,
    (1 + n) / (10 + n)) after n updates when `warmup` (TensorFlow's num_updates). BatchNorm: see recompute_bn."""

    def __init__(self, model, decay=0.999, warmup=True):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self):
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model):
        step = 1 - self.current_decay()  # once per update, not once per parameter
        for average, weight in zip(self.module.parameters(), model.parameters()):
            average.lerp_(weight, step)  # average += (1 - d) * (weight - average)
        self.num_updates += 1

class SwaAverage(ModelEma):
    """Stochastic Weight Averaging: the equal-weight mean of the weights passed to `update`, an EMA with d = n / (n + 1)
    after n updates (the first update copies the weights)."""

    def current_decay(self):
        return self.num_updates / (self.num_updates + 1)

def bn_images(dataset, count, transform=None, seed=0):
    """The first `count` images of `dataset` (uint8 N x 3 x 32 x 32), each through `transform` (a level's training
    augmentation: crop, flip, RandAugment), with the global RNG seeded by `seed` inside fork_rng, so that the same
    images come out every time and the run's own random stream is restored after. Without `transform`: clean."""
    images, labels = dataset.images[:count], dataset.labels[:count]
    if transform is not None:
        with torch.random.fork_rng(devices=[]):  # the training run's own random stream is not disturbed
            torch.manual_seed(seed)
            images = torch.stack([transform(image) for image in images])  # in order, as a DataLoader with -j 0
    return CifarDataset(images, labels)

@torch.no_grad()
def recompute_bn(model, dataset, device, img_size, batch_size, norms=None):
    """BatchNorm statistics of `model` from one pass over `dataset` (uint8 images, see bn_images), in batches of
    `batch_size` (the levels pass the global training batch): torch.optim.swa_utils.update_bn's procedure (reset,
    cumulative average, train mode). An average of weights needs statistics of its own (Izmailov et al. 2018, sec.
    3.2), and they must come from the distribution the layers trained on: update_bn and the SWA paper's
    `bn_update(loaders['train'], ...)` run over the *training* loader, augmentation included (MixUp/CutMix and
    erasing act on the batch after the loader, so not). `norms`: the BatchNorm layers to recompute (default: all);
    the others keep their statistics and stay in eval mode, as frozen stages do in training."""
    if norms is None:
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    model.eval()  # only the layers recomputed in train mode (the dropout before the head comes after every one)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None = cumulative average
        m.train()
    for images, _ in batches(dataset, min(batch_size, len(dataset)), device, drop_last=True):  # no batch of one
        with autocast(device):
            model(prepare_batch(images, device, img_size))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()

# ---- Test-time augmentation: deterministic views of the 32-px [0, 1] batch, and the multi-view prediction ---------
def _shift(images, dy, dx):  # translate by (dy, dx) pixels, filling with zeros as the training crop's padding does
    pad, (height, width) = max(abs(dy), abs(dx)), images.shape[-2:]
    return F.pad(images, (pad,) * 4)[..., pad - dy:pad - dy + height, pad - dx:pad - dx + width]

def _zoom(images, scale=1.125):  # zoom in about the centre of square images: upsample by `scale`, crop back
    side = images.shape[-1]
    big = F.interpolate(images, size=(round(side * scale),) * 2, mode="bilinear", align_corners=False)
    offset = (big.shape[-1] - side) // 2
    return big[..., offset:offset + side, offset:offset + side]

TTA_VIEWS = {"identity": lambda x: x, "flip": lambda x: x.flip(-1), "shift_right": lambda x: _shift(x, 0, 2),
             "shift_left": lambda x: _shift(x, 0, -2), "shift_down": lambda x: _shift(x, 2, 0),
             "shift_up": lambda x: _shift(x, -2, 0), "zoom": _zoom, "flip_zoom": lambda x: _zoom(x.flip(-1))}
TTA_SETS = {"none": ["identity"], "flip": ["identity", "flip"],
            "flip+translate": ["identity", "flip", "shift_right", "shift_left", "shift_down", "shift_up"]}
TTA_SETS["flip+translate+scale"] = TTA_SETS["flip+translate"] + ["zoom", "flip_zoom"]

@torch.no_grad()
def predict(model, dataset, device, img_size, views=("identity",), batch_size=256):
    """(V x N x K logits of every view, float32 on the CPU; N labels), kept on the device to the end: one sync."""
    model.eval()
    outputs = []
    for images, _ in batches(dataset, batch_size, device):
        with autocast(device):
            outputs.append(torch.stack([model(prepare_batch(images, device, img_size, TTA_VIEWS[view])).float()
                                        for view in views]))
    return torch.cat(outputs, dim=1).cpu(), dataset.labels

def average_views(view_logits, temperature=1.0, average="softmax"):
    """V x N x K logits -> N x K probabilities: the mean over views of softmax(logits / T), or ("logit") the softmax
    of the mean logits / T. Predict with T = 1: with several views, another T can change the top class."""
    if average == "logit":
        return (view_logits.mean(0) / temperature).softmax(-1)
    return (view_logits / temperature).softmax(-1).mean(0)

# ---- Calibration: temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", sec. 4.2) -----
def nll_per_image(view_logits, labels, temperature=1.0, average="softmax"):
    """Each image's exact NLL under average_views(view_logits, temperature, average), from V x N x K (or N x K) logits
    in float64, no clamp: minus the log-softmax of the mean logits ("logit"); for the softmax average,
    log(mean_v p_v) = logsumexp_v(log p_v) - log V. It is what fit_temperature minimises and evaluate.py reports."""
    logits = view_logits.double() / temperature
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)  # one view
    if average == "logit":
        log_probs = logits.mean(0).log_softmax(-1)
    else:
        log_probs = logits.log_softmax(-1).logsumexp(0) - math.log(len(logits))
    return -log_probs.gather(1, labels.long()[:, None]).squeeze(1)

def fit_temperature(view_logits, labels, average="softmax", low=1e-2, high=1e2, iterations=100):
    """The T minimising the NLL of the labels under the views' average at T (nll_per_image: V x N x K validation logits,
    or N x K for one view), so that each TTA set gets the T of its own average: golden-section search on log T in
    [log low, log high], where the NLL is unimodal. Returns (T, at_bound): at_bound, the optimum is at an end, so T is
    no fit (chance-level logits want T = infinity). T > 0 keeps the arg-max of one view's logits; with several
    views and softmax averaging it could change the top class, so predictions come from the T = 1 average."""
    nll = lambda log_t: float(nll_per_image(view_logits, labels, math.exp(log_t), average).mean())  # noqa: E731
    lo, hi, golden = math.log(low), math.log(high), (math.sqrt(5) - 1) / 2
    for _ in range(iterations):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    log_t = (lo + hi) / 2
    at_bound = min(nll(math.log(low)), nll(math.log(high))) <= nll(log_t) + 1e-9  # no better than an end: not a fit
    if nll(log_t) >= nll(0.0):  # keep T = 1 unless the fit is better
        return 1.0, at_bound
    return math.exp(log_t), at_bound
