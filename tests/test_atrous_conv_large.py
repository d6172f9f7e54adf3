"""Paper-sized shapes and Inductor compilation: slow on CPU, so CI skips them (-m "not slow").

The GPU run includes them: there the triton and cuda backends see the real ASPP shapes.

Tolerances (tests/_cases.py): rule 2 elementwise (K = 9 * Cin up to 18432 products: gamma_K is
about 1e-3 of the magnitude, a loose but machine-independent bound) and rule 3, which is tight:
the fused result within 3x plain PyTorch's own error (cuDNN or oneDNN in the same dtype, TF32 off)
against fp64, plus 8 fp32 ulps (1 bf16 ulp) of the exact tensor's norm.
"""
import pytest
import torch

import fastaspp
from fastaspp import reference

from _cases import CONV_EPILOGUE, absolute, assert_as_accurate_as_plain, assert_within, per_conversion
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
    plain = reference.atrous_conv2d(x, w, None, 1, rate, rate, scale=s, shift=t, relu=True)
    f64 = lambda v: v.detach().double()  # noqa: E731
    ref = reference.atrous_conv2d(f64(x), f64(w), None, 1, rate, rate, scale=f64(s), shift=f64(t), relu=True)
    magnitude = reference.atrous_conv2d(absolute(x), absolute(w), None, 1, rate, rate, scale=absolute(s),
                                        shift=absolute(t))
    ulps = 8 if dtype == torch.float32 else 1
    assert_within(out, ref, magnitude, 9 * c_in + CONV_EPILOGUE, dtype, "forward",
                  storage_roundings=per_conversion(backend, dtype))
    assert_as_accurate_as_plain(out, plain, ref, "forward", dtype, floor_ulps=ulps)
    g = torch.randn(out.shape, generator=gen).to(device, dtype)
    mask = (out.detach() > 0).to(dtype)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    plain_pre = reference.atrous_conv2d(x, w, None, 1, rate, rate, scale=s, shift=t)
    px, pw = torch.autograd.grad(plain_pre, (x, w), g * mask)
    xr, wr = f64(x).requires_grad_(), f64(w).requires_grad_()
    pre = reference.atrous_conv2d(xr, wr, None, 1, rate, rate, scale=f64(s), shift=f64(t))
    ex, ew = torch.autograd.grad(pre, (xr, wr), g.double() * mask.double())
    assert_as_accurate_as_plain(dx, px, ex, "grad x", dtype, floor_ulps=ulps)
    assert_as_accurate_as_plain(dw, pw, ew, "grad weight", dtype, floor_ulps=ulps)


def test_inductor_compile(backend):
    device = device_for(backend)
    conv = fastaspp.nn.ConvBNReLU(8, 6, 3, padding=2, dilation=2).to(device).eval()
    x = torch.randn(2, 8, 9, 9, device=device).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True)
    with torch.no_grad():  # the same kernel; Inductor may fold the BN in another order (rule 6: a few ulps)
        torch.testing.assert_close(compiled(x), conv(x))
