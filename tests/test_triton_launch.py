"""The Triton launches past the autotuner and heuristics wrappers (fastaspp.kernels.launch.
launch_tuned): the autotuner runs on the first call of a key (sizes, flags and dtypes), later calls
of that key launch the JIT function under the wrappers with the arguments the wrappers gave it, and
both give the same result."""
import pytest
import torch

import fastaspp
from conftest import device_for

pytest.importorskip("triton")
if fastaspp.backends().count("triton") == 0:
    pytest.skip("the triton backend is unavailable", allow_module_level=True)


def test_the_autotuner_runs_once_a_key_then_its_config_launches(monkeypatch):
    from fastaspp.kernels import atrous_conv, launch

    tuner = atrous_conv._atrous_fwd_kernel
    jit = launch.jit_function(tuner)  # under the autotuner and the tile heuristics
    assert jit is tuner.fn.fn
    monkeypatch.setattr(launch, "_LAUNCHES", {})  # no key launched yet in this process's cache
    runs = {"autotuner": 0, "inner": 0}
    launches = []  # the JIT function's arguments on each launch

    def counted(name, run):
        def wrapper(*args, **kwargs):
            runs[name] += 1
            if name == "inner":
                launches.append((args, kwargs))
            return run(*args, **kwargs)
        return wrapper

    # As instance attributes that go afterwards (setattr would leave the old bound methods behind).
    monkeypatch.setitem(vars(tuner), "run", counted("autotuner", tuner.run))
    monkeypatch.setitem(vars(jit), "run", counted("inner", jit.run))
    device, gen = device_for("triton"), torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 3, 3, generator=gen).to(device)
    small, large = (torch.randn(1, 4, s, s, generator=gen).to(device) for s in (7, 9))
    with fastaspp.backend("triton"), torch.no_grad():
        first = fastaspp.ops.atrous_conv2d(small, w, padding=2, dilation=2)
        again = fastaspp.ops.atrous_conv2d(small, w, padding=2, dilation=2)
        assert runs == {"autotuner": 1, "inner": 2}, runs  # the second call launched past the autotuner
        (args0, kwargs0), (args1, kwargs1) = launches
        assert kwargs0.keys() == kwargs1.keys() and {"TILE_H", "TILE_W", "BLOCK_M", "num_warps"} <= kwargs1.keys()
        assert all(kwargs0[k] == kwargs1[k] for k in kwargs0 if k != "grid"), (kwargs0, kwargs1)
        assert len(args0) == len(args1)
        fastaspp.ops.atrous_conv2d(large, w, padding=2, dilation=2)  # a new key: the autotuner again
        assert runs == {"autotuner": 2, "inner": 3}, runs
        fastaspp.ops.atrous_conv2d(small.double(), w.double(), padding=2, dilation=2)  # new dtypes, too
        assert runs == {"autotuner": 3, "inner": 4}, runs
    assert torch.equal(first, again)
    assert len(launch._LAUNCHES[tuner]) == 3  # one launch kept per key


def test_stand_ins_launch_as_kernels():
    """A stand-in for a kernel (not an Autotuner: tests, benchmarks) launches as kernel[grid](...)."""
    from fastaspp.kernels.launch import launch_tuned

    seen = []

    class StandIn:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs))

    launch_tuned(StandIn(), "grid", 1, 2, FLAG=True)
    assert seen == [("grid", (1, 2), {"FLAG": True})]
