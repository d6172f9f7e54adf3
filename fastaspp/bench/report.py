"""One result row per (workload, batch, backend), its markdown table, the environment stamp and the
files a run writes (JSON, markdown, PNG plots)."""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
from typing import Dict, Iterable, List, Optional, Tuple

import torch

import fastaspp


@dataclasses.dataclass
class Row:
    kind: str  # "conv", "aspp eval", "aspp train", "model eval", "model train"
    shape: str
    batch: int
    dtype: str
    device: str
    backend: str
    eager_ms: float
    fused_ms: float
    eager_spread_ms: float
    fused_spread_ms: float
    useful_flops: float  # live-tap FLOPs of one call (what fused computes)
    dense_flops: float  # every tap (what eager computes)
    max_abs_err: float  # fused against eager on the same input (NaN where not comparable)
    compiled_ms: Optional[float] = None  # torch.compile of the eager module, where measured
    eager_mem_mb: Optional[float] = None  # device memory a call allocates (GPU only)
    fused_mem_mb: Optional[float] = None
    eager_max_abs: Optional[float] = None  # the largest |eager output|, which max_abs_err is relative to

    @property
    def max_rel_err(self) -> float:
        """max_abs_err against the largest eager output: a random-init model's logits reach 1e4 and
        more, where an fp32 error of 0.1 is 1e-5 of them (NaN where not compared)."""
        if self.eager_max_abs is None or not math.isfinite(self.max_abs_err):
            return float("nan")
        return self.max_abs_err / self.eager_max_abs if self.eager_max_abs > 0 else float("inf")

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.fused_ms

    def tflops(self, which: str, flops: str) -> float:
        ms = self.fused_ms if which == "fused" else self.eager_ms
        return (self.useful_flops if flops == "useful" else self.dense_flops) / ms / 1e9

    def to_dict(self, peak_tflops: Optional[float]) -> dict:
        out = dataclasses.asdict(self)
        out.update(speedup=self.speedup,
                   fused_dense_tflops=self.tflops("fused", "dense"), fused_useful_tflops=self.tflops("fused", "useful"),
                   eager_dense_tflops=self.tflops("eager", "dense"), eager_useful_tflops=self.tflops("eager", "useful"),
                   fused_useful_peak_share=self.tflops("fused", "useful") / peak_tflops if peak_tflops else None,
                   max_rel_err=self.max_rel_err)
        return out


def max_error(pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[float, float]:
    """(max |fused - eager|, max |eager|) over (fused, eager) output pairs, in float64: a row's
    max_abs_err and eager_max_abs."""
    err = scale = 0.0
    for fused, eager in pairs:
        eager = eager.double()
        err = max(err, (fused.double() - eager).abs().max().item())
        scale = max(scale, eager.abs().max().item())
    return err, scale


def _mem(row: Row) -> str:
    if row.eager_mem_mb is None or row.fused_mem_mb is None:
        return "-"
    return f"{row.eager_mem_mb:.0f} / {row.fused_mem_mb:.0f}"


def _err(row: Row) -> str:
    rel = row.max_rel_err
    return f"{row.max_abs_err:.1e}" + ("" if math.isnan(rel) else f" ({rel:.0e})")


def fmt_ms(ms: float) -> str:
    """Milliseconds with two decimals, or four below 0.1 ms (the fixed-cost rows are microseconds)."""
    return f"{ms:.2f}" if ms >= 0.1 else f"{ms:.4f}"


def markdown(rows: List[Row], peak_tflops: Optional[float]) -> str:
    head = ("| workload | batch | dtype | backend | eager ms | fused ms | speed-up | compiled ms (fused vs it) | "
            "fused TFLOP/s dense / useful | useful % of peak | eager TFLOP/s dense / useful | "
            "memory MB eager / fused | max abs err (relative) |\n" + "|---" * 13 + "|\n")
    lines = []
    for r in rows:
        compiled = "-" if r.compiled_ms is None else f"{fmt_ms(r.compiled_ms)} ({r.compiled_ms / r.fused_ms:.2f}x)"
        share = f"{100 * r.tflops('fused', 'useful') / peak_tflops:.1f}%" if peak_tflops else "-"
        lines.append(
            f"| {r.kind} {r.shape} | {r.batch} | {r.dtype} | {r.backend} | "
            f"{fmt_ms(r.eager_ms)} ±{fmt_ms(r.eager_spread_ms)} | "
            f"{fmt_ms(r.fused_ms)} ±{fmt_ms(r.fused_spread_ms)} | {r.speedup:.2f}x | {compiled} | "
            f"{r.tflops('fused', 'dense'):.3f} / {r.tflops('fused', 'useful'):.3f} | {share} | "
            f"{r.tflops('eager', 'dense'):.3f} / {r.tflops('eager', 'useful'):.3f} | {_mem(r)} | "
            f"{_err(r)} |\n")
    note = (f"\nPeak: {peak_tflops:.2f} TFLOP/s (a large matmul in this dtype, measured in this run). "
            "± is the 20th-80th percentile spread. Useful FLOPs count live taps only; the cpu ASPP eval's "
            "Winograd branches multiply less than that, so its share of peak can pass 100%." if peak_tflops else "")
    note += ("\nmax abs err: fused against eager on the same input, and in brackets divided by the largest "
             "|eager| output (random-init models' logits reach 1e4 and more).\n")
    return head + "".join(lines) + note


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git_commit() -> Optional[str]:
    # FASTASPP_COMMIT names the commit where the tree was copied without its .git (a device run).
    if os.environ.get("FASTASPP_COMMIT"):
        return os.environ["FASTASPP_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> Dict[str, object]:
    """Device and versions stamped on every result file."""
    info: Dict[str, object] = {"torch": torch.__version__, "fastaspp": fastaspp.__version__, "cuda": torch.version.cuda,
                               "cpu": _cpu_model() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["commit"] = _git_commit()
    # The switches that pick kernels (FASTASPP_CUDA_CONV, FASTASPP_TRITON_AUTOTUNE, ...): a row's
    # backend name alone does not say which kernel ran.
    info["switches"] = {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("FASTASPP_") and k != "FASTASPP_COMMIT"}
    return info


def write_results(out_dir: str, op: str, device: torch.device, dtype_name: str, rows: List[Row],
                  peak_tflops: Optional[float], command: str) -> List[str]:
    """Writes DIR/<op>-<device>-<dtype>-<UTC stamp>.{json,md} and the plots; returns the paths."""
    from fastaspp.bench import plots

    os.makedirs(out_dir, exist_ok=True)
    env = environment()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tag = str(env.get("gpu") or device.type).replace(" ", "-")
    base = os.path.join(out_dir, f"{op}-{tag}-{dtype_name}-{stamp}")
    table = markdown(rows, peak_tflops)
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, "command": command, "peak_tflops": peak_tflops,
                   "rows": [r.to_dict(peak_tflops) for r in rows]}, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(f"`{command}`\n\nEnvironment: {json.dumps(env)}\n\n{table}")
    paths = [base + ".json", base + ".md"]
    paths += plots.write_plots(rows, peak_tflops, base, title=f"{tag}, {dtype_name}")
    return paths
