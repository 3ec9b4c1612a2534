"""Debug grids and curve plots."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import train_dacs_mrm as T
from eval import main as eval_main
from support.data import CLASSES, PALETTE
import support.reports as R
from support.networks import build_nets
from support.reports import debug_panels, legend_strip, with_legend
from support.speed import CudaGraphStep
from support.toy import TOY_CLASSES, TOY_PALETTE

from helpers import GRAPH_CASES, TOY_FAST, fake_batch, loss_record, write_run


# ---------------------------------------------------------------- curves

def test_plot_curves_draws_each_logged_series_and_survives_a_partial_log(tmp_path, capsys):
    first = write_run(tmp_path / "first", [loss_record(i) for i in range(50, 4001, 50)] +
                      [dict(iteration=2000, val_miou=20.0), dict(iteration=4000, val_miou=30.0)])
    second = write_run(tmp_path / "second", [loss_record(i, 2.0) for i in range(50, 2001, 50)] +
                       [dict(iteration=2000, val_miou=25.0)])
    drawn = R.plot_curves([first], str(tmp_path / "first.png"))
    assert drawn == ["loss_sup", "loss_uda", "loss_mrm", "pseudo_weight", "lr", "val_miou"]  # no MIC, no FD
    # 6 panels: two rows of COLUMNS, one legend line
    size = (R.COLUMNS * R.PANEL[0], 2 * R.PANEL[1] + R.LEGEND_LINE + 8)
    assert Image.open(tmp_path / "first.png").size == size
    R.plot_curves([second], str(tmp_path / "second.png"))
    assert Image.open(tmp_path / "second.png").size == size
    assert not np.array_equal(np.array(Image.open(tmp_path / "first.png")),
                              np.array(Image.open(tmp_path / "second.png")))

    # a record being written and a damaged line are skipped: the same picture
    with open(os.path.join(first, "log.jsonl"), "a") as f:
        f.write('{"iteration": 4050, "loss_sou')
    assert R.plot_curves([first], str(tmp_path / "partial.png")) == drawn
    assert open(tmp_path / "partial.png", "rb").read() == open(tmp_path / "first.png", "rb").read()
    lines = open(os.path.join(first, "log.jsonl")).read().split("\n")
    with open(os.path.join(first, "log.jsonl"), "w") as f:
        f.write("\n".join(lines[:10] + ["{not json"] + lines[10:]))
    assert R.plot_curves([first], str(tmp_path / "damaged.png")) == drawn
    assert open(tmp_path / "damaged.png", "rb").read() == open(tmp_path / "first.png", "rb").read()

    # two runs: a line in each run's colour; an empty log draws a placeholder
    assert eval_main(["--plot", first, second, "--out", str(tmp_path / "both.png")]) == 0
    pixels = np.array(Image.open(tmp_path / "both.png")).reshape(-1, 3)
    for colour in R.RUN_COLOURS[:2]:
        assert (pixels == colour).all(axis=1).sum() > 100
    assert Image.open(tmp_path / "both.png").size == (size[0], size[1] + R.LEGEND_LINE)
    empty = write_run(tmp_path / "empty", [])
    assert R.plot_curves([empty], str(tmp_path / "empty.png")) == []

    # a whole DACS schedule's log (5000 records per series) draws one panel per series logged
    long_run = write_run(tmp_path / "long", [loss_record(i) for i in range(50, 250_001, 50)])
    assert R.plot_curves([long_run], str(tmp_path / "long.png")) == drawn[:-1]
    # a log that names L_sup loss_source draws it as loss_sup
    older = write_run(tmp_path / "older", [{"loss_source" if k == "loss_sup" else k: v
                                            for k, v in loss_record(i).items()} for i in range(50, 501, 50)])
    assert R.plot_curves([older], str(tmp_path / "older.png"))[0] == "loss_sup"
    capsys.readouterr()


def test_training_draws_its_curves_and_plot_draws_several_runs(tmp_path, small_toy, capsys, monkeypatch):
    runs = [str(tmp_path / name) for name in ("a", "b")]
    for seed, run in enumerate(runs):
        assert T.main(TOY_FAST + ["--iters", "2", "--seed", str(seed), "--work-dir", run]) == 0
    record = [json.loads(line) for line in open(os.path.join(runs[0], "log.jsonl")) if "val_miou" in line][-1]
    ious = np.array([np.nan if v is None else v for v in record["val_iou"]])
    assert len(ious) == len(TOY_CLASSES) and math.isclose(np.nanmean(ious), record["val_miou"])
    drawn = Image.open(os.path.join(runs[0], "curves.png"))
    capsys.readouterr()
    assert eval_main(["--plot", *runs, "--out", str(tmp_path / "curves.png")]) == 0
    assert re.fullmatch(r"wrote .*curves.png: \d series of 2 run\(s\)\n", capsys.readouterr().out)
    both = Image.open(tmp_path / "curves.png")
    assert both.width == drawn.width and both.height > drawn.height  # one more legend line


# ---------------------------------------------------------------- debug grids

def test_debug_grids_are_written_at_their_iterations_and_show_the_steps_mrm_mask(tmp_path, small_toy, monkeypatch):
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "4", "--debug-every", "2", "--mic", "--work-dir", work]) == 0
    assert sorted(os.listdir(os.path.join(work, "debug"))) == ["iteration_000002.png", "iteration_000004.png"]
    grid = np.array(Image.open(os.path.join(work, "debug", "iteration_000004.png")))
    legend = legend_strip(list(TOY_CLASSES) + ["ignore"], np.concatenate([TOY_PALETTE, [[0, 0, 0]]]), 4 * 256)
    # 15 panels (9 DACS, 4 MRM, 2 MIC), 64x128 scenes at 256 wide, the legend of the toy classes and ignore below
    assert grid.shape == (4 * (128 + 14) + len(legend), 4 * 256, 3)
    assert np.array_equal(grid[4 * (128 + 14):], legend)
    off = str(tmp_path / "off")
    assert T.main(TOY_FAST + ["--iters", "4", "--debug-every", "0", "--work-dir", off]) == 0
    assert not os.path.exists(os.path.join(off, "debug"))
    # the MRM panel darkens exactly the cells of the mask the step's loss used
    cfg = T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--device", "cpu", "--rebuilder-dim", "32",
                          "--rebuilder-heads", "4", "--rebuilder-grid", "4", "--iters", "4"])
    nets = build_nets(cfg)
    used = []
    real = T.mrm_auxiliary_loss
    monkeypatch.setattr(T, "mrm_auxiliary_loss", lambda *a: used.append(a[6]) or real(*a))
    _, seen = T.train_step(cfg, nets, fake_batch(), 0)
    panels = dict(debug_panels(cfg, nets, seen))
    assert len(panels) == 13 and all(p.shape == (32, 32, 3) and p.dtype == np.uint8 for p in panels.values())
    shown, mixed = panels["MRM mask (4x4)"].astype(float), panels["mixed image"].astype(float)
    darkened = (shown.sum(-1) < 0.5 * mixed.sum(-1) + 1).reshape(4, 8, 4, 8).mean(axis=(1, 3)) > 0.5
    assert (darkened == used[0][0, 0].bool().numpy()).all() and 0 < darkened.sum() < 16
    assert (panels["mixed target"] == PALETTE[seen["mixed_label"][0].numpy()]).all()


@pytest.mark.slow
def test_the_graph_steps_debug_grid_equals_the_eager_steps():
    cfg = T.parse_args(GRAPH_CASES[1] + ["--device", "cpu"])
    torch.manual_seed(0)
    eager = build_nets(cfg)
    torch.manual_seed(0)
    graphed = build_nets(cfg)
    step = CudaGraphStep(graphed, T.begin_step, T.device_step, warmup=1, capture=False)
    for iteration in range(3):
        torch.manual_seed(100 + iteration)
        _, seen_eager = T.train_step(cfg, eager, fake_batch(seed=iteration), iteration)
        torch.manual_seed(100 + iteration)
        _, seen_graphed = step(cfg, graphed, fake_batch(seed=iteration), iteration)
    for (name, a), (_, b) in zip(debug_panels(cfg, eager, seen_eager), debug_panels(cfg, graphed, seen_graphed),
                                 strict=True):
        assert np.array_equal(a, b), name


# ---------------------------------------------------------------- the class legend of pictures of predictions

def swatch_pixels(legend, colour):
    return int((legend.reshape(-1, 3) == colour).all(axis=1).sum())


def test_the_legend_shows_each_listed_class_in_its_palette_colour():
    legend = legend_strip(CLASSES, PALETTE, 300)
    assert legend.dtype == np.uint8 and legend.shape[1] == 300 and legend.shape[0] > 3 * 14  # 19 names wrap
    swatch = swatch_pixels(legend, PALETTE[0])
    assert swatch >= 9 * 9
    for c, colour in enumerate(PALETTE):
        assert swatch_pixels(legend, colour) >= swatch, CLASSES[c]
    some = legend_strip(CLASSES, PALETTE, 300, classes=[0, 18])
    assert len(some) < len(legend)
    colourful = [c for c, (r, g, b) in enumerate(PALETTE) if not r == g == b]  # text pixels are grey
    assert [c for c in colourful if swatch_pixels(some, PALETTE[c])] == [0, 18]
    # a picture 2048 wide gets it twice as large, to read where the picture is shown shrunk
    big = legend_strip(CLASSES, PALETTE, 2048, classes=[0])
    assert big.shape == (2 * len(legend_strip(CLASSES, PALETTE, 1024, classes=[0])), 2048, 3)
    assert swatch_pixels(big, PALETTE[0]) == 4 * swatch_pixels(legend_strip(CLASSES, PALETTE, 1024, [0]), PALETTE[0])
    # below a picture, which keeps its pixels; one narrower than the legend needs gets white beside it
    picture = np.random.default_rng(0).integers(0, 256, (5, 3, 3), dtype=np.uint8)
    shown = with_legend(picture, CLASSES, PALETTE, [7])
    assert shown.shape[1] == 160 and np.array_equal(shown[:5, :3], picture) and (shown[:5, 3:] == 255).all()
    assert np.array_equal(shown[5:], legend_strip(CLASSES, PALETTE, 160, [7]))
