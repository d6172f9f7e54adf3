"""IntermediateLayerGetter: torchvision's backbone wrapper (same children, names and state_dict)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict

from torch import Tensor, nn


class IntermediateLayerGetter(nn.ModuleDict):
    """Keeps `model`'s children up to the last one named in `return_layers` (the rest, e.g. a
    classifier's avgpool and fc, are dropped) and runs them in order, returning an OrderedDict
    {return_layers[name]: output of child `name`}. Only direct children can be returned."""

    _version = 2

    def __init__(self, model: nn.Module, return_layers: Dict[str, str]) -> None:
        names = [name for name, _ in model.named_children()]
        missing = [name for name in return_layers if name not in names]
        if missing:
            raise ValueError(f"return_layers names {missing} that are not children of the model; children: {names}")
        wanted = {str(k): str(v) for k, v in return_layers.items()}
        pending = set(wanted)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            pending.discard(name)
            if not pending:
                break
        super().__init__(layers)
        self.return_layers = wanted

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out
