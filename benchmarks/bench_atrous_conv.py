"""pytest-benchmark: fused conv+BN+ReLU against eager PyTorch (channels_last, eval).

    python -m pytest benchmarks/bench_atrous_conv.py

Each group holds the eager baseline and every usable fastaspp backend for one shape,
so pytest-benchmark's table shows the ratio measured in the same run. CPU: fp32 at
batch 1; GPU: bf16 at batch 1 and 8. `fastaspp bench` prints the same comparison with
dense and useful FLOP/s.
"""
import pytest
import torch

import fastaspp
from fastaspp.bench.conv import SHAPES, ConvPair

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BATCHES = [1, 8] if ON_GPU else [1]
# GPU: the GPU backends on CUDA tensors; CPU: the cpu backend (the Triton interpreter is not timed).
IMPLS = ["eager"] + ([b for b in fastaspp.backends() if b in ("triton", "cuda")] if ON_GPU else ["cpu"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_conv_bn_relu(benchmark, shape, batch, impl):
    if ON_GPU:
        torch.backends.cudnn.benchmark = True
    benchmark.group = f"{shape.name} batch {batch}"
    pair = ConvPair(shape, batch, DTYPE, DEVICE)
    useful, dense = shape.flops(batch)
    benchmark.extra_info.update(useful_flops=useful, dense_flops=dense, dtype=str(DTYPE), device=str(DEVICE))
    module = pair.eager if impl == "eager" else pair.fused

    def step():
        out = module(pair.next_x())
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    with torch.no_grad(), fastaspp.backend("auto" if impl == "eager" else impl):
        benchmark.pedantic(step, rounds=10 if ON_GPU else 5, iterations=1, warmup_rounds=2)
