"""SyncBN: fastaspp's ASPP split over two CPU processes (gloo).

torch.nn.SyncBatchNorm refuses CPU tensors, so the ground truth is what SyncBatchNorm
computes by definition: the reference ASPP with plain BatchNorm over the union of both
ranks' batches, in one process. Outputs and input gradients must equal that reference's
halves, parameter gradients summed over ranks its gradients, running statistics its own.

Tolerances (tests/_cases.py, rule 3): the fused SyncBN run and the plain fp32 reference each
against the reference in fp64, the fused error within 3x plain's plus 8 fp32 ulps (of the
gradient before the batch norms' cancellation for gradients: frozen_statistics); the inputs keep
every ReLU input 1e-5 of its scale away from 0 (asserted), so that the runs share their masks.
"""
import copy
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastaspp
from fastaspp import reference

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_accurate(fused, plain, exact, floor_scale=None):
    """assert_as_accurate_as_plain as a bool (the workers report, the test asserts)."""
    from _cases import assert_as_accurate_as_plain

    try:
        assert_as_accurate_as_plain(fused, plain, exact, floor_scale=floor_scale)
    except AssertionError:
        return False
    return True


def _worker(rank: int, port: int, results, tests_dir) -> None:
    sys.path.insert(0, tests_dir)
    from _cases import assert_relu_margin, frozen_statistics, recording_relu_inputs

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        ref = reference.ASPP(6, (2, 3), 4)
        mine = fastaspp.nn.ASPP(6, (2, 3), 4)
        mine.load_state_dict(ref.state_dict())
        ref.project[3].p = mine.project[3].p = 0.0  # dropout off: compare exactly
        mine = fastaspp.nn.convert_sync_batchnorm(mine)
        checks = {"converted": sum(isinstance(m, fastaspp.nn.SyncBatchNorm2d) for m in mine.modules()) == 5}

        exact = copy.deepcopy(ref).double()
        full = torch.randn(2 * WORLD, 6, 7, 7, generator=torch.Generator().manual_seed(5)).requires_grad_()
        g_full = torch.randn(2 * WORLD, 4, 7, 7, generator=torch.Generator().manual_seed(6))
        full64 = full.detach().double().requires_grad_()
        frozen = frozen_statistics(exact, full64)
        expected = ref(full)
        with recording_relu_inputs(exact) as relu_in:
            exact_out = exact(full64)
        assert_relu_margin(relu_in)
        ref_grads = torch.autograd.grad(expected, [full, *ref.parameters()], g_full)
        exact_grads = torch.autograd.grad(exact_out, [full64, *exact.parameters()], g_full.double())
        frozen_grads = torch.autograd.grad(frozen(full64), [full64, *frozen.parameters()], g_full.double())

        part = slice(2 * rank, 2 * rank + 2)
        x = full.detach()[part].clone().requires_grad_()
        out = mine(x)
        grads = torch.autograd.grad(out, [x, *mine.parameters()], g_full[part])
        checks["output"] = _as_accurate(out, expected.detach()[part], exact_out.detach()[part])
        floor = lambda i, p=slice(None): max(exact_grads[i][p].norm(), frozen_grads[i][p].norm()).item()  # noqa: E731
        checks["grad x"] = _as_accurate(grads[0], ref_grads[0][part], exact_grads[0][part], floor(0, part))
        for i, (a, b, e) in enumerate(zip(grads[1:], ref_grads[1:], exact_grads[1:])):
            dist.all_reduce(a)  # what DDP's gradient all-reduce sums
            checks[f"grad param {i}"] = _as_accurate(a, b, e, floor(i + 1))
        for key, value in exact.state_dict().items():
            if value.is_floating_point():
                checks[key] = _as_accurate(mine.state_dict()[key], ref.state_dict()[key], value)
        # The check can fail: one rank's half alone gives other statistics (off by whole percents,
        # where rounding is below 1e-6).
        alone = reference.ASPP(6, (2, 3), 4)
        alone.load_state_dict(ref.state_dict())
        other = alone(full.detach()[part])
        checks["differs from unsynchronised"] = (other - out.detach()).norm() > 1e-3 * other.norm()
        results[rank] = {k: bool(v) for k, v in checks.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_sync_batchnorm_two_processes():
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(_free_port(), results, os.path.dirname(os.path.abspath(__file__))),
                       nprocs=WORLD, start_method="spawn", join=True)
    for rank in range(WORLD):
        failed = [k for k, ok in results[rank].items() if not ok]
        assert not failed, f"rank {rank}: {failed}"


def test_convert_keeps_state_dict_and_eval_output():
    torch.manual_seed(0)
    m = fastaspp.nn.ASPP(6, (2, 3), 4).eval()
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        before = m(x)
    keys = list(m.state_dict().keys())
    converted = fastaspp.nn.convert_sync_batchnorm(m)
    assert list(converted.state_dict().keys()) == keys
    with torch.no_grad():  # the same eval kernels on the same folded parameters (rule 6)
        torch.testing.assert_close(converted(x), before)
    bn = fastaspp.nn.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
    assert isinstance(bn, fastaspp.nn.SyncBatchNorm2d)
