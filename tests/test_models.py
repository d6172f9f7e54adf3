"""fastaspp.models (DeepLabV3 family) and fastaspp.convert, on the cpu backend.

Ground truth: the same model built with fused=False (plain PyTorch, torchvision's semantics),
loaded with the fused model's state_dict. Key layout and parameter counts are checked against
facts read from torchvision's source (torchvision does not import on this CPU-only torch).

Tolerances (tests/_cases.py). Whole networks admit no useful a-priori bound (dozens of layers,
hardswish, residual sums), so fp32 and bf16 results follow rule 3: the fused model and the plain
one, in the same dtype on the same input, each against the plain model in fp64; the fused error
(2-norm) within 3x plain's plus 8 fp32 ulps (1 bf16 ulp) of the exact tensor's norm.

Training steps run in fp64 (fused and plain): in fp32 the gradients are ill-conditioned at batch 2
(the ASPP's image-pooling BN normalises 2 nearly equal values per channel): plain fp32 is up to
~15% away from fp64 on some backbone gradients, and a ReLU whose input lies within fp32 rounding
of 0 may flip between runs. Without an exact reference beyond fp64 the bound comes from the
conditioning: a plain fp32 step measures it (its deviation from fp64 is ~kappa * u32), so each
fp64 step lies within ~kappa * u64 = that deviation * 2^-29 of the exact one, and fused and plain
fp64 may differ by twice that, times rule 3's 3, plus 8 fp64 ulps (assert_fp64_agrees).
Checked to fail, in a scratch run, with one BN weight of the fused model off by 1e-4 (every eval
and training case) and by 1e-7 (every fp64 training step).
"""
import copy
import os
import pickle
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastaspp
import fastaspp.models as M
from fastaspp import reference
from fastaspp.convert import convert
from fastaspp.models._fuse import FusedSequential
from fastaspp.models.heads import CascadeHead
from fastaspp.models.mobilenetv3 import Conv2dNormActivation
from _cases import assert_as_accurate_as_plain, frozen_statistics
from fastaspp.models.resnet import (
    BasicBlock,
    Bottleneck,
    FusedBasicBlock,
    FusedBottleneck,
)

BUILDERS = {"resnet50": M.deeplabv3_resnet50, "resnet101": M.deeplabv3_resnet101,
            "mobilenet_v3_large": M.deeplabv3_mobilenet_v3_large}
UNITS = {"resnet50": 3 + 4 + 6 + 3, "resnet101": 3 + 4 + 23 + 3, "mobilenet_v3_large": 0}


def randomized(module, seed=0):
    """Non-trivial BN statistics and affine parameters, so folding errors show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    return module


def make_pair(arch, **kwargs):
    """(fused, plain): the same weights, randomized BN."""
    torch.manual_seed(0)
    fused = randomized(BUILDERS[arch](**kwargs))
    plain = BUILDERS[arch](fused=False, **kwargs)
    plain.load_state_dict(fused.state_dict(), strict=True)
    return fused, plain


def image(n=1, size=33, seed=1, dtype=torch.float32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_close_scaled(a, b, tol):
    """|a - b| <= tol * (largest |b|, at least 1e-3) + tol * |b|: for fp64 against fp64 (rule 4)."""
    torch.testing.assert_close(a, b, atol=tol * max(b.abs().max().item(), 1e-3), rtol=tol)


def exact_outputs(plain, x):
    """The plain model in fp64 on x's values, eval: the reference of rule 3."""
    with torch.no_grad():
        return copy.deepcopy(plain).double().eval()(x.double())


def assert_outputs_as_accurate(fused_out, plain_out, exact_out, dtype=torch.float32):
    """Rule 3 for every output of a model (dicts of tensors or one tensor)."""
    if torch.is_tensor(exact_out):
        fused_out, plain_out, exact_out = {"out": fused_out}, {"out": plain_out}, {"out": exact_out}
    floor_ulps = 8 if dtype == torch.float32 else 1
    for key in exact_out:
        assert_as_accurate_as_plain(fused_out[key], plain_out[key], exact_out[key], key, dtype=dtype,
                                    floor_ulps=floor_ulps)


class Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops a block dispatches."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


def fastaspp_calls(calls):
    return {k: v for k, v in calls.items() if k.startswith("fastaspp.") and not k.startswith("fastaspp._")}


# ---------------------------------------------------------------- key layout (torchvision's)
# From torchvision/models: ResNet-50/101 Bottleneck layers (3, 4, 6, 3) / (3, 4, 23, 3), a downsample
# in the first unit of each layer; DeepLabHead = ASPP (1x1, 3 rates, pooling, project) + 3x3 conv, BN,
# ReLU, 1x1 conv; FCNHead on layer3 (ResNet, 1024 channels) or C2 (MobileNetV3, features.4, 40 channels).
# state_dict entries: conv 1 (2 with bias), BN 5 (weight, bias, running_mean, running_var, num_batches_tracked).
CONV, BN = 1, 5
ASPP_ENTRIES = (CONV + BN) * 4 + (CONV + BN) + (CONV + BN)         # 1x1 + 3 atrous, pooling, project
HEAD_ENTRIES = ASPP_ENTRIES + CONV + BN + 2 * CONV                  # + 3x3 conv, BN, 1x1 conv with bias
AUX_ENTRIES = CONV + BN + 2 * CONV
# torchvision's MobileNetV3-Large table (in, kernel, expanded, out, SE): expand conv when expanded != in.
MBV3_LARGE = [(16, 16, False), (16, 64, False), (24, 72, False), (24, 72, True), (40, 120, True),
              (40, 120, True), (40, 240, False), (80, 200, False), (80, 184, False), (80, 184, False),
              (80, 480, True), (112, 672, True), (112, 672, True), (160, 960, True), (160, 960, True)]


def expected_entries(arch, aux):
    if arch.startswith("resnet"):
        layers = (3, 4, 6, 3) if arch == "resnet50" else (3, 4, 23, 3)
        backbone = (CONV + BN) + sum(layers) * 3 * (CONV + BN) + 4 * (CONV + BN)  # stem, units, downsamples
    else:
        blocks = sum((CONV + BN) * (2 + (exp != cin)) + (4 if se else 0) for cin, exp, se in MBV3_LARGE)
        backbone = (CONV + BN) + blocks + (CONV + BN)  # stem, blocks (SE: fc1, fc2 with bias), last 1x1
    return backbone + HEAD_ENTRIES + (AUX_ENTRIES if aux else 0)


# torchvision's published sizes (DeepLabV3_*_Weights meta "num_params", models with aux_loss=True).
NUM_PARAMS = {"resnet50": 42004074, "resnet101": 60996202, "mobilenet_v3_large": 11029328}
ENTRIES = {"resnet50": 370, "resnet101": 676, "mobilenet_v3_large": 360}
SAMPLE_KEYS = {
    "resnet50": {
        "backbone.conv1.weight": (64, 3, 7, 7), "backbone.bn1.num_batches_tracked": (),
        "backbone.layer1.0.conv1.weight": (64, 64, 1, 1), "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.layer2.0.conv2.weight": (128, 128, 3, 3), "backbone.layer3.5.bn3.running_var": (1024,),
        "backbone.layer4.0.downsample.1.weight": (2048,), "backbone.layer4.2.conv2.weight": (512, 512, 3, 3),
        "backbone.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "classifier.0.convs.0.0.weight": (256, 2048, 1, 1), "classifier.0.convs.1.0.weight": (256, 2048, 3, 3),
        "classifier.0.convs.3.1.running_mean": (256,), "classifier.0.convs.4.1.weight": (256, 2048, 1, 1),
        "classifier.0.convs.4.2.num_batches_tracked": (), "classifier.0.project.0.weight": (256, 1280, 1, 1),
        "classifier.0.project.1.bias": (256,), "classifier.1.weight": (256, 256, 3, 3),
        "classifier.2.running_var": (256,), "classifier.4.weight": (21, 256, 1, 1), "classifier.4.bias": (21,),
        "aux_classifier.0.weight": (256, 1024, 3, 3), "aux_classifier.1.weight": (256,),
        "aux_classifier.4.weight": (21, 256, 1, 1), "aux_classifier.4.bias": (21,)},
    "resnet101": {"backbone.layer3.22.conv3.weight": (1024, 256, 1, 1), "backbone.layer4.2.bn3.bias": (2048,),
                  "classifier.0.convs.0.0.weight": (256, 2048, 1, 1), "aux_classifier.0.weight": (256, 1024, 3, 3)},
    "mobilenet_v3_large": {
        "backbone.0.0.weight": (16, 3, 3, 3), "backbone.0.1.running_var": (16,),
        "backbone.1.block.0.0.weight": (16, 1, 3, 3), "backbone.2.block.0.0.weight": (64, 16, 1, 1),
        "backbone.4.block.1.0.weight": (72, 1, 5, 5), "backbone.4.block.2.fc1.weight": (24, 72, 1, 1),
        "backbone.4.block.2.fc2.bias": (72,), "backbone.4.block.3.1.weight": (40,),
        "backbone.13.block.1.0.weight": (672, 1, 5, 5), "backbone.15.block.2.fc1.weight": (240, 960, 1, 1),
        "backbone.16.0.weight": (960, 160, 1, 1), "backbone.16.1.num_batches_tracked": (),
        "classifier.0.convs.0.0.weight": (256, 960, 1, 1), "classifier.0.project.0.weight": (256, 1280, 1, 1),
        "classifier.4.weight": (21, 256, 1, 1), "aux_classifier.0.weight": (10, 40, 3, 3),
        "aux_classifier.4.weight": (21, 10, 1, 1)},
}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_key_layout_matches_torchvision(arch):
    torch.manual_seed(0)
    fused = BUILDERS[arch](aux_loss=True)
    plain = BUILDERS[arch](aux_loss=True, fused=False)
    sd, plain_sd = fused.state_dict(), plain.state_dict()
    assert [(k, v.shape) for k, v in sd.items()] == [(k, v.shape) for k, v in plain_sd.items()]
    assert len(sd) == ENTRIES[arch] == expected_entries(arch, aux=True)
    assert sum(p.numel() for p in fused.parameters()) == NUM_PARAMS[arch]
    for key, shape in SAMPLE_KEYS[arch].items():
        assert tuple(sd[key].shape) == shape, key
    assert list(sd)[0] == ("backbone.conv1.weight" if arch.startswith("resnet") else "backbone.0.0.weight")
    assert list(sd)[-1] == "aux_classifier.4.bias"
    no_aux = BUILDERS[arch](fused=False).state_dict()
    assert len(no_aux) == expected_entries(arch, aux=False)
    assert not any(k.startswith("aux_classifier") for k in no_aux)
    # Module tree: torchvision's names and indices; the fused model holds fastaspp's ASPP.
    assert isinstance(fused.classifier[0], fastaspp.nn.ASPP) and type(plain.classifier[0]) is M.PlainASPP
    assert [type(m) for m in list(fused.classifier)[1:]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert isinstance(fused.aux_classifier[3], nn.Dropout) and fused.aux_classifier[3].p == 0.1
    bns = [m for m in fused.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    eps, momentum = (1e-5, 0.1) if arch.startswith("resnet") else (1e-3, 0.01)
    assert all(bn.eps == eps and bn.momentum == momentum for bn in bns)
    if arch.startswith("resnet"):
        assert list(dict(fused.backbone.named_children())) == [
            "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        assert all(type(u) is FusedBottleneck for layer in (fused.backbone.layer1, fused.backbone.layer4)
                   for u in layer)
        assert all(type(u) is Bottleneck for u in plain.backbone.layer4)
    else:
        assert list(dict(fused.backbone.named_children())) == [str(i) for i in range(17)]
    # fused=False: torch modules and fastaspp's plain-PyTorch ones only (from fastaspp.nn only ASPPPooling,
    # plain torch ops; no fused op either, which test_eval_fused_matches_plain checks).
    own = {type(m) for m in plain.modules() if not type(m).__module__.startswith("torch.")}
    assert {c.__module__ for c in own - {fastaspp.nn.ASPPPooling}} <= {
        "fastaspp.models.deeplabv3", "fastaspp.models._utils", "fastaspp.models.resnet", "fastaspp.models.heads",
        "fastaspp.models.mobilenetv3", "fastaspp.models.plain_aspp"}


# ---------------------------------------------------------------- fused == plain, eval
EVAL_CASES = [
    ("resnet50", dict(aux_loss=True)),                                       # torchvision's: OS8, (12, 24, 36)
    ("resnet50", dict(output_stride=16, multi_grid=(1, 2, 4), aux_loss=True)),
    ("resnet50", dict(output_stride=16, atrous_rates=(3, 6))),
    ("resnet50", dict(head="cascade", output_stride=16, multi_grid=(1, 2, 4), aux_loss=True)),
    ("resnet50", dict(head="cascade", cascade_blocks=1, multi_grid=(1, 2, 1))),
    ("resnet101", dict(aux_loss=True)),
    ("mobilenet_v3_large", dict(aux_loss=True)),                             # torchvision's: OS16, (12, 24, 36)
    ("mobilenet_v3_large", dict(output_stride=8, atrous_rates=(2, 4, 6, 8))),
]


def _case_id(case):
    arch, kwargs = case
    return arch + "".join(f"-{k}={v}" for k, v in kwargs.items()).replace(" ", "")


# In eval a bottleneck unit is three op calls (conv1, conv2, conv3 with their BN), plus one for the
# downsample of each layer's first unit (four in a ResNet backbone, none in the cascade blocks); the
# MobileNetV3 backbone runs none.
BACKBONE_CALLS = {arch: 3 * units + 4 if units else 0 for arch, units in UNITS.items()}


def _expected_fused_calls(arch, kwargs):
    """fastaspp op calls of one eval forward: the backbone's, one per 3x3 head conv, and the ASPP."""
    calls = {}
    convs = BACKBONE_CALLS[arch]
    if kwargs.get("head") == "cascade":
        convs += 3 * 3 * kwargs.get("cascade_blocks", 3)
    else:
        calls["fastaspp.aspp_branches.default"] = 1
        convs += 1  # DeepLabHead's 3x3 conv
    convs += 1 if kwargs.get("aux_loss") else 0
    calls["fastaspp.atrous_conv2d.default"] = convs
    return calls


@pytest.mark.parametrize("case", EVAL_CASES, ids=_case_id)
def test_eval_fused_matches_plain(case):
    arch, kwargs = case
    fused, plain = make_pair(arch, num_classes=5, **kwargs)
    fused.eval()
    plain.eval()
    x = image()
    with torch.no_grad():
        with Recorder() as rec:
            out = fused(x)
        with Recorder() as plain_rec:
            expected = plain(x)
    assert fastaspp_calls(plain_rec.calls) == {}
    assert list(out) == list(expected) == (["out", "aux"] if kwargs.get("aux_loss") else ["out"])
    for key in expected:
        assert out[key].shape == (1, 5, 33, 33)
    assert_outputs_as_accurate(out, expected, exact_outputs(plain, x))
    assert fastaspp_calls(rec.calls) == _expected_fused_calls(arch, kwargs)


# ---------------------------------------------------------------- fused == plain, one training step
TRAIN_CASES = [
    ("resnet50", dict(aux_loss=True), torch.float64),
    ("resnet50", dict(head="cascade", cascade_blocks=1, output_stride=16, multi_grid=(1, 2, 4)), torch.float64),
    pytest.param(("resnet101", dict(aux_loss=True), torch.float64), marks=pytest.mark.slow),
    ("mobilenet_v3_large", dict(aux_loss=True), torch.float64),
]
GRAD_SAMPLE = ["backbone.layer1.0.conv2.weight", "backbone.layer2.0.conv2.weight", "backbone.layer4.2.conv2.weight",
               "backbone.layer4.0.bn2.weight", "backbone.conv1.weight", "backbone.0.0.weight",
               "backbone.7.block.1.0.weight", "classifier.0.convs.1.0.weight", "classifier.0.project.0.weight",
               "classifier.1.weight", "classifier.2.bias", "classifier.4.weight",
               "classifier.block5.0.conv2.weight", "classifier.logits.weight", "aux_classifier.0.weight",
               "aux_classifier.1.weight"]


def _train_step(model, x, target, aux):
    torch.manual_seed(7)  # same dropout masks on both sides
    out = model(x)
    loss = F.cross_entropy(out["out"], target)
    if aux:
        loss = loss + 0.5 * F.cross_entropy(out["aux"], target)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), dict(zip([n for n, _ in model.named_parameters()], grads))


def assert_fp64_agrees(fused, plain, probe, what, floor_scale):
    """Fused and plain fp64 results within 3 x 2 x 2^-29 of plain fp32's deviation from plain fp64
    (the conditioning, module docstring), plus 8 fp64 ulps of floor_scale: for gradients the largest
    gradient norm of the step (before a batch norm's cancellation: frozen_statistics), since rounding
    noise flows between tensors through the backward and a small tensor's fp32 probe may be lucky."""
    diff = (fused.double() - plain.double()).norm().item()
    allowed = 3 * 2 * 2.0 ** -29 * (probe.double() - plain.double()).norm().item() + \
        8 * torch.finfo(torch.float64).eps * floor_scale
    assert diff <= allowed, f"{what}: fused and plain fp64 differ by {diff:.3g} > {allowed:.3g}"


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: _case_id(c[:2]) + f"-{str(c[2])[6:]}")
def test_train_step_fused_matches_plain(case):
    arch, kwargs, dtype = case
    fused, plain = make_pair(arch, num_classes=3, **kwargs)
    probe = copy.deepcopy(plain).train()  # plain fp32: measures the conditioning
    fused.to(dtype).train()
    plain.to(dtype).train()
    x = image(2, dtype=dtype)
    target = torch.randint(0, 3, (2, 33, 33), generator=torch.Generator().manual_seed(2))
    aux = bool(kwargs.get("aux_loss"))
    frozen = frozen_statistics(plain, x, seed=7)
    loss, grads = _train_step(fused, x, target, aux)
    expected_loss, expected_grads = _train_step(plain, x, target, aux)
    probe_loss, probe_grads = _train_step(probe, x.float(), target, aux)
    _, frozen_grads = _train_step(frozen, x, target, aux)
    assert_fp64_agrees(loss, expected_loss, probe_loss, "loss", expected_loss.abs().item())
    sampled = [k for k in GRAD_SAMPLE if k in grads]
    assert len(sampled) >= 6
    scale = max(max(expected_grads[k].norm().item(), frozen_grads[k].norm().item()) for k in grads)
    for key in grads:
        assert_fp64_agrees(grads[key], expected_grads[key], probe_grads[key], key, scale)
    assert all(g.abs().sum() > 0 for k, g in grads.items() if k in ("classifier.4.weight", "backbone.conv1.weight",
                                                                     "backbone.0.0.weight"))
    expected_state, probe_state = plain.state_dict(), probe.state_dict()
    for key, value in fused.state_dict().items():
        if "running_" in key:
            assert_fp64_agrees(value, expected_state[key], probe_state[key], key, expected_state[key].norm().item())
        elif "num_batches" in key:
            assert torch.equal(value, expected_state[key]), key
    assert int(fused.state_dict()["classifier.2.num_batches_tracked" if kwargs.get("head") != "cascade"
                                  else "classifier.block5.0.bn2.num_batches_tracked"]) == 1


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_torch_func_through_the_model(arch):
    """A whole fused model in eval under torch.func: the gradient of a loss in its parameters
    (functional_call) and the jvp in its input agree with the plain model's, as a training step does
    (assert_fp64_agrees: fp64 against fp64 within the conditioning an fp32 probe measures)."""
    fused, plain = make_pair(arch, num_classes=3)
    probe = copy.deepcopy(plain).eval()
    fused.double().eval()
    plain.double().eval()
    x = image(1, dtype=torch.float64)
    t = image(1, seed=5, dtype=torch.float64)

    def grads(model, x):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p):
            return torch.func.functional_call(model, (p, buffers), (x,))["out"].square().mean()
        return torch.func.grad(loss)(params)

    def tangent(model, x, t):
        return torch.func.jvp(lambda x: model(x)["out"], (x,), (t,))[1]

    got, want, probe_grads = grads(fused, x), grads(plain, x), grads(probe, x.float())
    scale = max(g.norm().item() for g in want.values())
    for key in want:
        assert_fp64_agrees(got[key], want[key], probe_grads[key], key, scale)
    assert got["classifier.4.weight"].abs().sum() > 0
    want_t = tangent(plain, x, t)
    assert_fp64_agrees(tangent(fused, x, t), want_t, tangent(probe, x.float(), t.float()), "jvp",
                       want_t.abs().max().item())


# ---------------------------------------------------------------- the paper's options
def _rates(layer):
    return [(u.conv2.dilation[0], u.conv2.padding[0], u.conv2.stride[0]) for u in layer]


@pytest.mark.parametrize("output_stride,multi_grid,layer3,layer4", [
    (8, None, [1, 2, 2, 2, 2, 2], [2, 4, 4]),        # torchvision: a dilated layer's first unit keeps the last rate
    (16, None, [1] * 6, [1, 2, 2]),
    (16, (1, 2, 4), [1] * 6, [2, 4, 8]),             # the paper's example
    (8, (1, 2, 4), [1, 2, 2, 2, 2, 2], [4, 8, 16]),
    (8, (1, 2, 1), [1, 2, 2, 2, 2, 2], [4, 8, 4]),
    (16, (2, 2, 2), [1] * 6, [4, 4, 4]),
])
def test_layer_rates_and_strides(output_stride, multi_grid, layer3, layer4):
    model = M.deeplabv3_resnet50(output_stride=output_stride, multi_grid=multi_grid, fused=False)
    backbone = model.backbone
    assert _rates(backbone.layer3) == [(d, d, 2 if i == 0 and output_stride == 16 else 1) for i, d in enumerate(layer3)]
    assert _rates(backbone.layer4) == [(d, d, 1) for d in layer4]
    assert backbone.layer2[0].conv2.stride == (2, 2) and backbone.layer4[0].downsample[0].stride == (1, 1)
    rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
    assert [b[0].dilation[0] for b in model.classifier[0].convs[1:-1]] == list(rates)


@pytest.mark.parametrize("arch,output_stride,out_size,aux_size", [
    # 33 → stem 17 → 9 (OS4) → 5 (OS8) → 3 (OS16)
    ("resnet50", 8, 5, 5), ("resnet50", 16, 3, 3), ("mobilenet_v3_large", 16, 3, 5), ("mobilenet_v3_large", 8, 5, 5),
])
def test_output_stride_shapes(arch, output_stride, out_size, aux_size):
    torch.manual_seed(0)
    model = BUILDERS[arch](output_stride=output_stride, aux_loss=True, num_classes=4, fused=False).eval()
    x = image(size=33)
    with torch.no_grad():
        features = model.backbone(x)
        out = model(x)
    channels = (2048, 1024) if arch == "resnet50" else (960, 40)
    assert features["out"].shape == (1, channels[0], out_size, out_size)
    assert features["aux"].shape == (1, channels[1], aux_size, aux_size)
    assert out["out"].shape == out["aux"].shape == (1, 4, 33, 33)


def test_mobilenet_dilation():
    net = M.deeplabv3_mobilenet_v3_large(fused=False).backbone
    depthwise = [net[str(i)].block[1 if i > 1 else 0][0] for i in range(1, 16)]
    assert [c.dilation[0] for c in depthwise] == [1] * 12 + [2] * 3  # torchvision's dilated=True: C4 at rate 2
    assert depthwise[12].stride == (1, 1) and depthwise[6].stride == (2, 2)
    net8 = M.deeplabv3_mobilenet_v3_large(output_stride=8, fused=False).backbone
    assert [net8[str(i)].block[1 if i > 1 else 0][0].dilation[0] for i in range(1, 16)] == [1] * 6 + [2] * 6 + [4] * 3
    assert M.deeplabv3_mobilenet_v3_large(output_stride=8, fused=False).classifier[0].convs[1][0].dilation == (24, 24)


def test_cascade_head():
    model = M.deeplabv3_resnet50(head="cascade", output_stride=16, multi_grid=(1, 2, 4), num_classes=6)
    head = model.classifier
    assert isinstance(head, CascadeHead)
    assert list(dict(head.named_children())) == ["block5", "block6", "block7", "logits"]
    assert head.rates == (4, 8, 16)  # block4 (layer4) has rate 2 at OS16; doubling per block
    for name, rate in zip(("block5", "block6", "block7"), head.rates):
        block = getattr(head, name)
        assert len(block) == 3 and all(type(u) is FusedBottleneck and u.downsample is None for u in block)
        assert [u.conv2.dilation[0] for u in block] == [rate, 2 * rate, 4 * rate]
        assert block[0].conv1.in_channels == 2048 and block[2].conv3.out_channels == 2048
    assert head.logits.weight.shape == (6, 2048, 1, 1) and head.logits.bias is not None
    keys = model.state_dict()
    assert "classifier.block7.2.bn3.running_var" in keys and "classifier.logits.bias" in keys
    assert not any(".convs." in k for k in keys)  # no ASPP
    assert len(keys) == expected_entries("resnet50", aux=False) - HEAD_ENTRIES + 3 * 3 * 3 * (CONV + BN) + 2
    os8 = M.deeplabv3_resnet50(head="cascade", cascade_blocks=2, fused=False).classifier
    assert os8.rates == (8, 16) and [u.conv2.dilation[0] for u in os8.block6] == [16, 16, 16]
    assert list(dict(os8.named_children())) == ["block5", "block6", "logits"]


# ---------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs,message", [
    (dict(output_stride=32), r"output_stride must be one of \(8, 16\), got 32"),
    (dict(output_stride=8.0), r"output_stride must be one of"),
    (dict(multi_grid=(1, 2)), r"multi_grid must be 3 ints >= 1 .*got \(1, 2\)"),
    (dict(multi_grid=(1, 0, 2)), r"multi_grid must be 3 ints"),
    (dict(head="psp"), r"head must be one of \('aspp', 'cascade'\), got 'psp'"),
    (dict(cascade_blocks=2), r"cascade_blocks applies to head='cascade' only"),
    (dict(head="cascade", cascade_blocks=0), r"cascade_blocks must be an int >= 1"),
    (dict(head="cascade", atrous_rates=(6, 12)), r"atrous_rates applies to head='aspp' only"),
    (dict(atrous_rates=()), r"atrous_rates must be a list or tuple of 1 to 4 ints >= 1, got \(\)"),
    (dict(atrous_rates=(1, 2, 3, 4, 5)), r"atrous_rates must be"),
    (dict(atrous_rates=(6, 0)), r"atrous_rates must be"),
    (dict(num_classes=0), r"num_classes must be an int >= 1"),
    (dict(aux_loss=1), r"aux_loss must be True, False or None"),
    (dict(fused="yes"), r"fused must be True or False"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        M.deeplabv3_resnet50(**kwargs)


def test_bad_arguments_mobilenet():
    with pytest.raises(ValueError, match=r"output_stride must be one of \(8, 16\), got 32"):
        M.deeplabv3_mobilenet_v3_large(output_stride=32)
    with pytest.raises(TypeError, match="multi_grid"):
        M.deeplabv3_mobilenet_v3_large(multi_grid=(1, 2, 4))
    with pytest.raises(TypeError, match="head"):
        M.deeplabv3_mobilenet_v3_large(head="cascade")


# ---------------------------------------------------------------- weights from local files
class NotATensor:
    pass


def test_weights_roundtrip_and_inference(tmp_path):
    torch.manual_seed(0)
    source = randomized(M.deeplabv3_mobilenet_v3_large(num_classes=3, aux_loss=True)).eval()
    path = tmp_path / "model.pth"
    torch.save(source.state_dict(), path)
    loaded = M.deeplabv3_mobilenet_v3_large(weights=path).eval()  # num_classes and aux_loss from the file
    assert loaded.aux_classifier is not None and loaded.classifier[4].out_channels == 3
    plain = M.deeplabv3_mobilenet_v3_large(weights=str(path), fused=False).eval()
    x = image()
    with torch.no_grad():
        expected = source(x)
        got, got_plain = loaded(x), plain(x)
    for key in expected:  # the same weights in the same fused model: the same bits
        assert torch.equal(got[key], expected[key]), key
    assert_outputs_as_accurate(got, got_plain, exact_outputs(plain, x))
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth")  # training-script layout
    wrapped = M.deeplabv3_mobilenet_v3_large(weights=tmp_path / "checkpoint.pth", aux_loss=True)
    assert torch.equal(wrapped.classifier[4].weight, source.classifier[4].weight)


def test_weights_backbone(tmp_path):
    from fastaspp.models.mobilenetv3 import mobilenet_v3_large

    torch.manual_seed(3)
    imagenet = mobilenet_v3_large(output_stride=16)  # the classification net (features, classifier)
    path = tmp_path / "backbone.pth"
    torch.save(imagenet.state_dict(), path)
    model = M.deeplabv3_mobilenet_v3_large(weights_backbone=path)
    assert torch.equal(model.backbone["16"][0].weight, imagenet.features[16][0].weight)
    assert torch.equal(model.backbone["4"].block[2].fc1.bias, imagenet.features[4].block[2].fc1.bias)
    assert not any(k.startswith("backbone.classifier") for k in model.state_dict())


def test_weights_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*nope\.pth"):
        M.deeplabv3_resnet50(weights=missing)
    with pytest.raises(FileNotFoundError, match=r"weights_backbone file not found: .*nope\.pth"):
        M.deeplabv3_resnet50(weights_backbone=missing)
    with pytest.raises(TypeError, match=r"weights must be a local file path .* never downloads"):
        M.deeplabv3_resnet50(weights=object())

    bad = tmp_path / "bad.pth"
    torch.save({"backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "extra.weight": torch.zeros(1),
                "other.bias": torch.zeros(2)}, bad)
    with pytest.raises(RuntimeError) as info:
        M.deeplabv3_mobilenet_v3_large(weights=bad)
    message = str(info.value)
    assert "bad.pth" in message and "352 missing keys ('backbone.0.0.weight', 'backbone.0.1.weight'" in message
    assert "3 unexpected keys ('backbone.conv1.weight', 'extra.weight', 'other.bias')" in message
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "classifier.weight": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError, match=r"weights_backbone file .*bad\.pth.* does not match .* 319 missing keys "
                                           r"\('bn1.weight', .*; 1 unexpected keys \('classifier.weight'\)"):
        M.deeplabv3_resnet50(weights_backbone=bad)  # a ResNet-50 classifier's state_dict: 318 + fc's 2 entries

    torch.manual_seed(0)
    three = tmp_path / "three.pth"
    torch.save(M.deeplabv3_mobilenet_v3_large(num_classes=3, fused=False).state_dict(), three)
    with pytest.raises(RuntimeError, match=r"2 keys with another shape \('classifier.4.weight': file \(3, 256, 1, 1\) "
                                           r"vs model \(5, 256, 1, 1\), 'classifier.4.bias'"):
        M.deeplabv3_mobilenet_v3_large(weights=three, num_classes=5)
    with pytest.raises(RuntimeError, match=r"8 missing keys \('aux_classifier.0.weight'"):
        M.deeplabv3_mobilenet_v3_large(weights=three, aux_loss=True)

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"w": torch.zeros(1), "obj": NotATensor()}, unsafe)
    with pytest.raises(pickle.UnpicklingError):  # torch.load(weights_only=True) refuses arbitrary objects
        M.deeplabv3_mobilenet_v3_large(weights=unsafe)
    assert not os.path.exists(tmp_path / "hub")


# ---------------------------------------------------------------- channels_last, autocast, compile, export
def test_channels_last_and_autocast():
    fused, plain = make_pair("resnet50", num_classes=4, output_stride=16, aux_loss=True)
    fused = fused.eval().to(memory_format=torch.channels_last)
    plain = plain.eval().to(memory_format=torch.channels_last)
    x = image().to(memory_format=torch.channels_last)
    exact = exact_outputs(plain, x)
    with torch.no_grad():
        out, expected = fused(x), plain(x)
        for key in expected:
            assert out[key].is_contiguous(memory_format=torch.channels_last)
        assert_outputs_as_accurate(out, expected, exact)
        with torch.autocast("cpu", dtype=torch.bfloat16), Recorder() as rec:
            low = fused(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_expected = plain(x)
    assert fastaspp_calls(rec.calls)["fastaspp.atrous_conv2d.default"] == BACKBONE_CALLS["resnet50"] + 2
    for key in expected:
        assert low[key].dtype == low_expected[key].dtype == torch.bfloat16
    # bf16 keeps 8 bits: both are ~1% from fp64 after 16 units; rule 3 in bf16.
    assert_outputs_as_accurate(low, low_expected, exact, torch.bfloat16)


def test_autocast_training_head_and_block():
    """bf16 autocast in training: the fused head and blocks run (the fused ASPP at its weights' precision:
    fastaspp.nn.ASPP's training path does not follow autocast) and stay within bf16 error of fp32."""
    from fastaspp.models.heads import DeepLabHead, FCNHead

    torch.manual_seed(0)
    modules = [(DeepLabHead(16, 3, (1, 2)), DeepLabHead(16, 3, (1, 2), fused=False)),
               (FCNHead(16, 3), FCNHead(16, 3, fused=False)),
               (FusedBottleneck(16, 4, dilation=2), Bottleneck(16, 4, dilation=2))]
    x = torch.randn(4, 16, 9, 9, generator=torch.Generator().manual_seed(1))
    for fused, plain in modules:
        randomized(fused)
        plain.load_state_dict(fused.state_dict())
        for m in (fused, plain):
            for dropout in (d for d in m.modules() if isinstance(d, nn.Dropout)):
                dropout.p = 0.0
        exact = copy.deepcopy(plain).double().train()
        frozen = frozen_statistics(exact, x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fused.train()(x)
            low_plain = plain.train()(x)
        assert low.dtype == torch.bfloat16
        expected, frozen_out = exact(x.double()), frozen(x.double())
        # Rule 3 in bf16: against plain PyTorch under the same autocast, both measured against fp64.
        assert_as_accurate_as_plain(low, low_plain, expected, "output", torch.bfloat16, floor_ulps=1)
        grads = [torch.autograd.grad(out.float().square().sum(), list(m.parameters())[-1])[0]  # the last conv or BN
                 for out, m in ((low, fused), (low_plain, plain), (expected, exact), (frozen_out, frozen))]
        assert_as_accurate_as_plain(*grads[:3], "last parameter's gradient", torch.bfloat16, floor_ulps=1,
                                    floor_scale=max(grads[2].norm(), grads[3].norm()).item())


@pytest.fixture(scope="module")
def eval_resnet50():
    fused, plain = make_pair("resnet50", num_classes=3, aux_loss=True)
    return fused.eval(), plain.eval()


# A compiled or exported graph folds from the parameters on every call, which require grad, so the
# cpu backend can keep no derived weight (csrc/common/kept.h) and runs other kernels than eager eval
# from the kept fold (Winograd, oneDNN with the fold as post-ops): the graph's outputs are held to
# rule 3 against the plain model, not compared bitwise with the eager fused model.


def test_torch_compile_fullgraph(eval_resnet50):
    fused, plain = eval_resnet50
    x = image()
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    with torch.no_grad():
        out = compiled(x)
        assert_outputs_as_accurate(out, plain(x), exact_outputs(plain, x))


def test_torch_export(eval_resnet50):
    fused, plain = eval_resnet50
    x = image()
    with torch.no_grad():
        program = torch.export.export(fused, (x,))
        out = program.module()(x)
        assert_outputs_as_accurate(out, plain(x), exact_outputs(plain, x))
    ops = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    assert ops["fastaspp.atrous_conv2d.default"] == BACKBONE_CALLS["resnet50"] + 2
    assert ops["fastaspp.aspp_branches.default"] == 1


# ---------------------------------------------------------------- the plain ASPP (fused=False)
@pytest.mark.parametrize("rates", [(2,), (2, 3, 6), (1, 2, 3, 4)], ids=lambda r: "r" + "-".join(map(str, r)))
def test_plain_aspp_has_the_fused_and_reference_layout(rates):
    """fused=False's ASPP, fastaspp.nn.ASPP and the reference: one module tree, one state_dict."""
    modules = [M.PlainASPP(7, rates, 5), fastaspp.nn.ASPP(7, rates, 5), reference.ASPP(7, rates, 5)]
    layouts = [[(k, tuple(v.shape)) for k, v in m.state_dict().items()] for m in modules]
    assert layouts[0] == layouts[1] == layouts[2]
    plain = modules[0]
    assert type(plain.convs[-1]) is fastaspp.nn.ASPPPooling  # production's pooling branch, not the oracle's
    for branch, rate in zip(plain.convs[1:-1], rates):
        assert [type(m) for m in branch] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
        assert branch[0].padding == branch[0].dilation == (rate, rate) and branch[0].bias is None
    assert [type(m) for m in plain.project] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout]
    assert plain.project[3].p == 0.5
    assert type(M.deeplabv3_mobilenet_v3_large(num_classes=3, fused=False).classifier[0]) is M.PlainASPP


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_plain_aspp_matches_reference(training, layout):
    """PlainASPP runs the reference's torch ops in the same order, so with the same state (and, in
    training, the same dropout seed) its output, gradients and running statistics are bitwise equal."""
    torch.manual_seed(0)
    ref = randomized(reference.ASPP(6, (2, 3), 4))
    plain = M.PlainASPP(6, (2, 3), 4)
    plain.load_state_dict(ref.state_dict(), strict=True)
    ref.to(memory_format=layout).train(training)
    plain.to(memory_format=layout).train(training)
    x = torch.randn(2, 6, 9, 7, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=layout)
    outs, grads = [], []
    for module in (ref, plain):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        out = module(xi)
        outs.append(out)
        grads.append(torch.autograd.grad(out, [xi, *module.parameters()], torch.ones_like(out)))
    assert outs[1].stride() == outs[0].stride()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for g_plain, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_plain, g_ref, rtol=0, atol=0)
    for (key, a), b in zip(plain.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- convert()
def test_convert_torchvision_style_deeplabv3():
    _, plain = make_pair("resnet50", num_classes=3, aux_loss=True, output_stride=16)
    plain.eval()
    converted = convert(plain)
    assert converted is not plain and type(plain.classifier[0]) is M.PlainASPP  # the original is untouched
    assert all(type(u) is Bottleneck for u in plain.backbone.layer4)
    assert isinstance(converted.classifier[0], fastaspp.nn.ASPP) and converted.classifier.fused
    assert converted.aux_classifier.fused
    assert all(type(u) is FusedBottleneck for layer in ("layer1", "layer2", "layer3", "layer4")
               for u in getattr(converted.backbone, layer))
    assert [(k, v.shape) for k, v in converted.state_dict().items()] == \
        [(k, v.shape) for k, v in plain.state_dict().items()]
    x = image()
    with torch.no_grad():
        with Recorder() as rec:
            out = converted(x)
        expected = plain(x)
    assert fastaspp_calls(rec.calls) == _expected_fused_calls("resnet50", dict(aux_loss=True))
    assert_outputs_as_accurate(out, expected, exact_outputs(plain, x))
    weight = plain.classifier[0].convs[1][0].weight
    assert convert(plain, inplace=True) is plain and isinstance(plain.classifier[0], fastaspp.nn.ASPP)
    assert plain.classifier[0].convs[1][0].weight is weight  # modules are reused, nothing copied


class TinyNet(nn.Module):
    """A torchvision-style tree: blocks, a DeepLabHead-like nn.Sequential, and things not to fuse."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.basic = BasicBlock(8, 8)
        self.down = BasicBlock(8, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False),
                                                                         nn.BatchNorm2d(16)))
        self.bottleneck = Bottleneck(16, 4, dilation=2)
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                       nn.ReLU())
        self.hswish = Conv2dNormActivation(16, 16, 1, activation_layer=nn.Hardswish)
        self.relu_cna = Conv2dNormActivation(16, 16, 1, activation_layer=nn.ReLU)
        self.hooked = nn.Sequential(nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(16),
                                    nn.ReLU())
        self.hooked[0].register_forward_hook(lambda m, i, o: o * 1.0)
        self.head = nn.Sequential(reference.ASPP(16, (1, 2), 8), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, x):
        for m in (self.stem, self.basic, self.down, self.bottleneck, self.depthwise, self.hswish, self.relu_cna,
                  self.hooked, self.head):
            x = m(x)
        return x


def test_convert_module_tree():
    torch.manual_seed(0)
    net = randomized(TinyNet()).double()
    converted = convert(net)
    assert type(converted.stem) is fastaspp.nn.ConvBNReLU
    assert type(converted.basic) is FusedBasicBlock and type(converted.down) is FusedBasicBlock
    assert type(converted.bottleneck) is FusedBottleneck
    assert type(converted.head) is FusedSequential and converted.head._fused_runs == (1,)
    assert isinstance(converted.head[0], fastaspp.nn.ASPP)
    assert type(converted.relu_cna) is fastaspp.nn.ConvBNReLU and converted.relu_cna.out_channels == 16
    # Left alone: depthwise (groups 16), Hardswish, a conv with a forward hook.
    assert type(converted.depthwise) is nn.Sequential and type(converted.hswish) is Conv2dNormActivation
    assert type(converted.hooked) is nn.Sequential
    assert list(converted.state_dict()) == list(net.state_dict())

    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # fp64 against fp64 (rule 4): 1e-10 of the scale, far above both sides' ~1e-14 on this small net.
    with torch.no_grad():
        assert_close_scaled(converted.eval()(x), net.eval()(x), 1e-10)
    converted.train()
    net.train()
    outs = []
    for model in (converted, net):
        torch.manual_seed(5)
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        outs.append((out, grads, model.state_dict()))
    (out, grads, state), (expected, expected_grads, expected_state) = outs
    assert_close_scaled(out, expected, 1e-10)
    for a, b in zip(grads, expected_grads):
        assert_close_scaled(a, b, 1e-9)
    for key, value in expected_state.items():
        assert_close_scaled(state[key].double(), value.double(), 1e-10)


def test_convert_mobilenet_and_idempotence():
    fused, plain = make_pair("mobilenet_v3_large", num_classes=3)
    converted = convert(plain.eval())
    expand = converted.backbone["2"].block[0]  # 1x1 expand conv, BN, ReLU ("RE" block)
    assert type(expand) is fastaspp.nn.ConvBNReLU and expand.out_channels == 64
    assert type(converted.backbone["2"].block[1]) is Conv2dNormActivation  # depthwise: left as torch
    assert type(converted.backbone["8"].block[0]) is Conv2dNormActivation  # Hardswish: left as torch
    again = convert(fused)
    assert type(again.classifier[0]) is fastaspp.nn.ASPP and list(again.state_dict()) == list(fused.state_dict())
    x = image()
    exact = exact_outputs(plain, x)["out"]
    with torch.no_grad():
        expected = plain(x)["out"]
        assert_as_accurate_as_plain(converted(x)["out"], expected, exact, "converted")
        assert_as_accurate_as_plain(again.eval()(x)["out"], expected, exact, "converted twice")


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert({"a": 1})
