"""The cuda conv kernels' tiling (csrc/common/conv_tiling.h), run on the host through
torch.ops.fastaspp._conv_patch_taps: the patches of a dst map (for the input gradient of a strided
conv, of each stride phase's sub-map) and the taps each CTA visits, checked by brute force over
pixels and against fastaspp.geometry, on CPU-only machines too.

A CTA must visit every tap that feeds one of its patch's pixels (else the result is wrong) and
should skip every other (else it does dead work); both are exact here, so equality is the test.
"""
import itertools

import pytest
import torch

from fastaspp.geometry import conv_out_size, tap_live_range

import fastaspp  # noqa: F401  (loads the extension's ops)

# (input h, w), (kernel h, w), stride, padding, dilation: the ASPP's and the backbone's geometries,
# then strided, uneven and degenerate ones.
CASES = [
    ((33, 33), (3, 3), (1, 1), (6, 6), (6, 6)),
    ((33, 33), (3, 3), (1, 1), (18, 18), (18, 18)),
    ((65, 65), (3, 3), (1, 1), (36, 36), (36, 36)),
    ((65, 65), (3, 3), (1, 1), (2, 2), (2, 2)),
    ((65, 65), (1, 1), (1, 1), (0, 0), (1, 1)),
    ((17, 15), (3, 3), (2, 2), (1, 1), (1, 1)),
    ((40, 23), (7, 7), (2, 2), (3, 3), (1, 1)),
    ((21, 30), (3, 3), (2, 3), (4, 2), (2, 3)),
    ((9, 50), (1, 3), (1, 1), (0, 5), (1, 5)),
    ((5, 3), (5, 3), (1, 2), (7, 1), (4, 1)),
    ((1, 1), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 100), (3, 3), (1, 1), (12, 12), (12, 12)),
]


def patch_taps(src_hw, dst_hw, kernel, stride, padding, dilation, dgrad):
    return torch.ops.fastaspp._conv_patch_taps(*src_hw, *dst_hw, *kernel, list(stride), list(padding),
                                               list(dilation), dgrad)


def reads(i_dst, k, src_size, dst_size, s, p, d, dgrad):
    """Whether dst coordinate i_dst gets a term from tap k along one axis, by enumeration: forward,
    output i_dst reads input i_dst*s + k*d - p; dgrad, input i_dst receives from every output o
    with o*s + k*d - p = i_dst."""
    if not dgrad:
        return 0 <= i_dst * s + k * d - p < src_size
    return any(o * s + k * d - p == i_dst for o in range(src_size))


def shapes(dst_hw):
    """(rows, cols) of the least-area 64-pixel patch, ties to the squarest (the kernels' order)."""
    h, w = dst_hw
    best = None
    for lg in (3, 4, 2, 5, 1, 6, 0):
        rows, cols = 64 >> lg, 1 << lg
        area = -(-h // rows) * rows * (-(-w // cols) * cols)
        if best is None or area < best[0]:
            best = (area, rows, cols)
    return best[1:]


@pytest.mark.parametrize("dgrad", [False, True], ids=["forward", "dgrad"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_patches_cover_the_map_and_visit_exactly_the_live_taps(case, dgrad):
    (h, w), (kh, kw), stride, padding, dilation = case
    out_hw = tuple(conv_out_size(size, k, s, p, d) for size, k, s, p, d in zip((h, w), (kh, kw), stride, padding,
                                                                               dilation))
    src_hw, dst_hw = (out_hw, (h, w)) if dgrad else ((h, w), out_hw)
    table = patch_taps(src_hw, dst_hw, (kh, kw), stride, padding, dilation, dgrad)
    # The input gradient tiles each stride phase's sub-map apart, on the grid of the largest.
    phases = stride if dgrad else (1, 1)
    largest = tuple(-(-size // s) for size, s in zip(dst_hw, phases))
    rows, cols = shapes(largest)
    tiles_w = -(-largest[1] // cols)
    per_phase = -(-largest[0] // rows) * tiles_w
    assert table.shape == (phases[0] * phases[1] * per_phase, 6 + kh * kw)
    covered = torch.zeros(dst_hw, dtype=torch.long)
    for b, row in enumerate(table.tolist()):
        r0, r1, c0, c1, ph, pw = row[:6]
        phase, j = divmod(b, per_phase)
        assert (ph, pw) == divmod(phase, phases[1])  # phase-major, then row-major patches
        assert (r0, c0) == ((j // tiles_w) * rows, (j % tiles_w) * cols)
        sub_hw = (len(range(ph, dst_hw[0], phases[0])), len(range(pw, dst_hw[1], phases[1])))
        assert (r1, c1) == (min(r0 + rows, sub_hw[0]), min(c0 + cols, sub_hw[1]))
        pixel_rows = [ph + phases[0] * u for u in range(r0, r1)]
        pixel_cols = [pw + phases[1] * v for v in range(c0, c1)]
        for i in pixel_rows:
            covered[i, pixel_cols] += 1
        for a, c in itertools.product(range(kh), range(kw)):
            by_pixels = any(reads(i, a, src_hw[0], dst_hw[0], stride[0], padding[0], dilation[0], dgrad)
                            for i in pixel_rows) and \
                any(reads(j, c, src_hw[1], dst_hw[1], stride[1], padding[1], dilation[1], dgrad) for j in pixel_cols)
            assert row[6 + a * kw + c] == by_pixels, (b, a, c)
            if dgrad and by_pixels:  # a visited tap lines every pixel of the patch up with an output
                assert all((i + padding[0] - a * dilation[0]) % stride[0] == 0 for i in pixel_rows)
                assert all((j + padding[1] - c * dilation[1]) % stride[1] == 0 for j in pixel_cols)
            if not dgrad:  # the same from fastaspp.geometry's live output ranges
                lo_h, hi_h = tap_live_range(a, h, out_hw[0], stride[0], padding[0], dilation[0])
                lo_w, hi_w = tap_live_range(c, w, out_hw[1], stride[1], padding[1], dilation[1])
                assert by_pixels == (max(lo_h, r0) < min(hi_h, r1) and max(lo_w, c0) < min(hi_w, c1))
    assert torch.equal(covered, torch.ones_like(covered))  # every dst pixel in exactly one patch


def test_an_empty_map_has_no_patches():
    assert patch_taps((0, 5), (0, 5), (3, 3), (1, 1), (1, 1), (1, 1), False).shape == (0, 15)


@pytest.mark.parametrize("geometry", [dict(stride=(0, 1)), dict(padding=(-1, 0)), dict(dilation=(1, 0))],
                         ids=["stride", "padding", "dilation"])
def test_bad_geometry_is_refused(geometry):
    args = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1)) | geometry
    with pytest.raises(RuntimeError, match="stride >= 1, padding >= 0, dilation >= 1"):
        patch_taps((5, 5), (5, 5), (3, 3), args["stride"], args["padding"], args["dilation"], False)
