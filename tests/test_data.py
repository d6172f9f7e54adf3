"""fastaspp.data: synthetic scenes, VOC and folder loaders, joint transforms, palette, overlays."""
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastaspp.data.base
from fastaspp.data import (IGNORE_INDEX, SYNTHETIC_CLASSES, VOC_PALETTE, EvalTransform, FolderSegmentation,
                           SyntheticScenes, TrainTransform, VOCSegmentation, build_dataset, collect_images, colorize,
                           colorize_rgb, denormalize, normalize, read_label)
from fastaspp.metrics import ConfusionMatrix
from fastaspp.visualize import overlay, save_overlay

# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_items_shapes_dtypes_and_values():
    ds = SyntheticScenes("train", size=8, image_size=(64, 80))
    assert len(ds) == 8 and ds.num_classes == len(SYNTHETIC_CLASSES) == 6
    image, label = ds[3]
    assert image.shape == (3, 64, 80) and image.dtype == torch.float32
    assert label.shape == (64, 80) and label.dtype == torch.int64
    raw, raw_label = ds.load(3)
    assert 0 <= raw.min() and raw.max() <= 1
    torch.testing.assert_close(image, normalize(raw))  # the default transform only normalises
    assert torch.equal(label, raw_label)
    assert set(label.unique().tolist()) <= set(range(6))


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = SyntheticScenes("train", size=4), SyntheticScenes("train", size=4)
    for i in range(4):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))
    assert not torch.equal(a[0][1], a[1][1])
    val = SyntheticScenes("val", size=4)
    other_seed = SyntheticScenes("train", size=4, seed=1)
    for i in range(4):
        assert not torch.equal(a[i][0], val[i][0])
        assert not torch.equal(a[i][0], other_seed[i][0])


def test_synthetic_covers_every_class_with_sizable_objects():
    ds = SyntheticScenes("val", size=40, num_classes=6)
    labels = torch.stack([ds.load(i)[1] for i in range(len(ds))])
    share = torch.bincount(labels.flatten(), minlength=6).double() / labels.numel()
    assert (share[1:] > 0.03).all(), share  # every shape class is well represented
    assert 0.4 < share[0] < 0.85, share  # and so is the background
    fewer = SyntheticScenes("val", size=10, num_classes=3)
    assert fewer.classes == SYNTHETIC_CLASSES[:3]
    assert set(torch.stack([fewer.load(i)[1] for i in range(10)]).unique().tolist()) == {0, 1, 2}


def test_synthetic_is_fast():
    ds = SyntheticScenes("train", size=60, image_size=129)
    times = []
    for i in range(60):
        start = time.perf_counter()
        ds.load(i)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.010, f"median {np.median(times) * 1e3:.1f} ms per 129x129 scene"


@pytest.mark.parametrize("kwargs,message", [
    (dict(split="test"), "split must be one of"),
    (dict(num_classes=7), "num_classes must be in 2..6"),
    (dict(num_classes=1), "num_classes must be in 2..6"),
    (dict(image_size=8), "image_size must be"),
    (dict(size=0), "size must be a positive"),
])
def test_synthetic_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticScenes(**kwargs)


def _train_tiny_net(conv_kernel: int, steps: int = 100, seed: int = 0) -> float:
    """Train a 3-layer conv net on synthetic train crops; mIoU on 32 val scenes."""
    torch.manual_seed(seed)
    train = SyntheticScenes("train", size=steps * 8, image_size=65, transform=TrainTransform(65, (0.75, 1.25)))
    val = SyntheticScenes("val", size=32, image_size=65)
    k, c = conv_kernel, 6
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, k, padding=k // 2), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, k, padding=2 * (k // 2), dilation=2), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, c, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    for image, label in loader:
        loss = F.cross_entropy(net(image), label, ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    cm = ConfusionMatrix(c)
    with torch.no_grad():
        for image, label in torch.utils.data.DataLoader(val, batch_size=16):
            cm.update(net(image).argmax(1), label)
    return cm.miou()


def test_synthetic_is_learnable_by_a_tiny_conv_net():
    """Evidence of learnability: 100 steps of a 3-layer conv net score far above chance (measured
    mIoU 0.96; always predicting background scores about 0.48 / 6 = 0.08), and above the same net
    with 1x1 convolutions, which sees single pixels (measured 0.79): colour alone is not enough."""
    conv = _train_tiny_net(conv_kernel=3)
    pixel = _train_tiny_net(conv_kernel=1)
    assert conv > 0.85, f"3x3 conv net mIoU {conv:.3f}"
    assert conv > pixel + 0.08, f"3x3 conv net mIoU {conv:.3f} vs per-pixel net {pixel:.3f}"


# ---------------------------------------------------------------------------------------------- transforms


def _pair(height=24, width=32):
    """An image whose red channel encodes its label (label / 10), so registration can be checked."""
    label = torch.zeros(height, width, dtype=torch.int64)
    label[4:16, 6:20] = 1
    label[10:22, 22:30] = 2
    image = torch.stack([label.float() / 10, torch.linspace(0, 1, width).expand(height, width),
                         torch.full((height, width), 0.5)])
    return image, label


def test_train_transform_is_deterministic_given_a_generator():
    image, label = _pair()
    t = TrainTransform(20)
    a = t(image, label, generator=torch.Generator().manual_seed(5))
    b = t(image, label, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outs = [t(image, label, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    assert len({o[0].sum().item() for o in outs}) > 1
    for out_image, out_label in outs:
        assert out_image.shape == (3, 20, 20) and out_label.shape == (20, 20) and out_label.dtype == torch.int64


def test_crop_pads_label_with_ignore_and_image_with_zero_after_normalisation():
    image, label = _pair(24, 32)
    t = TrainTransform((40, 48), scale_range=(1.0, 1.0), flip=False)
    out_image, out_label = t(image, label, generator=torch.Generator().manual_seed(0))
    # The image is smaller than the crop: it sits at the top left, the rest is padding.
    assert torch.equal(out_label[:24, :32], label)
    assert (out_label[24:] == IGNORE_INDEX).all() and (out_label[:, 32:] == IGNORE_INDEX).all()
    torch.testing.assert_close(out_image[:, :24, :32], normalize(image))
    assert (out_image[:, 24:] == 0).all() and (out_image[:, :, 32:] == 0).all()
    torch.testing.assert_close(denormalize(out_image[:, 30:, 40:]),
                               torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1).expand(3, 10, 8))


def test_flip_flips_image_and_label_together():
    image, label = _pair()
    t = TrainTransform((24, 32), scale_range=(1.0, 1.0))
    flipped = 0
    for seed in range(16):
        out_image, out_label = t(image, label, generator=torch.Generator().manual_seed(seed))
        is_flipped = torch.equal(out_label, label.flip(-1))
        assert is_flipped or torch.equal(out_label, label)
        want = image.flip(-1) if is_flipped else image
        torch.testing.assert_close(out_image, normalize(want))
        flipped += is_flipped
    assert 3 <= flipped <= 13  # about half of the draws


def test_random_scale_stays_in_range_and_keeps_labels_registered():
    image, label = _pair(20, 20)
    t = TrainTransform(48, scale_range=(0.5, 2.0), flip=False)  # the crop holds the whole scaled image
    sides = []
    for seed in range(40):
        out_image, out_label = t(image, label, generator=torch.Generator().manual_seed(seed))
        valid = out_label != IGNORE_INDEX
        rows, cols = valid.any(1).sum().item(), valid.any(0).sum().item()
        assert rows == cols and 10 <= rows <= 40
        sides.append(rows)
        assert set(out_label[valid].unique().tolist()) <= {0, 1, 2}  # nearest: no blended labels
        # Away from edges, the bilinear image and the nearest label agree (red channel = label / 10).
        red = denormalize(out_image)[0]
        interior = valid & (F.max_pool2d(out_label[None, None].float(), 3, 1, 1)[0, 0]
                            == -F.max_pool2d(-out_label[None, None].float(), 3, 1, 1)[0, 0])
        torch.testing.assert_close(red[interior], out_label[interior].float() / 10, atol=1e-4, rtol=0)
    assert min(sides) < 15 and max(sides) > 34  # the draws span the range


def test_eval_transform_only_normalises():
    image, label = _pair()
    out_image, out_label = EvalTransform()(image, label)
    torch.testing.assert_close(out_image, normalize(image))
    assert torch.equal(out_label, label)
    torch.testing.assert_close(denormalize(out_image), image)


@pytest.mark.parametrize("kwargs,message", [
    (dict(crop_size=0), "crop_size must be a positive int"),
    (dict(crop_size=(3,)), "crop_size must be a positive int"),
    (dict(crop_size=9, scale_range=(2.0, 0.5)), "scale_range must be"),
])
def test_train_transform_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainTransform(**kwargs)


def test_transform_input_errors():
    image, label = _pair()
    with pytest.raises(ValueError, match="label must be an int64"):
        EvalTransform()(image, label.int())
    with pytest.raises(ValueError, match=r"image must be a float \[3, H, W\]"):
        TrainTransform(8)(image[:2], label)


def test_dataset_augmentation_depends_on_seed_epoch_and_index_only():
    ds = SyntheticScenes("train", size=6, transform=TrainTransform(48))
    first = [ds[i] for i in range(6)]
    again = [ds[i] for i in reversed(range(6))][::-1]  # another order: same samples
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], first[0][0])  # a new epoch, new crops of the same scenes
    ds.set_epoch(0)
    assert torch.equal(ds[0][0], first[0][0])


def test_dataloader_workers_do_not_change_the_batches():
    ds = SyntheticScenes("train", size=8, image_size=48, transform=TrainTransform(32))
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers)
        batches.append([b for b in loader])
    for (a_img, a_lab), (b_img, b_lab) in zip(*batches):
        assert torch.equal(a_lab, b_lab)
        # Workers run torch single-threaded, which can change the last bit of a resize.
        torch.testing.assert_close(a_img, b_img, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- VOC


def _write_image(path, height, width, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _voc_label(height, width, cls):
    label = np.zeros((height, width), dtype=np.uint8)
    label[2:height - 2, 3:width - 3] = cls
    label[0] = 255  # an ignored boundary
    return label


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i, (name, cls) in enumerate([("2007_000001", 15), ("2007_000002", 7), ("2007_000003", 20)]):
        _write_image(root / "JPEGImages" / f"{name}.jpg", 12, 16, i)
        colorize(_voc_label(12, 16, cls)).save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2007_000002\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000003\n")
    return root


def test_voc_reads_palette_indices_and_splits(voc_root):
    train = build_dataset("voc", str(voc_root), "train")
    val = build_dataset("voc", str(voc_root), "val")
    assert isinstance(train, VOCSegmentation) and len(train) == 2 and len(val) == 1 and train.num_classes == 21
    image, label = train[0]
    assert image.shape == (3, 12, 16) and image.dtype == torch.float32
    assert torch.equal(label, torch.from_numpy(_voc_label(12, 16, 15).astype(np.int64)))
    assert set(val[0][1].unique().tolist()) == {0, 20, 255}
    # The JPEG decodes to (about: it is lossy) the pixels written.
    raw, _ = train.load(0)
    want = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    assert abs(raw.permute(1, 2, 0).mean().item() * 255 - want.mean()) < 8


def test_voc_prefers_segmentation_class_aug_and_train_aug(voc_root):
    aug = voc_root / "SegmentationClassAug"
    aug.mkdir()
    for name in ("2007_000001", "2007_000002", "2007_000003"):
        Image.fromarray(_voc_label(12, 16, 3)).save(aug / f"{name}.png")  # greyscale, as SBD's are
    (voc_root / "ImageSets/Segmentation/train_aug.txt").write_text("2007_000001\n2007_000002\n2007_000003\n")
    train = VOCSegmentation(str(voc_root), "train")
    assert len(train) == 3 and train.label_dir == str(aug)
    assert set(train[2][1].unique().tolist()) == {0, 3, 255}
    assert len(VOCSegmentation(str(voc_root), "val")) == 1  # val keeps val.txt


def test_voc_errors_name_what_is_missing(voc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC root: directory .*nowhere does not exist"):
        VOCSegmentation(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError,
                       match=r"VOC split 'test': list file .*test.txt does not exist "
                             r"\(splits there: \['train', 'val'\]"):
        VOCSegmentation(str(voc_root), "test")
    # Files broken after construction are still caught, naming the file, when loaded.
    val = VOCSegmentation(str(voc_root), "val")
    colorize(_voc_label(12, 16, 30)).save(voc_root / "SegmentationClass" / "2007_000003.png")
    with pytest.raises(ValueError, match=r"2007_000003.png holds values \[30\], outside 0..20"):
        val[0]
    Image.new("RGB", (16, 12)).save(voc_root / "SegmentationClass" / "2007_000003.png")
    with pytest.raises(ValueError, match="has mode RGB; expected a single-channel PNG"):
        val[0]
    Image.new("P", (15, 12)).save(voc_root / "SegmentationClass" / "2007_000003.png")
    with pytest.raises(ValueError, match=r"is \(12, 16\) \(H, W\) but its label .* is \(12, 15\)"):
        val[0]
    for sub in ("ImageSets/Segmentation", "SegmentationClass", "JPEGImages"):
        os.rename(voc_root / sub, voc_root / f"{sub}.moved")
        with pytest.raises(FileNotFoundError, match=f"directory .*VOC2012/{sub} does not exist"):
            VOCSegmentation(str(voc_root))
        os.rename(voc_root / f"{sub}.moved", voc_root / sub)


def test_voc_lists_every_missing_file_at_construction(voc_root):
    ids = ["2007_000001", "2007_000003"] + [f"2008_{i:06d}" for i in range(12)]
    (voc_root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    os.remove(voc_root / "SegmentationClass" / "2007_000003.png")
    _write_image(voc_root / "JPEGImages" / "2008_000005.jpg", 12, 16, 0)
    with pytest.raises(FileNotFoundError,
                       match=r"VOC split 'val': 13 of the 14 ids listed in .*val.txt lack an image "
                             r".*JPEGImages/<id>.jpg or a label .*SegmentationClass/<id>.png: "
                             r"2007_000003 \(label\), 2008_000000 \(image and label\), .*"
                             r"2008_000005 \(label\), .* and 3 more$"):
        VOCSegmentation(str(voc_root), "val")


def test_voc_checks_file_headers_at_construction_and_records_sizes(voc_root):
    (voc_root / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n2007_000003\n")
    _write_image(voc_root / "JPEGImages" / "2007_000002.jpg", 20, 30, 5)
    colorize(_voc_label(20, 30, 7)).save(voc_root / "SegmentationClass" / "2007_000002.png")
    val = VOCSegmentation(str(voc_root), "val")
    assert val.image_sizes == [(12, 16), (20, 30), (12, 16)]
    assert val.max_image_pixels == 600 and val.max_image_size == (20, 30)
    (voc_root / "JPEGImages" / "2007_000001.jpg").write_text("not a JPEG")
    Image.new("RGB", (16, 12)).save(voc_root / "SegmentationClass" / "2007_000002.png")  # also the wrong size
    Image.new("P", (15, 12)).save(voc_root / "SegmentationClass" / "2007_000003.png")
    with pytest.raises(ValueError) as error:
        VOCSegmentation(str(voc_root), "val")
    lines = str(error.value).splitlines()
    assert lines[0] == "VOC split 'val': 4 problem(s) in 3 samples:", lines
    assert lines[1].endswith("JPEGImages/2007_000001.jpg is not an image (PIL cannot identify its format)")
    assert "SegmentationClass/2007_000002.png has mode RGB; expected a single-channel PNG" in lines[2]
    assert lines[3].endswith("2007_000002.jpg is (20, 30) (H, W) but its label "
                             f"{voc_root}/SegmentationClass/2007_000002.png is (12, 16)")
    assert lines[4].endswith("2007_000003.jpg is (12, 16) (H, W) but its label "
                             f"{voc_root}/SegmentationClass/2007_000003.png is (12, 15)")
    assert len(lines) == 5



# ---------------------------------------------------------------------------------------------- folder


def _folder(root, stems, classes=(1, 2), image_ext=".png"):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, stem in enumerate(stems):
        _write_image(root / "images" / f"{stem}{image_ext}", 10, 14, i)
        Image.fromarray(_voc_label(10, 14, classes[i % len(classes)])).save(root / "masks" / f"{stem}.png")
    return root


def test_folder_pairs_by_stem_and_scans_num_classes(tmp_path):
    root = _folder(tmp_path / "data", ["b", "a", "c"], classes=(1, 4))
    ds = build_dataset("folder", str(root), "train")
    assert isinstance(ds, FolderSegmentation) and len(ds) == 3
    assert ds.num_classes == 5 and ds.classes == ("0", "1", "2", "3", "4")  # max index 4 (255 ignored)
    image, label = ds[0]  # sorted by stem: "a"
    assert image.shape == (3, 10, 14) and torch.equal(label, torch.from_numpy(_voc_label(10, 14, 4).astype(np.int64)))
    raw, _ = ds.load(0)  # PNG is lossless
    want = np.random.default_rng(1).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    assert torch.equal((raw * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(want))
    named = FolderSegmentation(str(root), classes=["bg", "x", "y", "z", "w", "v"])
    assert named.num_classes == 6 and named.classes[1] == "x"
    with pytest.raises(ValueError, match=r"label .*\.png holds values \[4\], outside 0..2"):
        FolderSegmentation(str(root), num_classes=3)[0]


def test_folder_uses_split_subdirectory_when_present(tmp_path):
    _folder(tmp_path / "train", ["a", "b"])
    _folder(tmp_path / "val", ["c"], image_ext=".jpg")
    assert len(build_dataset("folder", str(tmp_path), "train", num_classes=3)) == 2
    assert len(build_dataset("folder", str(tmp_path), "val", num_classes=3)) == 1


def test_folder_errors_name_unmatched_files(tmp_path):
    root = _folder(tmp_path / "data", ["a", "b", "c"])
    os.remove(root / "masks" / "b.png")
    Image.new("L", (14, 10)).save(root / "masks" / "zzz.png")
    with pytest.raises(ValueError, match=r"images without a mask in .*masks: b\.png; "
                                         r"masks without an image in .*images: zzz\.png"):
        FolderSegmentation(str(root))
    with pytest.raises(FileNotFoundError, match="folder dataset masks: directory .*nowhere/masks does not exist"):
        (tmp_path / "nowhere" / "images").mkdir(parents=True)
        FolderSegmentation(str(tmp_path / "nowhere"))


def test_folder_checks_every_file_header_at_construction(tmp_path):
    root = _folder(tmp_path / "data", ["a", "b", "c", "d", "e"], image_ext=".jpg")
    (root / "images" / "a.jpg").write_text("text saved as a.jpg")
    Image.new("RGB", (14, 10)).save(root / "masks" / "b.png")
    Image.new("L", (14, 11)).save(root / "masks" / "c.png")
    (root / "masks" / "d.png").write_bytes(b"\x89PNG but not really")
    # num_classes given: no mask is decoded for the class scan, the header checks alone must fail.
    with pytest.raises(ValueError) as error:
        FolderSegmentation(str(root), num_classes=3)
    lines = str(error.value).splitlines()
    assert lines[0] == f"folder dataset {root}: 4 problem(s) in 5 samples:"
    assert lines[1:] == [
        f"  {root}/images/a.jpg is not an image (PIL cannot identify its format)",
        f"  label {root}/masks/b.png has mode RGB; expected a single-channel PNG of class indices "
        f"(mode P, L, I, I;16)",
        f"  image {root}/images/c.jpg is (10, 14) (H, W) but its label {root}/masks/c.png is (11, 14)",
        f"  {root}/masks/d.png is not an image (PIL cannot identify its format)"]


def test_folder_lists_ten_problems_and_counts_the_rest(tmp_path):
    stems = [f"s{i:02d}" for i in range(13)]
    root = _folder(tmp_path / "data", stems)
    for stem in stems:
        Image.new("L", (3, 3)).save(root / "masks" / f"{stem}.png")
    with pytest.raises(ValueError, match=r"13 problem\(s\) in 13 samples:\n(  image .*s\d\d.png is \(10, 14\) .*\n){10}"
                                         r"  and 3 more$"):
        FolderSegmentation(str(root), num_classes=3)


def test_folder_reads_headers_only_and_records_image_sizes(tmp_path):
    root = _folder(tmp_path / "data", ["a", "b"])
    _write_image(root / "images" / "b.png", 30, 8, 0)
    Image.fromarray(_voc_label(30, 8, 2)).save(root / "masks" / "b.png")
    whole = (root / "images" / "a.png").read_bytes()
    (root / "images" / "a.png").write_bytes(whole[:len(whole) // 3])  # a header, then truncated pixels
    ds = FolderSegmentation(str(root), num_classes=3)
    assert ds.image_sizes == [(10, 14), (30, 8)] and ds.max_image_pixels == 240 and ds.max_image_size == (30, 8)
    with pytest.raises(OSError, match="truncated"):
        ds[0]  # what a header does not show is found when loaded
    assert SyntheticScenes("val", size=3, image_size=(32, 48)).image_sizes == [(32, 48)] * 3


def test_progress_bars_for_many_files_only(tmp_path, capsys, monkeypatch):
    root = _folder(tmp_path / "data", ["a", "b", "c"])
    FolderSegmentation(str(root))
    assert capsys.readouterr().err == ""  # 3 files: too few to show progress
    monkeypatch.setattr(fastaspp.data.base, "PROGRESS_MIN_ITEMS", 3)  # as if there were many
    FolderSegmentation(str(root))
    err = capsys.readouterr().err
    assert f"checking folder dataset {root} files: 100%" in err and "scanning masks for num_classes: 100%" in err
    build_dataset("folder", str(root), progress=False)
    assert capsys.readouterr().err == ""
    (tmp_path / "VOC/ImageSets/Segmentation").mkdir(parents=True)
    for sub in ("JPEGImages", "SegmentationClass"):
        (tmp_path / "VOC" / sub).mkdir()
    for name in ("x", "y", "z"):
        _write_image(tmp_path / "VOC/JPEGImages" / f"{name}.jpg", 6, 6, 0)
        Image.new("P", (6, 6)).save(tmp_path / "VOC/SegmentationClass" / f"{name}.png")
    (tmp_path / "VOC/ImageSets/Segmentation/val.txt").write_text("x\ny\nz\n")
    build_dataset("voc", str(tmp_path / "VOC"), "val")
    assert "checking VOC split 'val' files: 100%" in capsys.readouterr().err
    build_dataset("voc", str(tmp_path / "VOC"), "val", progress=False)
    assert capsys.readouterr().err == ""



def test_build_dataset_errors():
    with pytest.raises(ValueError, match=r"dataset name must be one of \('synthetic', 'voc', 'folder'\), got 'coco'"):
        build_dataset("coco", "/tmp")
    with pytest.raises(ValueError, match="dataset 'voc' needs a root directory"):
        build_dataset("voc", None)
    assert isinstance(build_dataset("synthetic", None, "val", size=3), SyntheticScenes)


# ---------------------------------------------------------------------------------------------- predict inputs


def _images(directory, *names):
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        _write_image(directory / name, 6, 8, i)
    return directory


def test_collect_images_expands_directories_and_checks_every_input(tmp_path):
    d = _images(tmp_path / "d", "b.PNG", "a.jpg", "c.jpeg", "e.Bmp")
    (d / "notes.txt").write_text("not an image")
    (d / "sub.png").mkdir()  # a directory named like an image is not one
    _images(d / "sub.png", "deep.png")  # nor is anything below the directory
    assert collect_images([str(d)]) == [(f"{d}/a.jpg", "a"), (f"{d}/b.PNG", "b"), (f"{d}/c.jpeg", "c"),
                                        (f"{d}/e.Bmp", "e")]
    one = _images(tmp_path / "one", "z.png")
    assert collect_images([str(one / "z.png"), str(d / "a.jpg")]) == [(f"{one}/z.png", "z"), (f"{d}/a.jpg", "a")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "t.txt").write_text("")
    for empty in ("empty", "texts"):
        with pytest.raises(ValueError, match=rf"directory .*{empty} holds no images \(.jpg, .jpeg, .png, .bmp\)"):
            collect_images([str(d), str(tmp_path / empty)])
    with pytest.raises(FileNotFoundError, match=rf"2 input path\(s\) do not exist: {tmp_path}/gone.png, "
                                                rf"{tmp_path}/nowhere$"):
        collect_images([str(tmp_path / "gone.png"), str(d), str(tmp_path / "nowhere")])
    (tmp_path / "fake.jpg").write_text("text saved as a JPEG")
    (d / "fake.png").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        collect_images([str(tmp_path / "fake.jpg"), str(d)])
    assert str(error.value).splitlines() == [
        "2 of 6 input images cannot be read:",
        f"  {tmp_path}/fake.jpg is not an image (PIL cannot identify its format)",
        f"  {d}/fake.png is not an image (PIL cannot identify its format)"]
    with pytest.raises(ValueError, match="no input images given"):
        collect_images([])


def test_collect_images_keeps_a_file_once(tmp_path):
    d = _images(tmp_path / "d", "a.png", "b.png")
    os.symlink(d / "a.png", tmp_path / "link.png")
    got = collect_images([str(d / "b.png"), str(d), str(tmp_path / "d" / ".." / "d" / "a.png"),
                          str(tmp_path / "link.png"), str(d / "b.png")])
    assert got == [(f"{d}/b.png", "b"), (f"{d}/a.png", "a")]


def test_collect_images_gives_unique_output_stems(tmp_path):
    a = _images(tmp_path / "a", "photo.png", "photo.jpg", "x.png", "solo.png", "Case.png")
    b = _images(tmp_path / "b", "x.png", "case.jpg")
    got = dict(collect_images([str(a), str(b)]))
    assert got == {f"{a}/Case.png": "Case_png", f"{a}/photo.jpg": "photo_jpg", f"{a}/photo.png": "photo_png",
                   f"{a}/solo.png": "solo", f"{a}/x.png": "a_x_png", f"{b}/case.jpg": "case_jpg",
                   f"{b}/x.png": "b_x_png"}
    # A longer name can meet another file's stem: x.png's x_png is x_png.png's stem; both move on.
    c = _images(tmp_path / "c", "x.png", "x.jpg", "x_png.png")
    assert [stem for _, stem in collect_images([str(c)])] == ["x_jpg", "c_x_png", "x_png_png"]
    # Distinct paths that spell the same whole name, c/x.png and the extensionless c/x_png, are numbered.
    (c / "x_png").write_bytes((c / "x.png").read_bytes())
    (c / "x_png.png").unlink()
    stems = [stem for _, stem in collect_images([str(c / "x.png"), str(c / "x_png"), str(c / "x.jpg")])]
    assert stems[2] == "x_jpg" and stems[1] == stems[0] + "_2" and stems[0].endswith("_c_x_png")
    swapped = [stem for _, stem in collect_images([str(c / "x_png"), str(c / "x.png"), str(c / "x.jpg")])]
    assert swapped == [stems[0], stems[0] + "_2", "x_jpg"]  # input order decides



# ---------------------------------------------------------------------------------------------- palette, overlay


def test_voc_palette_and_colorize_round_trip(tmp_path):
    assert VOC_PALETTE.shape == (256, 3)
    assert VOC_PALETTE[1].tolist() == [128, 0, 0] and VOC_PALETTE[15].tolist() == [192, 128, 128]
    assert VOC_PALETTE[255].tolist() == [224, 224, 192]
    label = torch.tensor([[0, 1, 2], [15, 20, 255]])
    colorize(label).save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == "P"
    assert torch.equal(read_label(str(tmp_path / "m.png")), label)  # a palette PNG stores indices
    assert (colorize_rgb(label)[1, 0] == VOC_PALETTE[15]).all()
    with pytest.raises(ValueError, match=r"label must be a \[H, W\] array"):
        colorize(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"label values must be in \[0, 255\]"):
        colorize(torch.tensor([[256]]))


def test_overlay_puts_image_prediction_and_label_side_by_side(tmp_path):
    image, label = _pair(12, 10)
    pred = torch.zeros_like(label)
    panels = np.asarray(overlay(normalize(image), pred, label))
    assert panels.shape == (12, 3 * 10 + 2 * 4, 3)
    assert np.abs(panels[:, :10].astype(int) - (image.permute(1, 2, 0).numpy() * 255).round()).max() <= 1
    assert (panels[:, 14:24] == VOC_PALETTE[0]).all()
    assert (panels[:, 28:38] == colorize_rgb(label)).all()
    path = save_overlay(tmp_path / "o.png", normalize(image), pred)
    assert Image.open(path).size == (2 * 10 + 4, 12)
    with pytest.raises(ValueError, match=r"pred must be \[H, W\] = \(12, 10\)"):
        overlay(normalize(image), pred[:5])
