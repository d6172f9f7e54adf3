"""How the Triton kernels are launched: dtypes to constexprs, autotune configs, the launch context.

Dtypes: float32, float16, bfloat16 and float64, accumulated in fastaspp._rules.accumulator_dtype
(float32, float64 for float64). float32 operands use ``input_precision=FP32_DOT_PRECISION`` ("ieee"
by default, so results match PyTorch's fp32 convolution closely; "tf32" trades ~1e-3 relative error
for tensor-core speed); "ieee" fp32 and fp64 run on the FMA units and are autotuned over their own
smaller configs. Under TRITON_INTERPRET=1, bfloat16 operands are widened to float32 before tl.dot,
because the interpreter (numpy has no bfloat16) computes bfloat16 arithmetic wrongly; on the GPU
they go to the tensor cores as bfloat16.
"""

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner, Heuristics

from fastaspp._rules import accumulator_dtype

# Decided at import: the interpreter needs the variable set before triton is imported anyway.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def on_off_switch(name):
    """A FASTASPP_* on/off environment variable: None when unset or empty, else whether it is "1";
    any value but "0" or "1" is an error naming it (never read as the default)."""
    value = os.environ.get(name, "")
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"fastaspp: the environment variable {name} must be unset, 0 or 1, got {value!r}")
    return value == "1"


# input_precision of tl.dot for float32 operands: "ieee" (exact fp32 products) or "tf32".
FP32_DOT_PRECISION = "ieee"

# The dtypes these kernels accept (the op layer checks against this before calling).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def cdiv(a, b):
    """ceil(a / b) of host ints, for grids and heuristics. triton.cdiv is a constexpr function in
    recent Triton, whose Python call unwraps each argument: about 2.5 us a call where this takes
    0.1, and a forward launch made 13 of them."""
    return -(-a // b)


def cfg(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Tensor-core configs (fp16, bf16, fp32 as tf32), Hopper-oriented (H100): 128-256 wide tiles,
# BLOCK_K 64, 3-4 stage pipelines; smaller tiles for batch 1 / small maps where large tiles leave
# SMs idle.  forward and grad_input share them (BLOCK_N runs over Cout in forward, over Cin in
# grad_input).  Defined even under the interpreter: tests compile each for sm_90 ahead of time.
GPU_CONV_TC_CONFIGS = [
    cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
    cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64),
    cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
]
GPU_WGRAD_TC_CONFIGS = [
    cfg(8, 3, BLOCK_CO=128, BLOCK_CI=256, BLOCK_M=64),
    cfg(8, 3, BLOCK_CO=128, BLOCK_CI=128, BLOCK_M=64),
    cfg(4, 4, BLOCK_CO=128, BLOCK_CI=128, BLOCK_M=32),
    cfg(4, 4, BLOCK_CO=64, BLOCK_CI=128, BLOCK_M=64),
    cfg(4, 4, BLOCK_CO=64, BLOCK_CI=64, BLOCK_M=64),
]
# FMA configs (fp64, and fp32 with "ieee" precision): no tensor cores, 4/8-byte operands; smaller
# K steps keep the shared-memory pipeline within Hopper's 227 KB.
GPU_CONV_FMA_CONFIGS = [
    cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
    cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32),
]
GPU_WGRAD_FMA_CONFIGS = [
    cfg(4, 2, BLOCK_CO=64, BLOCK_CI=64, BLOCK_M=32),
    cfg(8, 2, BLOCK_CO=128, BLOCK_CI=64, BLOCK_M=32),
    cfg(4, 3, BLOCK_CO=32, BLOCK_CI=64, BLOCK_M=32),
]

_AUTOTUNE = on_off_switch("FASTASPP_TRITON_AUTOTUNE")  # read at import, checked even where unused
if INTERPRET:
    # Autotuning is pointless and slow in the interpreter: one small config (tl.dot needs >= 16).
    _CONV_TC_CONFIGS = [cfg(4, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)]
    _CONV_FMA_CONFIGS = []
    _WGRAD_TC_CONFIGS = [cfg(4, 1, BLOCK_CO=16, BLOCK_CI=16, BLOCK_M=16)]
    _WGRAD_FMA_CONFIGS = []
elif _AUTOTUNE is False:
    # One config per kind, no autotuning: the GPU test run sets this so that its many shapes
    # compile once instead of once per config (the benchmarks autotune and check the result).
    _CONV_TC_CONFIGS, _CONV_FMA_CONFIGS = GPU_CONV_TC_CONFIGS[-1:], GPU_CONV_FMA_CONFIGS[:1]
    _WGRAD_TC_CONFIGS, _WGRAD_FMA_CONFIGS = GPU_WGRAD_TC_CONFIGS[-1:], GPU_WGRAD_FMA_CONFIGS[:1]
else:
    _CONV_TC_CONFIGS, _CONV_FMA_CONFIGS = GPU_CONV_TC_CONFIGS, GPU_CONV_FMA_CONFIGS
    _WGRAD_TC_CONFIGS, _WGRAD_FMA_CONFIGS = GPU_WGRAD_TC_CONFIGS, GPU_WGRAD_FMA_CONFIGS


def deterministic_configs():
    """Whether autotuning is off for bit-identical results across processes: every kernel here is
    deterministic for a given config (no atomics, fixed-order reductions), but autotuning may pick
    a different tiling, so a different summation order, in another process. On under
    torch.use_deterministic_algorithms(True) or FASTASPP_DETERMINISTIC=1: the first config of the
    dot's kind is used."""
    forced = on_off_switch("FASTASPP_DETERMINISTIC")  # checked whatever torch's setting
    return torch.are_deterministic_algorithms_enabled() or forced is True


def prune_by_dot_kind(n_tensor_core_configs):
    """Autotune only the configs made for the dot the dtype gets: tensor cores, or FMA."""

    def prune(configs, named_args, **kwargs):
        dot = kwargs["DOT_DTYPE"]
        tensor_cores = dot in (tl.float16, tl.bfloat16) or (
            dot == tl.float32 and kwargs["DOT_PRECISION"] != "ieee")
        chosen = (configs[:n_tensor_core_configs] if tensor_cores else configs[n_tensor_core_configs:]) or configs
        return chosen[:1] if deterministic_configs() else chosen

    return {"early_config_prune": prune}


CONV_CONFIGS = _CONV_TC_CONFIGS + _CONV_FMA_CONFIGS
CONV_PRUNE = prune_by_dot_kind(len(_CONV_TC_CONFIGS))
WGRAD_CONFIGS = _WGRAD_TC_CONFIGS + _WGRAD_FMA_CONFIGS
WGRAD_PRUNE = prune_by_dot_kind(len(_WGRAD_TC_CONFIGS))


TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def dtype_meta(dtype):
    """(ACC_DTYPE, DOT_DTYPE, DOT_PRECISION) constexprs for activations of `dtype`."""
    if dtype not in TL_DTYPES:
        raise TypeError(f"triton backend: dtype {dtype} not supported "
                        "(float32, float16, bfloat16, float64)")
    acc = TL_DTYPES[accumulator_dtype(dtype)]
    if dtype == torch.float64:
        return acc, tl.float64, "ieee"
    if dtype == torch.bfloat16 and INTERPRET:
        return acc, tl.float32, "ieee"  # interpreter bf16 arithmetic is broken
    if dtype == torch.float32:
        return acc, tl.float32, FP32_DOT_PRECISION
    # fp16/bf16 go to the tensor cores as they are; the precision flag only concerns fp32.
    return acc, TL_DTYPES[dtype], "tf32"



def launch_ctx(t):
    """Where a launch runs: the tensor's GPU, or the interpreter for CPU tensors."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if not INTERPRET:
        raise RuntimeError("triton backend: tensors on device "
                           f"'{t.device}' need TRITON_INTERPRET=1 set before triton is imported "
                           "(CUDA tensors run natively)")
    return contextlib.nullcontext()


def jit_function(kernel):
    """The JIT function (or, under TRITON_INTERPRET, the interpreted one) under a kernel's autotune
    and heuristics wrappers."""
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def _call_key(args, kwargs):
    return tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args), tuple(kwargs.items())


def _launch_of(kernel, config, args, kwargs):
    """(function, keyword arguments) that kernel's autotuner, with `config` chosen, launches for a
    call: its heuristics wrapper's values worked out as Heuristics.run does, in order."""
    launch_kwargs = {**kwargs, **config.all_kwargs()}
    inner = kernel.fn
    if isinstance(inner, Heuristics):
        for name, heuristic in inner.values.items():
            launch_kwargs[name] = heuristic({**dict(zip(inner.arg_names, args)), **launch_kwargs})
        inner = inner.fn
    return inner, launch_kwargs


# Each autotuned kernel's launches past its wrappers, by call key (each int or constexpr argument's
# value and each tensor argument's dtype, finer than the autotuner's key): the function under the
# wrappers and every keyword argument it received on the key's first call (the call's own, the
# config's, the heuristics' values). First calls hold the lock: best_config is the autotuner's
# last call's, so no other call may come in between.
_LAUNCHES = {}
_FIRST_CALLS = threading.Lock()


def launch_tuned(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs) for an autotuned kernel (the launch of every fastaspp kernel),
    past Triton's autotuner and heuristics wrappers once the call's key has been launched.

    Triton's Autotuner.run rebuilds its key on every call from all the kernel's arguments (a
    membership test in the argument-name list and a hasattr for each of about 40), and
    Heuristics.run a dict of them for each heuristic: tens of us a launch on a 2-core CPU
    (benchmarks/triton_host_wrappers.py). The first call of a key runs the autotuner (which tunes
    when its own key is new, keeps the config and launches); later calls launch the JIT function
    under the wrappers with the keyword arguments the wrappers gave it then, which depend only on
    the key: the config by the autotuner's key (coarser than this one) and the tile heuristics by
    the map's sizes and the config. So a launch is the one the wrappers would make. `kernel` is
    looked up at each call site, so a stand-in that is not an Autotuner (tests, benchmarks)
    launches as kernel[grid](...)."""
    if type(kernel) is not Autotuner:
        return kernel[grid](*args, **kwargs)
    launches = _LAUNCHES.get(kernel)
    if launches is None:
        launches = _LAUNCHES.setdefault(kernel, {})
    key = _call_key(args, kwargs)
    launch = launches.get(key)
    if launch is None:
        with _FIRST_CALLS:
            kernel[grid](*args, **kwargs)
            launches[key] = _launch_of(kernel, kernel.best_config, args, kwargs)
        return None
    inner, launch_kwargs = launch
    inner[grid](*args, **launch_kwargs)
    return None
