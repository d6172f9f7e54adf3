"""Training, evaluation and prediction: the protocol's pieces, exact resume, fused against plain
PyTorch, the CLI end to end, and DistributedDataParallel over two CPU processes (gloo)."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import fastaspp.train as train_mod
from fastaspp.checkpoint import CheckpointError, load_checkpoint
from fastaspp.cli import main
from fastaspp.evaluate import evaluate, load_trained_model
from fastaspp.metrics import ConfusionMatrix
from fastaspp.train import TrainConfig, epoch_batches, poly_lr, train

SMALL = dict(model="deeplabv3_mobilenet_v3_large", dataset="synthetic", batch_size=2, crop=65, progress=False)


def test_poly_lr_follows_the_paper():
    assert poly_lr(0.007, 0, 100, 0.9) == 0.007
    assert poly_lr(0.007, 50, 100, 0.9) == pytest.approx(0.007 * 0.5 ** 0.9)
    assert poly_lr(0.007, 100, 100, 0.9) == 0.0


def test_epoch_batches_are_seeded_and_split_across_ranks():
    one = epoch_batches(10, 4, seed=3, epoch=1, rank=0, world=1)
    assert one == epoch_batches(10, 4, seed=3, epoch=1, rank=0, world=1)
    assert one != epoch_batches(10, 4, seed=3, epoch=2, rank=0, world=1)
    assert len(one) == 2 and all(len(b) == 4 for b in one)  # the incomplete last batch is dropped
    halves = [epoch_batches(10, 4, seed=3, epoch=1, rank=r, world=2) for r in range(2)]
    assert [a + b for a, b in zip(*halves)] == one


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="model must be one of"):
        TrainConfig(model="unet").validate()
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="multi_grid applies to the ResNet models"):
        TrainConfig(multi_grid=(1, 2, 4)).validate()


def _weights(path):
    return load_checkpoint(path)["model"]


def test_resume_continues_exactly_where_it_stopped(tmp_path, monkeypatch):
    straight = train(TrainConfig(**SMALL, iters=4, save_every=2, out=str(tmp_path / "a")))
    # The same run, crashing in its third step (after the step-2 checkpoint), then resumed.
    real_loss, calls = train_mod.segmentation_loss, []

    def crash_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_loss(*args)

    monkeypatch.setattr(train_mod, "segmentation_loss", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**SMALL, iters=4, save_every=2, out=str(tmp_path / "b")))
    monkeypatch.setattr(train_mod, "segmentation_loss", real_loss)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 2
    resumed = train(TrainConfig(**SMALL, iters=4, save_every=2, out=str(tmp_path / "b"),
                                resume=str(tmp_path / "b" / "last.pt")))
    assert resumed["step"] == straight["step"] == 4
    a, b = _weights(straight["checkpoint"]), _weights(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a = [json.loads(line)["loss"] for line in open(tmp_path / "a" / "metrics.jsonl")]
    log_b = [json.loads(line)["loss"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert log_a == log_b  # steps 1-2 logged before the crash, 3-4 after the resume


class _Float64(torch.nn.Module):
    """A model run in float64 (parameters and input): the exact trajectory to measure fp32 runs against."""

    def __init__(self, model):
        super().__init__()
        self.inner = model.double()

    def forward(self, x):
        return self.inner(x.double())


def test_fused_training_matches_plain_pytorch(tmp_path, monkeypatch):
    """The fused model and the plain PyTorch model (fused=False), same seed and batches, 3 steps, each
    against the same training in float64.

    Losses: an fp32 trajectory drifts from the exact one as rounding in each step's gradients moves the
    next step's weights; plain PyTorch's own drift sets the scale (measured here: 5e-4 to 8e-4 at step
    3, and plain fp32 at 1 and at 2 threads differ by 2e-4, so no fixed tolerance between two fp32
    runs holds on every machine). The fused run's drift must stay within 3x plain's, plus a floor of
    a few fp32 ulps of the loss for a run that happens to round like fp64. Updates: to 5% (fp32
    gradients of this network are only good to about 1% against fp64, for plain PyTorch as for
    fused: see the test below)."""
    build = train_mod.build_model
    losses, runs = {}, {}
    for name, fused, dtype in (("fused", True, torch.float32), ("plain", False, torch.float32),
                               ("exact", False, torch.float64)):
        monkeypatch.setattr(train_mod, "build_model",
                            (lambda *a: _Float64(build(*a))) if dtype == torch.float64 else build)
        runs[name] = train(TrainConfig(**SMALL, iters=3, fused=fused, out=str(tmp_path / name)))
        losses[name] = np.array([json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")])
    monkeypatch.setattr(train_mod, "build_model", build)
    drift = {k: np.abs(losses[k] - losses["exact"]).max() for k in ("fused", "plain")}
    floor = 8 * np.finfo(np.float32).eps * np.abs(losses["exact"]).max()
    assert drift["fused"] <= 3 * drift["plain"] + floor, (drift, losses)
    _assert_same_updates(_weights(runs["fused"]["checkpoint"]), _weights(runs["plain"]["checkpoint"]), rtol=5e-2)


def _initial_weights(seed=0):
    torch.manual_seed(seed)  # as train() does before building its model
    return train_mod.build_model(SMALL["model"], 6).state_dict()


def _assert_same_updates(a, b, rtol):
    """The update (final - initial) of all parameters of run a against run b, as one vector, relative
    to b's update: per parameter is meaningless here, since a BN bias followed by another BN has a
    zero gradient, so both runs move it by rounding noise alone."""
    init = _initial_weights()
    assert list(a) == list(b) == list(init)
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    update_a = torch.cat([(a[k] - init[k]).flatten() for k in keys])
    update_b = torch.cat([(b[k] - init[k]).flatten() for k in keys])
    assert ((update_a - update_b).norm() / update_b.norm()).item() <= rtol


def test_fused_gradients_are_as_accurate_as_plain_pytorch():
    """One training step's gradients, fused fp32 and plain fp32, each against plain fp64: the fused
    model's error is within 1.5x of plain PyTorch's own fp32 error (about 1% of the gradient norm
    for this network at initialisation, measured), globally and for every parameter."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 65, 65).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 6, (2, 65, 65))
    grads = {}
    for name, fused, dtype in [("fused", True, torch.float32), ("plain", False, torch.float32),
                               ("exact", False, torch.float64)]:
        torch.manual_seed(0)
        model = train_mod.build_model(SMALL["model"], 6, fused=fused).to(dtype, memory_format=torch.channels_last)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # masks are compared elsewhere; here only the arithmetic
        loss = torch.nn.functional.cross_entropy(model.train()(x.to(dtype))["out"], target)
        grads[name] = torch.autograd.grad(loss, list(model.parameters()))
    err = {k: [(g.double() - e).norm().item() for g, e in zip(grads[k], grads["exact"])] for k in ("fused", "plain")}
    total = {k: sum(v * v for v in err[k]) ** 0.5 for k in err}
    assert total["fused"] <= 1.5 * total["plain"], total
    for i, (fused_err, plain_err) in enumerate(zip(err["fused"], err["plain"])):
        assert fused_err <= 1.5 * plain_err + 1e-3 * total["plain"], i


class _Const(torch.nn.Module):
    """A 'model' whose prediction for image i is a fixed label map."""

    def __init__(self, preds, num_classes):
        super().__init__()
        self.preds, self.num_classes, self.i = preds, num_classes, 0

    def forward(self, x):
        pred = self.preds[self.i]
        self.i += 1
        return {"out": torch.nn.functional.one_hot(pred, self.num_classes).permute(2, 0, 1)[None].float() * 10}


class _Pairs(torch.utils.data.Dataset):
    classes = ("a", "b", "c")
    num_classes = 3

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.zeros(3, *self.labels[i].shape), self.labels[i]


def test_evaluate_computes_miou_from_the_whole_split(tmp_path):
    labels = [torch.tensor([[0, 1], [2, 255]]), torch.tensor([[1, 1], [0, 2]])]
    preds = [torch.tensor([[0, 1], [1, 0]]), torch.tensor([[1, 0], [0, 2]])]
    result = evaluate(_Const(preds, 3), _Pairs(labels), torch.device("cpu"), out=str(tmp_path), overlays=1)
    # By hand over the 7 labelled pixels: class 0: tp 2, fp 1, fn 0 -> 2/3; class 1: tp 2, fp 1,
    # fn 1 -> 2/4; class 2: tp 1, fp 0, fn 1 -> 1/2.
    assert result["per_class_iou"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 0.5})
    assert result["mIoU"] == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)
    assert result["pixel_acc"] == pytest.approx(5 / 7)
    saved = json.loads(open(tmp_path / "eval.json").read())
    assert saved["mIoU"] == pytest.approx(result["mIoU"])
    assert len(result["overlays"]) == 1 and os.path.exists(result["overlays"][0])


def test_cli_train_eval_predict(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "deeplabv3_mobilenet_v3_large", "--dataset", "synthetic", "--iters", "2",
                 "--batch-size", "2", "--crop", "65", "--device", "cpu", "--out", str(out)]) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert all({"loss", "lr", "images_per_s"} <= set(r) for r in records)
    ckpt = str(out / "last.pt")
    assert main(["eval", "--checkpoint", ckpt, "--dataset", "synthetic", "--device", "cpu", "--scales", "0.75,1.0",
                 "--flip", "--overlays", "2", "--limit", "3", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads(open(tmp_path / "eval" / "eval.json").read())
    assert 0 <= result["mIoU"] <= 1 and result["scales"] == [0.75, 1.0] and result["flip"] is True
    assert result["images"] == 3
    assert len([p for p in os.listdir(tmp_path / "eval") if p.endswith(".png")]) == 2
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--checkpoint", ckpt, str(image), "--device", "cpu", "--out", str(tmp_path / "pred")]) == 0
    mask = Image.open(tmp_path / "pred" / "photo_mask.png")
    assert mask.mode == "P" and mask.size == (50, 40)
    model, meta = load_trained_model(ckpt, torch.device("cpu"))
    assert np.asarray(mask).max() < len(meta["classes"])


def test_eval_refuses_a_foreign_checkpoint(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a fastaspp checkpoint"):
        load_trained_model(str(path), torch.device("cpu"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_dropout(self, x):
    return x


def _ddp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.nn.Dropout.forward = _no_dropout  # each rank draws its own masks: compare the arithmetic
    try:
        train(TrainConfig(**dict(SMALL, batch_size=4), iters=2, out=out))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_match_one_process(tmp_path, monkeypatch):
    """Two gloo ranks (global batch 4, SyncBN) against one process at batch 4, dropout off (ranks
    draw their own masks): the same samples, the same batch statistics; gradients agree up to how the
    cross-entropy means weigh ignored pixels across ranks, so the parameters' update agrees to 5% after
    two steps."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    monkeypatch.setattr(torch.nn.Dropout, "forward", _no_dropout)
    single = train(TrainConfig(**dict(SMALL, batch_size=4), iters=2, out=str(tmp_path / "one")))
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["step"] == 2
    assert not os.path.exists(tmp_path / "ddp" / "metrics.jsonl.1")
    a, b = ddp["model"], _weights(single["checkpoint"])
    assert list(a) == list(b)  # no "module." prefix: rank 0 saves the unwrapped model
    _assert_same_updates(a, b, rtol=5e-2)


def test_confusion_matrix_ignores_255():
    m = ConfusionMatrix(2)
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 255, 1]))
    assert m.mat.tolist() == [[1, 0], [0, 1]]
