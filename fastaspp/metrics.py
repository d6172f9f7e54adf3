"""Segmentation metrics from a confusion matrix, and multi-scale + flip inference."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Accumulates a [C, C] confusion matrix: rows are the true class, columns the predicted one.

    Pixels whose target is ignore_index are skipped. The matrix lives on the device of the first
    update (or `device`), so a GPU evaluation never copies predictions to the host.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self._device_fixed = device is not None

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch. pred: predicted class indices (e.g. logits.argmax(1)); target: true indices
        with ignore_index where unlabelled; both integer tensors of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)} (pass pred as class indices, e.g. logits.argmax(1))")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(f"pred and target must be integer class indices, got {pred.dtype} and {target.dtype}")
        if not self._device_fixed:
            self.mat = self.mat.to(target.device)
            self._device_fixed = True
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        c = self.num_classes
        for name, values in (("target", target), ("pred", pred)):
            lo, hi = values.min().item(), values.max().item()
            if lo < 0 or hi >= c:
                raise ValueError(f"{name} holds class indices in [{lo}, {hi}], outside 0..{c - 1} "
                                 f"(and not the ignore index {self.ignore_index})")
        self.mat += torch.bincount(target * c + pred, minlength=c * c).view(c, c)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrix over the processes of torch.distributed, if initialised (a no-op
        otherwise). With NCCL the matrix must be on the GPU: update it with GPU tensors."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat, op=torch.distributed.ReduceOp.SUM)
        return self

    def per_class_iou(self) -> torch.Tensor:
        """IoU = TP / (TP + FP + FN) per class, float64 [C]; NaN for a class in neither the targets
        nor the predictions (it has no IoU, and miou() leaves it out)."""
        mat = self.mat.double()
        tp = mat.diagonal()
        union = mat.sum(0) + mat.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        """Mean IoU over the classes that occur (NaN if nothing was counted)."""
        iou = self.per_class_iou()
        present = ~iou.isnan()
        return iou[present].mean().item() if present.any() else math.nan

    def pixel_accuracy(self) -> float:
        """Fraction of counted pixels classified correctly (NaN if nothing was counted)."""
        total = self.mat.sum().item()
        return self.mat.diagonal().sum().item() / total if total else math.nan

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        """{"mIoU", "pixel_acc", "per_class_iou": {name: iou}} with None for NaN (valid JSON)."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"class_names has {len(names)} names for {self.num_classes} classes")
        finite = lambda x: None if math.isnan(x) else x  # noqa: E731
        return {"mIoU": finite(self.miou()), "pixel_acc": finite(self.pixel_accuracy()),
                "per_class_iou": {n: finite(v) for n, v in zip(names, self.per_class_iou().tolist())}}


def check_scales(scales: Sequence[float]) -> tuple:
    """scales as a tuple, or the error that says it must be a non-empty sequence of positive numbers."""
    scales = tuple(scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    return scales


def predict_multiscale(model_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                       scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Class probabilities [N, C, H, W] (float32) averaged over scales and, with flip, mirrored inputs.

    As in DeepLab's evaluation, the image [N, 3, H, W] is resized bilinearly to each scale, the
    logits model_fn(x) [N, C, h, w] are resized bilinearly back to (H, W), and the *softmax
    probabilities* are averaged (not the logits). Gradients are not disabled here: call it under
    torch.inference_mode() for evaluation. argmax(1) of the result is the prediction.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be a [N, 3, H, W] batch, got shape {tuple(image.shape)}")
    scales = check_scales(scales)
    height, width = image.shape[-2:]
    total, count = None, 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            logits = model_fn(x.flip(-1) if mirrored else x)
            if logits.dim() != 4 or logits.shape[0] != image.shape[0]:
                raise ValueError(f"model_fn must return logits [N={image.shape[0]}, C, h, w], got shape "
                                 f"{tuple(logits.shape)}")
            logits = logits.float()
            if mirrored:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            total = probs if total is None else total + probs
            count += 1
    return total / count
