"""Compile every Triton kernel of fastaspp, in every autotune config, for a GPU arch, with no GPU.

    python -m fastaspp.kernels.aot_check [--arch 90] [--jobs 2]

The interpreter (how CI runs the kernels) never lowers them to PTX, so it cannot see what only the
GPU compiler rejects (a dot's accumulator type, a config whose pipeline overflows shared memory).
This compiles each (kernel, config, dtype) through Triton's full pipeline (TTIR -> PTX -> cubin
with ptxas) for the target arch and checks the shared memory each needs against the arch's limit.
Exit status 0 when all compile and fit; otherwise it lists the failures.  Must run without
TRITON_INTERPRET=1 (the interpreter replaces the kernels with Python functions).
"""
import argparse
import concurrent.futures
import os
import sys

# Per-block shared memory limit (bytes) of the archs this checks: sm_80 163 KB, sm_90 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}

# Tile sides the heuristics would pick for a 33x33 map (any valid pair compiles the same way).
_TILE = {16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (11, 11), 256: (16, 16)}


def _cases():
    """(kernel name, config index, kind, dtype name) for every config of every kernel."""
    from fastaspp.kernels import launch as K

    out = []
    for kernel, tc, fma in [("fwd", K.GPU_CONV_TC_CONFIGS, K.GPU_CONV_FMA_CONFIGS),
                            ("dgrad", K.GPU_CONV_TC_CONFIGS, K.GPU_CONV_FMA_CONFIGS),
                            ("wgrad", K.GPU_WGRAD_TC_CONFIGS, K.GPU_WGRAD_FMA_CONFIGS)]:
        out += [(kernel, i, "tc", dt) for i in range(len(tc)) for dt in ("bf16", "fp16")]
        out += [(kernel, i, "fma", dt) for i in range(len(fma)) for dt in ("fp32", "fp64")]
    # The forward with every training fusion on (prologue, per-image bias, BN statistics), the
    # one-launch ASPP branches in eval (ReLU) and training (statistics) form, and their input gradient.
    for kernel in ("fwd_fused", "aspp", "aspp_stats", "aspp_dgrad"):
        out += [(kernel, i, "tc", "bf16") for i in range(len(K.GPU_CONV_TC_CONFIGS))]
        out += [(kernel, i, "fma", "fp32") for i in range(len(K.GPU_CONV_FMA_CONFIGS))]
    return out


def _compile(case, arch):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastaspp.kernels import aspp as A
    from fastaspp.kernels import atrous_conv as C
    from fastaspp.kernels import launch as K

    kernel, index, kind, dtype = case
    tl_dtype = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}[dtype]
    acc = tl.float64 if dtype == "fp64" else tl.float32
    precision = "ieee" if kind == "fma" else "tf32"
    if kernel == "wgrad":
        config = (K.GPU_WGRAD_TC_CONFIGS if kind == "tc" else K.GPU_WGRAD_FMA_CONFIGS)[index]
        jit = C._atrous_wgrad_kernel
    else:
        config = (K.GPU_CONV_TC_CONFIGS if kind == "tc" else K.GPU_CONV_FMA_CONFIGS)[index]
        jit = {"dgrad": C._atrous_dgrad_kernel, "aspp": A._aspp_branches_kernel, "aspp_stats": A._aspp_branches_kernel,
               "aspp_dgrad": A._aspp_grad_input_kernel}.get(kernel, C._atrous_fwd_kernel)
        tile_h, tile_w = _TILE[config.kwargs["BLOCK_M"]]
    fn = K.jit_function(jit)
    const = dict(config.kwargs, ACC_DTYPE=acc, DOT_DTYPE=tl_dtype, DOT_PRECISION=precision)
    if kernel.startswith("fwd"):
        fused = kernel == "fwd_fused"
        const.update(RELU=not fused, PROLOGUE=fused, IMAGE_BIAS=fused, STATS=fused, HAS_SCALE=not fused,
                     HAS_SHIFT=not fused)
    if kernel in ("aspp", "aspp_stats"):
        const.update(RELU=kernel == "aspp", STATS=kernel == "aspp_stats", AFFINE=kernel == "aspp")
    if kernel != "wgrad":
        const.update(TILE_H=tile_h, TILE_W=tile_w)
    pointer = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}[dtype]
    acc_pointer = "*fp64" if dtype == "fp64" else "*fp32"
    signature = {name: ("constexpr" if name in const else
                        acc_pointer if name in ("ws_ptr", "stats_ptr") else
                        "*i32" if name == "rates_ptr" else
                        pointer if name.endswith("_ptr") else "i32") for name in fn.arg_names}
    missing = set(const) - set(fn.arg_names)
    if missing:
        return case, f"constexprs {sorted(missing)} are not parameters of the kernel"
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as exc:  # reported per case, the run goes on
        return case, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    shared = compiled.metadata.shared
    if shared > SHARED_LIMIT[arch]:
        return case, f"needs {shared} bytes of shared memory, sm_{arch} has {SHARED_LIMIT[arch]}"
    return case, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: unset TRITON_INTERPRET (the interpreter never compiles the kernels)", file=sys.stderr)
        return 2
    cases = _cases()
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_compile, cases, [args.arch] * len(cases)))
    failures = [(case, why) for case, why in results if why is not None]
    for case, why in failures:
        print(f"FAIL {case}: {why}")
    print(f"aot_check sm_{args.arch}: {len(cases) - len(failures)} of {len(cases)} (kernel, config, dtype) compiled "
          "and fit in shared memory")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
