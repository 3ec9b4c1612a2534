"""The recipes and their optimizers (DACS's SGD slots, AdamW), frameworks, the command line's flags."""
import argparse
import collections
import copy
import json
import os
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_dacs_mrm as T
from support.cli import DEFAULT_WORKERS, DEFAULTS, FLAG_KEYS, FLAGS, UNLISTED, build_parser, unread_flags
from support.data import step_inputs, to_device
from support.models import DropPath
from support.networks import SlotSGD, build_model, build_nets, dacs_parameter_slots, lr_factor, set_learning_rates

from helpers import fake_batch


def dacs_1x_lr_params(backbone):
    """DACS's model/deeplabv2.py get_1x_lr_params_NOscale, walked over our module tree (same names and nesting)."""
    for top in (backbone.conv1, backbone.bn1, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        for module in top.modules():
            for p in module.parameters():
                if p.requires_grad:
                    yield p


def torch1x_sgd_step(groups, state, momentum, weight_decay):
    """torch 1.x SGD.step written out: every listed occurrence of a tensor is one update; the momentum
    buffer lives in state[tensor], created as a copy of the first d_p."""
    with torch.no_grad():
        for group in groups:
            for p in group["params"]:
                d_p = p.grad.add(p, alpha=weight_decay)
                if id(p) not in state:
                    state[id(p)] = d_p.clone()
                else:
                    state[id(p)].mul_(momentum).add_(d_p)
                p.add_(state[id(p)], alpha=-group["lr"])


def test_dacs_parameter_slots_count_like_the_official_generator():
    with torch.device("meta"):
        model, _ = build_model("dlv2", 19, aspp_dilations=(6, 12, 18, 24))
    slots = dacs_parameter_slots(model.encoder.backbone)
    assert sum(slots.values()) == len(list(dacs_1x_lr_params(model.encoder.backbone))) == 314
    # with DACS's four-conv classifier (8 tensors, once each): the 322 slots for 112 tensors torch 1.x warned of
    assert sum(slots.values()) + 8 == 322 and len(slots) + 8 == 112
    assert sorted(collections.Counter(slots.values()).items()) == [(1, 1), (3, 99), (4, 4)]


@pytest.mark.parametrize("slots", ["official", "unique"])
def test_dacs_sgd_matches_a_torch_1x_per_slot_loop_over_three_steps(slots):
    """Our optimizer against torch 1.x's SGD loop over DACS's duplicated list (official) or a de-duplicated
    one (unique), on a tiny caffe ResNet; the two listings end far apart, so the test tells them apart."""
    cfg = T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--device", "cpu", "--no-mrm", "--iters", "10",
                          "--lr", "0.05", "--dacs-param-slots", slots])
    torch.manual_seed(0)
    nets = build_nets(cfg)
    references = {name: copy.deepcopy(nets.model) for name in ("official", "unique")}
    listings = {"official": lambda b: list(dacs_1x_lr_params(b)),
                "unique": lambda b: list(dict.fromkeys(dacs_1x_lr_params(b)))}
    groups = {name: [dict(params=listings[name](m.encoder.backbone)), dict(params=list(m.decoder.parameters()))]
              for name, m in references.items()}
    states, x = {"official": {}, "unique": {}}, torch.rand(2, 3, 33, 33)
    for iteration in range(3):
        for model in (nets.model, *references.values()):
            model.eval()  # BatchNorm on its running statistics: the same forward for every copy
            model.zero_grad()
            model(x).square().mean().backward()
        set_learning_rates(cfg, nets, iteration)
        nets.optimizers[0].step()
        for name in references:
            for group, lr in zip(groups[name], (0.05, 0.5)):
                group["lr"] = lr * lr_factor(cfg, iteration)
            torch1x_sgd_step(groups[name], states[name], momentum=0.9, weight_decay=5e-4)
    for (name, a), b in zip(nets.model.named_parameters(), references[slots].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    def conv(model):
        return model.encoder.backbone.layer1[0].conv2.weight

    listings_apart = (conv(references["official"]) - conv(references["unique"])).abs().max()
    assert listings_apart > 1e-3 and listings_apart > 100 * (conv(nets.model) - conv(references[slots])).abs().max()
    assert isinstance(nets.optimizers[0], SlotSGD if slots == "official" else torch.optim.SGD)


def test_slot_sgd_with_one_slot_is_torch_sgd_bit_for_bit():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ours = SlotSGD([dict(params=list(a.parameters()))], lr=0.1, momentum=0.9, weight_decay=5e-4)
    torchs = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        x = torch.randn(5, 4)
        for model, optimizer in ((a, ours), (b, torchs)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_rebuilder_trains_with_adamw_in_every_recipe():
    dacs = build_nets(T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--device", "cpu"]))
    sgd, adamw = dacs.optimizers
    assert isinstance(sgd, SlotSGD) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == {id(p) for p in dacs.rebuilder.parameters()}
    assert {g["initial_lr"] for g in adamw.param_groups} == {2e-4} and adamw.param_groups[0]["weight_decay"] == 0.01
    assert not any(p is q for g in sgd.param_groups for p in g["params"] for q in dacs.rebuilder.parameters())
    daformer = build_nets(T.parse_args(["--task", "gta2cs", "--arch", "mit-tiny", "--device", "cpu"]))
    (shared,) = daformer.optimizers
    rebuilder_groups = [g for g in shared.param_groups
                        if any(p is q for p in g["params"] for q in daformer.rebuilder.parameters())]
    assert rebuilder_groups and all(g["initial_lr"] == 2e-4 for g in rebuilder_groups)
    assert len(build_nets(T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--device", "cpu",
                                            "--no-mrm"])).optimizers) == 1


def test_dacs_param_slots_refused_outside_the_dacs_recipe(capsys):
    assert T.main(["--task", "gta2cs", "--arch", "mit-tiny", "--dacs-param-slots", "unique"]) == 2
    assert T.main(["--task", "gta2cs", "--dacs-param-slots", "twice"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "applies to DACS's SGD only" in err[0] and "must be one of official | unique" in err[1]


def test_recipe_and_arch_that_make_no_sense_together_are_one_line(capsys, one_error_line):
    for args in (["--recipe", "dacs", "--arch", "mitb5"], ["--recipe", "daformer", "--arch", "dlv2"],
                 ["--recipe", "mmseg-dacs", "--arch", "dlv2-tiny"], ["--recipe", "sgd"], ["--arch", "resnet"]):
        one_error_line("", T.main, ["--task", "gta2cs"] + args, start="error: --")
    assert T.main(["--task", "gta2cs", "--recipe", "daformer", "--arch", "dlv2-v1c", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert (config["recipe"], config["arch"], config["framework"], config["ema"]) == ("daformer", "dlv2-v1c", "mmseg", 0.999)


@pytest.mark.parametrize("arch,framework", [("dlv2-tiny", "dacs"), ("dlv2-v1c-tiny", "mmseg")])
def test_source_loss_reduction_and_ema_timing_follow_the_framework(arch, framework):
    """mmseg 0.16 averages the source CE over ALL pixels (ignored ones count 0), DACS over labelled ones.
    DACS updates the teacher after step `it` with alpha(it) (0 at it = 0: a copy); DAFormer before step it + 1
    with alpha(it + 1) (0.5 after the first step)."""
    cfg = T.parse_args(["--task", "gta2cs", "--arch", arch, "--device", "cpu", "--no-mrm", "--iters", "10"])
    assert cfg.framework == framework
    label = torch.randint(0, 5, (2, 32, 32), dtype=torch.uint8)
    label[:, :16] = 255
    torch.manual_seed(0)
    nets = build_nets(cfg)
    before, teacher_before = copy.deepcopy(nets.model).train(), copy.deepcopy(nets.teacher)
    batch = fake_batch(source_label=label)
    x_s, y_s, _, _ = step_inputs(nets, *to_device(batch, nets))
    with torch.no_grad():
        ce = F.cross_entropy(F.interpolate(before(x_s), size=(32, 32), mode="bilinear",
                                           align_corners=cfg.align_corners), y_s, ignore_index=255, reduction="none")
    losses, _ = T.train_step(cfg, nets, batch, 0)
    expected = ce.sum() / (ce.numel() if framework == "mmseg" else (y_s != 255).sum())
    torch.testing.assert_close(losses[0], expected)
    alpha = 0.5 if framework == "mmseg" else 0.0
    for t, t0, s in zip(nets.teacher.parameters(), teacher_before.parameters(), nets.model.parameters()):
        torch.testing.assert_close(t, alpha * t0 + (1 - alpha) * s)


def test_teacher_is_deterministic_but_stays_in_train_mode():
    """DAFormer switches off the teacher's DropPath and dropout only (BatchNorm stays in train mode)."""
    nets = build_nets(T.parse_args(["--task", "toy", "--arch", "mit-tiny", "--device", "cpu"]))
    assert nets.teacher.training
    assert any(isinstance(m, DropPath) and m.p > 0 for m in nets.teacher.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(nets.teacher(x), nets.teacher(x), rtol=0, atol=0)
        assert not torch.equal(nets.model(x), nets.model(x))  # the student's DropPath is on


@pytest.mark.parametrize("task,arch,expected", [("gta2cs", "dlv2", "resnet101COCO-41f33a49.pth"),
                                                 ("syn2cs", "dlv2-v1c", "resnet101_v1c-e67eebb6.pth"),
                                                 ("gta2cs", "mitb5", "mit_b5.pth"),
                                                 ("gta2cs", "dlv2-r50", "resnet50-11ad3fa6.pth")])
def test_paper_tasks_refuse_to_start_from_random_weights_unless_asked(tmp_path, capsys, one_error_line, task, arch,
                                                                      expected):
    work = tmp_path / "run"
    assert "--pretrained none" in one_error_line(expected, T.main, ["--task", task, "--arch", arch, "--work-dir",
                                                                    str(work)])
    assert not work.exists()
    assert T.parse_args(["--task", task, "--arch", arch, "--pretrained", "none"]).pretrained == "none"
    for mode in (["--print-config"], ["--count-flops"], ["--check-data", "--data-root", str(tmp_path)]):
        T.main(["--task", task, "--arch", arch] + mode)
        assert "--pretrained" not in capsys.readouterr().err  # the modes build nothing from weights


def test_every_flag_has_help_its_default_and_its_choices_in_groups():
    parser = build_parser(T.RECIPES, T.__doc__)
    groups = {group.title: group._group_actions for group in parser._action_groups if group.title in FLAGS}
    assert list(groups) == list(FLAGS) == ["run and data", "model", "recipe and schedule", "DACS",
                                             "MRM and the paper's ablations", "MIC", "HRDA", "precision and speed",
                                             "several GPUs (torchrun)", "modes (each does its work and exits)"]
    actions = {action.dest: action for group in groups.values() for action in group}
    assert list(actions) == FLAG_KEYS and set(DEFAULTS) < set(FLAG_KEYS)
    for key, action in actions.items():
        if key in UNLISTED:  # parsed, not listed
            listed = [line.split()[0] for line in parser.format_help().splitlines() if line.startswith("  --")]
            assert action.help == argparse.SUPPRESS and f"--{key.replace('_', '-')}" not in listed
            continue
        assert len(action.help) > 20, key
        if key in DEFAULTS:
            assert DEFAULTS[key] == "" or f"default {DEFAULTS[key]}" in action.help, key
        else:  # set by every recipe: no default of its own, each recipe's value shown
            assert "default: the recipe's" in action.help and all(key in recipe for recipe in T.RECIPES.values()), key
    assert "(recipe dacs, mmseg-dacs, toy: 0.99; daformer, hrda: 0.999)" in actions["ema"].help
    assert "(recipe dacs: 250000; mmseg-dacs, daformer, hrda: 40000; toy: 1000)" in actions["iters"].help
    assert "default 0" not in actions["iters"].help
    text = parser.format_help()
    for shown in ("--amp off|bf16|fp16", "--task gta2cs|syn2cs|toy", "--recipe dacs|mmseg-dacs|daformer|hrda|toy",
                  "--mrm-domain target|source|both", "--arch dlv2|dlv2-r50|", "--aspp-dilations 6,12|6,12,18,24",
                  "--cuda-graph, --no-cuda-graph", "--decoder deeplabv2|deeplabv3plus|daformer"):
        assert shown in text, shown
    with pytest.raises(SystemExit) as exit_:
        T.parse_args(["--help"])
    assert exit_.value.code == 0


def test_workers_default_to_the_machines_cores_up_to_four():
    cores = len(os.sched_getaffinity(0))
    assert DEFAULT_WORKERS == min(4, cores) and T.parse_args([]).workers == 0  # the toy recipe: none
    assert T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny"]).workers == min(4, cores)


def test_daformer_recipe_with_mmseg_deeplabv2_computes_the_feature_distance_on_its_one_level(tmp_path, monkeypatch):
    seen = []
    real = T.feature_distance
    monkeypatch.setattr(T, "feature_distance", lambda s, i, y: seen.append((s.shape, i.shape)) or real(s, i, y))
    cfg = T.parse_args(["--task", "gta2cs", "--arch", "dlv2-v1c-tiny", "--recipe", "daformer", "--device", "cpu",
                          "--iters", "10"])
    nets = build_nets(cfg)
    losses, _ = T.train_step(cfg, nets, fake_batch(size=64), 0)
    assert seen == [((2, 512, 8, 8), (2, 512, 8, 8))] and torch.isfinite(losses).all()


@pytest.mark.parametrize("flags,unread", [
    (["--no-mrm", "--mask-ratio", "0.5", "--mrm-weight", "2"], "--mask-ratio 0.5, --mrm-weight 2.0"),
    (["--source-only", "--ema", "0.9", "--debug-every", "5", "--checkpoint-blocks", "--pseudo-margins", "1,1,1,1"],
     "--ema 0.9, --debug-every 5, --checkpoint-blocks, --pseudo-margins 1,1,1,1"),  # a ResNet recomputes nothing
    (["--momentum", "0.5", "--rcs-min-pixels", "5", "--cat-max-ratio", "0.5", "--workers", "1"],
     "--momentum 0.5, --rcs-min-pixels 5, --cat-max-ratio 0.5"),  # AdamW; RCS off; whole images, no re-crop
    (["--arch", "mit-tiny", "--aspp-dilations", "6,12,18,24", "--checkpoint-blocks"], "--aspp-dilations 6,12,18,24"),
    (["--mrm-mode", "input", "--rebuilder-dim", "32", "--rebuilder-lr", "0.1"], "--rebuilder-dim 32, --rebuilder-lr 0.1"),
    (["--mic-weight", "2", "--mic-block-size", "4"], "--mic-weight 2.0, --mic-block-size 4"),
    (["--data-root", "/nonexistent"], "--data-root /nonexistent"),  # toy scenes are drawn, not read
    (["--crop", "64", "--cat-max-ratio", "0.5", "--flip", "--workers", "1", "--mask-ratio", "0.5"], None)])
def test_flags_the_run_never_reads_are_named_in_one_warning(tmp_path, small_toy, capsys, flags, unread):
    """Derived from what the run's code read during its first iteration, loader workers included."""
    assert T.main(["--task", "toy", "--iters", "1", "--batch-size", "2", "--workers", "0",
                   "--work-dir", str(tmp_path / "run")] + flags) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ([f"warning: {unread}: not read by this run's code (its method, architecture or recipe takes "
                         f"no such setting), so they change nothing"] if unread else [])


def test_a_copy_of_the_settings_remembers_what_it_reads_as_a_spawned_worker_would():
    cfg = T.parse_args(["--flip", "--mask-ratio", "0.5"])
    assert unread_flags(cfg) == ["--flip", "--mask-ratio 0.5"]
    copy = pickle.loads(pickle.dumps(cfg))
    assert vars(copy) == vars(cfg) and copy.given == cfg.given
    assert copy.flip is True and copy.read == {"flip"} and cfg.read == set()
    cfg.read.update(copy.read)  # what the training loop does with a batch's flags_read
    assert unread_flags(cfg) == ["--mask-ratio 0.5"]
