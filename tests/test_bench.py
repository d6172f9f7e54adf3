"""The benchmark machinery: timing statistics, rows, the markdown table and the files a run writes."""
import json
import math

import torch

from fastaspp.bench import conv as bench_conv
from fastaspp.bench.report import Row, markdown, write_results
from fastaspp.bench.timing import alternate, measure_peak_tflops, summarize

from _cases import gamma

# A row's max_abs_err compares two fp32 computations of the same sums (fused and eager), each within
# gamma_n * M of the exact result (tests/_cases.py, rule 2): n <= 250 roundings here (the tiny ASPP's
# 3x3 branches over 16 channels, then its projection over 80; the convs' 72 products and their BN),
# M <= 80 (the op row's randn weight, scale and shift give 80 with their fixed seeds; the module
# rows' default-initialised weights give M below 10 for global seeds 0 to 4, 8x under). So the two differ by
# at most 2 * gamma_250 * 80 = 2.4e-3; a row that compared other inputs or weights would be off by
# the outputs' own size (1 to 80).
ROW_ERROR_BOUND = 2 * gamma(250, 2.0 ** -24) * 80
# The overhead bench's mid-size ConvBNReLU rows: n <= 600 roundings (a 3x3 conv over at most 64
# channels in the row tested here, then BN); default-initialised weights bound |w| by 1/sqrt(9 Cin),
# so M stays near 10 there too, and 80 again leaves 8x.
MID_ROW_ERROR_BOUND = 2 * gamma(600, 2.0 ** -24) * 80


def test_summarize_reports_median_and_percentile_spread():
    t = summarize([5.0, 1.0, 2.0, 4.0, 3.0])
    assert t.median_ms == 3.0
    assert math.isclose(t.spread_ms, 4.2 - 1.8)  # 80th - 20th percentile (inclusive method), to 1e-9 relative
    assert summarize([2.5]) == type(t)(2.5, 0.0)


def test_alternate_times_every_function_in_rounds():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    timings = alternate(fns, torch.device("cpu"), warmup=1, reps=2, rounds=2)
    assert len(timings) == 2 and all(t.median_ms >= 0 for t in timings)
    assert "".join(calls) == "aaa" "bbb" "aaa" "bbb"  # per round: warm-up + reps of a, then of b


def test_conv_row_compares_fused_with_eager_on_the_same_weights():
    shape = bench_conv.ConvShape("tiny", 8, 4, 9, 2)
    row = bench_conv.measure(shape, 2, torch.float32, torch.device("cpu"), reps=2, rounds=1)
    assert row.kind == "conv" and row.backend == "cpu" and row.batch == 2
    assert row.max_abs_err <= ROW_ERROR_BOUND
    assert row.eager_max_abs > 0 and row.max_rel_err == row.max_abs_err / row.eager_max_abs
    useful, dense = shape.flops(2)
    assert (row.useful_flops, row.dense_flops) == (useful, dense) and useful < dense  # rate 2 on 9x9: dead taps
    assert row.speedup == row.eager_ms / row.fused_ms


def test_peak_is_a_measured_positive_rate():
    assert measure_peak_tflops(torch.device("cpu"), torch.float32, size=128) > 0


def _row(**kw):
    base = dict(kind="conv", shape="s", batch=1, dtype="float32", device="cpu", backend="cpu", eager_ms=2.0,
                fused_ms=1.0, eager_spread_ms=0.1, fused_spread_ms=0.2, useful_flops=1e9, dense_flops=2e9,
                max_abs_err=1e-6)
    base.update(kw)
    return Row(**base)


def test_environment_records_the_switches_that_pick_kernels(monkeypatch):
    """A row's backend name alone does not say which kernel ran (FASTASPP_CUDA_CONV=sm80 keeps the
    cuda backend off wgmma): the result files carry every FASTASPP_ variable but the commit's."""
    from fastaspp.bench.report import environment

    monkeypatch.setenv("FASTASPP_CUDA_CONV", "sm80")
    monkeypatch.setenv("FASTASPP_COMMIT", "abc123")
    env = environment()
    assert env["switches"]["FASTASPP_CUDA_CONV"] == "sm80" and "FASTASPP_COMMIT" not in env["switches"]
    assert env["commit"] == "abc123"


def test_markdown_and_json_carry_ratios_rates_and_peak_share(tmp_path):
    rows = [_row(), _row(kind="aspp eval", compiled_ms=1.5, backend="triton", max_abs_err=0.25, eager_max_abs=5e4)]
    table = markdown(rows, peak_tflops=4.0)
    assert "| conv s | 1 | float32 | cpu | 2.00 ±0.10 | 1.00 ±0.20 | 2.00x | - | 2.000 / 1.000 | 25.0% |" in table
    assert "1.50 (1.50x)" in table
    # The error against the largest eager output beside the absolute one, where that is known.
    assert "| 1.0e-06 |\n" in table and "| 2.5e-01 (5e-06) |\n" in table
    paths = write_results(str(tmp_path), "all", torch.device("cpu"), "float32", rows, 4.0, "fastaspp bench --test")
    data = json.loads(open(next(p for p in paths if p.endswith(".json"))).read())
    assert data["peak_tflops"] == 4.0 and data["command"] == "fastaspp bench --test"
    assert {"torch", "commit", "cpu", "triton"} <= set(data["environment"])
    assert data["rows"][0]["fused_useful_peak_share"] == 0.25 and data["rows"][0]["speedup"] == 2.0
    assert math.isnan(data["rows"][0]["max_rel_err"]) and data["rows"][1]["max_rel_err"] == 0.25 / 5e4
    pngs = [p for p in paths if p.endswith(".png")]
    assert len(pngs) == 2
    for p in pngs:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_overhead_rows_time_one_call_of_each_tiny_workload():
    from fastaspp.bench import overhead

    for mode in overhead.MODES:
        rows = [overhead.measure_op(mode, calls=2, reps=1, rounds=1),
                overhead.measure_convbnrelu(mode, calls=2, reps=1, rounds=1),
                overhead.measure_aspp(mode, calls=2, reps=1, rounds=1)]
        for row in rows:
            assert row.kind.startswith("overhead ") and row.kind.endswith(mode) and row.backend == "cpu"
            assert row.batch == (2 if mode == "train" else 1)
            assert row.eager_ms > 0 and row.fused_ms > 0
            if mode == "eval":  # fused against eager on the same input and state
                assert row.max_abs_err <= ROW_ERROR_BOUND, row
        mid = overhead.measure_convbnrelu(mode, shape=overhead.MID_CONVS[-1], calls=1, reps=1, rounds=1)
        assert mid.shape == overhead.MID_CONVS[-1].name and mid.eager_ms > 0 and mid.fused_ms > 0
        if mode == "eval":
            assert mid.max_abs_err <= MID_ROW_ERROR_BOUND, mid


def test_model_cases_build_their_options_and_measure_training_steps():
    from fastaspp.bench import models as bench_models

    cascade = next(c for c in bench_models.MODEL_CASES if "cascade" in c.label)
    plain, fused = bench_models.model_pair(cascade.name, torch.float32, torch.device("cpu"), **dict(cascade.options))
    assert type(fused.classifier).__name__ == type(plain.classifier).__name__ == "CascadeHead"
    assert fused.classifier.rates == (4, 8, 16)  # output stride 16: layer4 at rate 2
    case = bench_models.MODEL_CASES[-1]  # MobileNetV3: the cheapest
    row = bench_models.measure(case, 2, "train", torch.float32, torch.device("cpu"), size=65, reps=1, rounds=1)
    assert (row.kind, row.shape, row.batch) == ("model train", f"{case.label}-65", 2)
    assert row.eager_ms > 0 and row.fused_ms > 0


def test_multiscale_row_runs_every_scale_per_call():
    from fastaspp.bench import models as bench_models

    case = bench_models.MODEL_CASES[-1]  # MobileNetV3: the cheapest
    row = bench_models.measure_multiscale(case, torch.float32, torch.device("cpu"), size=64, scales=(0.5, 1.0),
                                          reps=1, rounds=1)
    assert (row.kind, row.shape, row.batch) == ("model eval multi-scale", f"{case.label}-32/64", 1)
    single = bench_models.model_flops(bench_models.model_pair(case.name, torch.float32, torch.device("cpu"))[0],
                                      torch.randn(1, 3, 64, 64))
    assert row.dense_flops > single[1]  # both scales counted
    assert row.eager_ms > 0 and row.fused_ms > 0 and math.isfinite(row.max_abs_err)  # accuracy: test_models.py
    assert set(bench_models.MODEL_MULTISCALE_LABELS) <= {c.label for c in bench_models.MODEL_CASES}


def _gpu_profile():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_profile.py"
    spec = importlib.util.spec_from_file_location("gpu_profile", path)
    gpu_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_profile)
    return gpu_profile


def test_gpu_profile_summary_checks_the_issue_goals():
    """benchmarks/gpu_profile.py's per-case summary: each cuda row's kernels against cuDNN's conv
    kernel (eager's longest) and against the triton row's kernels, with the goal verdicts."""
    gpu_profile = _gpu_profile()
    device_ms = {"eager": [("cudnn conv", 0.2), ("batch norm", 0.05)], "triton": [("conv", 0.25)],
                 "cuda": [("conv", 0.4)], "cuda-split": [("conv", 0.1), ("finalize", 0.02)]}
    head, slow, split = gpu_profile.goal_lines("aspp-33-r6", 8, device_ms)
    assert "cuDNN conv kernel 0.200 ms, triton kernels 0.250 ms" in head
    assert "0.50x cuDNN, 0.62x triton (misses >= 0.9x cuDNN, misses >= triton)" in slow
    assert "kernels 0.120 ms: 1.67x cuDNN, 2.08x triton (meets >= 0.9x cuDNN, meets >= triton)" in split
    # No cuDNN goal at batch 1: only the one against triton.
    assert gpu_profile.goal_lines("aspp-33-r6", 1, device_ms)[1].endswith("(misses >= triton)")


def _run_script(name, *args):
    """Runs benchmarks/<name> in a fresh interpreter (as a user would) and returns its stdout."""
    import pathlib
    import subprocess
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / name
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_overhead_profile_times_every_part_of_this_commits_call():
    """benchmarks/overhead_profile.py names this commit's functions (it once called a helper renamed
    since): every part and every layer of the mid-size training step prints a positive time, and the
    C++ op appears in its ATen table."""
    import re

    out = _run_script("overhead_profile.py", "--threads", "1", "--calls", "4", "--samples", "1")
    times = dict(re.findall(r"^(\S.*?)\s+([0-9.]+) µs$", out, flags=re.M))
    for part in ("whole call", "argument checks (Python: the torch op's route)", "backend choice and route",
                 "fastaspp._C's binding (C++ checks, then the kernel op)", "eager conv2d + affine + relu",
                 "train: fused forward + backward"):
        assert float(times[part]) > 0, part
    steps = dict(re.findall(r"^  (\S.*?)\s+([0-9.]+) µs$", out, flags=re.M))
    assert len(steps) == 7 and all(float(us) > 0 for us in steps.values()), steps
    assert "fastaspp.nn.ConvBNReLU" in steps
    assert "fastaspp::_atrous_conv2d_forward" in out


def test_cpu_ceiling_and_dead_tap_scripts_run_on_small_maps():
    """The CPU benchmark scripts that take small shapes run end to end (the crossover sweeps, whose
    shapes are fixed, take minutes and are left to their users)."""
    assert "winograd floor" in _run_script("cpu_eval_ceiling.py", "--size", "9", "--c-in", "16", "--rounds", "1")
    assert "36 |" in _run_script("eager_dead_taps.py", "--size", "9", "--c-in", "16", "--reps", "1")


def test_onednn_threshold_sweep_runs(tmp_path):
    """cpu_onednn_live_share.py --thresholds (23 convs, about 10 s at one rep) times every conv in each
    direction and by the backward's default rule, and writes its result file."""
    out = _run_script("cpu_onednn_live_share.py", "--thresholds", "--reps", "1", "--out", str(tmp_path))
    assert len([line for line in out.splitlines() if " rule " in line]) == 23
    assert len(list(tmp_path.glob("cpu-onednn-live-share-thresholds-*.json"))) == 1


def test_gpu_profile_runs_end_to_end_on_cpu_stand_ins(capsys):
    """benchmarks/gpu_profile.py's main and main_host run as on the GPU, with the cpu backend standing in
    for every row and small channels (device time is too scarce to find a renamed helper there): every
    case prints each row and its goal summary, and the host profile names functions."""
    import os

    gpu_profile = _gpu_profile()
    before = {k: os.environ.get(k) for k in gpu_profile.CUDA_SWITCHES}
    stand_ins = {label: ("cpu", switches) for label, (_, switches) in gpu_profile.BACKENDS.items()}
    gpu_profile.main(torch.device("cpu"), torch.float32, stand_ins, channels=8, quick=True)
    gpu_profile.main_host(torch.device("cpu"), torch.float32, ("cpu",), channels=8, reps=3)
    out = capsys.readouterr().out
    for name, batch in gpu_profile.CASES:
        for label in ("eager", *gpu_profile.BACKENDS):
            assert f"{name} b{batch} {label:15s} call " in out, (name, batch, label)
        assert f"{name} b{batch} goals: cuDNN conv kernel" in out
    assert "host time of aspp-33-r6 b1 cpu, by function:" in out and " us own, " in out
    assert " by own time:" in out and " by time with callees:" in out and "atrous_conv2d" in out
    assert {k: os.environ.get(k) for k in gpu_profile.CUDA_SWITCHES} == before  # the switches restored


def test_gpu_profile_replays_each_layer_of_a_triton_call():
    """gpu_profile.triton_layers (here under TRITON_INTERPRET, as the suite runs triton): it captures each
    layer's call from one real call (module, kernels module, its launch_tuned, the same launch through
    the autotuner, JIT launch), times each replayed alone, and leaves the kernel objects and the
    kernels module as they were."""
    from fastaspp.kernels import atrous_conv as kernels

    gpu_profile = _gpu_profile()
    pair = gpu_profile.benchmark.ConvPair(gpu_profile.benchmark.ConvShape("tiny", 8, 8, 6, 2), 1, torch.float32,
                                          torch.device("cpu"))
    layers = gpu_profile.triton_layers(pair, torch.device("cpu"), reps=1, samples=1)
    assert list(layers) == ["module", "kernels.atrous_conv2d_forward", "launch_tuned", "autotuned launch",
                            "JIT launch"]
    assert all(ms > 0 for ms in layers.values())
    assert "run" not in vars(kernels._atrous_fwd_kernel) and "run" not in vars(kernels._atrous_fwd_kernel.fn.fn)
    assert kernels.atrous_conv2d_forward.__name__ == "atrous_conv2d_forward"
    assert kernels.launch_tuned.__name__ == "launch_tuned"
