"""Bad input to atrous_conv2d gets an error that names the argument.

Every case runs both ways the entry point checks: its eager calls of the C++ kernels check in C++
(csrc/eager_calls.cpp), every other call in Python (check_atrous_conv2d_args); under a torch-function
mode that passes calls through, the call takes the torch op's route and the Python checks. Both must
raise the same error."""
import pytest
import torch

import fastaspp

conv = fastaspp.ops.atrous_conv2d


class _PassThrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True, params=["eager", "op-route"])
def checked_by(request):
    if request.param == "eager":
        yield request.param
        return
    with _PassThrough():
        yield request.param


def good():
    return torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 1, 3, 8, 8), (8,)])
def test_x_not_4d(shape):
    _, w = good()
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor"):
        conv(torch.randn(shape), w)


def test_weight_not_4d():
    x, _ = good()
    with pytest.raises(ValueError, match=r"weight must be a 4-D tensor"):
        conv(x, torch.randn(4, 3, 3))


def test_channel_mismatch():
    x, _ = good()
    with pytest.raises(ValueError, match=r"weight expects 5 input channels .* x has 3"):
        conv(x, torch.randn(4, 5, 3, 3))


@pytest.mark.parametrize("name", ["stride", "dilation"])
@pytest.mark.parametrize("value", [0, -1, (1, 0)])
def test_stride_dilation_below_one(name, value):
    x, w = good()
    with pytest.raises(ValueError, match=rf"{name} must be >= 1"):
        conv(x, w, **{name: value})


def test_negative_padding():
    x, w = good()
    with pytest.raises(ValueError, match=r"padding must be >= 0"):
        conv(x, w, padding=(1, -1))


@pytest.mark.parametrize("name", ["stride", "padding", "dilation"])
@pytest.mark.parametrize("value", [(1, 2, 3), 1.5, "same", True])
def test_malformed_pairs(name, value):
    x, w = good()
    with pytest.raises(TypeError, match=rf"{name} must be an int or a pair of ints"):
        conv(x, w, **{name: value})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_dtypes(dtype):
    x, w = good()
    with pytest.raises(TypeError, match=r"x must be float16, bfloat16, float32 or float64"):
        conv(x.to(dtype), w)
    with pytest.raises(TypeError, match=r"weight must be float16, bfloat16, float32 or float64"):
        conv(x, w.to(dtype))


def test_dtype_mismatch():
    x, w = good()
    with pytest.raises(TypeError, match=r"weight has dtype torch.float64 but x has torch.float32"):
        conv(x, w.double())


def test_device_mismatch():
    x, w = good()
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        conv(x, w.to("meta"))
    with pytest.raises(ValueError, match=r"scale is on meta but x is on cpu"):
        conv(x, w, scale=torch.ones(4, device="meta"))


@pytest.mark.parametrize("name", ["bias", "scale", "shift"])
def test_affine_wrong_length(name):
    x, w = good()
    with pytest.raises(ValueError, match=rf"{name} must have length C_out=4, got 5"):
        conv(x, w, **{name: torch.ones(5)})
    with pytest.raises(ValueError, match=rf"{name} must be a 1-D tensor"):
        conv(x, w, **{name: torch.ones(4, 1)})


def test_output_too_small():
    x, w = good()
    with pytest.raises(ValueError, match=r"output size .* is too small"):
        conv(x, w, dilation=5)


def test_relu_must_be_bool():
    x, w = good()
    with pytest.raises(TypeError, match=r"relu must be a bool"):
        conv(x, w, relu=1)


def test_unavailable_backend_says_why():
    if "cuda" in fastaspp.backends():
        pytest.skip("cuda is available here")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is unavailable: .+"):
        with fastaspp.backend("cuda"):
            pass


def test_cpu_backend_rejects_other_devices():
    with pytest.raises(RuntimeError, match=r"backend 'cpu' runs CPU tensors only"):
        fastaspp.resolve_backend(torch.device("cuda"), "cpu")


def test_op_rejects_auto_backend():
    x, w = good()
    with pytest.raises(ValueError, match=r"backend must be a concrete backend name"):
        torch.ops.fastaspp.atrous_conv2d(x, w, None, None, None, [1, 1], [0, 0], [1, 1], False, "auto")


def test_zero_channels():
    with pytest.raises(ValueError, match=r"weight must have non-zero C_out, C_in, KH and KW"):
        conv(torch.randn(1, 0, 8, 8), torch.randn(4, 0, 3, 3))
    with pytest.raises(ValueError, match=r"weight must have non-zero C_out, C_in, KH and KW"):
        conv(torch.randn(1, 3, 8, 8), torch.randn(0, 3, 3, 3))
