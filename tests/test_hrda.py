"""HRDA: the multi-resolution model, its losses, slide inference of any image shape, its recipe."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as E
import train_dacs_mrm as T
from eval import main as eval_main
from support.data import Domain, TrainBatches, margin_mask
from support.hrda import HRDAEncoder, HRDAModel, Views, rebuilt_features, slide_boxes
from support.models import MIT_B5, MIT_TINY, MiTEncoder, MixVisionTransformer
from support.networks import build_nets
from support.reports import debug_panels
from support.speed import count_flops

from helpers import TOY_FAST, assert_checkpoints_equal, state_of


# ---------------------------------------------------------------- HRDA: multi-resolution model, losses, slides

HRDA_TOY = TOY_FAST + ["--arch", "mit-tiny", "--detail-crop", "32"]


def tiny_hrda(num_classes=3, crop=64, side=32, window=0):
    torch.manual_seed(0)
    encoder = MiTEncoder(MIT_TINY)
    return HRDAModel(encoder, num_classes, 8, context_scale=0.5, detail_crop=side, window=window or crop)


def test_hrda_detail_window_offsets_are_multiples_of_8_one_per_batch_new_per_forward():
    """HRDA's get_crop_bbox(divisible=8): offsets randint(0, (1024 - 512 + 1) // 8) * 8, so 0..504 (512 never);
    one window for the whole batch, a new one at every training forward."""
    encoder = HRDAEncoder(MiTEncoder(MIT_TINY), 0.5, 512)
    random.seed(0)
    boxes = [encoder.draw_box(1024, 1024) for _ in range(4000)]
    offsets = {v for box in boxes for v in box}
    assert offsets == set(range(0, 505, 8))
    assert encoder.draw_box(512, 512) == (0, 0)
    seen, real_mit = [], encoder.mit.forward
    encoder.mit.forward = lambda x: seen.append(x) or real_mit(x)
    x = torch.rand(2, 3, 64, 96)
    small = HRDAEncoder(encoder.mit, 0.5, 32)
    views = [small(x) for _ in range(6)]
    for v, (context, detail) in zip(views, zip(seen[::2], seen[1::2])):
        (top, left), = v.boxes  # one window for both images
        assert top % 8 == 0 and left % 8 == 0 and 0 <= top <= 32 and 0 <= left <= 64
        assert torch.equal(detail, x[:, :, top:top + 32, left:left + 32])
        assert torch.equal(context, F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False))
    assert len({tuple(v.boxes[0]) for v in views}) > 1


def bilinear_up2(t):
    """x2 bilinear upsampling, align_corners False, written out per output pixel in float64."""
    B, C, h, w = t.shape
    out = torch.zeros(B, C, 2 * h, 2 * w, dtype=torch.float64)

    def taps(i, n):
        src = max((i + 0.5) / 2 - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n - 1)
        return i0, min(i0 + 1, n - 1), src - i0

    for y in range(2 * h):
        y0, y1, fy = taps(y, h)
        for x in range(2 * w):
            x0, x1, fx = taps(x, w)
            out[:, :, y, x] = ((1 - fy) * ((1 - fx) * t[:, :, y0, x0] + fx * t[:, :, y0, x1]) +
                               fy * ((1 - fx) * t[:, :, y1, x0] + fx * t[:, :, y1, x1]))
    return out


def test_hrda_fused_prediction_against_a_loop_over_pixels():
    """64 crop, 32 window at (8, 16): lr and attention (8x8, stride 8 of the crop), hr (8x8, stride 4 of the
    window); attention 0 outside the window's LR cells, lr * (1 - a), both up x2, hr pasted at box / 4."""
    head = tiny_hrda().decoder.eval()
    torch.manual_seed(1)
    context = [torch.randn(2, c, 32 // s, 32 // s) for c, s in zip(MIT_TINY["embed_dims"], (4, 8, 16, 32))]
    detail = [torch.randn_like(f) for f in context]
    views = Views(context, detail, [(8, 16)], 32)
    out = head(views)
    lr = head.head(context).double()
    attention = torch.sigmoid(head.scale_attention(context)).double()
    hr = head.head(detail).double()
    assert out.fused.shape == (2, 3, 16, 16) and out.detail.shape == (2, 3, 8, 8)
    masked = torch.zeros_like(attention)
    for y in range(8):
        for x in range(8):
            if 1 <= y < 5 and 2 <= x < 6:  # the window's rows 8..40, columns 16..48 in cells of 8 pixels
                masked[:, :, y, x] = attention[:, :, y, x]
    up_a, up_lr = bilinear_up2(masked), bilinear_up2((1 - masked) * lr)
    expected = up_lr.clone()
    for y in range(16):
        for x in range(16):
            if 2 <= y < 10 and 4 <= x < 12:  # the window in stride-4 cells
                expected[:, :, y, x] += up_a[:, :, y, x] * hr[:, :, y - 2, x - 4]
    torch.testing.assert_close(out.fused.double(), expected, rtol=1e-5, atol=1e-5)
    # outside the window's reach the attention is 0 and the fused logits are the context's own
    far = torch.ones(16, 16, dtype=torch.bool)
    far[1:11, 3:13] = False
    torch.testing.assert_close(out.fused.double()[..., far], bilinear_up2(lr)[..., far], rtol=1e-5, atol=1e-5)


def test_hrda_teacher_slides_9_detail_windows_that_tile_the_crop():
    """The inference forward on a 1024 crop: context at 0.5, 9 windows of 512 at stride 256 in one encoder batch;
    a model predicting one constant gives that constant everywhere only if the windows cover every pixel."""
    boxes = slide_boxes(1024, 1024, 512, 256)
    assert boxes == [(t, l) for t in (0, 256, 512) for l in (0, 256, 512)]
    count = torch.zeros(1024, 1024)
    for t, l in boxes:
        count[t:t + 512, l:l + 512] += 1
    assert count.min() == 1 and count.max() == 4
    model = tiny_hrda(crop=64, side=32).eval()
    with torch.no_grad():
        for head in (model.decoder.head, model.decoder.scale_attention):
            head.conv_seg.weight.zero_()
        model.decoder.head.conv_seg.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    batches, real_mit = [], model.encoder.mit.forward
    model.encoder.mit.forward = lambda x: batches.append(x.shape[0]) or real_mit(x)
    out = model(torch.rand(2, 3, 64, 64))
    assert batches == [2, 2 * 9] and out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out, torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1).expand(2, 3, 64, 64))


def test_hrda_test_time_slide_1024_windows_at_stride_512_average_their_logits(monkeypatch):
    """2048x1024 images: three 1024 windows in one batch, each window's logits at its size, averaged where two
    overlap. With encode_decode returning its input, the average gives the image back."""
    model = tiny_hrda(window=1024)
    assert slide_boxes(1024, 2048, 1024, 512) == [(0, 0), (0, 512), (0, 1024)]
    seen = []
    monkeypatch.setattr(model, "encode_decode", lambda x: seen.append(x.shape) or x * 1.0)
    x = torch.rand(1, 3, 1024, 2048)
    assert torch.allclose(model(x), x, atol=1e-6) and seen == [(3, 3, 1024, 1024)]
    monkeypatch.setattr(model, "encode_decode", lambda x: torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 1024, 1024))
    out = model(x)[0, 0]
    assert out[0, :512].eq(0).all() and out[0, 512:1024].eq(0.5).all() and out[0, 1024:1536].eq(1.5).all()
    assert out[0, 1536:].eq(2).all()


class FakeTarget:
    """A target domain of one image whose colours are its pixel coordinates: R = row, G = column."""
    name = "fake"

    def __init__(self, h, w):
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        self.image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)

    def __len__(self):
        return 1

    def load(self, i, full_label=False, with_label=True):
        return self.image, np.full(self.image.shape[:2], 255, np.uint8)


def test_hrda_pseudo_margins_follow_the_target_crop_and_flip():
    margins = (3, 24, 3, 5)
    full = margin_mask((100, 200), margins)
    assert full.sum() == (100 - 27) * (200 - 8) and full[3:76, 3:195].all()
    cfg = T.parse_args(["--task", "toy", "--crop", "64", "--flip", "--pseudo-margins", "3,24,3,5", "--batch-size", "8"])
    target = FakeTarget(100, 200)
    flipped = 0
    for iteration in range(3):
        batch = TrainBatches(cfg, target, target)[iteration]
        images, valid = batch["target_image"], batch["target_valid"]
        assert valid.shape == (8, 64, 64) and valid.dtype == torch.uint8
        for image, v in zip(images, valid):
            rows, cols = image[0].long(), image[1].long()
            assert torch.equal(v, torch.from_numpy(full)[rows, cols])
            flipped += int(cols[0, 0] > cols[0, -1])
    assert 0 < flipped < 24
    assert "target_valid" not in TrainBatches(T.parse_args(["--task", "toy"]), target, target)[0]


def test_hrda_recipe_settings_and_mic_blocks_of_64_at_1024(capsys):
    assert T.main(["--task", "gta2cs", "--recipe", "hrda", "--arch", "mitb5", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert {k: cfg[k] for k in ("crop", "detail_crop", "context_scale", "hr_loss_weight", "pseudo_margins",
                                "rcs_min_crop_ratio", "ema", "lr", "iters", "resolution", "mic_block_size", "pl_crop",
                                "fd_weight", "optimizer", "warmup_iters", "batch_size", "flip", "cat_max_ratio")} == dict(
        crop=1024, detail_crop=512, context_scale=0.5, hr_loss_weight=0.1, pseudo_margins="30,240,30,30",
        rcs_min_crop_ratio=2.0, ema=0.999, lr=6e-5, iters=40000, resolution=2, mic_block_size=64, pl_crop=False,
        fd_weight=0.005, optimizer="adamw", warmup_iters=1500, batch_size=2, flip=True, cat_max_ratio=0.75)
    assert cfg["work_dir"] == "runs/gta2cs-mitb5-hrda-dacs-mrm-seed0"
    torch.manual_seed(0)
    fill = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    out = T.mic_masked_images(torch.full((2, 3, 1024, 1024), 0.3), fill, 0.0, 0.8, 0.7, cfg["mic_block_size"])
    masked = (out - fill).abs().sum(dim=1) < 1e-6
    blocks = masked.view(2, 16, 64, 16, 64)
    assert (blocks == blocks[:, :, :1, :, :1]).all() and 0.55 < masked.float().mean() < 0.85
    # HRDA's training forward costs two MiT passes at half the crop's side and the heads; MRM decodes both views
    hrda = count_flops("mit-tiny", (64, 64), 19, dict(embed_dim=32, num_heads=4),
                         hrda=dict(context_scale=0.5, detail_crop=32, window=64))
    single = count_flops("mit-tiny", (32, 32), 19, dict(embed_dim=32, num_heads=4))
    assert 2 * single["model_gmac"] < hrda["model_gmac"] < 2.2 * single["model_gmac"]
    assert 2 * single["extra_gmac"] <= hrda["extra_gmac"] < 2.2 * single["extra_gmac"]


@pytest.mark.parametrize("args,message", [
    (["--arch", "dlv2-tiny", "--detail-crop", "32"], "runs a MiT"),
    (["--arch", "mit-tiny", "--detail-crop", "36"], "multiples of 16"),
    (["--arch", "mit-tiny", "--detail-crop", "32", "--mrm-objective", "pixel"], "--mrm-objective cls"),
    (["--arch", "mit-tiny", "--detail-crop", "32", "--compile"], "recompile"),
    (["--arch", "mit-tiny", "--hr-loss-weight", "0.2"], "needs --detail-crop"),
    (["--arch", "mit-tiny", "--pseudo-margins", "1,2,3"], "four pixel counts"),
])
def test_hrda_flags_that_cannot_work_are_refused_in_one_line(one_error_line, args, message):
    assert T.main(["--task", "toy"] + args) == 2
    one_error_line(message)


def test_hrda_mrm_gradient_reaches_both_views_the_rebuilder_and_the_heads():
    cfg = T.parse_args(HRDA_TOY + ["--iters", "2"])
    nets = build_nets(cfg)
    nets.model.train()
    x = torch.rand(2, 3, 64, 128)
    views = nets.model.encoder(x)
    for f in views.context + views.detail:
        f.retain_grad()
    labels = torch.randint(0, 7, (2, 64, 128))
    loss = T.mrm_auxiliary_loss(cfg, nets, views, x, labels, torch.ones(2, 64, 128))
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in views.context + views.detail)
    for module in (nets.rebuilder, nets.model.decoder.head, nets.model.decoder.scale_attention):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    mask = torch.zeros(4, 1, 8, 8)
    mask[:2, :, :4] = 1  # the context's masks: its top half; the detail windows' masks: nothing
    rebuilt = rebuilt_features(nets.rebuilder, views, mask)
    assert rebuilt.boxes == views.boxes and all(torch.equal(a, b) for a, b in zip(rebuilt.detail, views.detail))
    assert not torch.equal(rebuilt.context[0], views.context[0])


@pytest.mark.slow
def test_hrda_toy_recipe_trains_resumes_bit_exactly_and_evaluates_by_its_record(tmp_path, small_toy):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    args = HRDA_TOY + ["--iters", "6", "--mic", "--pseudo-margins", "2,8,2,2"]
    assert T.main(args + ["--work-dir", straight]) == 0
    assert T.main(args + ["--stop-after", "3", "--work-dir", split]) == 0
    assert T.main(args + ["--resume", "--work-dir", split]) == 0
    assert_checkpoints_equal(state_of(straight), state_of(split))
    exported = torch.load(os.path.join(straight, "model.pth"), weights_only=True)
    assert exported["arch"]["hrda"] == dict(context_scale=0.5, detail_crop=32, window=0)
    model, _, _ = E.load_segmentation_model(os.path.join(straight, "model.pth"))
    assert isinstance(model, HRDAModel) and not any("rebuild" in key for key in exported["model"])
    assert eval_main([os.path.join(straight, "model.pth"), "--task", "toy", "--workers", "0"]) == 0


@pytest.mark.slow
def test_hrda_toy_loss_falls(tmp_path, small_toy):
    work = str(tmp_path / "run")
    assert T.main(HRDA_TOY + ["--iters", "40", "--log-every", "5", "--checkpoint-every", "40", "--work-dir", work,
                              "--no-mrm"]) == 0
    losses = [json.loads(line)["loss_sup"] for line in open(os.path.join(work, "log.jsonl")) if "loss_sup" in line]
    assert len(losses) == 8 and sum(losses[-2:]) < 0.9 * sum(losses[:2])


@pytest.mark.slow
def test_hrda_paper_command_starts_on_fake_data_at_full_resolution(tmp_path, fake_data, monkeypatch, capsys):
    """`--task gta2cs --recipe hrda --pretrained mit_b5.pth` on GTA (1914x1052 -> 2560x1407) and Cityscapes
    (2048x1024) files, cut to one iteration of one image pair on 64 crops with a 32 window (the smallest the MiT
    takes: the files' sizes are what this test is about); checkpoints and validation recorded, not run."""
    root = fake_data(gta=(1, (1914, 1052)), cityscapes=(1, (2048, 1024)))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MixVisionTransformer(**MIT_B5).state_dict().items()}
    weights = {k: torch.zeros(shape, dtype=torch.half) for k, shape in shapes.items()}
    torch.save(weights, str(tmp_path / "mit_b5.pth"))
    seen, calls = [], []
    real_forward = T.forward_backward
    monkeypatch.setattr(T, "forward_backward",
                        lambda cfg, nets, *inputs: seen.append(inputs) or real_forward(cfg, nets, *inputs))
    for name in ("save_checkpoint", "export_model", "validate"):
        monkeypatch.setattr(T, name, lambda *a, name=name: calls.append(name))
    args = ["--task", "gta2cs", "--recipe", "hrda", "--arch", "mitb5", "--pretrained", str(tmp_path / "mit_b5.pth"),
            "--data-root", root, "--iters", "1", "--crop", "64", "--detail-crop", "32", "--batch-size", "1",
            "--workers", "0", "--work-dir", str(tmp_path / "run")]
    assert T.main(args) == 0
    out = capsys.readouterr().out
    assert "gta2cs: mitb5 (hrda recipe), DACS + MRM" in out
    (x_s, y_s, x_t, valid), = seen
    assert x_s.shape == (1, 3, 64, 64) and valid.shape == (1, 64, 64)
    assert calls == ["save_checkpoint", "export_model", "validate"]
    source = Domain("gta", root, resolution=2)
    target = Domain("cityscapes", root, resolution=2)
    assert source.load(0)[0].shape == (1407, 2560, 3) and target.load(0)[0].shape == (1024, 2048, 3)


def test_hrda_debug_grid_shows_the_detail_window_and_the_rebuilt_prediction():
    cfg = T.parse_args(HRDA_TOY + ["--iters", "2", "--mic"])
    nets = build_nets(cfg)
    batch = TrainBatches(cfg, Domain("toy-source"), Domain("toy-target"))[0]
    _, seen = T.train_step(cfg, nets, batch, 0)
    panels = dict(debug_panels(cfg, nets, seen))
    (top, left, side), = seen["detail_window"]
    window = panels["HRDA detail window (32x32)"]
    mixed = panels["mixed image"]
    assert np.array_equal(window[top:top + side, left:left + side], mixed[top:top + side, left:left + side])
    assert window.sum() < mixed.sum()
    assert {"prediction from rebuilt features", "MIC prediction"} <= panels.keys()
    assert all(p.shape[:2] == (64, 128) for p in panels.values())


@pytest.mark.parametrize("extra", [["--mrm-domain", "both"], ["--mrm-domain", "source"], ["--mrm-trains", "encoder"],
                                   ["--mrm-trains", "decoder"], ["--mrm-mode", "mask-only"], ["--mrm-mode", "input"],
                                   ["--no-mrm"], ["--source-only"], ["--fd-weight", "0.005"]])
def test_hrda_toy_variants_run(tmp_path, small_toy, extra):
    assert T.main(HRDA_TOY + ["--iters", "2", "--work-dir", str(tmp_path)] + extra) == 0
    records = [json.loads(line) for line in open(os.path.join(str(tmp_path), "log.jsonl")) if "loss_mrm" in line]
    assert (records[-1]["loss_mrm"] > 0) == ("--no-mrm" not in extra and "--source-only" not in extra)


# ---------------------------------------------------------------- HRDA: inference on images of any shape

def mmseg_slide_windows(h_img, w_img, h_crop, w_crop):
    """EncoderDecoder.slide_inference's windows (y1, y2, x1, x2) at half-crop strides, as mmseg writes them."""
    h_stride, w_stride = h_crop // 2, w_crop // 2
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


def coordinate_images(batch, height, width):
    """Images whose channels are each pixel's row, column and image index: a window's crop knows where it lies."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    return torch.stack([torch.stack([rows, cols, torch.full_like(rows, b)]) for b in range(batch)])


def window_logits(rows, cols, image, top, left):
    """Two logits per pixel from its row, column and image and its window's corner, so that windows disagree
    where they overlap; torch ops on tensors of any float type."""
    return torch.stack([torch.sin(0.013 * rows + 0.007 * cols) + 0.001 * top - 0.002 * left + image,
                        0.5 * torch.cos(0.011 * cols - 0.003 * rows) * (1 + 1e-6 * top * left) - image], dim=-3)


def encode_decode_of_coordinates(seen):
    """A stand-in for HRDAModel.encode_decode: window_logits of each crop of coordinate_images."""
    def encode_decode(crops):
        seen.append(tuple(crops.shape))
        rows, cols, image = crops[:, 0], crops[:, 1], crops[:, 2]
        return window_logits(rows, cols, image, rows[:, :1, :1], cols[:, :1, :1])
    return encode_decode


@pytest.mark.parametrize("size", [(768, 2048), (2048, 768), (900, 1500), (1500, 900), (700, 500), (700, 1500),
                                  (1024, 1024), (1024, 2048)])
def test_hrda_slide_inference_of_any_image_shape_is_mmsegs(monkeypatch, size):
    """HRDAModel.forward as slide_inference with 1024 windows at stride 512 over images of any shape: a window is
    at most the image's extent, its logits at its size are added at (y1, x1) and divided by the windows' count;
    one encode_decode batch of the image's windows. Against the average over mmseg's windows in float64."""
    height, width = size
    model = tiny_hrda(window=1024)
    seen = []
    monkeypatch.setattr(model, "encode_decode", encode_decode_of_coordinates(seen))
    out = model(coordinate_images(2, height, width))
    windows = mmseg_slide_windows(height, width, 1024, 1024)
    assert seen == [(len(windows) * 2, 3, min(1024, height), min(1024, width))]
    expected = torch.zeros(2, 2, height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    for y1, y2, x1, x2 in windows:
        rows, cols = torch.meshgrid(torch.arange(y1, y2, dtype=torch.float64),
                                    torch.arange(x1, x2, dtype=torch.float64), indexing="ij")
        for b in range(2):
            expected[b, :, y1:y2, x1:x2] += window_logits(rows, cols, b, y1, x1)
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1 and out.shape == (2, 2, height, width)
    torch.testing.assert_close(out.double(), expected / count, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(13, 21), (21, 13), (5, 11), (11, 5), (8, 19), (6, 6)])
def test_hrda_slide_inference_against_a_loop_over_windows_and_pixels(monkeypatch, size):
    """8-pixel windows at stride 4, the images larger, smaller or both in either side: every pixel the mean of
    its windows' logits, summed pixel by pixel in Python floats."""
    height, width = size
    model = tiny_hrda(window=8)
    monkeypatch.setattr(model, "encode_decode", encode_decode_of_coordinates([]))
    out = model(coordinate_images(2, height, width)).double()
    for b in range(2):
        for y in range(height):
            for x in range(width):
                sums, count = [0.0, 0.0], 0
                for y1, y2, x1, x2 in mmseg_slide_windows(height, width, 8, 8):
                    if y1 <= y < y2 and x1 <= x < x2:
                        count += 1
                        sums[0] += math.sin(0.013 * y + 0.007 * x) + 0.001 * y1 - 0.002 * x1 + b
                        sums[1] += 0.5 * math.cos(0.011 * x - 0.003 * y) * (1 + 1e-6 * y1 * x1) - b
                assert out[b, 0, y, x].item() == pytest.approx(sums[0] / count, abs=1e-5), (b, y, x)
                assert out[b, 1, y, x].item() == pytest.approx(sums[1] / count, abs=1e-5), (b, y, x)


def paste_by_hand(windows, boxes, size, stride):
    """paste_mean by loops over windows and cells: logits at box // stride, cut at the map's edge, averaged."""
    batch = windows.shape[0] // len(boxes)
    total = torch.zeros(batch, windows.shape[1], *size, dtype=torch.float64)
    count = torch.zeros(size, dtype=torch.float64)
    for k, (top, left) in enumerate(boxes):
        for i in range(windows.shape[2]):
            for j in range(windows.shape[3]):
                y, x = top // stride + i, left // stride + j
                if y < size[0] and x < size[1]:
                    total[:, :, y, x] += windows[k * batch:(k + 1) * batch, :, i, j].double()
                    count[y, x] += 1
    return total / count.clamp(min=1)


def test_hrda_paste_mean_of_windows_smaller_than_the_side_past_the_edge_and_off_the_grid():
    """Detail logits of 13 x 18 windows (side 80: the crop smaller in both sides) at stride 4, boxes off the
    4-pixel grid (HRDA's scale_box floors them), a map that a window passes."""
    from support.hrda import paste_mean
    torch.manual_seed(0)
    boxes = [(0, 0), (0, 10), (22, 0), (22, 10)]
    windows = torch.randn(len(boxes) * 2, 3, 13, 18)
    out = paste_mean(windows, boxes, 80, (17, 20), stride=4)
    torch.testing.assert_close(out.double(), paste_by_hand(windows, boxes, (17, 20), 4), rtol=1e-6, atol=1e-6)
    with pytest.raises(AssertionError):  # logits larger than a whole window's
        paste_mean(windows, boxes, 48, (17, 20), stride=4)


def constant_hrda(crop, side=32, window=0):
    """A tiny HRDA whose head predicts (0.5, -1, 2) everywhere and whose scale attention is 0.5: the fused logits
    are the constant only where the detail windows' logits reach."""
    model = tiny_hrda(crop=crop, side=side, window=window).eval()
    with torch.no_grad():
        for head in (model.decoder.head, model.decoder.scale_attention):
            head.conv_seg.weight.zero_()
            head.conv_seg.bias.zero_()
        model.decoder.head.conv_seg.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    return model


@pytest.mark.parametrize("size, side", [((100, 76), 32), ((90, 58), 32), ((61, 97), 32), ((64, 64), 32),
                                        ((64, 150), 96)])
def test_hrda_encode_decode_crops_of_any_shape(size, side):
    """encode_decode on crops whose sides are not multiples of the detail window nor of 8 (100 = 4 mod 8: the
    upsampled context is 26 cells, the windows reach 25), or smaller than it in one side (64 x 96 windows): the
    windows are those of mmseg's formula, the fused map is cut to where they reach, so a constant head gives the
    constant over the whole crop."""
    height, width = size
    model = constant_hrda(crop=max(size), side=side)
    views = model.encoder.slide(torch.rand(2, 3, height, width))
    windows = mmseg_slide_windows(height, width, side, side)
    assert views.boxes == [(y1, x1) for y1, _, x1, _ in windows]
    assert views.detail[0].shape[0] == 2 * len(windows)
    with torch.no_grad():
        out = model.encode_decode(torch.rand(2, 3, height, width))
    assert out.shape == (2, 3, height, width)
    torch.testing.assert_close(out, torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1).expand_as(out))


def test_hrda_predicts_an_image_of_an_odd_shape_end_to_end():
    """A real tiny HRDA (MiT, 96 windows at stride 48, 32 detail windows at stride 16) on a 150 x 77 image: the
    windows are 96 x 77, the detail windows inside them partly off the 4-pixel grid; logits of the image's shape,
    finite, and with a constant head the constant everywhere."""
    model = tiny_hrda(crop=96, side=32).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 150, 77))
    assert out.shape == (2, 3, 150, 77) and torch.isfinite(out).all()
    with torch.no_grad():
        out = constant_hrda(crop=96)(torch.rand(1, 3, 77, 150))
    torch.testing.assert_close(out, torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1).expand(1, 3, 77, 150))
