"""fastaspp.checkpoint: round trip, atomic writes, and clear errors for unusable files."""
import os
import random

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
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a torch file at all")
    with pytest.raises(CheckpointError, match=f"checkpoint {junk} is corrupt"):
        load_checkpoint(junk)
    good = tmp_path / "good.pt"
    save_checkpoint(good, _training_state(3))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated} is corrupt, truncated"):
        load_checkpoint(truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"checkpoint {empty} is corrupt"):
        load_checkpoint(empty)


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
    with pytest.raises(TypeError, match="state must be a dict"):
        save_checkpoint(path, [1, 2])
    with pytest.raises(FileNotFoundError, match="directory .* does not exist"):
        save_checkpoint(tmp_path / "missing" / "c.pt", {"step": 1})
    assert not path.exists()
