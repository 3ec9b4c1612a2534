"""The paper's other experiments: MIC, what the MRM loss trains, the objectives, switches that cannot work."""
import copy

import pytest
import torch
import torch.nn.functional as F

import support.models
import train_dacs_mrm as T
from mrm import Masking
from support.data import BATCH_KEYS, step_inputs, to_device
from support.networks import build_nets
from support.reports import debug_panels
from support.speed import count_flops

from helpers import fake_batch


def test_mic_loss_is_the_student_on_masked_targets_against_the_teachers_pseudo_labels(monkeypatch):
    cfg = T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--device", "cpu", "--no-mrm", "--mic",
                          "--iters", "10", "--pseudo-threshold", "0.1"])
    torch.manual_seed(0)
    nets = build_nets(cfg)
    student, teacher = copy.deepcopy(nets.model), copy.deepcopy(nets.teacher)
    masked = torch.rand(2, 3, 32, 32)
    monkeypatch.setattr(T, "mic_masked_images", lambda *args: masked)
    batch = fake_batch()
    losses, _ = T.train_step(cfg, nets, batch, 0)
    _, _, x_t, _ = step_inputs(nets, *to_device(batch, nets))
    with torch.no_grad():
        probs = F.interpolate(teacher(x_t), size=(32, 32), mode="bilinear", align_corners=True).softmax(dim=1)
        confidence, pseudo = probs.max(dim=1)
        ce = F.cross_entropy(F.interpolate(student(masked), size=(32, 32), mode="bilinear", align_corners=True),
                             pseudo, reduction="none")
    expected = (ce * (confidence >= 0.1).float().mean()).mean()
    assert 0 < (confidence >= 0.1).float().mean() < 1
    torch.testing.assert_close(losses[3], expected)


def toy_nets(*flags):
    """(cfg, nets, images) of the toy task with these flags, seeded."""
    cfg = T.parse_args(["--task", "toy", "--device", "cpu", *flags])
    torch.manual_seed(0)
    return cfg, build_nets(cfg), torch.rand(2, 3, 32, 64)


@pytest.mark.parametrize("trains", ["both", "encoder", "decoder"])
def test_mrm_trains_sends_the_mrm_gradient_only_where_asked(trains):
    """Table 4: the MRM loss alone, backpropagated; the held part gets exactly zero gradient from it."""
    cfg, nets, x = toy_nets("--mrm-trains", trains)
    features = nets.model.encoder(x)
    labels = torch.randint(0, 7, (2, 32, 64))
    T.mrm_auxiliary_loss(cfg, nets, features, x, labels, None).backward()

    def grad(module):
        return sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None)
    assert (grad(nets.model.encoder) > 0) == (trains != "decoder")
    assert (grad(nets.model.decoder) > 0) == (trains != "encoder")
    assert grad(nets.rebuilder) > 0


@pytest.mark.parametrize("objective", ["pixel", "feature-teacher", "feature-student"])
def test_objectives_train_the_rebuilder_without_the_decoder(objective):
    cfg, nets, x = toy_nets("--mrm-objective", objective)
    loss = T.mrm_auxiliary_loss(cfg, nets, nets.model.encoder(x), x, None, None)
    loss.backward()
    assert loss > 0 and nets.rebuilder.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in nets.model.decoder.parameters())
    assert (nets.pixel_head is not None) == (objective == "pixel")
    if objective == "pixel":
        adamw = nets.optimizers[0]
        assert any(p is nets.pixel_head.weight for g in adamw.param_groups for p in g["params"])


def test_experiment_switches_that_cannot_work_are_one_line(one_error_line):
    for args, words in ((["--mrm-objective", "pixel", "--no-mrm"], "needs MRM"),
                        (["--mrm-mode", "mask-only", "--source-only"], "needs MRM"),
                        (["--decoder", "deeplabv3plus", "--arch", "mitb5"], "does not fit --arch mitb5"),
                        (["--decoder", "daformer", "--arch", "dlv2"], "does not fit --arch dlv2"),
                        (["--mrm-objective", "pixel", "--mrm-trains", "decoder"], "needs --mrm-mode rebuild"),
                        (["--mrm-objective", "feature-student", "--mrm-mode", "mask-only"], "needs --mrm-mode rebuild"),
                        (["--mic", "--source-only"], "--mic needs target images"),
                        (["--mrm-objective", "hog"], "must be one of cls | pixel"),
                        (["--mrm-trains", "rebuilder"], "must be one of both | encoder | decoder")):
        assert T.main(["--task", "gta2cs"] + args) == 2, args
        one_error_line(words)


def test_input_space_masking_masks_the_mixed_image_on_the_grid_and_its_loss_trains_the_whole_student(monkeypatch):
    """Table 6's "Input Space" row: the mixed images masked on the 16x16 grid (exactly 102 cells each), masked
    pixels the colour that normalises to 0, a second student pass whose loss alone reaches encoder and decoder."""
    x = torch.rand(2, 3, 64, 48)
    mask = Masking(16, 0.4).random_mask(2)
    fill = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    masked = T.masked_input(x, mask, fill)
    cells = mask.repeat_interleave(4, dim=2).repeat_interleave(3, dim=3).bool().expand_as(x)  # 64/16, 48/16
    assert mask.flatten(1).sum(1).tolist() == [102, 102]
    assert torch.equal(masked[~cells], x[~cells]) and torch.equal(masked[cells], fill.expand_as(x)[cells])
    assert T.main(["--task", "gta2cs", "--arch", "dlv2-tiny", "--mrm-mode", "input", "--mrm-domain", "both"]) == 2
    cfg = T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--device", "cpu", "--mrm-mode", "input",
                          "--iters", "4"])
    nets = build_nets(cfg)
    assert nets.rebuilder is not None and not list(nets.rebuilder.parameters()) and len(nets.optimizers) == 1
    state = {}
    real_masked_input, real_ce = T.masked_input, support.models.segmentation_ce

    def spied_masked_input(*args):
        state["next"] = True  # the next loss is the masked pass's
        return real_masked_input(*args)

    def only_the_masked_loss(*args, **kwargs):
        loss = real_ce(*args, **kwargs)
        return loss if state.pop("next", False) else 0 * loss

    monkeypatch.setattr(T, "masked_input", spied_masked_input)
    monkeypatch.setattr(support.models, "segmentation_ce", only_the_masked_loss)
    nets.model.train()
    batch = fake_batch()
    losses, seen = T.forward_backward(cfg, nets, *step_inputs(nets, *[batch[k] for k in BATCH_KEYS if k in batch]))
    assert losses[2] > 0 and losses[0] == losses[1] == 0
    for part in (nets.model.encoder, nets.model.decoder):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    monkeypatch.undo()
    assert "MRM masked input" in dict(debug_panels(cfg, nets, seen))
    base = count_flops("dlv2", mode="rebuild")
    assert count_flops("dlv2", mode="input")["ratio"] == 2.0 and base["ratio"] < 1.1
