"""Triton's autotuner zeroes a kernel's reset_to_zero arguments (the statistics planes) after tuning,
wherever the kernel has more than one config: on a GPU, the first call of each shape. The
interpreter runs one config and never tunes, so here every launch goes through a stand-in that
zeroes those arguments first, as that call does. No input may be what gets zeroed: the kernels once
took x as the unread statistics pointer, and a GPU's first call zeroed x (or its NHWC copy)."""
import pytest
import torch

import fastaspp
from fastaspp import reference

from _cases import CONV_EPILOGUE, assert_within, aspp_branches_bound, conv_magnitude
from conftest import device_for

pytest.importorskip("triton")
if fastaspp.backends().count("triton") == 0:
    pytest.skip("the triton backend is unavailable", allow_module_level=True)


class ZeroingTuner:
    """A kernel's autotuner whose launches first zero its reset_to_zero arguments."""

    def __init__(self, tuner):
        self.tuner = tuner

    def __getitem__(self, grid):
        launch = self.tuner[grid]

        def run(*args, **kwargs):
            for name in self.tuner.reset_to_zero:
                args[self.tuner.arg_names.index(name)].zero_()
            return launch(*args, **kwargs)
        return run


@pytest.fixture
def zeroing_tuners(monkeypatch):
    from fastaspp.kernels import aspp, atrous_conv

    for module, name in ((atrous_conv, "_atrous_fwd_kernel"), (aspp, "_aspp_branches_kernel")):
        tuner = getattr(module, name)
        assert tuner.reset_to_zero == ["stats_ptr"], f"{name}: what this test stands in for changed"
        monkeypatch.setattr(module, name, ZeroingTuner(tuner))


def test_every_kernel_the_tuner_resets_is_covered_here():
    """A new kernel with reset_to_zero (or restore_value) needs its wrappers checked as these are."""
    import importlib
    import pkgutil

    import triton

    import fastaspp.kernels as package

    resetting = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.Autotuner) and (obj.reset_to_zero or obj.restore_value):
                resetting.add(f"{info.name}.{name}")
    assert resetting == {"atrous_conv._atrous_fwd_kernel", "aspp._aspp_branches_kernel"}


def _randn(*shape, gen, device, channels_last=False):
    t = torch.randn(*shape, generator=gen).to(device)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_survives_the_autotuners_reset(zeroing_tuners, channels_last):
    device, gen = device_for("triton"), torch.Generator().manual_seed(0)
    x = _randn(2, 5, 9, 11, gen=gen, device=device, channels_last=channels_last)
    w, s, t = _randn(7, 5, 3, 3, gen=gen, device=device), _randn(7, gen=gen, device=device), \
        _randn(7, gen=gen, device=device)
    inputs = [v.clone() for v in (x, w, s, t)]
    with fastaspp.backend("triton"):
        y = fastaspp.ops.atrous_conv2d(x, w, scale=s, shift=t, padding=2, dilation=2)
    for name, v, before in zip("xwst", (x, w, s, t), inputs):
        assert torch.equal(v, before), f"{name} changed"
    f64 = [v.double() for v in (x, w, s, t)]
    exact = reference.atrous_conv2d(f64[0], f64[1], None, 1, 2, 2, scale=f64[2], shift=f64[3])
    magnitude = conv_magnitude(x, w, None, s, t, 1, 2, 2)
    assert_within(y, exact, magnitude, 5 * 9 + CONV_EPILOGUE, torch.float32, "conv")


def test_aspp_branches_survive_the_autotuners_reset(zeroing_tuners):
    device, gen = device_for("triton"), torch.Generator().manual_seed(1)
    rates, c_in, c = [2, 3], 4, 6
    x = _randn(2, c_in, 7, 8, gen=gen, device=device, channels_last=True)
    weights = [_randn(c, c_in, 1, 1, gen=gen, device=device)] + \
        [_randn(c, c_in, 3, 3, gen=gen, device=device) for _ in rates]
    s, t = _randn(3 * c, gen=gen, device=device), _randn(3 * c, gen=gen, device=device)
    inputs = [v.clone() for v in (x, *weights, s, t)]
    with fastaspp.backend("triton"):
        y = fastaspp.ops.aspp_branches(x, weights, rates, s, t, relu=False)
    for v, before in zip((x, *weights, s, t), inputs):
        assert torch.equal(v, before), "an input changed"
    exact, magnitude, depth = aspp_branches_bound(x, weights, rates, s, t, relu=False)
    assert_within(y, exact, magnitude, depth, torch.float32, "aspp branches")
