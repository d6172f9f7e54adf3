"""fastaspp.checkpoint: round trip, atomic writes, checksums, orphan cleanup, and clear errors for unusable files."""
import collections
import os
import random
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastaspp import checkpoint
from fastaspp.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint


def _training_state(step: int) -> dict:
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "rng": capture_rng_state(), "args": {"model": "tiny", "crop": 129, "scales": [0.5, 1.0], "resume": None}}


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path):
    state = _training_state(7)
    path = tmp_path / "last.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    _assert_same(state, loaded)  # the format marker is not part of the returned state
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "fastaspp-checkpoint" and raw["version"] == checkpoint.VERSION
    assert os.listdir(tmp_path) == ["last.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any file the user writes


def test_rng_state_round_trip_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng_state()})
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, interrupt):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _training_state(1))
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # a complete write of the new state...
        f.truncate(f.tell() // 2)  # ...of which only half reaches the disk before the crash
        raise interrupt

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(type(interrupt)):
        save_checkpoint(path, _training_state(2))
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # the partial temporary file is gone


def test_crash_before_the_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="no space"):
        save_checkpoint(tmp_path / "last.pt", {"step": 1})
    assert os.listdir(tmp_path) == []


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=f"checkpoint {path} does not exist"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_corrupt_and_truncated_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _training_state(3))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated} is corrupt, truncated"):
        load_checkpoint(truncated)


def test_files_that_are_not_torch_checkpoints(tmp_path):
    files = {"random.pt": random.Random(0).randbytes(4096), "text.pt": b"this is not a torch file at all\n",
             "zip-random.pt": b"PK\x03\x04" + random.Random(1).randbytes(4092)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    want = {"random.pt": r"is not a torch checkpoint: it begins with b'.*', neither a zip archive .* nor a pickle",
            "text.pt": r"is not a torch checkpoint: it begins with b'this is '",
            "empty.pt": r"is empty \(0 bytes\), not a torch checkpoint",
            "zip-random.pt": r"is corrupt, truncated or not a torch file \(RuntimeError: .*zip archive",
            "legacy.pt": r"is not a fastaspp checkpoint: it is a bare pickle"}
    for name, pattern in want.items():
        path = tmp_path / name
        with pytest.raises(CheckpointError, match=f"checkpoint {path} {pattern}") as info:
            load_checkpoint(path)
        for torch_text in ("file an issue", "WeightsUnpickler", "weights_only", "Python objects"):
            assert torch_text not in str(info.value), name


def _corrupt(path, start: int, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(count))


def test_corrupted_tensor_data_is_caught_by_the_checksum(tmp_path):
    weight = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))  # 4 MB: a record well past the header
    state = {"model": {"w": weight, "b": torch.zeros(3)}, "step": 5}
    path = tmp_path / "last.pt"
    save_checkpoint(path, state)
    data = path.read_bytes()
    offset = data.find(weight.numpy().tobytes())  # torch stores tensor records uncompressed
    assert offset > 0 and data.find(weight.numpy().tobytes(), offset + 1) < 0
    _corrupt(path, offset + weight.nbytes // 2, 4096)  # 4 KB of zeros in the middle of the tensor's data
    damaged = torch.load(path, weights_only=True)["model"]["w"]  # torch's zip reader does not notice...
    assert not torch.equal(damaged, weight) and int((damaged != weight).sum()) == 1024
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt: its contents do not match the sha256 "
                                              f"checksum it was saved with .*use an earlier copy"):
        load_checkpoint(path)  # ...the checksum does


def test_corrupted_scalar_is_caught_by_the_checksum(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 123456789, "w": torch.ones(2)})
    data = path.read_bytes()
    offset = data.find(b"J" + struct.pack("<i", 123456789))  # pickle's BININT
    assert offset > 0
    path.write_bytes(data[:offset + 1] + struct.pack("<i", 123456780) + data[offset + 5:])
    assert torch.load(path, weights_only=True)["step"] == 123456780
    with pytest.raises(CheckpointError, match="do not match the sha256 checksum"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta", "ignore:torch.quantize_per_tensor",
                            "ignore:TypedStorage is deprecated")
def test_checksum_round_trips_every_kind_of_value(tmp_path):
    complex_values = torch.randn(3, dtype=torch.complex64)
    state = {
        "zero_dim": torch.tensor(2.5), "bool": torch.tensor([True, False]), "bf16": torch.randn(4).bfloat16(),
        "complex": complex_values, "conj": complex_values.conj(),
        "neg": torch.randn(3, dtype=torch.complex64).conj().imag,
        "strided": torch.arange(12.0).reshape(3, 4).t(), "view": torch.arange(10)[2:5], "empty": torch.empty(0, 3),
        "half": torch.randn(2, 2).half(), "int8": torch.tensor([-1, 2], dtype=torch.int8),
        "sparse": torch.eye(3).to_sparse(), "csr": torch.eye(3).to_sparse_csr(), "meta": torch.empty(2, device="meta"),
        "quantized": torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.qint8),
        "param": torch.nn.Parameter(torch.ones(2)),
        "floats": [0.0, -0.0, float("inf"), float("nan"), 1e-300], "complex_number": 1 + 2j,
        "ints": (0, -1, 2 ** 70, True, False), "text": ["", "é\u2603", b"\x00bytes"], "none": None,
        "set": {"b", "a", 3, (1, 2)}, "size": torch.Size([2, 3]), "dtype": torch.float16, "device": torch.device("cpu"),
        "ordered": collections.OrderedDict([("z", 1), ("a", 2)]), 7: {"nested": [[{"deep": torch.ones(1)}]]},
    }
    path = tmp_path / "c.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)  # no false alarm: the loaded state hashes as the saved one did
    # The private digest itself: its inputs (what changes it) are the property under test.
    assert checkpoint._digest(loaded) == checkpoint._digest(state) == torch.load(path, weights_only=True)["sha256"]
    assert list(loaded) == list(state)
    # Every kind of change moves the digest, including ones that compare equal in Python.
    digest = checkpoint._digest
    base = {"x": torch.zeros(2), "n": 1}
    assert len({digest(base), digest({"x": torch.zeros(2, dtype=torch.float64), "n": 1}),
                digest({"x": torch.zeros(1, 2), "n": 1}), digest({"x": torch.tensor([0.0, -0.0]), "n": 1}),
                digest({"x": torch.zeros(2), "n": 1.0}), digest({"x": torch.zeros(2), "n": True}),
                digest({"n": 1, "x": torch.zeros(2)}), digest({"x": [torch.zeros(2)], "n": 1}),
                digest({"x": torch.zeros(2), "n": (1,)}), digest({"x": torch.zeros(2), "n": [1]}),
                digest({"x": torch.zeros(2), "n": "1"}), digest({"x": torch.zeros(2), "n": b"1"}),
                digest({"x": torch.zeros(2), 1: 1}), digest(collections.OrderedDict(base))}) == 14
    assert digest({"s": {"a", "b", "c"}}) == digest({"s": {"c", "b", "a"}})
    assert digest({"a": ["bc"]}) != digest({"a": ["b", "c"]})
    with pytest.raises(TypeError, match=r"state\['s'\]\[0\] is a numpy.float64"):
        digest({"s": {np.float64(1.0)}})


def test_version_1_checkpoints_load_unverified(tmp_path):
    path = tmp_path / "v1.pt"
    weight = torch.randn(5)
    torch.save({"format": "fastaspp-checkpoint", "version": 1, "model": {"w": weight}, "step": 4, "sha256": "mine"},
               path)
    loaded = load_checkpoint(path)
    assert list(loaded) == ["model", "step", "sha256"]  # "sha256" was not reserved in version 1
    assert torch.equal(loaded["model"]["w"], weight) and loaded["step"] == 4 and loaded["sha256"] == "mine"


def test_version_2_checkpoint_without_its_checksum(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"format": "fastaspp-checkpoint", "version": 2, "step": 4}, path)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt: a version 2 checkpoint without "
                                              f"its sha256 checksum"):
        load_checkpoint(path)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.skipif(os.name != "posix", reason="orphans are found with os.kill(pid, 0)")
def test_save_removes_temporary_files_of_dead_saves_only(tmp_path):
    dead = _dead_pid()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        orphans = [f".last.pt.{dead}.0123abcd.tmp", f".last.pt.{os.getpid()}.89abcdef.tmp"]
        kept = [f".last.pt.{sleeper.pid}.0123abcd.tmp",  # a live process's save in progress
                ".last.pt.1.0123abcd.tmp",  # pid 1: alive (another user's, when not root)
                f".other.pt.{dead}.0123abcd.tmp", f".last.pt.{dead}.0123abcd.tmp.bak", f"last.pt.{dead}.0123abcd.tmp",
                f".last.pt.{dead}.notahex1.tmp", f".last.pt.{dead}.0123abcd0.tmp", "notes.txt"]
        for name in orphans + kept:
            (tmp_path / name).write_bytes(b"PK\x03\x04partial")
        (tmp_path / f".last.pt.{dead}.fedcba98.tmp").mkdir()  # not a file: left alone
        kept.append(f".last.pt.{dead}.fedcba98.tmp")
        save_checkpoint(tmp_path / "last.pt", {"step": 1})
        assert sorted(os.listdir(tmp_path)) == sorted(kept + ["last.pt"])
        assert load_checkpoint(tmp_path / "last.pt") == {"step": 1}
    finally:
        sleeper.kill()
        sleeper.wait()


_STALLED_SAVE = """
import sys, time, torch
from fastaspp.checkpoint import save_checkpoint

def stalled_save(obj, f, *args, **kwargs):
    f.write(b"PK\\x03\\x04" + bytes(1 << 20))
    f.flush()
    print("writing", flush=True)
    time.sleep(60)

torch.save = stalled_save
save_checkpoint(sys.argv[1], {"step": 2})
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_save_killed_mid_write_leaves_an_orphan_that_the_next_save_removes(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    child = subprocess.Popen([sys.executable, "-c", _STALLED_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    leftovers = [name for name in os.listdir(tmp_path) if name != "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".last.pt.{child.pid}.")  # what SIGKILL leaves
    assert load_checkpoint(path) == {"step": 1}
    save_checkpoint(path, {"step": 3})
    assert os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path) == {"step": 3}


def test_foreign_checkpoints(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), bare)  # a plain state_dict: loads, but is not ours
    with pytest.raises(CheckpointError, match=f"checkpoint {bare} is not a fastaspp checkpoint.*'format'"):
        load_checkpoint(bare)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.ones(2), tensor)
    with pytest.raises(CheckpointError, match="it is a Tensor without the marker"):
        load_checkpoint(tensor)
    pickled = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole pickled module: weights_only refuses it
    with pytest.raises(CheckpointError, match=f"checkpoint {pickled} is not a fastaspp checkpoint.*weights_only"
                                              r".*Unsupported global: GLOBAL torch\.nn\.modules\.linear\.Linear"):
        load_checkpoint(pickled)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "fastaspp-checkpoint", "version": checkpoint.VERSION + 1, "step": 1}, newer)
    with pytest.raises(CheckpointError, match=f"format version {checkpoint.VERSION + 1}"):
        load_checkpoint(newer)


def test_save_refuses_what_weights_only_cannot_load(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        save_checkpoint(path, {"rng": {"numpy": np.zeros(3)}})
    with pytest.raises(TypeError, match=r"state\['args'\]\['lr'\] is a numpy.float64"):
        save_checkpoint(path, {"args": {"lr": np.float64(0.1)}})
    with pytest.raises(ValueError, match="reserved keys"):
        save_checkpoint(path, {"format": "mine"})
    with pytest.raises(ValueError, match=r"reserved keys \['sha256'\]"):
        save_checkpoint(path, {"sha256": "mine"})
    with pytest.raises(TypeError, match=r"state\['s'\] has a key of type tuple"):
        save_checkpoint(path, {"s": {(1, 2): 3}})
    with pytest.raises(TypeError, match="state must be a dict"):
        save_checkpoint(path, [1, 2])
    with pytest.raises(FileNotFoundError, match="directory .* does not exist"):
        save_checkpoint(tmp_path / "missing" / "c.pt", {"step": 1})
    assert not path.exists()
