"""Drop-in layers for atrous convolution: AtrousConv2d and ConvBNReLU."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastaspp.nn._fold_cache import FoldCache, records_autograd
from fastaspp.nn._train_bn import batch_norm_act
from fastaspp._rules import accumulator_dtype
from fastaspp.ops._autocast import cast_dtype
from fastaspp.ops.atrous_conv import atrous_conv2d


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """nn.Conv2d's padding as ints ('valid' = 0, 'same' = d*(k-1)/2 for odd k)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(f"padding='same' with kernel_size={conv.kernel_size} and dilation={conv.dilation} "
                                 f"needs asymmetric padding, which fastaspp does not support")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


def _check_fusable(conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise ValueError(f"groups must be 1 for fastaspp's atrous convolution, got {conv.groups}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros', got {conv.padding_mode!r}")
    _explicit_padding(conv)


class AtrousConv2d(nn.Conv2d):
    """nn.Conv2d (same constructor and state_dict, groups=1, zero padding) on fastaspp's kernels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_fusable(self)

    def forward(self, input: Tensor) -> Tensor:
        return atrous_conv2d(input, self.weight, self.bias, self.stride, _explicit_padding(self), self.dilation)


def fold_bn(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(scale, shift) of a BN in eval: γ/√(σ²+ε) and β − μ·γ/√(σ²+ε), in fp32 (fp64 for fp64)."""
    acc = accumulator_dtype(bn.running_var.dtype)
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    return scale, shift


def _member(module: nn.Module, table: str, name: str) -> Optional[Tensor]:
    """module.<name> read from its parameter or buffer dict: nn.Module.__getattr__ is slow (a search
    of several dicts per read), which a small call pays six times (a parametrized weight, which lives
    elsewhere, falls back to getattr)."""
    members = module.__dict__[table]
    return members[name] if name in members else getattr(module, name)


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, relu: bool = True,
                cache: Optional[FoldCache] = None) -> Tensor:
    """act(bn(conv(x))) with the conv on fastaspp's op: the one conv + BN (+ ReLU) block that
    ConvBNReLU and the models' fused blocks run.

    Eval (BN with running statistics): one op call, BN folded into a per-channel scale and shift.
    The fold and a detached view of the conv's weight are kept in `cache` (default: one held by
    `bn`) while the parameters and statistics are unchanged, so a call pays one version check and
    the backends keep their re-laid-out weights. Training: the op, then the BN with batch statistics
    (and the ReLU) as one op on CPU tensors, else `bn` itself (fastaspp.nn._train_bn); the kept
    fold is dropped.
    """
    if cache is None:
        cache = bn.__dict__.get("_fastaspp_fold")
        if cache is None:
            cache = bn.__dict__["_fastaspp_fold"] = FoldCache()
    padding = _explicit_padding(conv)
    weight, bias = _member(conv, "_parameters", "weight"), _member(conv, "_parameters", "bias")
    running_mean = _member(bn, "_buffers", "running_mean")
    if bn.training or running_mean is None:
        cache.clear()
        return batch_norm_act(bn, atrous_conv2d(x, weight, bias, conv.stride, padding, conv.dilation), relu)
    sources = [weight, bias, _member(bn, "_parameters", "weight"), _member(bn, "_parameters", "bias"), running_mean,
               _member(bn, "_buffers", "running_var")]
    # The dtype the op computes in: x's, or the autocast dtype the op casts its operands to. The fold
    # is made in it, so that the op's own cast finds it done: a weight cast on every call would be a
    # new tensor each time, and the backends could never keep its re-laid-out copy.
    dtype = cast_dtype(x)
    if torch.compiler.is_compiling() or records_autograd(sources):
        scale, shift = (t.to(dtype) for t in fold_bn(bn))
    else:
        weight, bias, scale, shift = cache.get(sources, (dtype, x.device, bn.eps), lambda: (
            weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype),
            *(t.to(dtype) for t in fold_bn(bn))))
    return atrous_conv2d(x, weight, bias, conv.stride, padding, conv.dilation, scale=scale, shift=shift, relu=relu)


class ConvBNReLU(nn.Sequential):
    """Conv2d → BatchNorm2d → ReLU with the state_dict of that nn.Sequential.

    Eval (BN using running statistics): one fused op, BN folded into a per-channel scale and
    shift, kept until a parameter or buffer changes. Training, or a BN without running statistics:
    the conv runs on fastaspp's kernel, then the batch-statistics BN and the ReLU as one C++ op on
    CPU tensors, or BatchNorm2d and ReLU themselves elsewhere (fastaspp.nn._train_bn); results and
    running statistics are nn.BatchNorm2d's within rounding (conv_bn_act).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0, dilation=1,
                 bias: bool = False, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, bias=bias, **factory)
        _check_fusable(conv)
        super().__init__(conv, nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory),
                         nn.ReLU(inplace=False))
        self._fold_cache = FoldCache()

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "ConvBNReLU":
        """Wraps existing Conv2d and BatchNorm2d modules (shared, not copied)."""
        _check_fusable(conv)
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
            raise ValueError(f"bn must be a BatchNorm2d over {conv.out_channels} channels, got {bn!r}")
        module = cls.__new__(cls)
        nn.Sequential.__init__(module, conv, bn, nn.ReLU(inplace=False))
        module._fold_cache = FoldCache()
        return module

    def folded_bn(self) -> tuple[Tensor, Tensor]:
        """(scale, shift) of this module's BN in eval."""
        return fold_bn(self[1])

    fold = staticmethod(fold_bn)

    def forward(self, input: Tensor) -> Tensor:
        modules = self._modules  # not self[0]: Sequential's indexing costs µs a call
        return conv_bn_act(modules["0"], modules["1"], input, relu=True, cache=self._fold_cache)
