"""fastaspp.ops.atrous_conv2d against fastaspp.reference on every usable backend.

Tolerances (tests/_cases.py, rule 2): every output and gradient is compared with the fp64
reference on the same inputs, elementwise within gamma_n times its magnitude (the reference on
absolute values), n the longest chain of roundings a term goes through:
  forward:      Cin*KH*KW (the dot product) + CONV_EPILOGUE (bias folded, scale, shift);
  grad x:       Cout*KH*KW + 2 (grad * scale, then the transposed conv);
  grad weight:  N*Ho*Wo + 2 (the sum over pixels, then * scale), grad bias likewise;
  grad scale:   N*Ho*Wo + Cin*KH*KW + 2 (<weight, sum over pixels> + bias * sum of grad);
  grad shift:   N*Ho*Wo.
Half types round to their storage once in the forward and at most twice in the backward (the
GPU backends round grad * scale, and the raw weight gradient, before the final cast); under the
Triton interpreter a bf16 conversion truncates and counts twice (per_conversion). Checked to
fail on a plausible bug (injected into fastaspp.ops.atrous_conv2d's inputs or its backward's
outputs in a scratch run): a dropped last tap, a scale or shift off by 1e-3, a weight gradient
missing one pixel's share and an input gradient off by 1e-3 fail every fp32 and fp64 case where
they change the result (bf16 and fp16 cannot resolve 1e-3).
"""
import pytest
import torch

import fastaspp
from fastaspp import reference
# The op layer's lazy import of the Triton kernels: their SUPPORTED_DTYPES decides which dtype cases run.
from fastaspp.ops.atrous_conv import _triton_kernels

from _cases import CASES, CONV_EPILOGUE, GRADCHECK_CASES, OPCHECK_CASES, ConvCase, absolute, assert_within, \
    conv_magnitude, folded_shift_roundings, per_conversion
from conftest import ON_GPU, device_for


def supports(backend, dtype):
    if backend == "triton":
        return dtype in _triton_kernels().SUPPORTED_DTYPES
    return True


def make_inputs(case: ConvCase, dtype, device, channels_last=False, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.c_in, case.h, case.w, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(case.c_out, case.c_in, case.k, case.k, generator=g) / (case.c_in * case.k * case.k) ** 0.5
    b, s, t = (torch.randn(case.c_out, generator=g) for _ in range(3)) if affine else (None, None, None)
    cast = lambda v: None if v is None else v.to(device=device, dtype=dtype)
    return cast(x), cast(w), cast(b), cast(s), cast(t)


def run_both(case, x, w, b, s, t, relu):
    """(fastaspp output, fp64 reference output, its magnitude) for the same inputs."""
    kwargs = dict(stride=case.stride, padding=case.pad, dilation=case.dilation)
    out = fastaspp.ops.atrous_conv2d(x, w, b, scale=s, shift=t, relu=relu, **kwargs)
    f64 = lambda v: None if v is None else v.detach().double()
    ref = reference.atrous_conv2d(f64(x), f64(w), f64(b), scale=f64(s), shift=f64(t), relu=relu, **kwargs)
    return out, ref, conv_magnitude(x, w, b, s, t, **kwargs)


def assert_forward_close(out, ref, magnitude, case, dtype, backend, what=""):
    """Rule 2: Cin*KH*KW roundings in the dot product plus the epilogue's, one to a half storage type,
    and the folded shift's (make_inputs gives a bias)."""
    depth = case.c_in * case.k * case.k + CONV_EPILOGUE
    assert_within(out, ref, magnitude, depth, dtype, what,
                  storage_roundings=per_conversion(backend, dtype) + folded_shift_roundings(backend, dtype))


def assert_layout_follows(out, x):
    """The output keeps x's memory format (either is right when x's layout is ambiguous, e.g. C == 1)."""
    if x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()} do not follow x's {fmt}"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_forward_fp32(backend, case, channels_last):
    x, w, b, s, t = make_inputs(case, torch.float32, device_for(backend), channels_last)
    out, ref, magnitude = run_both(case, x, w, b, s, t, relu=True)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_layout_follows(out, x)
    assert_forward_close(out, ref, magnitude, case, torch.float32, backend, f"forward {case}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES[:12], ids=str)
def test_forward_dtypes(backend, case, dtype):
    if not supports(backend, dtype):
        pytest.skip(f"{backend} does not support {dtype}")
    x, w, b, s, t = make_inputs(case, dtype, device_for(backend), channels_last=True)
    out, ref, magnitude = run_both(case, x, w, b, s, t, relu=True)
    assert out.dtype == dtype
    assert_forward_close(out, ref, magnitude, case, dtype, backend, f"forward {case}")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_forward_optional_arguments(backend, relu, affine):
    case = ConvCase(2, 4, 5, 7, 7, dilation=2)
    x, w, b, s, t = make_inputs(case, torch.float32, device_for(backend), affine=affine)
    out, ref, magnitude = run_both(case, x, w, b, s, t, relu=relu)
    if relu:
        assert (out >= 0).all()
    else:
        assert (out < 0).any()
    assert_forward_close(out, ref, magnitude, case, torch.float32, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward(backend, case, channels_last, dtype):
    """Gradients of x, weight, bias, scale and shift against autograd through the reference."""
    if not supports(backend, dtype):
        pytest.skip(f"{backend} does not support {dtype}")
    inputs = [v.requires_grad_() for v in make_inputs(case, dtype, device_for(backend), channels_last)]
    out, _, _ = run_both(case, *inputs, relu=True)
    # The reference takes the gradient the kernel got (rounded to its dtype), so that only the
    # kernel's rounding is measured.
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    # The ReLU mask is the output's; take the reference's mask from fastaspp's output so that
    # pixels rounding to exactly zero in half precision don't flip.
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    mask = (out.detach() > 0).double()
    geometry = (case.stride, case.pad, case.dilation)
    expected, magnitudes = [], []
    for values in (lambda v: v.detach().double(), absolute):  # the reference, then its magnitude
        leaves = [values(v).requires_grad_() for v in inputs]
        pre = reference.atrous_conv2d(leaves[0], leaves[1], leaves[2], *geometry, scale=leaves[3], shift=leaves[4])
        seed = grad.double() * mask if values is not absolute else grad.double().abs() * mask
        (expected if values is not absolute else magnitudes).extend(torch.autograd.grad(pre, leaves, seed))
    pixels = out.shape[0] * out.shape[2] * out.shape[3]
    taps = case.k * case.k
    depths = {"x": case.c_out * taps + 2, "weight": pixels + 2, "bias": pixels + 2,
              "scale": pixels + case.c_in * taps + 2, "shift": pixels}
    for name, v, a, e, m in zip(("x", "weight", "bias", "scale", "shift"), inputs, got, expected, magnitudes):
        assert a.shape == v.shape and a.dtype == v.dtype, name
        assert_within(a, e, m, depths[name], dtype, f"grad {name} {case}",
                      storage_roundings=2 * per_conversion(backend, dtype))
    assert_layout_follows(got[0], inputs[0])


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_fp64(backend, case, relu):
    if not supports(backend, torch.float64):
        pytest.skip(f"{backend} does not support float64")
    x, w, b, s, t = (v.requires_grad_() for v in make_inputs(case, torch.float64, device_for(backend)))
    fn = lambda *a: fastaspp.ops.atrous_conv2d(a[0], a[1], a[2], case.stride, case.pad, case.dilation,
                                               scale=a[3], shift=a[4], relu=relu)
    # Tolerances: tests/_cases.py rule 5 (the op is affine in each input: central differences are
    # exact but for ~1e-10 of rounding). ReLU kinks make finite differences unreliable where the
    # output is ~0: shift away from 0.
    if relu:
        with torch.no_grad():
            t += 0.5
    # The interpreter is too slow for a full numerical Jacobian: fast mode checks random projections.
    fast = backend == "triton" and not ON_GPU
    assert torch.autograd.gradcheck(fn, (x, w, b, s, t), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


def test_only_requested_gradients(backend):
    case = ConvCase(1, 3, 4, 6, 6, dilation=2)
    x, w, b, s, t = make_inputs(case, torch.float32, device_for(backend))
    w.requires_grad_()
    out = fastaspp.ops.atrous_conv2d(x, w, b, padding=2, dilation=2, scale=s, shift=t, relu=True)
    (gw,) = torch.autograd.grad(out.sum(), [w])
    assert gw.shape == w.shape and torch.isfinite(gw).all()


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(backend, case, channels_last):
    x, w, b, s, t = make_inputs(case, torch.float32, device_for(backend), channels_last)
    args = (x, w, b, s, t, [case.stride] * 2, [case.pad] * 2, [case.dilation] * 2, True, backend)
    torch.library.opcheck(torch.ops.fastaspp.atrous_conv2d.default, args)
    x.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(torch.ops.fastaspp.atrous_conv2d.default, args)
    out = fastaspp.ops.atrous_conv2d(x.detach(), w.detach(), stride=case.stride, padding=case.pad,
                                     dilation=case.dilation)
    geometry = ([case.stride] * 2, [case.pad] * 2, [case.dilation] * 2)
    torch.library.opcheck(torch.ops.fastaspp.atrous_conv2d_grad_input.default,
                          (out, w.detach(), list(x.shape), *geometry, backend))
    torch.library.opcheck(torch.ops.fastaspp.atrous_conv2d_grad_weight.default,
                          (x.detach(), out, list(w.shape), *geometry, backend))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_cpp_kernels(channels_last):
    """The C++ kernel ops themselves (fake impls registered from Python), with and without the
    optional affine, and the cpu backend's one-call backward with every output mask."""
    case = ConvCase(2, 3, 4, 6, 6, dilation=2)
    x, w, b, s, t = make_inputs(case, torch.float32, "cpu", channels_last)
    geometry = ([1, 1], [2, 2], [2, 2])
    torch.library.opcheck(torch.ops.fastaspp._atrous_conv2d_forward.default, (x, w, b, s, t, *geometry, True))
    torch.library.opcheck(torch.ops.fastaspp._atrous_conv2d_forward.default,
                          (x, w, None, None, None, *geometry, False))
    g = torch.randn(2, 4, 6, 6)
    g = g.to(memory_format=torch.channels_last) if channels_last else g
    torch.library.opcheck(torch.ops.fastaspp._atrous_conv2d_grad_input.default, (g, w, list(x.shape), *geometry))
    torch.library.opcheck(torch.ops.fastaspp._atrous_conv2d_grad_weight.default, (x, g, list(w.shape), *geometry))
    out = torch.ops.fastaspp._atrous_conv2d_forward.default(x, w, b, s, t, *geometry, True)
    for mask in ([True] * 5, [True, False, False, True, False], [False, True, True, False, True]):
        torch.library.opcheck(torch.ops.fastaspp._atrous_conv2d_backward.default,
                              (g, x, w, b, s, out, *geometry, mask))
    torch.library.opcheck(torch.ops.fastaspp._atrous_conv2d_backward.default,
                          (g, x, w, None, None, None, *geometry, [True, True, False, False, True]))


def test_torch_compile_fullgraph(backend):
    case = ConvCase(2, 3, 4, 7, 7, dilation=3)
    x, w, b, s, t = make_inputs(case, torch.float32, device_for(backend), channels_last=True)
    w.requires_grad_()

    def fn(x, w):
        return fastaspp.ops.atrous_conv2d(x, w, b, padding=3, dilation=3, scale=s, shift=t, relu=True).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    # The same kernels and the same aten tail on both sides (rule 6): equal to within the defaults.
    expected = fn(x, w)
    got = compiled(x, w)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(fn(x, w), w)[0])


def test_triton_keeps_copies_of_frozen_weights_only():
    """kernels/kept.py, tested directly: whether a copy was kept or made again is not visible through
    the ops. A copy is kept while a no-grad weight is unchanged, made again after an in-place change
    or when another weight of the set is swapped, and never kept for weights that train or for
    inference tensors (no version counter); entries die with their weight."""
    from fastaspp.kernels.kept import KeptCopies

    store = KeptCopies()
    tap_major = lambda w, dims: store.get((w,), dims, lambda: w.permute(*dims).contiguous())
    w = torch.randn(4, 3, 3, 3)
    first = tap_major(w, (2, 3, 1, 0))
    assert torch.equal(first, w.permute(2, 3, 1, 0)) and first.is_contiguous()
    assert tap_major(w, (2, 3, 1, 0)) is first
    assert tap_major(w, (2, 3, 0, 1)) is not first  # each tag has its own entry
    w.mul_(2)
    again = tap_major(w, (2, 3, 1, 0))
    assert again is not first and torch.equal(again, w.permute(2, 3, 1, 0))
    # A set of weights (the packed ASPP branches): swapping any but the first one invalidates the copy.
    others = [torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)]
    packed = lambda ws: store.get(ws, "packed", lambda: torch.cat([t.reshape(-1) for t in ws]))
    kept_pack = packed([w, others[0]])
    assert packed([w, others[0]]) is kept_pack
    swapped = packed([w, others[1]])
    assert swapped is not kept_pack and torch.equal(swapped[w.numel():], others[1].reshape(-1))
    trained = torch.randn(4, 3, 3, 3, requires_grad=True)
    assert tap_major(trained, (2, 3, 1, 0)) is not tap_major(trained, (2, 3, 1, 0))
    with torch.inference_mode():
        frozen = torch.randn(4, 3, 3, 3)
        assert tap_major(frozen, (2, 3, 1, 0)) is not tap_major(frozen, (2, 3, 1, 0))
    assert [t is w for t in store.owners()] == [True]
    del w, first, again, kept_pack, swapped
    assert store.owners() == []  # a dead weight drops its entry
