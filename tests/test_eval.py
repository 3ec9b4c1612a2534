"""eval.py: validation, predictions of any images, the Cityscapes benchmark format, summaries, model files."""
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import eval as E
import support.data
import support.models
import train_dacs_mrm as T
from eval import main as eval_main
from eval import evaluate
from support.data import (CITYSCAPES_ID_TO_TRAIN, CLASSES, DATASETS, PALETTE, SYNTHIA_13, mmseg_rescale_size,
                          resize_pair, write_fake_dataset)
from support.networks import build_model
from support.predict import TRAIN_TO_CITYSCAPES_ID
from support.reports import with_legend
from support.runs import export_model
from support.toy import TOY_CLASSES, TOY_PALETTE

from helpers import TOY_FAST, loss_record, snapshot, state_of, write_run


# ---------------------------------------------------------------- validation

def test_eval_refuses_wrong_class_count_and_non_empty_save_dir(tmp_path, small_toy, capsys):
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", work]) == 0
    model = os.path.join(work, "model.pth")
    assert eval_main([model, "--task", "gta2cs", "--data-root", str(tmp_path)]) == 2
    assert "a model of task toy, not --task gta2cs" in capsys.readouterr().err  # the file records its task
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "keep.txt").write_text("x")
    assert eval_main([model, "--task", "toy", "--save-dir", str(tmp_path / "pred"), "--workers", "0"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert eval_main([model, "--task", "toy", "--workers", "0"]) == 0
    assert re.search(r"on 4 toy-target val images \(mmseg protocol\), [0-9.]+ s on cpu \([0-9.]+ ms/image",
                     capsys.readouterr().out)


def test_eval_resamples_logits_with_the_align_corners_of_training(tmp_path, small_toy, monkeypatch):
    """The checkpoint records align_corners (DACS: True) and evaluation resizes the logits with it."""
    logits = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[1.5, 1.5], [1.5, 1.5]]]]).permute(1, 0, 2, 3)

    class Fixed(nn.Module):
        def forward(self, x):
            return logits

    class OneImage:
        name = "fixed"

        def __len__(self):
            return 1

        def load(self, i, full_label=False):
            return np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)

    for align_corners in (True, False):
        conf = evaluate(Fixed(), OneImage(), 2, torch.device("cpu"), align_corners)
        upsampled = F.interpolate(logits, size=(4, 4), mode="bilinear", align_corners=align_corners)
        predicted_class_1 = int((upsampled.argmax(dim=1) == 1).sum())
        assert conf.tolist() == [[16 - predicted_class_1, predicted_class_1], [0, 0]]
    # by hand: class 0 is x + 2y on the sample grid, {0, 1/3, 2/3, 1} (True) or {0, .25, .75, 1} (False);
    # class 1 wins where that is below 1.5 (ties go to class 0)
    assert evaluate(Fixed(), OneImage(), 2, torch.device("cpu"), True)[0, 1] == 4 + 3 + 1
    assert evaluate(Fixed(), OneImage(), 2, torch.device("cpu"), False)[0, 1] == 4 + 3
    import eval as eval_module
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", work, "--align-corners"]) == 0
    exported = torch.load(os.path.join(work, "model.pth"), weights_only=True)
    assert exported["arch"]["align_corners"] is True
    seen = []
    monkeypatch.setattr(eval_module, "evaluate", lambda *a, **k: seen.append(a[4]) or torch.eye(7, dtype=torch.long))
    assert eval_main([os.path.join(work, "model.pth"), "--task", "toy", "--workers", "0"]) == 0
    assert seen == [True]


# ---------------------------------------------------------------- any images, the benchmark server, summaries

def tiny_model(path, num_classes, align_corners, seed=0):
    """A random dlv2-tiny exported as training exports it (no training: a forward pass is all these tests need)."""
    torch.manual_seed(seed)
    model, arch_record = build_model("dlv2-tiny", num_classes)
    arch_record["align_corners"] = align_corners
    export_model(str(path), model, arch_record, num_classes)
    return str(path), model.eval()


@torch.no_grad()
def forward_by_hand(model, image, size_wh, align_corners):
    """Train ids of an HxWx3 uint8 image: resized to fit size_wh as mmseg does (None: as is), the model, logits
    resized bilinearly to the image's size, argmax."""
    x = image if size_wh is None else resize_pair(image, None, size_wh, None, resize_label=False)[0]
    logits = model(torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float() / 255)
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=align_corners)
    return logits.argmax(1)[0].numpy()


def random_image(rng, width, height):
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def toy_colours(ids):
    """What <stem>_color.png holds for toy train ids: their colours, a legend of the classes present below."""
    return with_legend(TOY_PALETTE[ids], TOY_CLASSES, TOY_PALETTE, np.unique(ids))


def test_images_predicts_every_file_at_its_own_size(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for name, (w, h) in (("odd", (37, 23)), ("odd2", (37, 23)), ("wide", (64, 32))):  # odd and odd2 share a batch
        Image.fromarray(random_image(rng, w, h)).save(images / f"{name}.png")
    Image.fromarray(random_image(rng, 50, 30)).save(images / "photo.jpg", quality=90)
    toy, model = tiny_model(tmp_path / "toy.pth", 7, align_corners=False)
    out = tmp_path / "out"
    assert eval_main([toy, "--task", "toy", "--images", str(images), "--out", str(out), "--device", "cpu",
                      "--workers", "0", "--batch-size", "2"]) == 0
    assert "wrote 4 colour and train-id PNGs" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted(f"{stem}_{kind}.png" for stem in ("odd", "odd2", "wide", "photo")
                                             for kind in ("color", "trainid"))
    classes = set()
    for path in sorted(images.iterdir()):
        image = np.array(Image.open(path).convert("RGB"))  # the JPEG as decoded
        ids = np.array(Image.open(out / f"{path.stem}_trainid.png"))
        assert ids.dtype == np.uint8 and ids.shape == image.shape[:2]
        assert np.array_equal(ids, forward_by_hand(model, image, None, False)), path.name
        assert np.array_equal(np.array(Image.open(out / f"{path.stem}_color.png")), toy_colours(ids))
        classes |= set(np.unique(ids).tolist())
    assert len(classes) > 1  # a constant prediction would prove little

    # --blend over a glob: the JPEG only, colours at alpha 0.5
    blended = tmp_path / "blended"
    assert eval_main([toy, "--task", "toy", "--images", str(images / "*.jpg"), "--out", str(blended), "--blend", "0.5",
                      "--device", "cpu", "--workers", "0"]) == 0
    assert sorted(os.listdir(blended)) == ["photo_color.png", "photo_trainid.png"]
    image = np.array(Image.open(images / "photo.jpg").convert("RGB")).astype(int)
    ids = np.array(Image.open(blended / "photo_trainid.png"))
    expected = (TOY_PALETTE[ids].astype(int) + image) / 2
    blend = np.array(Image.open(blended / "photo_color.png"))[:ids.shape[0], :ids.shape[1]]  # above its legend
    assert np.abs(blend - expected).max() <= 0.5

    # a Cityscapes task: the image is resized to fit 1024x512 as mmseg resizes the target (37x23 -> 824x512)
    assert mmseg_rescale_size(37, 23, (1024, 512)) == (824, 512)
    city, model = tiny_model(tmp_path / "city.pth", 19, align_corners=True)
    out = tmp_path / "city_out"
    assert eval_main([city, "--task", "gta2cs", "--images", str(images / "odd.png"), "--out", str(out),
                      "--device", "cpu", "--workers", "0"]) == 0
    image = np.array(Image.open(images / "odd.png"))
    assert np.array_equal(np.array(Image.open(out / "odd_trainid.png")),
                          forward_by_hand(model, image, (1024, 512), True))


def cityscapes_with_a_test_split(root):
    """Fake Cityscapes (2 val images, 64x128) and a test split of 3 images copied from it, in the real layout."""
    write_fake_dataset(root, "cityscapes", 2, (128, 64))
    val = os.path.join(root, "cityscapes", "leftImg8bit", "val")
    sources = sorted(os.path.join(d, f) for d, _, files in os.walk(val) for f in files)
    names = ["berlin/berlin_000000_000019_leftImg8bit.png", "berlin/berlin_000001_000019_leftImg8bit.png",
             "bonn/bonn_000000_000019_leftImg8bit.png"]
    for k, name in enumerate(names):
        target = os.path.join(root, "cityscapes", "leftImg8bit", "test", name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(sources[k % len(sources)], target)
    return names


def test_format_cityscapes_writes_benchmark_label_ids(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(DATASETS["cityscapes"], "size", (96, 48))  # the protocol at a size a CPU test affords
    root = str(tmp_path / "data")
    names = cityscapes_with_a_test_split(root)
    city, model = tiny_model(tmp_path / "city.pth", 19, align_corners=True)
    out = tmp_path / "results"
    assert eval_main([city, "--task", "gta2cs", "--data-root", root, "--split", "test", "--format", "cityscapes",
                      "--out", str(out), "--device", "cpu", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("warning: ") and "3 images" in captured.err \
        and "1525" in captured.err
    assert "wrote 3 Cityscapes test labelIds PNGs" in captured.out and str(out) in captured.out
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files)
    assert written == names
    label_ids = set(np.flatnonzero(CITYSCAPES_ID_TO_TRAIN != 255).tolist())
    for name in names:
        ids = np.array(Image.open(out / name))
        assert ids.dtype == np.uint8 and ids.shape == (64, 128)  # full resolution
        assert set(np.unique(ids).tolist()) <= label_ids
        image = np.array(Image.open(os.path.join(root, "cityscapes", "leftImg8bit", "test", name)))
        assert np.array_equal(CITYSCAPES_ID_TO_TRAIN[ids], forward_by_hand(model, image, (96, 48), True)), name
    # by hand: road (train id 0) is label id 7, bicycle (18) is 33
    assert TRAIN_TO_CITYSCAPES_ID[0] == 7 and TRAIN_TO_CITYSCAPES_ID[18] == 33

    out_val = tmp_path / "val_results"
    assert eval_main([city, "--task", "gta2cs", "--data-root", root, "--format", "cityscapes", "--out", str(out_val),
                      "--device", "cpu", "--workers", "0"]) == 0
    assert "official val split has 500" in capsys.readouterr().err
    assert sorted(os.listdir(out_val)) == ["frankfurt", "lindau"]
    assert os.listdir(out_val / "frankfurt") == ["frankfurt_000000_000019_leftImg8bit.png"]


def test_summary_groups_runs_by_configuration_and_reports_mean_and_std(tmp_path, capsys, one_error_line):
    road = lambda v: [v] + [50.0] * 18  # noqa: E731 (per-class IoUs in %, only road varies)
    a = write_run(tmp_path / "a", [loss_record(2000), dict(iteration=2000, val_miou=30.0, val_iou=road(10.0)),
                                   dict(iteration=4000, val_miou=40.0, val_iou=road(90.0))], seed=0)
    b = write_run(tmp_path / "b", [dict(iteration=4000, val_miou=43.0, val_iou=road(93.0))], seed=1, workers=2,
                  device="cpu", data_root="/elsewhere")  # settings that do not change the experiment
    c = write_run(tmp_path / "c", [dict(iteration=4000, val_miou=37.25)], seed=0, mrm=False)
    d = write_run(tmp_path / "d", [loss_record(50)], seed=2)
    ious = [float(i) for i in range(19)]
    for absent in (9, 14, 16):  # SYNTHIA has no terrain, truck, train
        ious[absent] = None
    s = write_run(tmp_path / "s", [dict(iteration=4000, val_miou=8.25, val_iou=ious)], task="syn2cs")
    assert eval_main(["--summary", a, b, c, d]) == 0
    out = capsys.readouterr().out
    assert f"{d}: no validation record" in out
    blocks = out.split("\n\n")
    with_mrm = next(block for block in blocks if "mrm=True" in block)
    without = next(block for block in blocks if "mrm=False" in block)
    # by hand: the last validations 40 and 43: mean 41.5, sample std sqrt(2 * 1.5^2 / 1) = 2.12
    assert f"{a} " in with_mrm and f"{b} " in with_mrm and "mean +- std (n=2)" in with_mrm
    assert "41.50 +- 2.12" in with_mrm and "30.00" not in with_mrm
    assert f"{c} " in without and "n=1" in without and "37.25" in without and "+-" not in without
    assert sum(line.startswith(str(d)) for line in out.splitlines()) == 1  # named once, in no table

    assert eval_main(["--summary", a, b, c, s, "--per-class"]) == 0
    out = capsys.readouterr().out
    assert sum("no per-class IoU" in line for line in out.splitlines()) == 1 and f"{c}: its validation" in out
    with_mrm = next(block for block in out.split("\n\n") if "mrm=True" in block)
    header, row_a, row_b, stats = with_mrm.splitlines()[1:]
    assert header.split()[3:5] == ["road", "sidewalk"] and header.split()[-1] == "mIoU19"
    assert row_a.split()[3] == "90.0" and row_b.split()[3] == "93.0"
    assert stats.split()[4] == "91.5" and stats.endswith("41.50 +- 2.12")  # road's mean: (90 + 93) / 2
    synthia = next(block for block in out.split("\n\n") if "task=syn2cs" in block)
    header, row = synthia.splitlines()[1:3]
    assert header.split()[-2:] == ["mIoU16", "mIoU13"] and "terrain" not in header
    assert sum(SYNTHIA_13) == 120 and row.split()[-2:] == ["8.25", f"{120 / 13:.2f}"]  # 9.23

    one_error_line("config.json", eval_main, ["--summary", str(tmp_path / "nowhere")])


def test_summary_counts_each_run_once_and_never_an_unfinished_run_or_a_nan(tmp_path, capsys, one_error_line):
    a = write_run(tmp_path / "a", [dict(iteration=4000, val_miou=40.0)], seed=0, iters=4000)
    b = write_run(tmp_path / "b", [dict(iteration=4000, val_miou=44.0)], seed=1, iters=4000)
    os.symlink(a, tmp_path / "link")
    running = write_run(tmp_path / "running", [dict(iteration=2000, val_miou=90.0)], seed=2, iters=4000)
    broken = write_run(tmp_path / "broken", [dict(iteration=2000, val_miou=35.0),
                                             dict(iteration=4000, val_miou=float("nan"))], seed=3, iters=4000)
    assert eval_main(["--summary", a, b, a, str(tmp_path / "link"), a + "/", running, broken]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {a} given twice, counted once", f"note: {tmp_path / 'link'} given twice (as {a}), "
                     f"counted once", f"note: {a}/ given twice (as {a}), counted once"]
    assert f"{running}: not counted: unfinished, last validated at iteration 2000 of 4000 (mIoU 90.00 so far)" in out
    assert f"{broken}: not counted: its last validation (iteration 4000) has no mIoU (nan)" in out
    table = out.split("\n\n")[-1]
    # by hand: 40 and 44, mean 42, sample std sqrt(2 * 2^2 / 1) = 2.83; the running 90 and the earlier 35 left out
    assert "mean +- std (n=2)" in table and table.rstrip().endswith("42.00 +- 2.83")
    assert not any(line.startswith((running, broken)) for line in table.splitlines())
    one_error_line("no finished run with a validation mIoU", eval_main, ["--summary", running, broken])


def test_save_dir_pictures_carry_a_legend_of_the_classes_they_show(tmp_path):
    class Scenes:
        name = "toy-target"

    image = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    prediction = np.zeros((6, 10), np.uint8)
    prediction[:, 5:] = 4
    E.prediction_writer(str(tmp_path), Scenes(), TOY_PALETTE, TOY_CLASSES)(0, image, prediction)
    picture = np.array(Image.open(tmp_path / "toy-target_00000.png"))
    assert np.array_equal(picture[:6, :20], np.concatenate([image, TOY_PALETTE[prediction]], axis=1))
    legend = picture[6:].reshape(-1, 3)
    assert picture.shape[1] == 160 and (picture[:6, 20:] == 255).all()  # the legend's least width, white beside
    for c, colour in enumerate(TOY_PALETTE):
        assert (legend == colour).all(axis=1).any() == (c in (0, 4)), TOY_CLASSES[c]


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm", "sighup"])
def test_an_interrupt_is_one_line_and_leaves_no_half_written_png(tmp_path, monkeypatch, one_error_line, stop):
    images, out = two_images(tmp_path / "images"), tmp_path / "out"
    toy, _ = model_of_task(tmp_path / "toy.pth", "toy", align_corners=False)
    save, calls = Image.Image.save, []

    def save_then_stop(self, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < 3:  # the first image's two PNGs
            return save(self, f, *args, **kwargs)
        f.write(b"\x89PNG\r\n\x1a\n")  # the second image's colour PNG, stopped after its first bytes
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        signum = signal.SIGTERM if stop == "sigterm" else signal.SIGHUP
        assert signal.getsignal(signum) != signal.SIG_DFL, "no handler: the signal would end the tests"
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(Image.Image, "save", save_then_stop)
    before = signal.getsignal(signal.SIGTERM)
    try:
        code = eval_main([toy, "--images", images, "--out", str(out)] + CPU)
    except KeyboardInterrupt:  # escaping, it would stop the whole test session
        code = None
    assert code == {"ctrl-c": 130, "sigterm": 143, "sighup": 129}[stop]
    one_error_line("nothing is left half-written", start="interrupted: " if stop == "ctrl-c" else "terminated: ")
    assert signal.getsignal(signal.SIGTERM) == before and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    assert sorted(os.listdir(out)) == ["a_color.png", "a_trainid.png"]
    for name in os.listdir(out):
        Image.open(out / name).load()  # whole


def test_refusals_are_one_line_and_touch_nothing(tmp_path, monkeypatch, capsys, one_error_line):
    monkeypatch.setitem(DATASETS["cityscapes"], "size", (96, 48))
    root = str(tmp_path / "data")
    cityscapes_with_a_test_split(root)
    city, _ = tiny_model(tmp_path / "city.pth", 19, align_corners=True)
    other, _ = tiny_model(tmp_path / "other.pth", 19, align_corners=True, seed=1)
    run = ["--task", "gta2cs", "--data-root", root, "--device", "cpu", "--workers", "0"]
    images = str(tmp_path / "data" / "cityscapes" / "leftImg8bit" / "val" / "lindau")
    os.symlink(city, tmp_path / "link.pth")
    (tmp_path / "a_file").write_text("keep")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")

    one_error_line("exists; pass --overwrite", eval_main, [city, "--export", other] + run, tmp_path)
    one_error_line("checkpoint being read", eval_main, [city, "--export", city, "--overwrite"] + run, tmp_path)
    one_error_line("checkpoint being read", eval_main, [city, "--export", str(tmp_path / "link.pth"), "--overwrite"]
                   + run, tmp_path)
    def weight(path):
        return torch.load(path, weights_only=True)["model"]["decoder.conv2d_list.0.weight"]
    assert not torch.equal(weight(other), weight(city))  # the two models differ before the export, agree after it
    assert eval_main([city, "--export", other, "--overwrite"] + run) == 0
    assert torch.equal(weight(other), weight(city))
    capsys.readouterr()
    one_error_line("inside --data-root", eval_main, [city, "--save-dir", os.path.join(root, "preds")] + run, tmp_path)
    one_error_line("inside --data-root", eval_main,
                   [city, "--images", images, "--out", os.path.join(root, "cityscapes", "p")] + run, tmp_path)
    one_error_line("existing file", eval_main, [city, "--save-dir", str(tmp_path / "a_file")] + run, tmp_path)
    one_error_line("existing file", eval_main, [city, "--images", images, "--out", str(tmp_path / "a_file")] + run,
                   tmp_path)
    one_error_line("not empty", eval_main, [city, "--images", images, "--out", str(tmp_path / "full")] + run, tmp_path)
    one_error_line("no PNG or JPEG images matched", eval_main,
                   [city, "--images", str(tmp_path / "*.webp"), "--out", str(tmp_path / "new")] + run, tmp_path)
    one_error_line("unknown device", eval_main, [city, "--device", "gpu"] + run[:-4], tmp_path)
    if not torch.cuda.is_available():
        one_error_line("no CUDA device", eval_main, [city, "--device", "cuda"] + run[:-4], tmp_path)

    # labels without a single labelled pixel: the mIoU would be nan
    val_labels = os.path.join(root, "cityscapes", "gtFine", "val")
    for dirpath, _, files in os.walk(val_labels):
        for name in files:
            Image.fromarray(np.zeros((64, 128), np.uint8)).save(os.path.join(dirpath, name))  # id 0: unlabeled
    one_error_line("no labelled pixel", eval_main, [city] + run, tmp_path)


# ---------------------------------------------------------------- a model file knows its task

CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def model_of_task(path, task, align_corners=True, seed=0, **arch):
    """A random dlv2-tiny for `task`, exported as training exports it: with the record of its task."""
    torch.manual_seed(seed)
    num_classes = len(support.data.TASKS[task]["class_names"])
    model, arch_record = build_model("dlv2-tiny", num_classes)
    arch_record.update(align_corners=align_corners, **arch)
    export_model(str(path), model, arch_record, num_classes, task=task)
    return str(path), model.eval()


def old_export(path, num_classes, align_corners, seed=0):
    """An export as written before model files recorded their task: arch, num_classes and model only."""
    torch.manual_seed(seed)
    model, arch_record = build_model("dlv2-tiny", num_classes)
    arch_record["align_corners"] = align_corners
    torch.save(dict(arch=arch_record, num_classes=num_classes, model=model.state_dict()), str(path))
    return str(path), model.eval()


def two_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in (("a", (40, 24)), ("b", (64, 32))):
        Image.fromarray(random_image(rng, w, h)).save(folder / f"{name}.png")
    return str(folder)


def assert_toy_predictions(out, images, model, align_corners):
    for name in ("a", "b"):
        image = np.array(Image.open(os.path.join(images, f"{name}.png")))
        ids = np.array(Image.open(os.path.join(out, f"{name}_trainid.png")))
        assert np.array_equal(ids, forward_by_hand(model, image, None, align_corners)), name
        assert np.array_equal(np.array(Image.open(os.path.join(out, f"{name}_color.png"))), toy_colours(ids))


CPU = ["--device", "cpu", "--workers", "0"]


def test_a_toy_export_predicts_images_without_task_in_toy_colours(tmp_path, small_toy, capsys):
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", work]) == 0
    path = os.path.join(work, "model.pth")
    exported = torch.load(path, weights_only=True)
    assert set(exported) == {"arch", "num_classes", "model", "inference"}
    record = exported["inference"]
    assert record["task"] == "toy" and record["target"] == "toy-target"
    assert record["class_names"] == list(TOY_CLASSES) and record["palette"] == TOY_PALETTE.tolist()
    assert record["label_ids"] is None and record["size"] is None and record["hrda"] is None  # toy: used as drawn
    assert record["align_corners"] == exported["arch"]["align_corners"]
    assert record["normalize"]["kind"] == support.models.RESNET_STYLES[exported["arch"]["style"]]["norm"]
    assert len(record["normalize"]["mean"]) == len(record["normalize"]["std"]) == 3
    images, out = two_images(tmp_path / "images"), str(tmp_path / "out")
    capsys.readouterr()
    assert eval_main([path, "--images", images, "--out", out] + CPU) == 0
    assert "wrote 2 colour and train-id PNGs" in capsys.readouterr().out
    model = E.load_segmentation_model(path)[0]
    assert_toy_predictions(out, images, model, record["align_corners"])


def test_a_task_that_contradicts_the_model_file_is_refused_in_one_line(tmp_path, one_error_line):
    toy, _ = model_of_task(tmp_path / "toy.pth", "toy", align_corners=False)
    city, _ = model_of_task(tmp_path / "city.pth", "gta2cs")
    root = str(tmp_path / "data")
    cityscapes_with_a_test_split(root)
    images, out = two_images(tmp_path / "images"), str(tmp_path / "out")
    for args, words in (
            ([toy, "--task", "gta2cs", "--images", images, "--out", out], "a model of task toy, not --task gta2cs"),
            ([toy, "--task", "gta2cs", "--format", "cityscapes", "--out", out], "a model of task toy, not --task gta2cs"),
            ([toy, "--task", "gta2cs"], "a model of task toy, not --task gta2cs"),
            ([toy, "--task", "gta2cs", "--export", str(tmp_path / "again.pth")], "a model of task toy"),
            # the same 19 classes: the file's task tells them apart
            ([city, "--task", "syn2cs", "--images", images, "--out", out], "a model of task gta2cs, not --task syn2cs")):
        one_error_line(words, eval_main, args + ["--data-root", root] + CPU, tmp_path)
    assert eval_main([toy, "--task", "toy", "--images", images, "--out", out] + CPU) == 0  # its own task: accepted


def test_an_export_without_the_record_needs_task(tmp_path, one_error_line):
    old, model = old_export(tmp_path / "old.pth", 7, align_corners=False)
    old_city, _ = old_export(tmp_path / "old_city.pth", 19, align_corners=True)
    root = str(tmp_path / "data")
    cityscapes_with_a_test_split(root)
    images, out = two_images(tmp_path / "images"), str(tmp_path / "out")
    for args in ([old, "--images", images, "--out", out], [old_city, "--images", images, "--out", out],
                 [old_city, "--format", "cityscapes", "--out", out], [old_city],
                 [old, "--export", str(tmp_path / "new.pth")]):
        one_error_line("pass --task", eval_main, args + ["--data-root", root] + CPU, tmp_path)
    one_error_line("model predicts 7 classes, task gta2cs has 19", eval_main,
                   [old, "--task", "gta2cs", "--images", images, "--out", out] + CPU, tmp_path)
    assert eval_main([old, "--task", "toy", "--images", images, "--out", out] + CPU) == 0
    assert_toy_predictions(out, images, model, False)
    # re-exported with --task, it records the task and predicts the same without it
    new = str(tmp_path / "new.pth")
    assert eval_main([old, "--task", "toy", "--export", new] + CPU) == 0
    state = torch.load(new, weights_only=True)
    assert state["inference"]["task"] == "toy" and state["arch"] == torch.load(old, weights_only=True)["arch"]
    assert eval_main([new, "--images", images, "--out", str(tmp_path / "again")] + CPU) == 0
    assert_toy_predictions(str(tmp_path / "again"), images, model, False)


def test_the_checkpoint_carries_the_record_and_an_older_checkpoint_resumes_and_evaluates(tmp_path, small_toy,
                                                                                         one_error_line):
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "2", "--stop-after", "1", "--work-dir", work]) == 0
    checkpoint_path = os.path.join(work, "checkpoint.pth")
    state = state_of(work)
    record = state["inference"]
    assert record["task"] == "toy" and record["class_names"] == list(TOY_CLASSES)
    assert record["align_corners"] == state["arch"]["align_corners"]
    images = two_images(tmp_path / "images")
    assert eval_main([checkpoint_path, "--images", images, "--out", str(tmp_path / "a")] + CPU) == 0
    # a checkpoint written before the record: its config knows the task, and it resumes as before
    del state["inference"]
    torch.save(state, checkpoint_path)
    assert eval_main([checkpoint_path, "--images", images, "--out", str(tmp_path / "b")] + CPU) == 0
    assert sorted(snapshot(tmp_path / "a").values()) == sorted(snapshot(tmp_path / "b").values())  # the same PNGs
    one_error_line("a model of task toy", eval_main,
                   [checkpoint_path, "--task", "gta2cs", "--images", images, "--out", str(tmp_path / "c")] + CPU,
                   tmp_path)
    assert T.main(TOY_FAST + ["--iters", "2", "--resume", "--work-dir", work]) == 0
    exported = torch.load(os.path.join(work, "model.pth"), weights_only=True)
    assert state_of(work)["inference"] == exported["inference"] == record
    assert state_of(work)["arch"] == exported["arch"] == state["arch"]


def test_cityscapes_models_record_their_size_and_label_ids_and_write_the_benchmark_without_task(tmp_path, monkeypatch,
                                                                                                 capsys):
    _, model = model_of_task(tmp_path / "hrda.pth", "gta2cs", resolution=2)
    record = torch.load(tmp_path / "hrda.pth", weights_only=True)["inference"]
    assert tuple(record["size"]) == (2048, 1024) and record["label_ids"] == CITYSCAPES_LABEL_IDS
    assert record["palette"] == PALETTE.tolist() and record["class_names"] == list(CLASSES)
    assert record["normalize"]["kind"] == "caffe" and record["normalize"]["std"] == [1.0, 1.0, 1.0]
    assert record["normalize"]["mean"] == pytest.approx(support.models.CAFFE_MEAN_BGR)  # as float32 holds them
    syn, _ = model_of_task(tmp_path / "syn.pth", "syn2cs")
    record = torch.load(syn, weights_only=True)["inference"]
    assert record["task"] == "syn2cs" and tuple(record["size"]) == (1024, 512)
    assert record["label_ids"] == CITYSCAPES_LABEL_IDS
    # the resize comes from the file: trained at 96x48, predicted at 96x48 whatever the table says now
    monkeypatch.setitem(DATASETS["cityscapes"], "size", (96, 48))
    city, model = model_of_task(tmp_path / "city.pth", "gta2cs")
    monkeypatch.setitem(DATASETS["cityscapes"], "size", (64, 32))
    root = str(tmp_path / "data")
    names = cityscapes_with_a_test_split(root)
    out = tmp_path / "results"
    assert eval_main([city, "--data-root", root, "--split", "test", "--format", "cityscapes", "--out", str(out)]
                     + CPU) == 0
    for name in names:
        ids = np.array(Image.open(out / name))
        image = np.array(Image.open(os.path.join(root, "cityscapes", "leftImg8bit", "test", name)))
        expected = np.array(CITYSCAPES_LABEL_IDS, np.uint8)[forward_by_hand(model, image, (96, 48), True)]
        assert np.array_equal(ids, expected), name
