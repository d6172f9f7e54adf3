"""The fastaspp command line: demo, train, eval, predict, bench (also `python -m fastaspp ...`)."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import time
from typing import Optional

import torch

from fastaspp.devices import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_against_reference(device: torch.device) -> float:
    """Fused ops vs fastaspp.reference: atrous conv forward and backward on ASPP-like shapes, and the
    fused ASPP in eval; returns the max relative error."""
    import fastaspp
    from fastaspp import reference

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for c_in, c_out, size, rate, stride in [(64, 32, 17, 6, 1), (64, 32, 17, 12, 1), (32, 16, 9, 18, 1),
                                           (48, 24, 16, 2, 2)]:
        x = torch.randn(2, c_in, size, size, generator=gen).to(device, memory_format=torch.channels_last)
        w = (torch.randn(c_out, c_in, 3, 3, generator=gen) / (9 * c_in) ** 0.5).to(device)
        s, t = (torch.randn(c_out, generator=gen).to(device) for _ in range(2))
        x.requires_grad_()
        w.requires_grad_()
        out = fastaspp.ops.atrous_conv2d(x, w, None, stride, rate, rate, scale=s, shift=t, relu=True)
        ref = reference.atrous_conv2d(x, w, None, stride, rate, rate, scale=s, shift=t, relu=True)
        g = torch.randn(out.shape, generator=gen).to(device)
        grads = torch.autograd.grad(out, (x, w), g)
        ref_grads = torch.autograd.grad(ref, (x, w), g)
        for a, b in [(out, ref), *zip(grads, ref_grads)]:
            worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item())
    # The fused ASPP (eval) against the reference ASPP with the same weights.
    ref_aspp = reference.ASPP(64, (6, 12, 18), 32).eval()
    with torch.no_grad():
        for m in ref_aspp.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    aspp = fastaspp.nn.ASPP(64, (6, 12, 18), 32).eval()
    aspp.load_state_dict(ref_aspp.state_dict())
    ref_aspp.to(device)
    aspp.to(device)
    x = torch.randn(2, 64, 17, 17, generator=gen).to(device, memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = aspp(x), ref_aspp(x)
    return max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item())


def _bench_backends(name: str, device: torch.device) -> list:
    """The fastaspp backends a bench run times: one name, or "all" usable on this device."""
    import fastaspp

    if name != "all":
        return [name]
    # The cpu backend runs CPU tensors only, and the interpreter runs Triton on CPU tensors for tests
    # only: it is not a CPU backend to time.
    return [b for b in fastaspp.backends()
            if (b == "cpu") == (device.type == "cpu") and fastaspp.resolve_backend(device, b) == b]


def _bench_shape_filter(names: Optional[str], op: str):
    """A function (all shapes of an op, its default shapes) -> the shapes to time: the default ones, or
    those that `--shapes` names. A name that no selected op has is an error that lists the valid ones."""
    if names is None:
        return lambda every, default: default
    from fastaspp.bench import aspp as bench_aspp
    from fastaspp.bench import conv as bench_conv

    if op not in ("conv", "aspp", "all"):
        raise SystemExit(f"fastaspp bench: --shapes applies to --op conv, aspp or all, not {op!r}")
    wanted = [n for n in re.split(r",(?![^(]*\))", names) if n]  # commas inside "(6,12,18)" stay
    valid = ([s.name for s in bench_conv.SHAPES] if op in ("conv", "all") else []) + \
            ([s.name for s in bench_aspp.ASPP_SHAPES] if op in ("aspp", "all") else [])
    unknown = [n for n in wanted if n not in valid]
    if unknown or not wanted:
        raise SystemExit(f"fastaspp bench: --shapes expected comma-separated names from {', '.join(valid)}; "
                         f"got {names!r}")
    return lambda every, default: [s for s in every if s.name in wanted]


def cmd_bench(args: argparse.Namespace) -> int:
    import fastaspp
    from fastaspp.bench import aspp as bench_aspp
    from fastaspp.bench import conv as bench_conv
    from fastaspp.bench.report import fmt_ms, markdown, write_results
    from fastaspp.bench.timing import measure_peak_tflops

    device = resolve_device(args.device)
    threads = getattr(args, "threads", None)
    if threads is not None:
        torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype]
    gpu_full = device.type == "cuda" and not args.quick
    only = _bench_shape_filter(getattr(args, "shapes", None), args.op)
    batches = getattr(args, "batches", None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    def progress(r):
        print(f"  {r.kind} {r.shape} b{r.batch} [{r.backend}]: eager {fmt_ms(r.eager_ms)} ms, "
              f"fused {fmt_ms(r.fused_ms)} ms, {r.speedup:.2f}x"
              + (f", compiled {fmt_ms(r.compiled_ms)} ms" if r.compiled_ms else ""), flush=True)
    peak = measure_peak_tflops(device, dtype)
    print(f"peak: {peak:.2f} TFLOP/s ({args.dtype} matmul on {device})")
    rows = []
    for backend in _bench_backends(args.backend, device):
        with fastaspp.backend(backend):
            if args.op in ("conv", "all"):
                print(f"fused conv+BN+ReLU vs eager ({device}, {args.dtype}, channels_last, eval, backend {backend})")
                shapes = only(bench_conv.SHAPES, bench_conv.QUICK_SHAPES if args.quick else bench_conv.SHAPES)
                rows += bench_conv.run(shapes, batches or ([1, 8] if gpu_full else [1]), dtype, device, backend,
                                       args.compile, reps=5 if args.quick else 10, progress=progress)
            if args.op in ("aspp", "all"):
                print(f"fastaspp.nn.ASPP vs the eager reference ASPP ({device}, {args.dtype}, channels_last, "
                      f"backend {backend})")
                shapes = only(bench_aspp.ASPP_SHAPES,
                              bench_aspp.ASPP_SHAPES if gpu_full else bench_aspp.ASPP_SHAPES[:1])
                modes = ["eval"] if args.quick else ["eval", "train"]
                rows += bench_aspp.run(shapes, batches or ([1, 8, 16] if gpu_full else [1]), modes, dtype, device,
                                       args.compile, progress)
            if args.op == "model":
                from fastaspp.bench import models as bench_models

                cases = (bench_models.GPU_MODEL_CASES if gpu_full else
                         bench_models.MODEL_CASES[:1] if args.quick else bench_models.MODEL_CASES)
                print(f"whole models, fused vs plain PyTorch ({device}, {args.dtype}, channels_last, eval at "
                      f"513x513, training steps at {bench_models.TRAIN_CROP}x{bench_models.TRAIN_CROP}, "
                      f"backend {backend})")
                rows += bench_models.run(cases, [8, 16] if gpu_full else [1], ["eval"] if args.quick else
                                         ["eval", "train"], dtype, device, 513, args.compile, progress,
                                         cuda_graphs=device.type == "cuda")
                if device.type == "cpu" and not args.quick:
                    for case in (c for c in cases if c.label in bench_models.MODEL_MULTISCALE_LABELS):
                        rows.append(bench_models.measure_multiscale(case, dtype, device))
                        progress(rows[-1])
            if args.op == "overhead":
                from fastaspp.bench import models as bench_models
                from fastaspp.bench import overhead as bench_overhead

                print(f"fixed cost per call: fused vs eager at tiny inputs ({device}, {args.dtype}, channels_last, "
                      f"{torch.get_num_threads()} threads, backend {backend})")
                names = bench_models.MODEL_NAMES[-1:] if args.quick else bench_models.MODEL_NAMES
                rows += bench_overhead.run(dtype, device, names, bench_overhead.MODEL_SIZES[:1] if args.quick
                                           else bench_overhead.MODEL_SIZES, progress=progress,
                                           mid_convs=bench_overhead.MID_CONVS[:1] if args.quick
                                           else bench_overhead.MID_CONVS)
    print()
    print(markdown(rows, peak))
    if args.out:
        command = ("fastaspp " + " ".join(map(_portable_path, sys.argv[1:])) if sys.argv[1:2] == ["bench"]
                   else f"fastaspp bench {vars(args)}")
        for path in write_results(args.out, args.op, device, args.dtype, rows, peak, command):
            print(f"wrote {path}")
    return 0


def _number(kind, low, what: str, above: bool = False):
    """An argparse type: a finite `kind` number >= low (> low if `above`); `what` says so in the error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > low if above else value >= low) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, 1, "an int >= 1")
_nonnegative_int = _number(int, 0, "an int >= 0")
_positive_float = _number(float, 0.0, "a number > 0", above=True)
_nonnegative_float = _number(float, 0.0, "a number >= 0")


def _int_list(text: str) -> tuple:
    return tuple(_number(int, 1, "comma-separated ints >= 1 such as 1,2,4")(v) for v in text.split(","))


def _float_list(text: str) -> tuple:
    return tuple(_number(float, 0.0, "comma-separated numbers > 0 such as 0.5,1.0,1.5", above=True)(v)
                 for v in text.split(","))


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _portable_path(arg: str) -> str:
    """arg, relative to the working directory when it is an absolute path below it: result files
    record their command, and a committed one must not name this machine's directories."""
    if os.path.isabs(arg):
        relative = os.path.relpath(arg)
        if not relative.startswith(os.pardir):
            return relative
    return arg


def _resume_command(argv: list, checkpoint: str) -> str:
    """The train command line that continues this run: the same arguments, resuming `checkpoint`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume=") and arg != "--overwrite":
            kept.append(arg)
    return shlex.join(["fastaspp", *kept, "--resume", checkpoint])


def cmd_train(args: argparse.Namespace) -> int:
    from fastaspp.train import TrainConfig, train

    cfg = TrainConfig(model=args.model, dataset=args.dataset, data_root=args.data_root, iters=args.iters,
                      batch_size=args.batch_size, crop=args.crop, lr=args.lr, output_stride=args.output_stride,
                      multi_grid=args.multi_grid, aux_weight=args.aux_weight, amp=args.amp, backend=args.backend,
                      device=args.device, out=args.out, resume=args.resume, seed=args.seed, workers=args.workers,
                      save_every=args.save_every, bn_recalibration=args.bn_recalibration, overwrite=args.overwrite,
                      allow_config_change=args.allow_config_change)
    result = train(cfg)
    if _rank0():
        print(f"trained to step {result['step']}, last loss {result['loss']:.4f}; checkpoint {result['checkpoint']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fastaspp.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.dataset, args.data_root, args.device, args.out, args.scales,
                                 args.flip, args.backend, args.split, args.overlays, args.limit, progress=True)
    print(f"mIoU {result['mIoU']:.4f}, pixel accuracy {result['pixel_acc']:.4f} over {result['images']} images "
          f"(scales {result['scales']}, flip {result['flip']}); wrote {os.path.join(args.out, 'eval.json')}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fastaspp.evaluate import predict_images

    for path in predict_images(args.checkpoint, args.images, args.out, args.device, args.backend):
        print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: fused ops checked against the reference, a model trained on the
    embedded synthetic data and evaluated, an overlay saved, and a short speed table."""
    import fastaspp
    from fastaspp.evaluate import evaluate_checkpoint
    from fastaspp.train import TrainConfig, train

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    print(f"fastaspp {fastaspp.__version__}: backends here {fastaspp.backends()}, "
          f"{device} tensors run on '{fastaspp.resolve_backend(device)}'")
    t0 = time.perf_counter()
    err = _check_against_reference(device)
    print(f"1. fused atrous conv+BN+ReLU (forward, backward) and fused ASPP (eval) vs reference: "
          f"max relative error {err:.2e}")
    if err > 1e-4:
        print("fastaspp demo: the fused op disagrees with the reference", file=sys.stderr)
        return 1
    iters = (400 if gpu else 150) if args.iters is None else args.iters
    cfg = TrainConfig(model="deeplabv3_mobilenet_v3_large", dataset="synthetic", iters=iters,
                      batch_size=16 if gpu else 8, crop=257 if gpu else 129, device=args.device, out=args.out,
                      save_every=10**9, seed=0, overwrite=True)
    print(f"2. training {cfg.model} (fused) on the synthetic scenes: {cfg.iters} iterations, batch {cfg.batch_size}, "
          f"crop {cfg.crop}")
    train(cfg)
    result = evaluate_checkpoint(os.path.join(cfg.out, "last.pt"), "synthetic", None, args.device,
                                 os.path.join(cfg.out, "eval"), overlays=1, progress=True)
    print(f"3. val mIoU {result['mIoU']:.3f}, pixel accuracy {result['pixel_acc']:.3f} "
          f"({result['images']} images); overlay: {result['overlays'][0]}")
    print("4. speed, fused against eager:")
    bench_args = argparse.Namespace(device=args.device, dtype="bfloat16" if gpu else "float32", quick=True,
                                    backend="auto", out=None, op="conv" if not gpu else "all", compile=False)
    code = cmd_bench(bench_args)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return code


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (options without a default say nothing)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    import fastaspp
    from fastaspp.train import MODELS

    parser = argparse.ArgumentParser(prog="fastaspp", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastaspp {fastaspp.__version__} "
                        f"(torch {torch.__version__})")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=_HelpFormatter)

    def backend_option(p: argparse.ArgumentParser, extra: str = "") -> None:
        p.add_argument("--backend", default="auto", help=f"fastaspp backend: auto, cpu, triton or cuda{extra}")

    def device_option(p: argparse.ArgumentParser, **kwargs) -> None:
        p.add_argument("--device", choices=["cpu", "cuda"], help="where the model runs", **kwargs)

    demo = command("demo", "check the fused ops, train and evaluate on synthetic data, time against eager")
    device_option(demo, default=default_device)
    demo.add_argument("--iters", type=_positive_int, default=None,
                      help="training iterations (default 150 on CPU, 400 on GPU)")
    demo.add_argument("--out", default="fastaspp-demo",
                      help="directory for the checkpoint, eval.json and overlay (replaced on each run)")
    demo.set_defaults(func=cmd_demo)

    train = command("train", "train a DeepLabV3 model (the paper's protocol)")
    train.add_argument("--model", choices=sorted(MODELS), required=True, help="the architecture")
    train.add_argument("--dataset", choices=["synthetic", "voc", "folder"], required=True, help="the training data")
    train.add_argument("--data-root", help="dataset directory (voc, folder)")
    train.add_argument("--iters", type=_positive_int, required=True, help="training steps")
    train.add_argument("--batch-size", type=_positive_int, required=True, help="global batch (split across processes)")
    train.add_argument("--crop", type=_positive_int, required=True,
                       help="training crop size in pixels (at least 2 x output stride + 1)")
    train.add_argument("--lr", type=_positive_float, default=0.007, help="base learning rate of the poly schedule")
    train.add_argument("--output-stride", type=int, choices=[8, 16], default=None,
                       help="default: the model's (8 for ResNets, 16 for MobileNetV3)")
    train.add_argument("--multi-grid", type=_int_list, default=None, help="unit rates of layer4, e.g. 1,2,4")
    train.add_argument("--aux-weight", type=_nonnegative_float, default=0.0,
                       help="> 0 trains the aux head with this loss weight")
    train.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    backend_option(train)
    device_option(train, required=True)
    train.add_argument("--out", required=True,
                       help="directory for last.pt and metrics.jsonl: new or empty, unless --resume or --overwrite")
    train.add_argument("--resume", help="a last.pt to continue from, with the configuration it was saved with")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume although --iters, --lr, --crop, ... differ from the checkpoint's")
    train.add_argument("--seed", type=_nonnegative_int, default=0, help="seeds the weights, data order and crops")
    train.add_argument("--workers", type=_nonnegative_int, default=0, help="DataLoader worker processes")
    train.add_argument("--save-every", type=_positive_int, default=50,
                       help="checkpoint every N iterations (and at the end, and on Ctrl-C)")
    train.add_argument("--bn-recalibration", type=_nonnegative_int, default=20,
                       help="batches for re-estimating BN running statistics after the last step (0: off)")
    train.set_defaults(func=cmd_train)

    evaluate = command("eval", "mIoU of a checkpoint on a dataset split")
    evaluate.add_argument("--checkpoint", required=True, help="a last.pt from fastaspp train")
    evaluate.add_argument("--dataset", choices=["synthetic", "voc", "folder"], required=True, help="the data")
    evaluate.add_argument("--data-root", help="dataset directory (voc, folder)")
    evaluate.add_argument("--split", default="val", help="the split to evaluate")
    evaluate.add_argument("--scales", type=_float_list, default="1.0",
                          help="input scales whose class probabilities are averaged, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
    evaluate.add_argument("--flip", action="store_true", help="also average the mirrored input")
    device_option(evaluate, default=default_device)
    backend_option(evaluate)
    evaluate.add_argument("--overlays", type=_nonnegative_int, default=4, help="overlay PNGs to write")
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N images")
    evaluate.add_argument("--out", required=True, help="directory for eval.json and the overlays")
    evaluate.set_defaults(func=cmd_eval)

    predict = command("predict", "segment image files: VOC-palette masks and overlays")
    predict.add_argument("--checkpoint", required=True, help="a last.pt from fastaspp train")
    predict.add_argument("images", nargs="+", help="image files, or directories of them")
    predict.add_argument("--out", required=True, help="directory for <name>_mask.png and <name>_overlay.png")
    device_option(predict, default=default_device)
    backend_option(predict)
    predict.set_defaults(func=cmd_predict)

    bench = command("bench", "benchmark fused conv+BN+ReLU and ASPP against eager PyTorch")
    bench.add_argument("--op", choices=["conv", "aspp", "model", "overhead", "all"], default="all",
                       help="all = conv and aspp; model (whole DeepLabV3s at 513x513) and overhead (the fixed cost per "
                            "call: tiny inputs, eval and train) are run on their own")
    bench.add_argument("--compile", action="store_true",
                       help="also time torch.compile of the eager modules (max-autotune on GPU)")
    device_option(bench, default=default_device)
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tensor dtype")
    backend_option(bench, ", or all (each usable one)")
    bench.add_argument("--quick", action="store_true", help="a few shapes at batch 1")
    bench.add_argument("--shapes", default=None,
                       help="comma-separated shape names to time instead of the default set (conv: aspp-33-r6 ... "
                            "backbone-512-d4; aspp: aspp-33-(6,12,18), aspp-65-(12,24,36))")
    bench.add_argument("--batches", type=_int_list, default=None,
                       help="comma-separated batch sizes for conv and aspp (default: 1,8 for conv and 1,8,16 for "
                            "aspp on GPU, 1 on CPU)")
    bench.add_argument("--out", help="directory for the JSON, markdown and PNG results")
    bench.add_argument("--threads", type=_positive_int, default=None,
                       help="torch threads for the run (default: torch's)")
    bench.set_defaults(func=cmd_bench)
    return parser


def _first_line(error: BaseException) -> str:
    return " ".join(str(error).split("\n")[0].split()) or type(error).__name__


# Errors that carry a message meant for the user (kept whole: a dataset check lists its problems one a
# line below the summary); anything else is reported by its type and first line.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError)


def main(argv=None) -> int:
    """Runs a command; an error prints `fastaspp <command>: <what is wrong>` and returns 1 (2 for bad
    arguments, from argparse), with the traceback only under --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from fastaspp.checkpoint import CheckpointError
    from fastaspp.train import TrainingInterrupted

    try:
        return args.func(args)
    except TrainingInterrupted as stop:
        if _rank0():
            resume = f" Resume with: {_resume_command(argv, stop.checkpoint)}" if args.command == "train" else ""
            print(f"fastaspp {args.command}: {stop}.{resume}", file=sys.stderr)
        return 128 + signal.Signals[stop.signal_name].value
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"fastaspp {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, _USER_ERRORS + (CheckpointError,)):
            message = str(error).strip() or type(error).__name__
        else:
            message = f"{type(error).__name__}: {_first_line(error)} (run with --debug for the traceback)"
        print(f"fastaspp {args.command}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
