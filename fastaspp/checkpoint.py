"""Training checkpoints: atomic saves, and loads with torch.load(weights_only=True) that say what is wrong.

A checkpoint is a dict of plain values (tensors, numbers, strings, None, lists/tuples/dicts of them):
model and optimizer state_dicts, the step, RNG states (see capture_rng_state), the run's arguments.
The file also carries {"format": "fastaspp-checkpoint", "version": 2}, so that a foreign file (a bare
state_dict, another project's checkpoint) is refused with a clear message instead of half-loading, and
"sha256": a digest of the state (see _digest), checked on load. torch's zip reader does not verify tensor
data, so without it a few flipped or zeroed KB in a checkpoint load silently as changed weights. Version 1
files (no digest) still load, unverified. A file that is not a zip archive at all (every torch.save since
1.6 writes one) is refused before torch.load sees it.
"""
from __future__ import annotations

import collections
import hashlib
import os
import pickle
import random
import re
import struct
import threading
import uuid

import numpy as np
import torch

FORMAT = "fastaspp-checkpoint"
VERSION = 2  # 2: adds "sha256"
_RESERVED = ("format", "version", "sha256")
# What torch.load(weights_only=True) rebuilds, besides tensors and the scalars that _walk lists. Exact
# types: numpy scalars subclass float but are refused.
_MAPPINGS = {dict, collections.OrderedDict}
_SEQUENCES = {list, tuple, torch.Size, set}
# _walk's type tags: the same values in a list or a tuple, a str or bytes, must not hash alike.
_TAGS = {dict: b"D", collections.OrderedDict: b"O", list: b"L", tuple: b"T", torch.Size: b"Z", set: b"S",
         str: b"U", bytes: b"Y", torch.dtype: b"P", torch.device: b"V"}


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (corrupt, truncated, foreign, unsupported version)."""


def _digest(state: dict) -> str:
    """SHA-256 of a canonical walk of `state`; the same walk refuses, naming the entry, what
    weights_only=True would refuse at load time. Every variable-length field is length-prefixed
    and every value type-tagged, so that no two different states feed the hash the same bytes."""
    h = hashlib.sha256()
    _walk(h, state, "state")
    return h.hexdigest()


def _walk(h, value, where: str) -> None:
    kind = type(value)
    if isinstance(value, torch.Tensor):
        _walk_tensor(h, value.detach(), where)
    elif kind in _MAPPINGS:
        h.update(b"%s%d;" % (_TAGS[kind], len(value)))
        for key, item in value.items():  # insertion order, which pickle keeps
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint entry {where} has a key of type {type(key).__name__}; "
                                f"keys must be str or int")
            _walk(h, key, where)
            _walk(h, item, f"{where}[{key!r}]")
    elif kind is set:
        # Iteration order of a set of strings changes between processes (hash randomisation): sort the
        # items' own digests.
        items = []
        for i, item in enumerate(value):
            sub = hashlib.sha256()
            _walk(sub, item, f"{where}[{i}]")
            items.append(sub.digest())
        h.update(b"%s%d;" % (_TAGS[kind], len(items)) + b"".join(sorted(items)))
    elif kind in _SEQUENCES:
        h.update(b"%s%d;" % (_TAGS[kind], len(value)))
        for i, item in enumerate(value):
            _walk(h, item, f"{where}[{i}]")
    elif kind is bool or value is None:
        h.update(b"N" if value is None else b"B1" if value else b"B0")
    elif kind is int:
        h.update(b"I%d;" % value)
    elif kind is float:
        h.update(b"F" + struct.pack("<d", value))  # exact bits: -0.0, inf and nan included, as pickle keeps them
    elif kind is complex:
        h.update(b"C" + struct.pack("<dd", value.real, value.imag))
    elif kind in (str, bytes, torch.dtype, torch.device):
        data = value if kind is bytes else str(value).encode("utf-8", "surrogatepass")  # pickle keeps lone surrogates
        h.update(b"%s%d;" % (_TAGS[kind], len(data)) + data)
    else:
        raise TypeError(f"checkpoint entry {where} is a {kind.__module__}.{kind.__name__}; a checkpoint "
                        f"holds only tensors, numbers, strings, None and lists/tuples/dicts of them "
                        f"(convert it, e.g. a numpy array with .tolist() or torch.from_numpy)")


def _walk_tensor(h, t: torch.Tensor, where: str) -> None:
    h.update(f"X{t.dtype}{tuple(t.shape)}{t.layout};".encode())
    if t.is_meta:
        return  # no data to hash
    if t.layout == torch.sparse_coo:
        parts = [t._indices(), t._values()]  # as stored, uncoalesced: what the file holds
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [t.crow_indices(), t.col_indices(), t.values()]
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = [t.ccol_indices(), t.row_indices(), t.values()]
    elif t.is_quantized:
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            params = [torch.tensor([t.q_scale()]), torch.tensor([t.q_zero_point()])]
        else:
            params = [t.q_per_channel_scales(), t.q_per_channel_zero_points(), torch.tensor([t.q_per_channel_axis()])]
        parts = [t.int_repr(), *params]
    elif t.layout == torch.strided:
        # The values' bytes, whatever the strides or device; the conj/neg bits are resolved since a
        # dtype view refuses them. One update over the buffer: no per-element Python.
        data = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(b"%d;" % data.nbytes)
        h.update(data)
        return
    else:
        raise TypeError(f"checkpoint entry {where} is a {t.layout} tensor, which a checkpoint cannot hold "
                        f"(convert it with .to_dense())")
    for part in parts:
        _walk_tensor(h, part, where)


_IN_FLIGHT: set[str] = set()  # temporary files this process is writing now
_IN_FLIGHT_LOCK = threading.Lock()


def _remove_orphans(directory: str, base: str) -> None:
    """Delete the temporary files of saves of `base` that died before their rename (SIGKILL, OOM
    killer, power loss): .<base>.<pid>.<hex>.tmp whose pid is not running. A live pid's file may be
    its save in progress, so it stays; so do this process's own saves in progress (other threads).
    Best effort: a file that cannot be removed is left for the next save."""
    if os.name != "posix":
        return  # os.kill(pid, 0) terminates the process on Windows
    pattern = re.compile(re.escape(f".{base}.") + r"(\d+)\.[0-9a-f]{8}\.tmp")
    with _IN_FLIGHT_LOCK:
        in_flight = set(_IN_FLIGHT)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        full = os.path.join(directory, name)
        if not match or full in in_flight:
            continue
        pid = int(match.group(1))
        if pid != os.getpid():  # this process's leftovers (pid reused after a restart) are not in flight
            try:
                os.kill(pid, 0)
                continue  # alive
            except PermissionError:
                continue  # alive, another user's
            except ProcessLookupError:
                pass
            except (OverflowError, OSError):
                continue
        try:
            if os.path.isfile(full) and not os.path.islink(full):
                os.unlink(full)
        except OSError:
            pass


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically: into a temporary file in the same directory, flushed to
    disk, then renamed over `path`. A crash at any point leaves the previous file intact; the temporary
    files of saves killed before their rename are removed by the next save to the same path."""
    path = os.fspath(path)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    clash = [k for k in _RESERVED if k in state]
    if clash:
        raise ValueError(f"state must not use the reserved keys {clash}: the checkpoint sets them")
    digest = _digest(state)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save checkpoint {path}: directory {directory} does not exist")
    # A fresh name in the same directory (os.replace is atomic only within a filesystem); opened with
    # "xb" rather than mkstemp so the file gets the usual umask permissions, not 0600.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.add(tmp)
    try:
        _remove_orphans(directory, os.path.basename(path))  # before writing: their space may be needed
        with open(tmp, "xb") as f:
            torch.save({"format": FORMAT, "version": VERSION, "sha256": digest, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(tmp)
    # Make the rename itself durable (POSIX; directories cannot be opened on Windows).
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


_ZIP_MAGIC = b"PK\x03\x04"  # a zip local file header: how every torch.save file since torch 1.6 begins


def _torch_detail(e: BaseException) -> str:
    """The line of a torch.load error that says what failed, without torch's boilerplate around it
    (its advice to re-run with weights_only=False or to file an issue does not apply to a damaged file)."""
    boilerplate = ("Weights only load failed", "file an issue", "Check the documentation")
    lines = [line.strip() for line in str(e).splitlines()
             if line.strip() and not any(b.lower() in line.lower() for b in boilerplate)]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """The state dict saved by save_checkpoint (without the format marker and checksum), loaded with
    torch.load(weights_only=True) and checked against its checksum. Raises FileNotFoundError if path
    is missing and CheckpointError if it is corrupt, truncated, not a fastaspp checkpoint, or of a
    newer version."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    # torch.load tries a file that is not a zip archive as a legacy pickle, and reports random bytes as
    # unsupported Python objects; what the file starts with says plainly what it is.
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes), not a torch checkpoint; "
                              f"use an earlier copy")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(f"checkpoint {path} is not a fastaspp checkpoint: it is a bare pickle (torch.save's "
                              f"legacy format, or pickle.dump), not the zip archive that save_checkpoint writes "
                              f"(load it with torch.load instead)")
    if not head.startswith(_ZIP_MAGIC):
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint: it begins with {head!r}, neither a "
                              f"zip archive (what torch.save writes) nor a pickle; it is some other kind of file, "
                              f"or was overwritten")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            # torch's message is long; its "WeightsUnpickler error: Unsupported global: ..." line names the object.
            detail = next(line.strip() for line in str(e).splitlines() if "Unsupported global" in line)
            raise CheckpointError(f"checkpoint {path} is not a fastaspp checkpoint: it holds Python objects "
                                  f"other than tensors and plain values, which weights_only=True refuses to "
                                  f"load ({detail.split('. Please use')[0]})") from e
        raise CheckpointError(f"checkpoint {path} is corrupt: its pickled data cannot be read "
                              f"({_torch_detail(e)}); use an earlier copy") from e
    except Exception as e:  # a damaged archive or pickle stream fails in arbitrary ways (IndexError, KeyError, ...)
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a torch file "
                              f"({_torch_detail(e)}); use an earlier copy") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = f"a {type(obj).__name__}" if not isinstance(obj, dict) else \
            f"a dict with keys {sorted(map(str, obj))[:6]}"
        raise CheckpointError(f"checkpoint {path} is not a fastaspp checkpoint: it is {found} without the marker "
                              f"'format': {FORMAT!r} (a bare state_dict? load it with torch.load instead)")
    version = obj.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this fastaspp reads versions "
                              f"1..{VERSION} (saved by a newer fastaspp?)")
    if version == 1:  # no checksum; "sha256" was not yet reserved, so it may be the caller's own key
        return {k: v for k, v in obj.items() if k not in ("format", "version")}
    state = {k: v for k, v in obj.items() if k not in _RESERVED}
    saved = obj.get("sha256")
    if not isinstance(saved, str):
        raise CheckpointError(f"checkpoint {path} is corrupt: a version {version} checkpoint without its sha256 "
                              f"checksum; use an earlier copy")
    try:
        actual = _digest(state)
    except TypeError as e:
        raise CheckpointError(f"checkpoint {path} is not a fastaspp checkpoint: {e}") from e
    if actual != saved:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the sha256 checksum it "
                              f"was saved with (damaged on disk or in transfer); use an earlier copy")
    return state


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
