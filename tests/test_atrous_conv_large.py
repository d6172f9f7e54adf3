"""Paper-sized shapes and Inductor compilation: slow on CPU, so CI skips them (-m "not slow").

The GPU run includes them: there the triton and cuda backends see the real ASPP shapes.
"""
import pytest
import torch

import fastaspp
from fastaspp import reference

from _cases import assert_close_scaled
from conftest import device_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c_in,c_out,size,rate,batch", [
    (2048, 256, 33, 6, 2), (2048, 256, 33, 18, 1), (2048, 256, 65, 36, 1), (256, 256, 65, 2, 2), (512, 512, 65, 4, 1),
])
def test_paper_shapes(backend, dtype, c_in, c_out, size, rate, batch):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=gen).to(device, dtype, memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, 3, 3, generator=gen) / (9 * c_in) ** 0.5).to(device, dtype)
    s, t = (torch.randn(c_out, generator=gen).to(device, dtype) for _ in range(2))
    x.requires_grad_()
    w.requires_grad_()
    out = fastaspp.ops.atrous_conv2d(x, w, None, 1, rate, rate, scale=s, shift=t, relu=True)
    f64 = lambda v: v.detach().double()
    ref = reference.atrous_conv2d(f64(x), f64(w), None, 1, rate, rate, scale=f64(s), shift=f64(t), relu=True)
    assert_close_scaled(out, ref, dtype, "forward")
    g = torch.randn(out.shape, generator=gen).to(device, dtype)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    xr, wr = f64(x).requires_grad_(), f64(w).requires_grad_()
    pre = reference.atrous_conv2d(xr, wr, None, 1, rate, rate, scale=f64(s), shift=f64(t))
    ex, ew = torch.autograd.grad(pre, (xr, wr), g.double() * (out.detach() > 0).double())
    assert_close_scaled(dx, ex, dtype, "grad x")
    assert_close_scaled(dw, ew, dtype, "grad weight")


def test_inductor_compile(backend):
    device = device_for(backend)
    conv = fastaspp.nn.ConvBNReLU(8, 6, 3, padding=2, dilation=2).to(device).eval()
    x = torch.randn(2, 8, 9, 9, device=device).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), conv(x))
