"""The paper's other experiments: MIC, what the MRM loss trains, the objectives, switches that cannot work."""
import copy

import pytest
import torch
import torch.nn.functional as F

import train_dacs_mrm as T
from support.data import step_inputs, to_device
from support.networks import build_nets

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


@pytest.mark.parametrize("trains", ["both", "encoder", "decoder"])
def test_mrm_trains_sends_the_mrm_gradient_only_where_asked(trains):
    """Table 4: the MRM loss alone, backpropagated; the held part gets exactly zero gradient from it."""
    cfg = T.parse_args(["--task", "toy", "--device", "cpu", "--mrm-trains", trains])
    torch.manual_seed(0)
    nets = build_nets(cfg)
    x = torch.rand(2, 3, 32, 64)
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
    cfg = T.parse_args(["--task", "toy", "--device", "cpu", "--mrm-objective", objective])
    torch.manual_seed(0)
    nets = build_nets(cfg)
    x = torch.rand(2, 3, 32, 64)
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
