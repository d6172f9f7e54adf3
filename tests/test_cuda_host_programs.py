"""Host programs that check the cuda backend's index math without a GPU: each file in
tests/cuda_host is compiled with nvcc (CI has it) and run here; it prints "ok" when every check
passes, else one line per failure.

  * sm80_layouts.cu (against the CUTLASS headers setup.py finds): the CuTe kernels' shared memory
    layouts (csrc/cuda/conv_cute.cuh and grad_weight_cute.cuh, for mma.sync and for wgmma) are
    bijective with every 16-byte cp.async chunk contiguous and aligned; each (pixel, chunk) of a
    stage is copied (and, for the projection's prologue, rewritten) by exactly one thread; each of
    the 64 x 128 accumulators of a CTA belongs to exactly one of its 128 threads, and each of the
    128 x 256 tile's (Sm90WideConfig) to one of its 256, row m to warpgroup m / 64; the main loops'
    cp.async schedules (PipelineShape) give each step its own landed stage and refill no stage a
    running MMA reads.
  * conv_walk.cu: the CuTe conv kernel's index code (its CTAs' patches, live-tap walk, A-row gather
    by slot, B rows and the epilogue's row mapping), run on the host with fp64 sums in place of the
    MMA, matches a direct conv for forward launches (one conv, or several into channel slices) and
    input-gradient launches (one conv with strides of 1 to 3 per axis, each stride phase of dx tiled
    apart, or several summed), with one patch and 128 channels a CTA and with the wide tile's two
    patches and 256 channels; and with the K loop split into parts (FASTASPP_CUDA_SPLIT_K), whose
    steps in part order are the unsplit walk, each gathering wherever in a tap it starts, summed in
    order, the split count's rules (csrc/common/k_split.h) and the longest live walk they size parts
    by (longest_walks, against every CTA's count_steps). Checked in a scratch copy by making
    step_at drop its chunk offset, overlapping two parts, mapping a phase's columns with the
    row stride, and in longest_walks, dropping the phase, counting dead rows in sum mode and
    shifting a patch line's start.
  * tma_boxes.cu: the TMA conv kernels' loads (csrc/cuda/conv_tma.cuh, csrc/common/tma_boxes.h),
    each modelled as TMA's documentation states (a box through the tensor map's view, zero outside
    its dims), hold what the cp.async gather puts in the A and B tiles, for every step and patch slot
    of random stride-1 forward and input-gradient launches (channel slices, K tails, dead taps) on
    both tiles (128 x 256 and 64 x 128); the producer's walk of each part of a split K loop
    (walk_live_steps) is step_at / next_step's; and which convs the kernel refuses. Checked in a
    scratch copy by giving the input gradient the forward's box origin, the row stride the wrong
    extent, the src view the pixel stride as its channel count, merging the weight view's K and tap
    dims, and a mid-tap part start that drops its chunk offset or its step count. sm80_layouts.cu
    checks that both tiles' stage layouts are what their boxes write under TMA's swizzles.
  * tma_pipeline.cu (against the CUTLASS headers): the TMA kernel's producer and consumer loops, with
    its StageRing, on a model of mbarriers in random interleavings: every run finishes, each wgmma
    reads its own step's boxes, and no load lands in a stage a wgmma may still read; one stage must
    deadlock. Checked in a scratch copy by waiting on the wrong parity for a release and for a fill,
    and by releasing a stage before its wgmma is done.
  * patch_groups.cu: a kernel owning two patches per CTA owns every patch once, two adjacent ones
    that share their rows, each slot's statistics row is its patch's index, one patch per CTA is
    the old grid, and a tap is live for the CTA's cover exactly when it is live for one of its
    patches (csrc/common/conv_tiling.h, CtaPatches).
  * gw_pixel_walk.cu: the CuTe weight gradient's per-thread pixel walk (GwPixelWalk, which moves a
    pixel 32 on per step without dividing) reaches the grad and x rows that the direct decode gives,
    over random convs, taps, splits and lanes.
  * epilogue_chunks.cu: the staged epilogue's 16-byte path (store_output_chunk) writes the same bytes
    and leaves the same staged values as the per-value store_output, for fp16 / bf16, forward and
    input gradient, every affine option, partial patches and channel blocks, channel slices, NaN
    and signed zeros; and it is refused for unaligned slices and addresses. The weight gradient's
    partial tiles likewise (store_partial4 against store_partial).
  * patch_stats.cu: the BN-statistics epilogue's per-patch pixel masks count every pixel of a map
    exactly once, and its per-channel (count, sum, centred M2) are within their error bounds of a
    long-double reference, also for a mean far above the spread (csrc/common/patch_stats.h).
  * launcher_checks.cu (builds atrous_conv.cu itself): the C launchers reject bad arguments (a
    partial prologue or one on a 3x3 conv, slices past the pixel or overlapping, wrong padding, an
    unknown dtype, too many branches, an invalid branch beside an empty output) before touching
    the device, and answer success for empty outputs. A rejection that failed would launch, and
    fail differently without a device: checked by removing the overlap check and the empty-output
    rule in a scratch copy.
"""
import importlib.util
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cutlass_include():
    spec = importlib.util.spec_from_file_location("fastaspp_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    try:
        return setup.cutlass_include()
    except SystemExit as e:  # the message says how to install the headers (.ci/run does)
        pytest.skip(str(e))


@pytest.mark.parametrize("program, needs_cutlass", [("sm80_layouts", True), ("patch_stats", False),
                                                    ("launcher_checks", True), ("gw_pixel_walk", False),
                                                    ("epilogue_chunks", False), ("patch_groups", False),
                                                    ("conv_walk", False), ("tma_boxes", False),
                                                    ("tma_pipeline", True)])
def test_host_program(tmp_path, program, needs_cutlass):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    include = [f"-I{cutlass_include()}", "-arch=sm_80"] if needs_cutlass else []
    exe = tmp_path / program
    subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", *include,
                    str(ROOT / "tests" / "cuda_host" / f"{program}.cu"), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout
