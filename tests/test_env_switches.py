"""The FASTASPP_* run-time switches (README, "Environment variables"; csrc/common/switches.h, kernels/launch.py): a
value that is none of a switch's choices, or not a whole number where one is expected, is an error
naming the variable and what it accepts, raised by the call that reads it, never read as the
default. Unset and empty mean the default; every accepted value still runs (the suite's CPU_PATHS
and tests/test_cpu_conv_paths.py use them throughout).
"""
import os
import re
import subprocess
import sys

import pytest
import torch

import fastaspp
from fastaspp.kernels import launch


def _conv(x, w, rate):
    return torch.ops.fastaspp._atrous_conv2d_forward(x, w, None, None, None, [1, 1], [rate] * 2, [rate] * 2, True)


def _inputs(requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    return x, torch.randn(6, 4, 3, 3, generator=gen).requires_grad_(requires_grad)


# (variable, other settings that make the call read it, bad values, what the message says it accepts)
CHOICE_CASES = [
    ("FASTASPP_CPU_ONEDNN", {}, ["yes", "2", " 1", "on"], "unset, 0 or 1"),
    ("FASTASPP_CPU_WINOGRAD", {"FASTASPP_CPU_DIRECT_MAX_MACS": "-1"}, ["true", "01", "1 "], "unset, 0 or 1"),
    ("FASTASPP_CPU_DIRECT_MAX_MACS", {}, ["lots", "1e6", "12x", "-2", "99999999999999999999"],
     "unset or a whole number >= -1"),
    ("FASTASPP_CPU_KEPT_MB", {"FASTASPP_CPU_DIRECT_MAX_MACS": "-1", "FASTASPP_CPU_ONEDNN": "0",
                              "FASTASPP_CPU_WINOGRAD": "0"}, ["-1", "1.5", "big"], "unset or a whole number >= 0"),
    ("FASTASPP_CPU_WINOGRAD_WORKSPACE_MB", {"FASTASPP_CPU_DIRECT_MAX_MACS": "-1", "FASTASPP_CPU_WINOGRAD": "1"},
     ["-3", "64MB"], "unset or a whole number >= 0"),
]


@pytest.mark.parametrize("name, setting, bad, accepted", CHOICE_CASES, ids=[c[0] for c in CHOICE_CASES])
def test_cpu_switch_rejects_values_it_does_not_know(name, setting, bad, accepted, monkeypatch):
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    x, w = _inputs()  # a weight without grad: kept (the budget is read) and Winograd-eligible
    monkeypatch.delenv(name, raising=False)
    expected = _conv(x, w, 2)
    for value in bad:
        monkeypatch.setenv(name, value)
        with pytest.raises(RuntimeError, match=f"{name} must be {accepted}, got '{value}'"):
            _conv(x, w.clone(), 2)  # a fresh weight: a kept layout would not read the budget again
    monkeypatch.setenv(name, "")  # empty is unset
    torch.testing.assert_close(_conv(x, w.clone(), 2), expected, rtol=0, atol=0)


def test_on_off_switch_of_the_triton_launcher(monkeypatch):
    monkeypatch.delenv("FASTASPP_DETERMINISTIC", raising=False)
    assert launch.on_off_switch("FASTASPP_DETERMINISTIC") is None
    for value, state in (("", None), ("0", False), ("1", True)):
        monkeypatch.setenv("FASTASPP_DETERMINISTIC", value)
        assert launch.on_off_switch("FASTASPP_DETERMINISTIC") is state
    for value in ("yes", "true", "2", " 1"):
        monkeypatch.setenv("FASTASPP_DETERMINISTIC", value)
        with pytest.raises(ValueError, match=f"FASTASPP_DETERMINISTIC must be unset, 0 or 1, got '{value}'"):
            launch.deterministic_configs()


def test_autotune_switch_is_checked_at_import():
    env = {**os.environ, "FASTASPP_TRITON_AUTOTUNE": "off"}
    done = subprocess.run([sys.executable, "-c", "import fastaspp.kernels.launch"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "FASTASPP_TRITON_AUTOTUNE must be unset, 0 or 1, got 'off'" in done.stderr


CUDA_SWITCHES = [
    ("FASTASPP_CUDA_CONV", "unset, sm80, wmma, wgmma_wide, wgmma_deep or wgmma_tma", ["sm90", "WMMA", "cute", "tma"]),
    ("FASTASPP_CUDA_SPLIT_K", "unset or a whole number >= 1", ["0", "auto", "-2", "4 "]),
]


@pytest.mark.parametrize("name, accepted, value", [(n, a, v) for n, a, values in CUDA_SWITCHES for v in values])
def test_cuda_switches_reject_values_they_do_not_know(name, accepted, value, monkeypatch):
    """Checked by the cuda bindings before they launch (binding_utils.h check_conv_switch). GPU builds only."""
    reason = fastaspp._backend.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"backend cuda unavailable: {reason}")
    x, w = (t.to("cuda", torch.bfloat16) for t in _inputs())
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=re.escape(f"{name} must be {accepted}, got '{value}'")):
        _conv(x, w, 2)
