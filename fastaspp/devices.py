"""One check of a device request for training, evaluation, prediction and the demo.

torch's own failures for an unusable "cuda" differ by where they surface (AttributeError
`_cuda_setDevice`, "Torch not compiled with CUDA enabled", a backend that is "unavailable"), and
none says what to do. Every entry point resolves its device here first.
"""
from __future__ import annotations

import os

import torch

DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: str | torch.device, argument: str = "device") -> torch.device:
    """`device` as a torch.device that this process can use, or a ValueError naming `argument`,
    what is wrong and what to do."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{argument} must be one of {DEVICE_TYPES} (optionally cuda:N), got {device!r}") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"{argument} must be one of {DEVICE_TYPES} (optionally cuda:N), got {device!r}")
    if dev.type == "cpu":
        return dev
    if torch.version.cuda is None:
        raise ValueError(f"{argument} {str(device)!r}: this torch ({torch.__version__}) is a CPU-only build; install a "
                         f"CUDA build of torch, or use cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else " (no driver, or no GPU)"
        raise ValueError(f"{argument} {str(device)!r}: torch sees no CUDA GPU{hint}; use cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{argument} {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (CUDA: the driver's free memory; CPU: Linux's
    MemAvailable), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
