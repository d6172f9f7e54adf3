"""Every Triton kernel, in every autotune config and dtype, compiles for sm_90 and fits its shared memory.

The interpreter (how CI runs the kernels) never lowers them to PTX; this runs Triton's whole
compiler (with ptxas) ahead of time, with no GPU, in a subprocess without TRITON_INTERPRET.
"""
import os
import subprocess
import sys

from fastaspp.kernels.aot_check import _cases


def test_all_triton_configs_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastaspp.kernels.aot_check", "--arch", "90", "--jobs", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    n = len(_cases())
    assert f"{n} of {n} " in proc.stdout, report
