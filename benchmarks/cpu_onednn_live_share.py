"""oneDNN or the live-tap GEMMs for an fp32 conv with dead taps, forward and backward: the rule of
csrc/cpu/conv_paths.h.

For 3x3 convs at rates that leave between a fifth and all of the (pixel, tap) pairs live, it times
in one run, interleaved:
  forward (eval conv + BN + ReLU, batch 1): eager PyTorch, and fastaspp.nn.ConvBNReLU forced onto
    oneDNN with the fused epilogue and onto the live-tap GEMMs (Winograd off);
  backward (input and weight gradients, batch 2): eager autograd of the conv, and the cpu backend's
    one-call backward forced onto oneDNN's convolution_backward, onto the live-tap GEMMs, and by
    the default rule.
The rule should take, in each direction, the path that is faster at each live share. With
--thresholds it times instead convs of 64 to 512 channels on 5x5 to 65x65 maps at 27-65% live: where
the backward's threshold moves with the channel count (onednn_min_live_share).

    python benchmarks/cpu_onednn_live_share.py [--thresholds] [--threads 2] [--out benchmarks/results]
"""
import torch

import fastaspp  # noqa: F401  (registers the ops)
from fastaspp.bench.timing import alternate
from fastaspp.geometry import live_tap_pixels

from _crossover import conv_bn_relu_pair, parse_args, with_env, write_result

# (c_in, c_out, size, rate): the ASPP's 2048 -> 256 branches at output stride 16 and 8, and square
# convs at rates that kill most off-centre taps.
SHAPES = [(2048, 256, 33, 6), (2048, 256, 33, 12), (2048, 256, 33, 18), (2048, 256, 65, 12), (2048, 256, 65, 24),
          (2048, 256, 65, 36), (2048, 256, 17, 12), (512, 512, 33, 24), (256, 256, 65, 36), (256, 256, 33, 18),
          (256, 256, 17, 12), (256, 256, 33, 2), (128, 128, 33, 18), (128, 128, 33, 1)]
# (c_in, c_out, size, rate) around the backward's thresholds for narrow and wide convs: 64-160
# channels at 27-65% live, 192-512 channels at 50-65%.
THRESHOLD_SHAPES = [(64, 64, 33, 24), (64, 64, 33, 20), (128, 128, 9, 5), (128, 128, 17, 9), (64, 64, 17, 9),
                    (64, 64, 17, 8), (160, 160, 17, 8), (128, 128, 9, 4), (128, 128, 17, 7), (64, 64, 17, 6),
                    (128, 128, 17, 5), (192, 192, 9, 4), (256, 256, 9, 4), (256, 256, 5, 2), (256, 256, 65, 24),
                    (256, 256, 33, 12), (192, 192, 17, 6), (512, 512, 17, 6), (512, 512, 9, 3), (256, 256, 9, 3),
                    (192, 192, 9, 3), (256, 256, 33, 10), (512, 512, 17, 5)]
CPU = torch.device("cpu")


ONEDNN = {"FASTASPP_CPU_ONEDNN": "1", "FASTASPP_CPU_WINOGRAD": "0", "FASTASPP_CPU_DIRECT_MAX_MACS": "-1"}
GEMMS = {"FASTASPP_CPU_ONEDNN": "0", "FASTASPP_CPU_WINOGRAD": "0", "FASTASPP_CPU_DIRECT_MAX_MACS": "-1"}


def measure(c_in: int, c_out: int, size: int, rate: int, reps: int) -> dict:
    live, dense = live_tap_pixels((size, size), (3, 3), (1, 1), (rate, rate), (rate, rate))
    eager, fused, x = conv_bn_relu_pair(c_in, size, rate, c_out=c_out)
    with torch.no_grad():
        fwd = alternate([lambda: eager(x), with_env(ONEDNN, lambda: fused(x)), with_env(GEMMS, lambda: fused(x))],
                        CPU, warmup=1, reps=reps, rounds=2)
    gen = torch.Generator().manual_seed(1)
    xb = torch.randn(2, c_in, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = eager[0].weight.detach()
    grad = torch.randn(2, c_out, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    xe, we = xb.clone().requires_grad_(), weight.clone().requires_grad_()
    ye = torch.nn.functional.conv2d(xe, we, padding=rate, dilation=rate)
    geometry = ([1, 1], [rate, rate], [rate, rate])
    fused_backward = lambda: torch.ops.fastaspp._atrous_conv2d_backward(  # noqa: E731
        grad, xb, weight, None, None, None, *geometry, [True, True, False, False, False])
    bwd = alternate([lambda: torch.autograd.grad(ye, (xe, we), grad, retain_graph=True),
                     with_env(ONEDNN, fused_backward), with_env(GEMMS, fused_backward), fused_backward],
                    CPU, warmup=1, reps=reps, rounds=2)
    names = ("eager", "onednn", "gemms", "rule")  # rule: the default choice, the direct loops included
    return dict(c_in=c_in, c_out=c_out, size=size, rate=rate, live_share=live / dense,
                forward_ms={n: t.median_ms for n, t in zip(names, fwd)},
                backward_ms={n: t.median_ms for n, t in zip(names, bwd)})


def main() -> None:
    args = parse_args(__doc__, flags={"--thresholds": "time THRESHOLD_SHAPES instead"})
    rows = []
    for shape in THRESHOLD_SHAPES if args.thresholds else SHAPES:
        row = measure(*shape, args.reps)
        rows.append(row)
        f, b = row["forward_ms"], row["backward_ms"]
        print(f"{row['c_in']:4d}->{row['c_out']:<4d} {row['size']:3d}x{row['size']:<3d} r{row['rate']:<3d} "
              f"live {row['live_share']:.2f}  forward: eager {f['eager']:.2f} onednn {f['onednn']:.2f} "
              f"gemms {f['gemms']:.2f}  backward: eager {b['eager']:.2f} onednn {b['onednn']:.2f} "
              f"gemms {b['gemms']:.2f} rule {b['rule']:.2f} ms", flush=True)
    if args.out:
        write_result(args.out, "cpu-onednn-live-share-thresholds" if args.thresholds else "cpu-onednn-live-share",
                     {"rows": rows})


if __name__ == "__main__":
    main()
