"""Whole fused models under CUDA graphs (docs/design.md §13): a manual torch.cuda.CUDAGraph capture and
torch.compile(mode="reduce-overhead") both work and match eager, and an eager call makes no host
synchronisation once warm. GPU only: skipped on CPU (the GPU run, benchmarks/gpu_run.sh, runs them).

Tolerances (tests/_cases.py, rule 3): a replayed or compiled result and the eager one, each against
the plain model in fp64 on the same input; the replayed or compiled error within 3x eager's plus 8
fp32 ulps of the exact output's norm. A replay that read a stale input, or a graph that kept stale
weights, is off by the output's own size.
"""
import pytest
import torch

import fastaspp

from _cases import assert_as_accurate_as_plain
from test_aspp import randomized

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")

GPU_BACKENDS = ("triton", "cuda")


def _model():
    torch.manual_seed(0)
    model = randomized(fastaspp.models.deeplabv3_mobilenet_v3_large(num_classes=5, fused=True))
    return model.cuda().to(memory_format=torch.channels_last)


def _exact(model):
    """The plain model (fused=False) in fp64 with model's state, in model's mode: the reference."""
    plain = fastaspp.models.deeplabv3_mobilenet_v3_large(num_classes=5, fused=False)
    plain.load_state_dict(model.state_dict())
    drop = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for mine, theirs in zip(drop, [m for m in plain.modules() if isinstance(m, torch.nn.Dropout)]):
        theirs.p = mine.p
    return plain.double().cuda().train(model.training)


def _images(count=2, batch=2, size=65):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, size, size, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
            for _ in range(count)]


def _usable(backend):
    # The private reason for a skip, as in conftest.py.
    reason = fastaspp._backend.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable: {reason}")


def _warm_up(fn, *args):
    """Calls on a side stream before capture: autotuning, kept weight layouts and per-device constant
    tensors all happen here, never inside a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_manual_capture_replays_the_eager_result(backend):
    _usable(backend)
    model = _model().eval()
    exact_model = _exact(model)
    first, second = _images()
    with torch.no_grad(), fastaspp.backend(backend):
        static_x = first.clone()
        _warm_up(model, static_x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)["out"]
        for x in (first, second):
            static_x.copy_(x)
            graph.replay()
            assert_as_accurate_as_plain(static_out, model(x)["out"], exact_model(x.double())["out"], "replay")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_eager_calls_make_no_host_sync(backend):
    _usable(backend)
    model = _model().eval()
    x, _ = _images()
    with torch.no_grad(), fastaspp.backend(backend):
        model(x)  # warm: autotuning and kept layouts may synchronise once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_compile_reduce_overhead(mode):
    _usable("triton")
    model = _model().train(mode == "train")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the same output from both runs
    images = _images(count=3)
    exact_model = _exact(model)  # train mode: batch statistics, the same output whatever its running stats
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead")
    with fastaspp.backend("triton"), torch.set_grad_enabled(mode == "train"):
        for x in images:
            out = compiled(x)["out"]
            expected = model(x)["out"]
            if mode == "train":  # batch statistics: both calls moved the running stats alike
                out.float().square().mean().backward()
            with torch.no_grad():
                exact = exact_model(x.double())["out"]
            assert_as_accurate_as_plain(out, expected, exact, "compiled")
