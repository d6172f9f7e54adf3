"""torch.func's transforms and forward-mode AD through every fused op and the layers built on them,
against the same functions written in plain torch ops (which torch.func differentiates itself).

Before, none of this held: torch.func.grad raised on every op, and forward-mode AD (torch.func.jvp,
jacfwd, torch.autograd.forward_ad) silently returned zero tangents, since neither torch.library's ops
nor the eager kernels carry a forward-mode formula. Now such calls take each op's autograd.Function
(fastaspp.ops._library.Route.TRANSFORM), whose jvp computes the tangent and whose generated vmap rule
runs the torch op per sample; a second derivative still raises, as under create_graph
(tests/test_double_backward.py); the torch ops called directly under forward-mode AD raise.

Tolerance (fp64): every compared value is a sum of at most a few hundred terms (inputs and tangents
positive, of order 1), so any summation order is within Higham's γ_n · Σ|terms| of it, below
2^-44 · Σ|terms| for n ≤ 2^9 roundings. The bound used is 2^-40 of the largest reference value, which
is within a factor 16 of the largest Σ|terms| in these cases (the shifts that bring half the
pre-activations below zero remove about their mean); the variances' tangents, which cancel further,
are measured against their terms' size instead."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fastaspp
from fastaspp.ops import affine_relu_project, aspp_branches, aspp_branches_stats, atrous_conv2d
from fastaspp.ops._library import transform_active

from conftest import ON_GPU, device_for

RTOL = 2.0 ** -40


@pytest.fixture
def backend(each_backend):
    return each_backend


def _positive(device, *shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(s, generator=gen, dtype=torch.float64) + 0.5).to(device) for s in shapes]


def _close(got, want, what, size=None):
    """|got - want| <= RTOL * size elementwise; size: the terms' magnitude (default: max |want|)."""
    got, want = ((t if isinstance(t, (tuple, list)) else (t,)) for t in (got, want))
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = g.detach(), w.detach()
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        scale = (size[i] if size is not None else None) or float(w.abs().max()) or 1.0
        err = float((g - w).abs().max())
        assert err <= RTOL * scale, f"{what}[{i}]: max error {err:.3g} > {RTOL * scale:.3g}"
        assert float(w.abs().max()) > 0, f"{what}[{i}]: the reference is all zeros, which cannot tell"


def _dual(f, primals, tangents):
    """f's outputs' tangents by torch.autograd.forward_ad (not functorch)."""
    with fwAD.dual_level():
        out = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        outs = out if isinstance(out, tuple) else (out,)
        return tuple(fwAD.unpack_dual(o).tangent for o in outs)


def _check_reverse_and_forward(ours, plain, primals, what, var_size=None):
    """grad (of a squared sum of every output) and jvp, ours against plain, and the dual-number API."""
    def loss(f):
        def run(*args):
            out = f(*args)
            return sum(o.square().sum() for o in (out if isinstance(out, tuple) else (out,)))
        return run

    argnums = tuple(range(len(primals)))
    _close(torch.func.grad(loss(ours), argnums)(*primals), torch.func.grad(loss(plain), argnums)(*primals),
           f"{what}: torch.func.grad")
    primals = tuple(primals)
    tangents = tuple(_positive(primals[0].device, *(p.shape for p in primals), seed=1))
    want = torch.func.jvp(plain, primals, tangents)[1]
    _close(torch.func.jvp(ours, primals, tangents)[1], want, f"{what}: torch.func.jvp", var_size)
    _close(_dual(ours, primals, tangents), want, f"{what}: forward_ad", var_size)


# ---------------------------------------------------------------- the ops, as plain torch
def _plain_conv(x, w, b, s, t):
    return torch.relu(F.conv2d(x, w, b, 1, 2, 2) * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))


def _plain_branches(x, w1, w3, s, t):
    z = torch.cat([F.conv2d(x, w1), F.conv2d(x, w3, None, 1, 2, 2)], dim=1)
    return torch.relu(z * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))


def _with_stats(z):
    var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    return z, mean, var


def _plain_branches_stats(x, w1, w3):
    return _with_stats(torch.cat([F.conv2d(x, w1), F.conv2d(x, w3, None, 1, 2, 2)], dim=1))


def _plain_project(z, centre, scale, shift, weight, image_bias):
    u = torch.relu((z - centre.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    return _with_stats(torch.einsum("nkhw,ok->nohw", u, weight) + image_bias[:, :, None, None])


def _var_size(outputs, tangents):
    """The size of the terms of the variances' tangents, 2·avg(|out − mean|·|out'|): theirs cancel."""
    out, mean, _ = outputs
    t_out = tangents[0]
    terms = 2 * ((out - mean.view(1, -1, 1, 1)).abs() * t_out.abs()).mean(dim=(0, 2, 3))
    return [None, None, float(terms.max())]


def test_atrous_conv2d(backend):
    primals = _positive(device_for(backend), (2, 3, 6, 5), (4, 3, 3, 3), (4,), (4,), (4,))
    x, w, b, s, _ = primals
    # The shift centres each channel's pre-activations: about half the outputs are cut by the ReLU.
    primals[4] = primals[4] * 0.1 - ((F.conv2d(x, w, b, 1, 2, 2) * s.view(1, -1, 1, 1)).mean(dim=(0, 2, 3)))

    def ours(x, w, b, s, t):
        return atrous_conv2d(x, w, b, 1, 2, 2, scale=s, shift=t, relu=True)

    assert bool((_plain_conv(*primals) == 0).any()) and bool((_plain_conv(*primals) > 0).any())
    _check_reverse_and_forward(ours, _plain_conv, primals, "atrous_conv2d")


# Interpreted Triton takes 40 s for the jacobians: slow there (per-sample gradients check vmap on it).
_JACOBIAN_BACKENDS = [pytest.param(b, marks=pytest.mark.slow) if b == "triton" and not ON_GPU else b
                      for b in fastaspp.BACKENDS]


@pytest.mark.parametrize("name", _JACOBIAN_BACKENDS)
def test_atrous_conv2d_jacobians_and_vmap(name):
    """jacrev and jacfwd (vmap over vjp and jvp: the Function's generated vmap rule), and vmap of the
    forward over x or over the weight, with in_dims and out_dims other than 0."""
    reason = fastaspp._backend.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"backend {name} unavailable: {reason}")
    with fastaspp.backend(name):
        _jacobians_and_vmap(device_for(name))


def _jacobians_and_vmap(device):
    x, w, s = _positive(device, (1, 2, 5, 4), (3, 2, 3, 3), (3,))

    def ours(w):
        return atrous_conv2d(x, w, None, 1, 2, 2, scale=s, relu=True).sum(dim=(0, 2, 3))

    def plain(w):
        return torch.relu(F.conv2d(x, w, None, 1, 2, 2) * s.view(1, -1, 1, 1)).sum(dim=(0, 2, 3))

    _close(torch.func.jacrev(ours)(w), torch.func.jacrev(plain)(w), "jacrev")
    _close(torch.func.jacfwd(ours)(w), torch.func.jacfwd(plain)(w), "jacfwd")
    xs, ws = _positive(x.device, (2, 1, 2, 5, 4), (3, 2, 3, 3, 2), seed=2)
    _close(torch.func.vmap(lambda xi: atrous_conv2d(xi, w, None, 1, 2, 2))(xs),
           torch.stack([F.conv2d(xi, w, None, 1, 2, 2) for xi in xs]), "vmap over x")
    _close(torch.func.vmap(lambda wi: atrous_conv2d(x, wi, None, 1, 2, 2), in_dims=4, out_dims=1)(ws),
           torch.stack([F.conv2d(x, ws[..., i], None, 1, 2, 2) for i in range(2)], dim=1), "vmap over the weight")
    # vmap inside jvp: the innermost transform is vmap, and the tangent must still come through.
    (tw,) = _positive(x.device, w.shape, seed=3)
    batched = lambda w: torch.func.vmap(lambda xi: atrous_conv2d(xi, w, None, 1, 2, 2))(xs)  # noqa: E731
    _close(torch.func.jvp(batched, (w,), (tw,))[1], torch.stack([F.conv2d(xi, tw, None, 1, 2, 2) for xi in xs]),
           "jvp of vmap")


def test_vmap_over_images_is_one_kernel_call(backend, monkeypatch):
    """vmap over x alone folds the vmapped dim into the images (vmap_into_images): one forward
    kernel call and one input-gradient call for the whole batch, where a loop makes one per sample."""
    from fastaspp.ops import atrous_conv as conv_module

    calls = []
    for name in ("_forward_kernel", "_grad_input_kernel"):
        original = getattr(conv_module, name)
        monkeypatch.setattr(conv_module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    xs, w = _positive(device_for(backend), (3, 2, 2, 5, 4), (3, 2, 3, 3))
    got = torch.func.vmap(lambda xi: atrous_conv2d(xi, w, None, 1, 2, 2))(xs)
    assert calls == ["_forward_kernel"]
    _close(got, torch.stack([F.conv2d(xi, w, None, 1, 2, 2) for xi in xs]), "vmap over x")
    calls.clear()
    tangent_in = torch.func.vmap(lambda xi: torch.func.vjp(lambda x: atrous_conv2d(x, w, None, 1, 2, 2), xi)[1](
        torch.ones(2, 3, 5, 4, dtype=xi.dtype, device=xi.device))[0])(xs)
    assert calls.count("_grad_input_kernel") == 1
    _close(tangent_in, torch.stack([torch.func.vjp(lambda x: F.conv2d(x, w, None, 1, 2, 2), xi)[1](
        torch.ones(2, 3, 5, 4, dtype=xi.dtype, device=xi.device))[0] for xi in xs]), "vmap of vjp in x")


def test_per_sample_gradients(backend):
    """vmap(grad(...)): the weight's gradient of each sample's loss."""
    x, w, s = _positive(device_for(backend), (3, 2, 5, 4), (3, 2, 3, 3), (3,))

    def loss(f, w, xi):
        return f(xi.unsqueeze(0), w).square().sum()

    ours = lambda xi, w: atrous_conv2d(xi, w, None, 1, 2, 2, scale=s, relu=True)  # noqa: E731
    plain = lambda xi, w: torch.relu(F.conv2d(xi, w, None, 1, 2, 2) * s.view(1, -1, 1, 1))  # noqa: E731
    per_sample = torch.func.vmap(torch.func.grad(lambda w, xi: loss(ours, w, xi)), in_dims=(None, 0))(w, x)
    want = torch.func.vmap(torch.func.grad(lambda w, xi: loss(plain, w, xi)), in_dims=(None, 0))(w, x)
    assert per_sample.shape == (3, *w.shape)
    _close(per_sample, want, "per-sample gradients")


def test_aspp_branches(backend):
    primals = _positive(device_for(backend), (2, 3, 5, 5), (2, 3, 1, 1), (2, 3, 3, 3), (4,), (4,))
    x, w1, w3, s, _ = primals
    pre = torch.cat([F.conv2d(x, w1), F.conv2d(x, w3, None, 1, 2, 2)], dim=1) * s.view(1, -1, 1, 1)
    primals[4] = primals[4] * 0.1 - pre.mean(dim=(0, 2, 3))  # about half the outputs cut by the ReLU

    def ours(x, w1, w3, s, t):
        return aspp_branches(x.contiguous(memory_format=torch.channels_last), [w1, w3], [2], s, t)

    out = _plain_branches(*primals)
    assert bool((out == 0).any()) and bool((out > 0).any())
    _check_reverse_and_forward(ours, _plain_branches, primals, "aspp_branches")


def test_aspp_branches_stats(backend):
    primals = _positive(device_for(backend), (2, 3, 5, 5), (2, 3, 1, 1), (2, 3, 3, 3))

    def ours(x, w1, w3):
        return aspp_branches_stats(x.contiguous(memory_format=torch.channels_last), [w1, w3], [2])

    tangents = tuple(_positive(primals[0].device, *(p.shape for p in primals), seed=1))
    size = _var_size(_plain_branches_stats(*primals),
                     torch.func.jvp(_plain_branches_stats, tuple(primals), tangents)[1])
    _check_reverse_and_forward(ours, _plain_branches_stats, primals, "aspp_branches_stats", size)


def test_affine_relu_project(backend):
    device = device_for(backend)
    z, centre, scale, shift, weight, image_bias = _positive(device, (2, 4, 3, 3), (4,), (4,), (4,), (3, 4), (2, 3))
    centre = centre + 0.5  # some pre-activations below zero
    primals = [z.contiguous(memory_format=torch.channels_last), centre, scale, shift, weight, image_bias]

    def ours(*args):
        return affine_relu_project(*args)

    tangents = tuple(_positive(device, *(p.shape for p in primals), seed=1))
    size = _var_size(_plain_project(*primals), torch.func.jvp(_plain_project, tuple(primals), tangents)[1])
    _check_reverse_and_forward(ours, _plain_project, primals, "affine_relu_project", size)


def test_aspp_ops_under_vmap(backend):
    """vmap over x of the ASPP ops (their Functions' generated vmap rules, and a loop over samples for
    their torch ops, whose Tensor[] argument torch's fallback refuses), and jacrev (their backwards
    under vmap)."""
    xs, w1, w3, s, t = _positive(device_for(backend), (2, 2, 3, 5, 5), (2, 3, 1, 1), (2, 3, 3, 3), (4,), (4,))
    x = xs[0]

    def channel_sums(f):
        return lambda x, w3: f(x, w1, w3, s, t).sum(dim=(0, 2, 3))

    ours = channel_sums(lambda x, w1, w3, s, t: aspp_branches(x, [w1, w3], [2], s, t))
    _close(torch.func.jacrev(ours, argnums=(0, 1))(x, w3), torch.func.jacrev(channel_sums(_plain_branches),
                                                                             argnums=(0, 1))(x, w3), "jacrev")
    _close(torch.func.vmap(lambda xi: aspp_branches(xi, [w1, w3], [2], s, t))(xs),
           torch.stack([_plain_branches(xi, w1, w3, s, t) for xi in xs]), "vmap of aspp_branches")
    got = torch.func.vmap(lambda xi: aspp_branches_stats(xi, [w1, w3], [2]))(xs)
    want = [torch.stack(o) for o in zip(*(_plain_branches_stats(xi, w1, w3) for xi in xs))]
    _close(got, want, "vmap of aspp_branches_stats", [None, None, float(want[0].square().max())])


@pytest.mark.parametrize("how", ["forward_ad", "jvp"])
def test_torch_op_refuses_forward_mode(backend, how):
    """The torch ops called directly have no forward-mode formula (torch.library's ops drop the
    tangents): under forward-mode AD they raise, naming the Python function that has one."""
    x, w = _positive(device_for(backend), (1, 2, 5, 4), (3, 2, 3, 3))

    def raw(x):
        return torch.ops.fastaspp.atrous_conv2d(x, w, None, None, None, [1, 1], [2, 2], [2, 2], False, backend)

    with pytest.raises(RuntimeError, match=r"torch.ops.fastaspp.atrous_conv2d has no forward-mode AD.*"
                                           r"call fastaspp.ops.atrous_conv2d"):
        if how == "jvp":
            torch.func.jvp(raw, (x,), (x,))
        else:
            _dual(raw, (x,), (x,))
    assert raw(x).shape == (1, 3, 5, 4)  # outside forward-mode AD it runs


def test_compiled_jvp_raises():
    """torch.compile sends every call to the torch op, which has no forward-mode formula: a compiled
    jvp raises (from the op's fake impl while tracing) instead of returning a zero tangent."""
    x, w, t = _positive(torch.device("cpu"), (1, 2, 5, 4), (3, 2, 3, 3), (3, 2, 3, 3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda w: torch.func.jvp(lambda w: atrous_conv2d(x, w, None, 1, 2, 2), (w,), (t,))[1],
                             backend="aot_eager")
    with pytest.raises(Exception, match="torch.ops.fastaspp.atrous_conv2d has no forward-mode AD"):
        compiled(w)


@pytest.mark.parametrize("second", ["grad-of-grad", "jacfwd-of-grad"])
def test_second_derivative_raises(backend, second):
    """As under create_graph: a second derivative through a fused op raises, naming it."""
    x, w, s = _positive(device_for(backend), (1, 2, 5, 4), (3, 2, 3, 3), (3,))

    def loss(w):
        return atrous_conv2d(x, w, None, 1, 2, 2, scale=s, relu=True).square().sum()

    outer = torch.func.grad if second == "grad-of-grad" else torch.func.jacfwd
    with pytest.raises(RuntimeError, match=f"atrous_conv2d on the {backend} backend has no double backward"):
        outer(lambda w: torch.func.grad(loss)(w).sum())(w)


def test_no_transform_outside():
    assert not transform_active()
    torch.func.grad(lambda t: t.sum())(torch.ones(2))
    assert not transform_active()


# ---------------------------------------------------------------- the layers
def _module_case(kind, device):
    torch.manual_seed(0)
    if kind == "ConvBNReLU":
        ours = fastaspp.nn.ConvBNReLU(3, 4, 3, padding=2, dilation=2)
        plain = fastaspp.reference.conv_bn_relu(3, 4, 3, padding=2, dilation=2)
        shape = (2, 3, 6, 5)
    else:
        ours = fastaspp.nn.ASPP(3, [2], out_channels=2)
        plain = fastaspp.reference.ASPP(3, [2], out_channels=2)
        shape = (2, 3, 5, 5)
    for bn in (m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics away from 0 and 1
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(0.2, 0.5)  # most outputs above the ReLU's cut
    plain.load_state_dict(ours.state_dict())
    for m in (ours, plain):
        m.double().to(device)
    (x,) = _positive(device, shape, seed=3)
    return ours, plain, x


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", ["ConvBNReLU", "ASPP"])
def test_module_functional_call(backend, kind, training):
    """grad of a loss in the parameters (torch.func.functional_call) and jvp in the input, against
    the torch modules with the same state; the eval modules' kept folds are not used under the
    transforms. Training BNs without running statistics, as torch.func asks of the torch modules
    (replace_all_batch_norm_modules_: their in-place update of a captured buffer is refused)."""
    ours, plain, x = _module_case(kind, device_for(backend))
    ours.train(training)
    plain.train(training)
    if training:
        for m in (ours, plain):
            torch.func.replace_all_batch_norm_modules_(m)
    if kind == "ASPP":
        ours.project[3].p = plain.project[3].p = 0.0  # no dropout: both sides draw no mask
    ours(x)  # an eval module keeps its fold now; the transforms must not use it
    plain(x)

    def grads(module):
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        return torch.func.grad(lambda p: torch.func.functional_call(module, (p, buffers), (x,)).square().sum())(params)

    got, want = grads(ours), grads(plain)
    assert got.keys() == want.keys()
    _close([got[k] for k in got], [want[k] for k in got], f"{kind} grad")
    (t,) = _positive(x.device, x.shape, seed=4)
    _close(torch.func.jvp(ours, (x,), (t,))[1], torch.func.jvp(plain, (x,), (t,))[1], f"{kind} jvp")
    if not training:
        _close(ours(x), plain(x), f"{kind} after the transforms")  # the kept fold still right


def test_model_ensemble_under_vmap(backend):
    """vmap over stacked module states (torch.func.stack_module_state), eval: every weight and BN
    statistic batched; the kept folds stay unused and the conv runs once per model."""
    device = device_for(backend)
    pairs = [_module_case("ConvBNReLU", device) for _ in range(2)]
    for seed, (ours, plain, _) in enumerate(pairs):  # two different models
        torch.manual_seed(seed + 10)
        for p in ours.parameters():
            p.data.uniform_(0.5, 1.5)
        plain.load_state_dict(ours.state_dict())
        ours.eval()
        plain.eval()
    x = pairs[0][2]
    params, buffers = torch.func.stack_module_state([ours for ours, _, _ in pairs])
    base = copy.deepcopy(pairs[0][0]).to("meta")
    got = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)))(params, buffers)
    _close(got, torch.stack([plain(x) for _, plain, _ in pairs]), "ensemble")
