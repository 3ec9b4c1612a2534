"""Tiny training runs on the CPU: logs, exports, variants, resume, the paper commands on fake data."""
import json
import os
import re

import pytest
import torch

import support.networks
import train_dacs_mrm as T
from eval import main as eval_main
from support.cli import CORES, cpu_threads
from support.models import MIT_B5, MixVisionTransformer, ResNetDilated

from helpers import TOY_FAST, assert_checkpoints_equal, state_of, tiny_dacs_run


def test_resume_is_bit_exact(tmp_path, small_toy):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert T.main(TOY_FAST + ["--iters", "6", "--work-dir", straight]) == 0
    assert T.main(TOY_FAST + ["--iters", "6", "--stop-after", "3", "--work-dir", split]) == 0
    assert state_of(split)["iteration"] == 3 and not os.path.exists(os.path.join(split, "model.pth"))
    assert T.main(TOY_FAST + ["--iters", "6", "--resume", "--work-dir", split]) == 0
    assert_checkpoints_equal(state_of(straight), state_of(split))
    lines = [json.loads(line) for line in open(os.path.join(split, "log.jsonl"))]
    assert [r["iteration"] for r in lines if "loss_sup" in r] == [2, 3, 4, 6]


def test_dacs_recipe_resume_restores_both_optimizers_bit_exactly(tmp_path):
    """The DACS recipe trains with SlotSGD plus the Rebuilder's AdamW; both come back on --resume."""
    args = tiny_dacs_run(tmp_path, iters=4, checkpoint_every=1)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert T.main(args + ["--work-dir", straight]) == 0
    assert T.main(args + ["--work-dir", split, "--stop-after", "2"]) == 0
    assert T.main(args + ["--work-dir", split, "--resume"]) == 0
    a, b = state_of(straight), state_of(split)
    assert [g["slots"] for g in a["optimizers"][0]["param_groups"]] == [1, 3, 4, 1]  # stem, block, downsample; head
    assert len(a["optimizers"]) == 2 and a["optimizers"][1]["param_groups"][0]["lr"] > 0
    assert_checkpoints_equal(a, b)
    config = json.load(open(os.path.join(straight, "config.json")))
    assert (config["recipe"], config["framework"], config["aspp_dilations"], config["iters"]) == ("dacs", "dacs", "6,12", 4)


@pytest.mark.slow
def test_training_with_the_graph_step_logs_checkpoints_and_resumes_bit_exactly(tmp_path, monkeypatch, capsys):
    """The training loop around CudaGraphStep (forced on; without a GPU it runs uncaptured): 8 iterations
    straight and 2 + 6 resumed end bit-identical (the capture falls at different iterations), the log holds
    plain decaying learning rates, and both end within float32 rounding of the eager loop."""
    args = tiny_dacs_run(tmp_path, iters=8, checkpoint_every=2)
    eager = str(tmp_path / "eager")
    assert T.main(args + ["--work-dir", eager]) == 0
    assert "step eager" in capsys.readouterr().out
    monkeypatch.setattr(support.networks, "why_eager", lambda cfg, world: "")
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert T.main(args + ["--work-dir", straight]) == 0
    assert "step as one CUDA graph" in capsys.readouterr().out
    assert T.main(args + ["--work-dir", split, "--stop-after", "2"]) == 0
    assert T.main(args + ["--work-dir", split, "--resume"]) == 0
    a, b, c = state_of(straight), state_of(split), state_of(eager)
    assert_checkpoints_equal(a, b)
    for part in ("model", "teacher", "rebuilder"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], c[part][key], msg=f"{part}.{key}")
    lrs = [json.loads(line)["lr"] for line in open(os.path.join(straight, "log.jsonl")) if "lr" in line]
    assert len(lrs) == 8 and all(type(lr) is float for lr in lrs) and lrs == sorted(lrs, reverse=True)


def test_toy_training_logs_and_exports_without_rebuilder(tmp_path, small_toy, capsys):
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "4", "--work-dir", work]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d (it/s|s/it)  ETA", out) and "mIoU" in out
    records = [json.loads(line) for line in open(os.path.join(work, "log.jsonl"))]
    assert {"iteration", "loss_sup", "loss_uda", "loss_mrm", "lr", "time"} <= records[0].keys()
    assert records[-1]["val_miou"] >= 0
    exported = torch.load(os.path.join(work, "model.pth"), weights_only=True)
    assert not any("rebuild" in key for key in exported["model"])
    assert exported["model"].keys() == state_of(work)["model"].keys()
    # zero inference cost: the exported network is the same graph as one trained without MRM
    baseline = str(tmp_path / "no-mrm")
    assert T.main(TOY_FAST + ["--iters", "2", "--no-mrm", "--work-dir", baseline]) == 0
    without = torch.load(os.path.join(baseline, "model.pth"), weights_only=True)
    assert {k: v.shape for k, v in exported["model"].items()} == {k: v.shape for k, v in without["model"].items()}
    assert exported["arch"] == without["arch"] and exported["num_classes"] == without["num_classes"]


@pytest.mark.parametrize("extra", [["--source-only"], ["--no-mrm"], ["--mrm-domain", "both", "--mask-ratio", "0.6"],
                                   ["--arch", "mit-tiny", "--checkpoint-blocks"], ["--mic"], ["--mic", "--no-mrm"],
                                   ["--mrm-objective", "pixel"], ["--mrm-objective", "feature-teacher"],
                                   ["--mrm-objective", "feature-student"], ["--mrm-mode", "mask-only"],
                                   ["--mrm-trains", "encoder"], ["--mrm-trains", "decoder"], ["--mrm-mode", "input"]])
def test_toy_variants_run(tmp_path, small_toy, extra):
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", str(tmp_path)] + extra) == 0
    state = state_of(str(tmp_path))
    assert (state["rebuilder"] is None) == ("--source-only" in extra or "--no-mrm" in extra)
    assert (state["pixel_head"] is None) == ("pixel" not in extra)
    records = [json.loads(line) for line in open(os.path.join(str(tmp_path), "log.jsonl")) if "loss_mic" in line]
    assert "--mic" in extra or records[-1]["loss_mic"] == 0  # its value: test_mic_loss_is_the_student_on...
    assert (state["teacher"] is None) == ("--source-only" in extra)


def test_gta2cs_starts_on_fake_data_in_the_real_layout(tmp_path, fake_data, run_main):
    root = fake_data(gta=(3, (96, 64)), cityscapes=(2, (128, 64)))
    work = str(tmp_path / "run")
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--iters", "2", "--crop", "48",
            "--workers", "0", "--work-dir", work, "--log-every", "1"]
    code, out, _ = run_main(args)
    assert code == 0 and "3 source / 2 target images" in out and "mIoU over 19 classes" in out
    assert eval_main([os.path.join(work, "model.pth"), "--task", "gta2cs", "--data-root", root,
                      "--workers", "0", "--save-dir", str(tmp_path / "pred")]) == 0
    assert len(os.listdir(tmp_path / "pred")) == 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dlv2", "dlv2-v1c", "mitb5"])
def test_documented_paper_command_starts_on_fake_data(tmp_path, fake_data, monkeypatch, capsys, arch):
    """`--task gta2cs --data-root data [--arch dlv2-v1c --pretrained resnet101_v1c.pth | --arch mitb5
    --pretrained mit_b5.pth]` with the full-size networks, cut to one iteration on 64x64 crops; checkpoint
    writing and validation are recorded, not run (a MiT-B5 checkpoint with AdamW states is over 1 GB)."""
    root = fake_data(gta=(2, (1280, 720)), cityscapes=(1, (1024, 512)))
    args = ["--task", "gta2cs", "--data-root", root]
    if arch == "dlv2":  # deliberately from random weights
        args += ["--pretrained", "none"]
    if arch == "dlv2-v1c":  # mmcv's layout: stem.*, layerX.*, under 'state_dict' with a 'meta' entry
        weights = ResNetDilated(style="v1c").state_dict()
        torch.save({"meta": {}, "state_dict": weights}, str(tmp_path / "resnet101_v1c.pth"))
        args += ["--arch", "dlv2-v1c", "--pretrained", str(tmp_path / "resnet101_v1c.pth")]
    if arch == "mitb5":  # SegFormer's file layout: the backbone's keys plus its ImageNet classifier
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in MixVisionTransformer(**MIT_B5).state_dict().items()}
        generator = torch.Generator().manual_seed(0)
        weights = {k: (0.02 * torch.randn(shape, generator=generator)).half() for k, shape in shapes.items()}
        weights.update({"head.weight": torch.zeros(1000, 512), "head.bias": torch.zeros(1000)})
        torch.save(weights, str(tmp_path / "mit_b5.pth"))
        args += ["--no-pl-crop", "--arch", "mitb5", "--pretrained", str(tmp_path / "mit_b5.pth")]  # a 64 crop
    losses, calls = [], []
    real_step = T.train_step
    def recorded_step(*args):
        result = real_step(*args)
        losses.append(result[0])
        return result

    monkeypatch.setattr(T, "train_step", recorded_step)
    for name in ("save_checkpoint", "export_model", "validate"):
        monkeypatch.setattr(T, name, lambda *a, name=name: calls.append(name))
    small = ["--iters", "1", "--crop", "64", "--batch-size", "1", "--workers", "0", "--work-dir", str(tmp_path / "run")]
    assert T.main(args + small) == 0
    recipe = {"dlv2": "dacs", "dlv2-v1c": "mmseg-dacs", "mitb5": "daformer"}[arch]
    out = capsys.readouterr().out
    assert f"gta2cs: {arch} ({recipe} recipe), DACS + MRM" in out
    initialisation = "random weights" if arch == "dlv2" else args[-1]
    threads = torch.get_num_threads()
    assert f"from {initialisation}; fp32 on cpu ({threads} CPU thread{'s' * (threads > 1)}), step eager (without --cuda-graph)" in out
    assert len(losses) == 1 and torch.isfinite(losses[0]).all() and losses[0][0] > 0
    assert calls == ["save_checkpoint", "export_model", "validate"]


def test_progress_shows_the_first_iteration_at_once_and_seconds_per_iteration_when_slow(tmp_path, small_toy,
                                                                                        capsys):
    cfg = T.parse_args(["--task", "toy"])
    means = [1.0, 2.0, 3.0, 0.0, 0.0, 0.5]
    assert T.progress_line(cfg, 10, means, 2.5).endswith("weight 0.500  2.50 it/s  ETA 6m36s")
    assert T.progress_line(cfg, 10, means, 0.25).endswith("weight 0.500  4.0 s/it  ETA 1h06m")
    assert T.progress_line(cfg, 10, means, 1).startswith("[10/1000] L_sup 1.0000  L_uda 2.0000  L_mrm 3.0000  weight")
    no_mrm = T.parse_args(["--task", "toy", "--no-mrm"])
    assert T.progress_line(no_mrm, 10, means, 1).startswith("[10/1000] L_sup 1.0000  L_uda 2.0000  weight")
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "3", "--log-every", "3", "--checkpoint-every", "3",
                              "--work-dir", work]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[1/3", "[3/3"]
    records = [json.loads(line) for line in open(os.path.join(work, "log.jsonl")) if "loss_sup" in line]
    assert [r["iteration"] for r in records] == [3]  # the early line is printed only, not logged


def test_daformer_recipe_on_fake_data_with_rare_class_sampling(tmp_path, fake_data):
    root = fake_data(synthia=(3, (96, 64)), cityscapes=(2, (128, 64)))
    args = ["--task", "syn2cs", "--data-root", root, "--arch", "mit-tiny", "--iters", "2", "--crop", "160",
            "--rcs-min-pixels", "64",
            "--workers", "0", "--work-dir", str(tmp_path / "run"), "--log-every", "1"]
    assert T.main(args) == 0
    assert os.path.exists(os.path.join(root, "synthia", "rcs_stats_synthia_3.json"))


def test_val_every_0_validates_only_the_last_iteration_and_threads_are_chosen_and_restored(tmp_path, small_toy,
                                                                                           capsys):
    work, before = str(tmp_path / "run"), torch.get_num_threads()
    assert T.main(TOY_FAST + ["--iters", "4", "--val-every", "0", "--threads", "1", "--work-dir", work]) == 0
    records = [json.loads(line) for line in open(os.path.join(work, "log.jsonl"))]
    assert [r["iteration"] for r in records if "val_miou" in r] == [4]
    assert "fp32 on cpu (1 CPU thread), step" in capsys.readouterr().out and torch.get_num_threads() == before
    cfg = T.parse_args(["--task", "toy", "--workers", "1"])
    assert cpu_threads(cfg) == max(1, min(torch.get_num_threads(), CORES - 1))
    assert cpu_threads(T.parse_args(["--task", "toy", "--threads", "3"])) == 3
