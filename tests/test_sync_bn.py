"""SyncBN: fastaspp's ASPP split over two CPU processes (gloo).

torch.nn.SyncBatchNorm refuses CPU tensors, so the ground truth is what SyncBatchNorm
computes by definition: the reference ASPP with plain BatchNorm over the union of both
ranks' batches, in one process. Outputs and input gradients must equal that reference's
halves, parameter gradients summed over ranks its gradients, running statistics its own.
"""
import os
import socket

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


def _close(a, b, tol=1e-4):
    return torch.allclose(a, b, atol=tol * max(b.abs().max().item(), 1e-3), rtol=tol)


def _worker(rank: int, port: int, results) -> None:
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

        full = torch.randn(2 * WORLD, 6, 7, 7, generator=torch.Generator().manual_seed(5)).requires_grad_()
        g_full = torch.randn(2 * WORLD, 4, 7, 7, generator=torch.Generator().manual_seed(6))
        expected = ref(full)
        ref_grads = torch.autograd.grad(expected, [full, *ref.parameters()], g_full)

        part = slice(2 * rank, 2 * rank + 2)
        x = full.detach()[part].clone().requires_grad_()
        out = mine(x)
        grads = torch.autograd.grad(out, [x, *mine.parameters()], g_full[part])
        checks["output"] = _close(out, expected.detach()[part])
        checks["grad x"] = _close(grads[0], ref_grads[0][part])
        for i, (a, b) in enumerate(zip(grads[1:], ref_grads[1:])):
            dist.all_reduce(a)  # what DDP's gradient all-reduce sums
            checks[f"grad param {i}"] = _close(a, b)
        for key, value in ref.state_dict().items():
            checks[key] = _close(mine.state_dict()[key].double(), value.double(), 1e-5)
        # The check can fail: one rank's half alone gives other statistics.
        alone = reference.ASPP(6, (2, 3), 4)
        alone.load_state_dict(ref.state_dict())
        checks["differs from unsynchronised"] = not _close(alone(full.detach()[part]), out.detach(), 1e-3)
        results[rank] = {k: bool(v) for k, v in checks.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_sync_batchnorm_two_processes():
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(_free_port(), results), nprocs=WORLD, start_method="spawn", join=True)
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
    with torch.no_grad():
        torch.testing.assert_close(converted(x), before)
    bn = fastaspp.nn.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
    assert isinstance(bn, fastaspp.nn.SyncBatchNorm2d)
