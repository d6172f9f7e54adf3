"""Training checkpoints: atomic saves, and loads with torch.load(weights_only=True) that say what is wrong.

A checkpoint is a dict of plain values (tensors, numbers, strings, None, lists/tuples/dicts of them):
model and optimizer state_dicts, the step, RNG states (see capture_rng_state), the run's arguments.
The file also carries {"format": "fastaspp-checkpoint", "version": 1}, so that a foreign file (a bare
state_dict, another project's checkpoint) is refused with a clear message instead of half-loading.
"""
from __future__ import annotations

import collections
import os
import pickle
import random
import uuid

import numpy as np
import torch

FORMAT = "fastaspp-checkpoint"
VERSION = 1
_RESERVED = ("format", "version")
# What torch.load(weights_only=True) rebuilds. Exact types: numpy scalars subclass float but are refused.
_SCALARS = {str, int, float, bool, complex, bytes, type(None), torch.dtype, torch.device}
_MAPPINGS = {dict, collections.OrderedDict}
_SEQUENCES = {list, tuple, torch.Size, set}


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (corrupt, truncated, foreign, unsupported version)."""


def _check_plain(value, where: str) -> None:
    """Refuse at save time what weights_only=True would refuse at load time, naming the entry."""
    if type(value) in _SCALARS or isinstance(value, torch.Tensor):
        return
    if type(value) in _MAPPINGS:
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint entry {where} has a key of type {type(key).__name__}; "
                                f"keys must be str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in _SEQUENCES:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__name__}; a checkpoint "
                    f"holds only tensors, numbers, strings, None and lists/tuples/dicts of them "
                    f"(convert it, e.g. a numpy array with .tolist() or torch.from_numpy)")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically: into a temporary file in the same directory, flushed to
    disk, then renamed over `path`. A crash at any point leaves the previous file intact."""
    path = os.fspath(path)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    clash = [k for k in _RESERVED if k in state]
    if clash:
        raise ValueError(f"state must not use the reserved keys {clash}: the checkpoint sets them")
    _check_plain(state, "state")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save checkpoint {path}: directory {directory} does not exist")
    # A fresh name in the same directory (os.replace is atomic only within a filesystem); opened with
    # "xb" rather than mkstemp so the file gets the usual umask permissions, not 0600.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable (POSIX; directories cannot be opened on Windows).
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """The state dict saved by save_checkpoint (without the format marker), loaded with
    torch.load(weights_only=True). Raises FileNotFoundError if path is missing and CheckpointError
    if it is corrupt, truncated, not a fastaspp checkpoint, or of a newer version."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            # torch's message is long; its "WeightsUnpickler error: Unsupported global: ..." line names the object.
            detail = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler" in line),
                          str(e).splitlines()[0])
            raise CheckpointError(f"checkpoint {path} is not a fastaspp checkpoint: it holds Python objects "
                                  f"other than tensors and plain values, which weights_only=True refuses to "
                                  f"load ({detail.split('. Please use')[0]})") from e
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {e}") from e
    except Exception as e:  # a damaged pickle stream fails in arbitrary ways (IndexError, KeyError, ...)
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a torch file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = f"a {type(obj).__name__}" if not isinstance(obj, dict) else \
            f"a dict with keys {sorted(map(str, obj))[:6]}"
        raise CheckpointError(f"checkpoint {path} is not a fastaspp checkpoint: it is {found} without the marker "
                              f"'format': {FORMAT!r} (a bare state_dict? load it with torch.load instead)")
    version = obj.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this fastaspp reads versions "
                              f"1..{VERSION} (saved by a newer fastaspp?)")
    return {k: v for k, v in obj.items() if k not in _RESERVED}


def capture_rng_state() -> dict:
    """The Python, numpy and torch (CPU, and CUDA if initialised) RNG states as checkpoint-safe values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
