"""Reads `nvcc -Xptxas -v` output (stdin) and fails when a CuTe kernel spills to local memory.

The CuTe kernels (csrc/cuda/conv_cute.cuh, grad_weight_cute.cuh, conv_tma.cuh) declare their
threads and CTAs per SM in their __launch_bounds__, which caps their registers (168 for 3 CTAs of
128 threads per SM, and for the TMA kernel's 384 threads, whose producer warpgroup then runs on 40
and its consumers on 232); past that, ptxas spills instead of failing the build. Every other
kernel may spill (the SIMT fp32 path does, a little).
"""
import re
import sys

function, checked, spilling = None, 0, []
for line in sys.stdin:
    found = re.search(r"Function properties for (\S+)", line)
    if found:
        function = found.group(1)
        continue
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if found and function is not None and ("_cute_kernel" in function or "_tma_kernel" in function):
        checked += 1
        if int(found.group(1)) or int(found.group(2)):
            spilling.append(f"{function}: {line.strip()}")
        function = None
if checked == 0:
    sys.exit("check_ptxas: no CuTe kernel in the ptxas output (was -Xptxas -v passed?)")
if spilling:
    sys.exit("CuTe kernels spill to local memory:\n  " + "\n  ".join(spilling))
print(f"check_ptxas: {checked} CuTe kernel images, none spills")
