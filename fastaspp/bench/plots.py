"""PNG figures of a benchmark run (matplotlib, headless): speed-up over eager per workload and
backend, and achieved useful TFLOP/s against the measured peak (a roofline-style ceiling)."""
from __future__ import annotations

from typing import List, Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or the GPU machine
import matplotlib.pyplot as plt  # noqa: E402


def _labels(rows) -> List[str]:
    return [f"{r.kind} {r.shape}\nb{r.batch}" for r in rows]


def _by_backend(rows):
    backends = sorted({r.backend for r in rows})
    workloads = list(dict.fromkeys((r.kind, r.shape, r.batch) for r in rows))
    return backends, workloads


def _save(fig, ax, path: str, ylabel: str, title: str) -> str:
    """Labels, legend and layout shared by the figures; writes the PNG and frees the figure."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def speedup_plot(rows, path: str, title: str) -> str:
    backends, workloads = _by_backend(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(workloads) + 2), 4.5))
    width = 0.8 / max(len(backends), 1)
    for i, backend in enumerate(backends):
        got = {(r.kind, r.shape, r.batch): r for r in rows if r.backend == backend}
        xs = [j + i * width for j, w in enumerate(workloads) if w in got]
        ax.bar(xs, [got[w].speedup for w in workloads if w in got], width, label=f"fastaspp {backend} / eager")
        compiled = [(j + i * width, got[w].compiled_ms / got[w].fused_ms)
                    for j, w in enumerate(workloads) if w in got and got[w].compiled_ms]
        if compiled:
            ax.scatter(*zip(*compiled), marker="_", s=200, color="black", zorder=3,
                       label="fastaspp / torch.compile" if i == 0 else None)
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))])
    ax.set_xticklabels([f"{k} {s}\nb{b}" for k, s, b in workloads], rotation=60, ha="right", fontsize=7)
    return _save(fig, ax, path, "speed-up (time of baseline / time of fastaspp)", f"fastaspp speed-up, {title}")


def roofline_plot(rows, peak_tflops: float, path: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r.tflops("eager", "useful") for r in rows], 0.4, label="eager (useful FLOPs)")
    ax.bar([x + 0.2 for x in xs], [r.tflops("fused", "useful") for r in rows], 0.4, label="fastaspp (useful FLOPs)")
    ax.axhline(peak_tflops, color="red", linestyle="--", label=f"measured matmul peak {peak_tflops:.1f} TFLOP/s")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{lab} {r.backend}" for lab, r in zip(_labels(rows), rows)], rotation=60, ha="right",
                       fontsize=7)
    return _save(fig, ax, path, "achieved TFLOP/s (live taps only)", f"achieved vs peak, {title}")


def write_plots(rows, peak_tflops: Optional[float], base: str, title: str) -> List[str]:
    if not rows:
        return []
    paths = [speedup_plot(rows, base + "-speedup.png", title)]
    if peak_tflops:
        paths.append(roofline_plot(rows, peak_tflops, base + "-roofline.png", title))
    return paths
