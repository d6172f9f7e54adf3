"""Weights from local files only (never downloads), with errors that name the keys."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

PathLike = Union[str, "os.PathLike[str]"]
_SHOWN = 5  # keys shown per kind of mismatch


def read_state_dict(path: PathLike, argument: str = "weights") -> Mapping[str, Tensor]:
    """The state_dict saved at `path` (torch.load with weights_only=True, on the CPU).

    A checkpoint that wraps it as {"model": ...} or {"state_dict": ...} (what training scripts
    save) is unwrapped.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a local file path (str or os.PathLike) or None, got "
                        f"{type(path).__name__}; fastaspp never downloads weights")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{argument} file not found: {path!r} ({argument} must be a local file; "
                                f"fastaspp never downloads weights)")
    state = torch.load(path, weights_only=True, map_location="cpu")
    if isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping):
        raise TypeError(f"{argument} file {path!r} holds a {type(state).__name__}, expected a state_dict "
                        f"(a mapping of names to tensors)")
    return state


def _sample(keys) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (", ..." if len(keys) > _SHOWN else "")


def check_keys(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Raises RuntimeError naming the missing, unexpected and wrongly shaped keys (a few of each, and counts)."""
    own, given = module.state_dict(), state
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    wrong_shape = [k for k in own if k in given and isinstance(given[k], Tensor) and given[k].shape != own[k].shape]
    if not (missing or unexpected or wrong_shape):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_sample(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_sample(unexpected)})")
    if wrong_shape:
        shapes = ", ".join(f"{k!r}: file {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
                           for k in wrong_shape[:_SHOWN])
        more = ", ..." if len(wrong_shape) > _SHOWN else ""
        parts.append(f"{len(wrong_shape)} keys with another shape ({shapes}{more})")
    raise RuntimeError(f"{source} does not match the model's state_dict: " + "; ".join(parts)
                       + ". Check num_classes, aux_loss and the model options against the checkpoint.")


def load_state(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Loads `state` into `module` strictly; `source` names it in the error."""
    check_keys(module, state, source)
    module.load_state_dict(state, strict=True)


def load_weights(module: nn.Module, path: Optional[PathLike], argument: str) -> None:
    """Loads the local file `path` (None: nothing) into `module` strictly."""
    if path is not None:
        load_state(module, read_state_dict(path, argument), f"{argument} file {os.fspath(path)!r}")
