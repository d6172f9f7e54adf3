"""fastaspp.metrics: the confusion matrix against hand-computed values, and multi-scale + flip inference."""
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastaspp.metrics import ConfusionMatrix, predict_multiscale

# A 3-class example worked by hand. 255 marks an ignored pixel, whatever is predicted there.
TARGET = torch.tensor([[0, 0, 1, 1, 255],
                       [0, 2, 2, 1, 255]])
PRED = torch.tensor([[0, 1, 1, 1, 2],
                     [0, 2, 0, 2, 0]])
# Counted pixels (target, pred): (0,0) (0,1) (1,1) (1,1) | (0,0) (2,2) (2,0) (1,2)
HAND_MATRIX = [[2, 1, 0],   # target 0: two right, one predicted as 1
               [0, 2, 1],   # target 1: two right, one predicted as 2
               [1, 0, 1]]   # target 2: one predicted as 0, one right
# IoU = TP / (row + column - TP): class 0: 2/(3+3-2), class 1: 2/(3+3-2), class 2: 1/(2+2-1)
HAND_IOU = [2 / 4, 2 / 4, 1 / 3]
# Tolerances: the metrics are ratios of exact integer counts computed in float64 (one division, a
# mean of 3): within a few 2^-53 of the fractions above, far inside pytest.approx's 1e-6 relative.
# The probabilities below are the same fp32 ops (softmax, bilinear resize, a mean of n maps) in
# another association: a few fp32 ulps of values in [0, 1], inside torch.testing's fp32 defaults
# (1.3e-6 relative + 1e-5 absolute; tests/_cases.py rule 6).


def test_confusion_matrix_matches_hand_computation():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.mat.tolist() == HAND_MATRIX
    assert cm.per_class_iou().tolist() == pytest.approx(HAND_IOU)
    assert cm.miou() == pytest.approx(sum(HAND_IOU) / 3)
    assert cm.pixel_accuracy() == pytest.approx(5 / 8)


def test_updates_accumulate_like_one_batch():
    one = ConfusionMatrix(3)
    one.update(PRED, TARGET)
    split = ConfusionMatrix(3)
    split.update(PRED[:1], TARGET[:1])
    split.update(PRED[1:], TARGET[1:])
    assert torch.equal(one.mat, split.mat)
    split.reset()
    assert split.mat.sum() == 0 and math.isnan(split.miou()) and math.isnan(split.pixel_accuracy())


def test_class_absent_from_pred_and_target_is_nan_and_left_out_of_the_mean():
    cm = ConfusionMatrix(4)  # class 3 never occurs
    cm.update(PRED, TARGET)
    iou = cm.per_class_iou()
    assert math.isnan(iou[3]) and iou[:3].tolist() == pytest.approx(HAND_IOU)
    assert cm.miou() == pytest.approx(sum(HAND_IOU) / 3)
    # A class that is only predicted (a false positive) has IoU 0 and does count.
    cm.update(torch.tensor([3]), torch.tensor([0]))
    assert cm.per_class_iou()[3] == 0
    summary = cm.summary(["a", "b", "c", "d"])
    json.dumps(summary, allow_nan=False)
    assert summary["per_class_iou"]["d"] == 0.0 and set(summary) == {"mIoU", "pixel_acc", "per_class_iou"}
    assert ConfusionMatrix(2).summary()["per_class_iou"] == {"0": None, "1": None}


def test_ignore_index_is_configurable_and_all_ignored_is_a_noop():
    cm = ConfusionMatrix(3, ignore_index=2)
    cm.update(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2]))
    assert cm.mat.sum() == 2
    cm.update(torch.tensor([1, 1]), torch.tensor([2, 2]))
    assert cm.mat.sum() == 2


@pytest.mark.parametrize("pred,target,message", [
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), "same shape"),
    (torch.zeros(4), torch.zeros(4, dtype=torch.long), "integer class indices"),
    (torch.tensor([0, 1]), torch.tensor([0, 3]), r"target holds class indices in \[0, 3\], outside 0..2"),
    (torch.tensor([0, -1]), torch.tensor([0, 1]), r"pred holds class indices in \[-1, 0\]"),
])
def test_update_errors(pred, target, message):
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix(3).update(pred, target)


def test_all_reduce_without_distributed_is_a_noop():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.all_reduce() is cm and cm.mat.tolist() == HAND_MATRIX


def _reduce_worker(rank: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(3)
        cm.update(PRED[rank:rank + 1], TARGET[rank:rank + 1])  # each rank sees one row
        cm.all_reduce()
        torch.save(cm.mat, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_sums_over_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_reduce_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt").tolist() == HAND_MATRIX


# ---------------------------------------------------------------------------------------------- multi-scale


def _toy_model(stride: int = 1):
    """Logits [N, 4, h, w] from a fixed 1x1 conv plus a left-to-right ramp (so flips matter),
    optionally average-pooled by `stride` like a network with an output stride."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 1, 1, generator=gen)

    def model_fn(x):
        ramp = torch.linspace(-2, 2, x.shape[-1]).view(1, 1, 1, -1) * torch.tensor([1., -1., 0.5, 0.]).view(1, 4, 1, 1)
        logits = F.conv2d(x, weight) + ramp
        return F.avg_pool2d(logits, stride) if stride > 1 else logits
    return model_fn


def test_single_scale_without_flip_is_the_softmax_of_the_logits():
    x = torch.randn(2, 3, 8, 10)
    model_fn = _toy_model()
    out = predict_multiscale(model_fn, x)
    torch.testing.assert_close(out, model_fn(x).softmax(1))


def test_flip_averages_probabilities_of_the_mirrored_prediction():
    x = torch.randn(2, 3, 8, 10)
    model_fn = _toy_model()
    want = (model_fn(x).softmax(1) + model_fn(x.flip(-1)).flip(-1).softmax(1)) / 2
    out = predict_multiscale(model_fn, x, flip=True)
    torch.testing.assert_close(out, want)
    # Averaging logits instead would give something else here: the ramp makes the two views disagree
    # (by O(0.1) in probability, where rounding is ~1e-7).
    logit_mean = ((model_fn(x) + model_fn(x.flip(-1)).flip(-1)) / 2).softmax(1)
    assert not torch.allclose(out, logit_mean, atol=1e-3)


def test_multiscale_resizes_inputs_and_upsamples_logits_to_the_image():
    x = torch.randn(1, 3, 16, 12)
    model_fn = _toy_model(stride=2)
    up = lambda logits: F.interpolate(logits, size=(16, 12), mode="bilinear", align_corners=False)  # noqa: E731
    half = F.interpolate(x, size=(8, 6), mode="bilinear", align_corners=False)
    big = F.interpolate(x, size=(24, 18), mode="bilinear", align_corners=False)
    want = sum(up(model_fn(v)).softmax(1) for v in (half, x, big)) / 3
    out = predict_multiscale(model_fn, x, scales=(0.5, 1.0, 1.5))
    assert out.shape == (1, 4, 16, 12)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 16, 12))


@pytest.mark.parametrize("kwargs,message", [
    (dict(scales=()), "scales must be a non-empty"),
    (dict(scales=(1.0, 0.0)), "scales must be a non-empty sequence of positive"),
])
def test_multiscale_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        predict_multiscale(_toy_model(), torch.randn(1, 3, 4, 4), **kwargs)


def test_multiscale_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"image must be a \[N, 3, H, W\]"):
        predict_multiscale(_toy_model(), torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match=r"model_fn must return logits \[N=1, C, h, w\]"):
        predict_multiscale(lambda x: x[0], torch.randn(1, 3, 4, 4))
