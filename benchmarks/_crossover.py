"""What the cpu crossover sweeps share (cpu_direct_crossover.py, cpu_winograd_crossover.py,
cpu_onednn_live_share.py): the conv + BN + ReLU pair they time, the cpu backend's path variables set
per call, the command line, and the result file."""
import argparse
import datetime
import json
import os
from typing import Dict, Optional

import torch

import fastaspp
from fastaspp.bench.report import environment


def conv_bn_relu_pair(c: int, size: int, rate: int, batch: int = 1, c_out: int = 0):
    """(eager, fused, x): an eval 3x3 conv (padding = dilation = rate, c to c_out channels, c_out = c
    when 0) + BN + ReLU as torch modules and as fastaspp.nn.ConvBNReLU with the same state,
    channels_last, and an input of batch x c x size²."""
    gen = torch.Generator().manual_seed(0)
    c_out = c_out or c
    eager = torch.nn.Sequential(torch.nn.Conv2d(c, c_out, 3, padding=rate, dilation=rate, bias=False),
                                torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()).eval()
    with torch.no_grad():
        eager[1].running_var.uniform_(0.5, 2.0, generator=gen)
    eager = eager.to(memory_format=torch.channels_last)
    fused = fastaspp.nn.ConvBNReLU.from_modules(eager[0], eager[1]).eval()
    x = torch.randn(batch, c, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    return eager, fused, x


def with_env(env: dict, fn):
    """fn with the cpu backend's path variables in `env` set for the call (the C++ rules read them
    per call), then removed."""
    def call():
        os.environ.update(env)
        try:
            return fn()
        finally:
            for name in env:
                del os.environ[name]
    return call


def parse_args(doc: str, flags: Optional[Dict[str, str]] = None) -> argparse.Namespace:
    """--threads (applied here), --reps, --out, and a switch for each of `flags` ({name: help})."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, text in (flags or {}).items():
        parser.add_argument(name, action="store_true", help=text)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def write_result(out_dir: str, name: str, payload: dict) -> None:
    """out_dir/<name>-<UTC time>.json with the environment and thread count stamped in."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(out_dir, f"{name}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"environment": environment(), "threads": torch.get_num_threads(), **payload}, f, indent=2)
    print(f"wrote {path}")
