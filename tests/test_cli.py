"""The workflow around the ops: runs that never lose or mix work, resumes that continue exactly or
refuse, evaluation that trusts the checkpoint, and a CLI that says in one line what is wrong."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastaspp
import fastaspp.evaluate as evaluate_mod
from fastaspp.checkpoint import load_checkpoint
from fastaspp.cli import build_parser, main
from fastaspp.evaluate import evaluate_checkpoint, predict_images
from fastaspp.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(model="deeplabv3_mobilenet_v3_large", dataset="synthetic", batch_size=2, crop=65, progress=False,
             bn_recalibration=0)
TRAIN_ARGS = ["train", "--model", "deeplabv3_mobilenet_v3_large", "--dataset", "synthetic", "--batch-size", "2",
              "--crop", "65", "--device", "cpu", "--bn-recalibration", "0"]


def _steps(out) -> list:
    return [json.loads(line)["step"] for line in open(Path(out) / "metrics.jsonl")]


def _write_folder(root: Path, labels: list, size: int = 72) -> Path:
    """A folder dataset: random images and the given masks (each an int array or a value to fill)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, label in enumerate(labels):
        mask = np.full((size, size), label, np.uint8) if np.isscalar(label) else np.asarray(label, np.uint8)
        Image.fromarray(rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """One training step on a 3-class folder dataset: (data root, checkpoint)."""
    base = tmp_path_factory.mktemp("folder_run")
    stripes = np.repeat(np.arange(72) * 3 // 72, 72).reshape(72, 72)  # rows of classes 0, 1, 2
    root = _write_folder(base / "data", [stripes, stripes.T, stripes, stripes.T])
    result = train(TrainConfig(**dict(SMALL, dataset="folder", data_root=str(root)), iters=1,
                               out=str(base / "run")))
    return root, result["checkpoint"]


# --- runs never destroy or mix work ---------------------------------------------------------------

def test_a_run_refuses_a_non_empty_out_unless_told(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**SMALL, iters=1, out=str(out)))
    before = load_checkpoint(out / "last.pt")
    with pytest.raises(ValueError, match=r"out .*run is not empty \(last.pt, metrics.jsonl\).*resume.*overwrite"):
        train(TrainConfig(**SMALL, iters=1, out=str(out)))
    assert _steps(out) == [1]
    assert load_checkpoint(out / "last.pt")["step"] == before["step"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        train(TrainConfig(**SMALL, iters=1, out=str(tmp_path / "other")))
    # --overwrite replaces the run's own files and nothing else.
    train(TrainConfig(**SMALL, iters=2, out=str(out), overwrite=True))
    assert _steps(out) == [1, 2]
    train(TrainConfig(**SMALL, iters=1, out=str(tmp_path / "other"), overwrite=True))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="overwrite would delete the checkpoint that resume names"):
        TrainConfig(**SMALL, iters=3, out=str(out), overwrite=True, resume=str(out / "last.pt")).validate()


def test_resume_refuses_a_changed_configuration(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**SMALL, iters=2, out=str(out)))
    ckpt = str(out / "last.pt")
    with pytest.raises(ValueError, match=r"differs from the checkpoint's.*batch_size: 2 -> 4; crop: 65 -> 97; "
                                         r"lr: 0.007 -> 0.01"):
        train(TrainConfig(**dict(SMALL, batch_size=4, crop=97), lr=0.01, iters=2, out=str(out), resume=ckpt))
    with pytest.raises(ValueError, match=r"differs from the checkpoint's.*iters: 2 -> 3"):
        train(TrainConfig(**SMALL, iters=3, out=str(out), resume=ckpt))
    # What changes where the run happens, not what it computes, is not a change of configuration.
    with pytest.raises(ValueError, match="at step 2, already at or past iters 2; nothing to train"):
        train(TrainConfig(**SMALL, iters=2, out=str(out), resume=ckpt, workers=1, save_every=7))
    result = train(TrainConfig(**SMALL, iters=3, out=str(out), resume=ckpt, allow_config_change=True))
    assert result["step"] == 3 and _steps(out) == [1, 2, 3]
    # A resume from another run refuses to mix into a directory holding a third run.
    with pytest.raises(ValueError, match="holds another run's last.pt"):
        train(TrainConfig(**SMALL, iters=3, out=str(out), resume=str(_copy_run(out, tmp_path / "copy"))))


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "last.pt").write_bytes((src / "last.pt").read_bytes())
    return dst / "last.pt"


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**SMALL, iters=2, save_every=1, out=str(out)))
    # As after a kill between the step-3 log line and its checkpoint, with a line cut short.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 2
    train(TrainConfig(**SMALL, iters=2, save_every=1, out=str(tmp_path / "straight")))
    resumed_cfg = dict(SMALL, iters=4)
    train(TrainConfig(**resumed_cfg, save_every=1, out=str(out), resume=str(out / "last.pt"),
                      allow_config_change=True))
    assert _steps(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("sig, code, workers", [(signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 0)])
def test_a_signal_saves_and_prints_the_resume_command(tmp_path, sig, code, workers):
    """SIGINT as a terminal's Ctrl-C sends it, to the whole process group (DataLoader workers too)."""
    out = tmp_path / "run"
    argv = TRAIN_ARGS + ["--iters", "500", "--save-every", "1000", "--workers", str(workers), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastaspp", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no step logged in 120 s"
        time.sleep(0.1)
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    saved = load_checkpoint(out / "last.pt")
    assert saved["step"] == _steps(out)[-1] >= 1  # nothing trained is lost, nothing logged is unsaved
    assert "Traceback" not in stderr
    line = next(line for line in stderr.splitlines() if "Resume with:" in line)
    assert f"interrupted by {signal.Signals(sig).name} at step {saved['step']}; saved {out / 'last.pt'}" in line
    command = shlex.split(line.split("Resume with: ")[1])
    assert command[0] == "fastaspp"
    args = build_parser().parse_args(command[1:])
    assert args.resume == str(out / "last.pt") and args.iters == 500 and args.out == str(out)


# --- evaluation trusts the checkpoint --------------------------------------------------------------

def test_eval_takes_the_classes_from_the_checkpoint(tmp_path, folder_run):
    _, checkpoint = folder_run
    # A val set without the highest class still has the checkpoint's three.
    val = _write_folder(tmp_path / "val", [0, 1, 0])
    result = evaluate_checkpoint(checkpoint, "folder", str(val), "cpu", str(tmp_path / "eval"), overlays=0)
    assert sorted(result["per_class_iou"]) == ["0", "1", "2"] and result["images"] == 3
    # A label past the checkpoint's classes is an error that names the file.
    stray = _write_folder(tmp_path / "stray", [0, 1, 7])
    with pytest.raises(ValueError, match=r"label .*2\.png holds values \[7\], outside 0..2"):
        evaluate_checkpoint(checkpoint, "folder", str(stray), "cpu", str(tmp_path / "eval2"), overlays=0)
    with pytest.raises(ValueError, match="dataset 'synthetic' has 6 classes but the checkpoint's model predicts 3"):
        evaluate_checkpoint(checkpoint, "synthetic", None, "cpu", str(tmp_path / "eval3"))


def test_eval_refuses_a_scale_that_cannot_fit(tmp_path, folder_run, monkeypatch):
    root, checkpoint = folder_run
    with pytest.raises(ValueError, match=r"scale 1000 on the largest image \(72x72\) needs an estimated .* GiB "
                                         r"of cpu memory, but .* is available; use scales up to about"):
        evaluate_checkpoint(checkpoint, "folder", str(root), "cpu", str(tmp_path / "e"), scales=(1.0, 1000.0))
    assert not (tmp_path / "e").exists()  # refused before the first image
    # The estimate and the suggestion are consistent: the suggested scale fits, twice it does not.
    model, _ = evaluate_mod.load_trained_model(checkpoint, torch.device("cpu"))
    need = evaluate_mod.estimate_eval_bytes(model, torch.device("cpu"), 3, 72 * 72, 4.0)
    monkeypatch.setattr(evaluate_mod, "available_memory", lambda device: need)
    evaluate_mod.check_eval_memory(model, torch.device("cpu"), 3, [(72, 72)], (4.0,))
    with pytest.raises(ValueError, match=r"use scales up to about 4\.00"):
        evaluate_mod.check_eval_memory(model, torch.device("cpu"), 3, [(72, 72), (36, 72)], (8.0,))


def test_predict_checks_every_input_first_and_never_writes_a_name_twice(tmp_path, folder_run):
    _, checkpoint = folder_run
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for name in ("photo.png", "photo.jpg", "other.png"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(photos / name)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predict_images(checkpoint, [str(photos / "other.png"), str(tmp_path / "missing.png")], str(tmp_path / "p1"))
    assert not (tmp_path / "p1").exists()  # nothing processed before the check
    written = predict_images(checkpoint, [str(photos / "photo.png"), str(photos / "photo.jpg")], str(tmp_path / "p2"))
    assert len(set(written)) == 4 and all(os.path.exists(p) for p in written)
    written = predict_images(checkpoint, [str(photos)], str(tmp_path / "p3"))  # a directory of images
    assert sorted(os.path.basename(p) for p in written if p.endswith("_mask.png")) == [
        "other_mask.png", "photo_jpg_mask.png", "photo_png_mask.png"]


# --- the CLI says in one line what is wrong ----------------------------------------------------------

def _error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("fastaspp ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_errors_are_one_line_without_a_traceback_unless_debug(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    line = _error_line(capsys, ["eval", "--checkpoint", str(junk), "--dataset", "synthetic", "--device", "cpu",
                                "--out", str(tmp_path / "e")])
    assert line.startswith("fastaspp eval: checkpoint ") and "is not a torch checkpoint" in line
    assert "file an issue" not in line
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    line = _error_line(capsys, TRAIN_ARGS + ["--iters", "1", "--out", str(tmp_path / "full")])
    assert line.startswith("fastaspp train: out ") and "is not empty" in line
    with pytest.raises(ValueError, match="is not empty"):
        main(TRAIN_ARGS + ["--iters", "1", "--out", str(tmp_path / "full"), "--debug"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_device_cuda_without_cuda_gives_one_message_everywhere(tmp_path, capsys, folder_run):
    _, checkpoint = folder_run
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    commands = {
        "train": TRAIN_ARGS[:-4] + ["--device", "cuda", "--iters", "1", "--out", str(tmp_path / "t")],
        "eval": ["eval", "--checkpoint", checkpoint, "--dataset", "synthetic", "--device", "cuda", "--out",
                 str(tmp_path / "e")],
        "predict": ["predict", "--checkpoint", checkpoint, str(image), "--device", "cuda", "--out", str(tmp_path)],
        "demo": ["demo", "--device", "cuda", "--out", str(tmp_path / "d")],
        "bench": ["bench", "--device", "cuda", "--quick"],
    }
    messages = {name: _error_line(capsys, argv).split(": ", 1)[1] for name, argv in commands.items()}
    assert len(set(messages.values())) == 1, messages
    assert "CPU-only build" in messages["train"] or "sees no CUDA GPU" in messages["train"]
    assert not (tmp_path / "t").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("argv, message", [
    (["demo", "--iters", "0"], "argument --iters: expected an int >= 1, got '0'"),
    (TRAIN_ARGS + ["--iters", "1", "--out", "x", "--bn-recalibration", "-1"], "expected an int >= 0, got '-1'"),
    (["eval", "--checkpoint", "c", "--dataset", "synthetic", "--out", "x", "--overlays", "-1"],
     "expected an int >= 0, got '-1'"),
    (["eval", "--checkpoint", "c", "--dataset", "synthetic", "--out", "x", "--scales", "1,0"],
     "expected comma-separated numbers > 0"),
    (["eval", "--checkpoint", "c", "--dataset", "synthetic", "--out", "x", "--scales", "1,inf"],
     "expected comma-separated numbers > 0"),
    (TRAIN_ARGS + ["--iters", "1", "--out", "x", "--lr", "0"], "expected a number > 0, got '0'"),
])
def test_cli_refuses_out_of_range_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_crop_too_small_for_the_output_stride(tmp_path, capsys):
    argv = TRAIN_ARGS + ["--iters", "1", "--out", str(tmp_path / "r")]
    argv[argv.index("--crop") + 1] = "1"
    line = _error_line(capsys, argv)
    assert "crop must be at least 33 at output stride 16" in line and not (tmp_path / "r").exists()


def test_help_gives_every_option_a_text_and_its_default(capsys):
    parser = build_parser()
    # argparse has no public way to list a parser's actions.
    commands = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"fastaspp {name} {action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.007)" in text and "(default: 50)" in text and "(default: 20)" in text
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip().startswith(f"fastaspp {fastaspp.__version__}")


def test_eval_shows_progress(tmp_path, capsys, folder_run):
    root, checkpoint = folder_run
    assert main(["eval", "--checkpoint", checkpoint, "--dataset", "folder", "--data-root", str(root), "--device",
                 "cpu", "--overlays", "0", "--out", str(tmp_path / "e")]) == 0
    assert "eval: 100%" in capsys.readouterr().err


def test_bench_records_paths_below_the_working_directory_relative(tmp_path, monkeypatch):
    """The command a result file records must not name this machine's directories. The helper is
    tested directly: a bench run that writes results takes minutes."""
    from fastaspp.cli import _portable_path

    monkeypatch.chdir(tmp_path)
    assert _portable_path(str(tmp_path / "benchmarks" / "results")) == os.path.join("benchmarks", "results")
    outside = str(tmp_path.parent / "elsewhere")
    assert _portable_path(outside) == outside
    assert _portable_path("--out") == "--out"


def test_bench_shape_filter_picks_named_shapes_and_names_the_valid_ones():
    from fastaspp.bench import conv as bench_conv
    from fastaspp.cli import _bench_shape_filter

    default = bench_conv.SHAPES[:2]
    assert _bench_shape_filter(None, "conv")(bench_conv.SHAPES, default) == default
    picked = _bench_shape_filter("aspp-65-r36,aspp-33-r6", "conv")(bench_conv.SHAPES, default)
    assert [s.name for s in picked] == ["aspp-33-r6", "aspp-65-r36"]
    from fastaspp.bench import aspp as bench_aspp

    picked = _bench_shape_filter("aspp-65-(12,24,36),aspp-33-r6", "all")(bench_aspp.ASPP_SHAPES, [])
    assert [s.name for s in picked] == ["aspp-65-(12,24,36)"]
    with pytest.raises(SystemExit, match="got 'aspp-33-r7'") as error:
        _bench_shape_filter("aspp-33-r7", "conv")
    assert "backbone-512-d4" in str(error.value) and "aspp-65-(12,24,36)" not in str(error.value)
    with pytest.raises(SystemExit, match="not 'model'"):
        _bench_shape_filter("aspp-33-r6", "model")


def test_bench_batches_must_be_positive_ints(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--batches", "1,0"])
    assert exit_info.value.code == 2 and "expected comma-separated ints >= 1" in capsys.readouterr().err


def test_bench_all_backends_are_those_of_the_device(monkeypatch):
    """On a GPU, `--backend all` times triton and cuda, never the cpu backend (which refuses CUDA
    tensors); on CPU the cpu backend alone."""
    from fastaspp.cli import _bench_backends

    def resolve(device, name):
        if name == "cpu" and device.type != "cpu":
            raise RuntimeError("fastaspp backend 'cpu' runs CPU tensors only")
        return name

    monkeypatch.setattr(fastaspp, "backends", lambda: ["cpu", "triton", "cuda"])
    monkeypatch.setattr(fastaspp, "resolve_backend", resolve)
    assert _bench_backends("all", torch.device("cuda")) == ["triton", "cuda"]
    assert _bench_backends("all", torch.device("cpu")) == ["cpu"]
    assert _bench_backends("triton", torch.device("cpu")) == ["triton"]
