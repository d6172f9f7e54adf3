"""Reads `nvcc -Xptxas -v` output (stdin) and fails when a CuTe kernel spills to local memory, or when
the TMA kernel gets other than the registers its warp roles split.

The CuTe kernels (csrc/cuda/conv_cute.cuh, grad_weight_cute.cuh, conv_tma.cuh) declare their
threads and CTAs per SM in their __launch_bounds__, which caps their registers (168 for 3 CTAs of
128 threads per SM); past that, ptxas spills instead of failing the build. Every other kernel may
spill (the SIMT fp32 path does, a little).

The TMA kernel's producer warpgroup gives registers to its consumers (setmaxnreg 40 / 232 on the
128 x 256 tile's 384 threads, 40 / 216 on the 64 x 128 tile's 256 threads, two CTAs an SM), which
needs the CTA to launch with the whole cap, Sm90TmaConfig::kLaunchRegisters: 168 and 128. With fewer,
setmaxnreg.inc would wait forever (launch_tma also refuses such an image at run time). Only its
sm_90a images hold the body; the others are a stub that traps, which tma_kernel_usable never launches.
"""
import re
import sys

# Sm90TmaConfig<T, kPatches> (mangled ...Sm90TmaConfigI<T>Li<kPatches>E...) -> kLaunchRegisters
TMA_LAUNCH_REGISTERS = {1: 128, 2: 168}

function, arch, checked, failures = None, None, 0, []
for line in sys.stdin:
    found = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
    if found:
        arch = found.group(2)
        continue
    found = re.search(r"Function properties for (\S+)", line)
    if found:
        function = found.group(1)
        continue
    if function is None or not ("_cute_kernel" in function or "_tma_kernel" in function):
        continue
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if found:
        checked += 1
        if int(found.group(1)) or int(found.group(2)):
            failures.append(f"{function} spills: {line.strip()}")
        continue
    found = re.search(r"Used (\d+) registers", line)
    if found:
        if "_tma_kernel" in function and arch == "sm_90a":  # other images hold a stub that only traps
            patches = re.search(r"Sm90TmaConfigI\w+?_Li(\d)E", function)
            want = TMA_LAUNCH_REGISTERS.get(int(patches.group(1))) if patches else None
            if want is None:
                failures.append(f"{function}: unknown TMA config (update TMA_LAUNCH_REGISTERS)")
            elif int(found.group(1)) != want:
                failures.append(f"{function} uses {found.group(1)} registers, not the {want} its setmaxnreg needs")
        function = None
if checked == 0:
    sys.exit("check_ptxas: no CuTe kernel in the ptxas output (was -Xptxas -v passed?)")
if failures:
    sys.exit("CuTe kernels:\n  " + "\n  ".join(failures))
print(f"check_ptxas: {checked} CuTe kernel images, none spills, the TMA kernels' registers as setmaxnreg needs")
