"""pytest-benchmark: fastaspp.nn.ASPP against the eager reference ASPP (channels_last), eval and a
training step, at the paper's shapes. CPU: fp32, batch 1, 33x33; GPU: bf16, batch 1/8/16, both shapes.
`fastaspp bench --op aspp [--compile]` prints the same comparison with FLOP/s and torch.compile."""
import pytest
import torch

import fastaspp
from fastaspp.bench.aspp import ASPP_SHAPES, aspp_pair

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPES = ASPP_SHAPES if ON_GPU else ASPP_SHAPES[:1]
BATCHES = [1, 8, 16] if ON_GPU else [1]


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_aspp(benchmark, shape, batch, mode, impl):
    if mode == "train":
        batch = max(batch, 2)  # the pooling branch's BatchNorm cannot train at batch 1
    benchmark.group = f"{shape.name} {mode} batch {batch}"
    eager, fused = aspp_pair(shape, DTYPE, DEVICE)
    module = (eager if impl == "eager" else fused).train(mode == "train")
    x = torch.randn(batch, shape.c_in, shape.size, shape.size).to(DEVICE, DTYPE, memory_format=torch.channels_last)
    x.requires_grad_(mode == "train")  # a training step also takes the input's gradient, as in a whole model
    useful, dense = (3 * f for f in shape.flops(batch)) if mode == "train" else shape.flops(batch)
    benchmark.extra_info.update(useful_flops=useful, dense_flops=dense, backend=fastaspp.resolve_backend(DEVICE))

    def step():
        if mode == "eval":
            with torch.no_grad():
                module(x)
        else:
            module(x).sum().backward()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10 if ON_GPU else 5, iterations=1, warmup_rounds=2)
