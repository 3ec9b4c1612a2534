"""The fast contract: mrm.py (the Rebuilder, the MRM loss) and the core DACS + MRM operations against hand
computations. CPU only, tiny tensors; the rest of the tests are in tests/."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import support.augment
import train_dacs_mrm as T
from mrm import Masking, Rebuilder, mrm_loss, segmentation_ce, sincos_pos_embed_2d
from support.augment import blur_kernel_size, color_jitter, gaussian_blur, jitter_images
from support.hrda import HRDAModel, HRDAOutput
from support.models import Normalize
from support.networks import PIXELS_PER_CELL, build_nets, lr_factor
from train_dacs_mrm import feature_distance

torch.set_num_threads(2)


def tiny_rebuilder(in_channels, **kw):
    kw = {"embed_dim": 32, "num_heads": 4, **kw}
    return Rebuilder(in_channels, **kw)


def grid_mask(rows_cols, grid=16, batch=1):
    mask = torch.zeros(batch, 1, grid, grid)
    for r, c in rows_cols:
        mask[:, :, r, c] = 1
    return mask


# ---------------------------------------------------------------- Rebuilder: shapes and contract

@pytest.mark.parametrize("size", [(64, 64), (65, 65), (33, 47), (8, 8), (16, 16), (1, 3)])
def test_single_scale_shape_and_type(size):
    rebuilder = tiny_rebuilder(24)
    f = torch.randn(2, 24, *size)
    out = rebuilder(f)
    assert isinstance(out, torch.Tensor) and out.shape == f.shape and out.dtype == f.dtype


@pytest.mark.parametrize("crop", [(512, 512), (512, 1024), (260, 388)])
def test_multi_scale_shapes_like_mit(crop):
    channels = [4, 8, 12, 16]
    rebuilder = tiny_rebuilder(channels)
    h, w = crop
    feats = [torch.randn(1, c, math.ceil(h / s), math.ceil(w / s)) for c, s in zip(channels, (4, 8, 16, 32))]
    out = rebuilder(feats)
    assert isinstance(out, list) and [o.shape for o in out] == [f.shape for f in feats]


def test_sequence_of_one_level_returns_list():
    out = tiny_rebuilder([24])((torch.randn(1, 24, 20, 20),))
    assert isinstance(out, list) and out[0].shape == (1, 24, 20, 20)


def test_zero_mask_returns_input_exactly():
    rebuilder = tiny_rebuilder([4, 8])
    feats = [torch.randn(2, 4, 40, 40), torch.randn(2, 8, 20, 20)]
    out = rebuilder(feats, mask=torch.zeros(2, 1, 16, 16))
    assert all(torch.equal(o, f) for o, f in zip(out, feats))


def test_masked_cells_change_and_visible_cells_are_bit_identical():
    rebuilder = tiny_rebuilder(8)
    f = torch.randn(1, 8, 64, 64)
    out = rebuilder(f, mask=grid_mask([(0, 0), (5, 9), (15, 15)]))
    masked = torch.zeros(64, 64, dtype=torch.bool)
    for r, c in [(0, 0), (5, 9), (15, 15)]:
        masked[4 * r:4 * r + 4, 4 * c:4 * c + 4] = True  # nearest resize: one cell = a 4x4 block
    assert torch.equal(out[..., ~masked], f[..., ~masked])
    assert (out[..., masked] != f[..., masked]).all()


def test_masked_cells_are_the_projected_offset():
    """f_r = M * f_o + (1 - M) * f_t (Eq. 6): a fully masked map is the projector output."""
    rebuilder = tiny_rebuilder(8)
    f = torch.randn(1, 8, 64, 64)
    ones = torch.ones(1, 1, 16, 16)
    offset = rebuilder.projectors[0](rebuilder.rebuild(rebuilder.embed_to_grid(f), ones))
    torch.testing.assert_close(rebuilder(f, mask=ones), offset)


def test_random_mask_has_exact_ratio_per_sample():
    rebuilder = tiny_rebuilder(8, mask_ratio=0.4)
    torch.manual_seed(0)
    mask = rebuilder.random_mask(64)
    assert mask.shape == (64, 1, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.sum(dim=(1, 2, 3)) == round(0.4 * 256)).all()
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 64  # drawn independently
    per_cell = mask.mean(dim=0)
    assert 0.2 < per_cell.min() and per_cell.max() < 0.6  # every cell gets masked sometimes


def test_mask_token_replaces_only_masked_cells():
    rebuilder = tiny_rebuilder(8, depth=0)
    tokens = torch.randn(1, 32, 16, 16)
    mask = grid_mask([(3, 4)])
    out = rebuilder.rebuild(tokens, mask)
    expected = F.layer_norm((tokens.flatten(2).transpose(1, 2) + rebuilder.pos_embed), (32,),
                            rebuilder.norm.weight, rebuilder.norm.bias)
    expected[0, 3 * 16 + 4] = F.layer_norm(rebuilder.mask_token[0, 0] + rebuilder.pos_embed[0, 3 * 16 + 4], (32,),
                                           rebuilder.norm.weight, rebuilder.norm.bias)
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), expected)


def test_pos_embed_matches_reference_formula():
    dim, grid = 16, 5
    table = sincos_pos_embed_2d(dim, grid).double()
    quarter = dim // 4
    for r in range(grid):
        for c in range(grid):
            row = table[r * grid + c]
            for i in range(quarter):
                w = 1.0 / 10000 ** (i / quarter)
                assert row[i] == pytest.approx(math.sin(r * w), abs=1e-6)
                assert row[quarter + i] == pytest.approx(math.cos(r * w), abs=1e-6)
                assert row[2 * quarter + i] == pytest.approx(math.sin(c * w), abs=1e-6)
                assert row[3 * quarter + i] == pytest.approx(math.cos(c * w), abs=1e-6)
    assert not sincos_pos_embed_2d(512, 16).requires_grad


@pytest.mark.parametrize("size", [(64, 64), (9, 12)])
def test_embedding_equals_linear_then_resize_in_float64(size):
    """The Rebuilder may resize before the linear layer; the result must not depend on the order."""
    rebuilder = tiny_rebuilder(24).double()
    f = torch.randn(2, 24, *size, dtype=torch.float64)
    tokens = F.linear(f.permute(0, 2, 3, 1), rebuilder.embed.weight, rebuilder.embed.bias).permute(0, 3, 1, 2)
    expected = F.interpolate(tokens, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(rebuilder.embed_to_grid(f), expected, rtol=1e-10, atol=1e-10)


def test_projector_structure_follows_official_widths():
    rebuilder = Rebuilder([64, 128, 320, 512])
    convs = [[(m.in_channels, m.out_channels, type(m).__name__)
              for m in p if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))] for p in rebuilder.projectors]
    assert convs[3] == [(512, 512, "Conv2d")]
    assert convs[2] == [(512, 256, "ConvTranspose2d"), (256, 320, "Conv2d")]
    assert convs[1] == [(512, 256, "ConvTranspose2d"), (256, 128, "ConvTranspose2d"), (128, 128, "Conv2d")]
    assert convs[0] == [(512, 256, "ConvTranspose2d"), (256, 128, "ConvTranspose2d"),
                        (128, 128, "ConvTranspose2d"), (128, 64, "Conv2d")]


def official_single_scale_param_count(c_in=2048, d=512, depth=2, mlp=4):
    embed = c_in * d + d
    block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp * d + mlp * d) + (mlp * d * d + d)
    proj = (d * 256 * 16 + 256) + 2 * 256 + (256 * 128 * 16 + 128) + (128 * c_in + c_in) + 2 * c_in
    return embed + d + depth * block + 2 * d + proj  # + mask token + final norm


def test_parameter_count_at_paper_settings():
    rebuilder = Rebuilder(2048)
    trainable = sum(p.numel() for p in rebuilder.parameters() if p.requires_grad)
    assert trainable == official_single_scale_param_count() == 10_246_016
    # The official code keeps the fixed 16x16x512 position table as a frozen nn.Parameter, so its
    # parameters() count is 10.4 M; here it is a buffer, and the trainable count is identical.
    assert trainable + rebuilder.pos_embed.numel() == 10_377_088
    assert all(p.requires_grad for p in rebuilder.parameters())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="expects a list"):
        tiny_rebuilder([4, 8])(torch.randn(1, 8, 16, 16))
    with pytest.raises(TypeError, match="expects a tensor"):
        tiny_rebuilder(8)([torch.randn(1, 8, 16, 16)])
    with pytest.raises(ValueError, match="channels"):
        tiny_rebuilder(8)(torch.randn(1, 9, 16, 16))
    with pytest.raises(ValueError, match="mask must be"):
        tiny_rebuilder(8)(torch.randn(2, 8, 16, 16), mask=torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="power"):
        tiny_rebuilder([4, 8], scale_factors=[3, 1])
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_rebuilder(8, mask_ratio=1.5)


def test_channels_last_input_gives_the_same_result():
    rebuilder = tiny_rebuilder(8)
    f = torch.randn(2, 8, 33, 40)
    mask = rebuilder.random_mask(2)
    out = rebuilder(f.to(memory_format=torch.channels_last), mask)
    torch.testing.assert_close(out, rebuilder(f, mask))


def test_autocast_bfloat16_keeps_feature_dtype_and_finite_loss():
    rebuilder, decoder = tiny_rebuilder(8), nn.Conv2d(8, 3, 1)
    f = torch.randn(2, 8, 20, 20)
    target = torch.randint(0, 3, (2, 40, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rebuilder(f)
        loss = mrm_loss(decoder, rebuilder, f, target)
    assert out.dtype == torch.float32 and torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rebuilder(f.bfloat16()).dtype == torch.bfloat16
    loss.backward()
    assert rebuilder.mask_token.grad is not None


# ---------------------------------------------------------------- the MRM loss

def test_gradients_reach_encoder_decoder_and_rebuilder():
    encoder = nn.Conv2d(3, 8, 3, stride=4, padding=1)
    decoder = nn.Conv2d(8, 5, 1)
    rebuilder = tiny_rebuilder(8)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    mrm_loss(decoder, rebuilder, encoder(x), y).backward()
    for name, module in [("encoder", encoder), ("decoder", decoder), ("rebuilder", rebuilder)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name


def reference_weighted_ce(logits, target, weight, ignore_index):
    """float64 loops over pixels: -log softmax at the label, times the weight, mean over all pixels."""
    logits = logits.double()
    total, count = 0.0, 0
    B, K, H, W = logits.shape
    for b in range(B):
        for i in range(H):
            for j in range(W):
                count += 1
                label = int(target[b, i, j])
                if label == ignore_index:
                    continue
                z = logits[b, :, i, j]
                log_p = z[label] - torch.logsumexp(z, dim=0)
                total += -float(log_p) * (1.0 if weight is None else float(weight[b, i, j]))
    return total, count


def test_mrm_loss_against_independent_recomputation():
    torch.manual_seed(0)
    decoder, rebuilder = nn.Conv2d(8, 4, 1), tiny_rebuilder(8)
    f = torch.randn(2, 8, 6, 5)
    target = torch.randint(0, 4, (2, 12, 10))
    target[0, :3] = 255
    weight = torch.rand(2, 12, 10)
    mask = rebuilder.random_mask(2)
    with torch.no_grad():
        logits = F.interpolate(decoder(rebuilder(f, mask)), size=(12, 10), mode="bilinear", align_corners=False)

    total, count = reference_weighted_ce(logits, target, weight, 255)
    loss = mrm_loss(decoder, rebuilder, f, target, weight=weight, mask=mask)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)  # DACS: mean over all pixels

    total, _ = reference_weighted_ce(logits, target, None, 255)
    valid = int((target != 255).sum())
    loss = mrm_loss(decoder, rebuilder, f, target, mask=mask)
    assert loss.item() == pytest.approx(total / valid, rel=1e-5)  # no weight: mean over valid pixels


def test_all_ignored_gives_zero_not_nan():
    decoder, rebuilder = nn.Conv2d(8, 4, 1), tiny_rebuilder(8)
    f = torch.randn(1, 8, 6, 6, requires_grad=True)
    target = torch.full((1, 12, 12), 255)
    for weight in (None, torch.rand(1, 12, 12)):
        loss = mrm_loss(decoder, rebuilder, f, target, weight=weight)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(f.grad).all()


def test_segmentation_ce_align_corners_switch():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 9, 9))
    for corners in (False, True):
        up = F.interpolate(logits, size=(9, 9), mode="bilinear", align_corners=corners)
        expected = F.cross_entropy(up, target)
        torch.testing.assert_close(segmentation_ce(logits, target, align_corners=corners), expected)


def test_wraps_a_torchvision_segmentation_model():
    """A model we did not write: torchvision's DeepLabV3-MobileNetV3, split into backbone and head."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5, aux_loss=False)

    def encoder(x):
        return model.backbone(x)["out"]

    x, y = torch.randn(2, 3, 96, 128), torch.randint(0, 5, (2, 96, 128))
    f = encoder(x)
    rebuilder = Rebuilder(f.shape[1], embed_dim=64, num_heads=4)
    loss = segmentation_ce(model.classifier(f), y) + mrm_loss(model.classifier, rebuilder, f, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone["0"][0].weight.grad.abs().sum() > 0
    assert rebuilder.embed.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(x)["out"].shape == (2, 5, 96, 128)  # inference is untouched

# ---------------------------------------------------------------- the ImageNet feature distance

def test_fd_identical_is_zero():
    f = torch.randn(2, 8, 4, 4)
    labels = torch.full((2, 16, 16), 13)
    assert feature_distance(f, f.clone(), labels).item() == 0.0


def test_fd_by_hand():
    # 2x2 blocks -> 2x3 cells
    labels = torch.tensor([[13, 13, 6, 6, 0, 0],
                           [13, 0, 7, 7, 0, 0],
                           [11, 11, 255, 255, 17, 17],
                           [11, 11, 255, 11, 17, 255]])[None]
    # cells: bus 75% (in), 6/7 50% (out), road (out) / person 100% (in), ignore 75% (out), bicycle 75% (in)
    imagenet = torch.zeros(1, 2, 2, 3)
    student = torch.full((1, 2, 2, 3), 100.0)
    student[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # norm 5
    student[0, :, 1, 0] = torch.tensor([0.0, 1.0])  # norm 1
    student[0, :, 1, 2] = torch.tensor([6.0, 0.0])  # norm 6
    assert feature_distance(student, imagenet, labels).item() == pytest.approx((5 + 1 + 6) / 3)


def test_fd_no_thing_cells_is_zero_and_backprops():
    student = torch.randn(1, 4, 2, 2, requires_grad=True)
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :4, :4] = 13
    labels[0, 1:4, 1:4] = 0  # only 7/16 bus in that cell -> below 0.75
    loss = feature_distance(student, torch.randn(1, 4, 2, 2), labels)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_fd_rejects_non_divisible_labels():
    with pytest.raises(ValueError):
        feature_distance(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3), torch.zeros(1, 10, 10))


# ---------------------------------------------------------------- DACS operations


def test_class_mix_takes_half_the_classes_of_each_image():
    torch.manual_seed(0)
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]],     # 4 classes (255 counts) -> 2 pasted
                           [[5, 5, 5, 5], [7, 7, 7, 9]]])        # 3 classes -> ceil(3/2) = 2 pasted
    for _ in range(20):
        mask = T.class_mix_masks(labels)
        for b, expected in ((0, 2), (1, 2)):
            pasted = set(labels[b][mask[b]].tolist())
            kept = set(labels[b][~mask[b]].tolist())
            assert len(pasted) == expected and not pasted & kept  # whole classes only
    single = torch.full((1, 3, 3), 4)
    assert T.class_mix_masks(single).all()  # one class: ceil(1/2) = 1, pasted


def test_class_mix_chooses_every_subset_eventually():
    torch.manual_seed(0)
    labels = torch.tensor([[[0, 1, 2, 3]]])
    seen = {tuple(sorted(labels[0][T.class_mix_masks(labels)[0]].tolist())) for _ in range(200)}
    assert len(seen) == 6  # C(4, 2)


def test_pseudo_label_and_confidence_weight_by_hand():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 0] = 10.0   # p = 0.99995 >= 0.968
    logits[0, 0, 0, 1] = 4.0    # p = 0.982 >= 0.968
    logits[0, 1, 1, 0] = 3.0    # p = 0.953 < 0.968
    label, weight = T.pseudo_label(logits, 0.968)                 # (1, 1) ties: argmax takes class 0
    assert label.tolist() == [[[1, 0], [1, 0]]]
    assert weight.item() == pytest.approx(2 / 4)


def test_color_jitter_and_blur_keep_range_and_respect_probability():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 40, 40)
    assert torch.equal(color_jitter(x, 0.25, p=0.0), x) and torch.equal(gaussian_blur(x, p=0.0), x)
    jittered, blurred = color_jitter(x, 0.25, p=1.0), gaussian_blur(x, p=1.0)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.equal(jittered, x)
    assert blurred.std() < x.std()  # a low-pass filter of white noise
    flat = torch.full((1, 3, 40, 40), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, p=1.0), flat)  # kernel sums to 1, reflect padding


# a 2x2 RGB image: blue-ish, red, grey, orange
JITTER_PIXELS = torch.tensor([[0.2, 0.4, 0.6], [0.9, 0.1, 0.1], [0.5, 0.5, 0.5], [1.0, 0.8, 0.0]])


def jitter_by_hand(op, factor):
    """kornia 0.5.8's four operations on JITTER_PIXELS, written per pixel by hand."""
    out = []
    for r, g, b in JITTER_PIXELS.tolist():
        if op == 'brightness':  # additive: x + (factor - 1), clamped
            out.append([min(max(c + factor - 1, 0.0), 1.0) for c in (r, g, b)])
        elif op == 'contrast':  # kornia 0.5.8 multiplies, no mean
            out.append([min(max(c * factor, 0.0), 1.0) for c in (r, g, b)])
        elif op == 'saturation':  # HSV saturation s = (max - min) / max times factor, at most 1: each
            v, m = max(r, g, b), min(r, g, b)  # channel moves towards/away from the max by s' / s
            scale = min(factor * (v - m) / v, 1.0) / ((v - m) / v) if v > m else 1.0
            out.append([v - scale * (v - c) for c in (r, g, b)])
        else:  # hue + factor turns, through the HSV hexagon
            v, m = max(r, g, b), min(r, g, b)
            if v == m:
                out.append([r, g, b])
                continue
            d = v - m
            h6 = {0: (g - b) / d, 1: 2 + (b - r) / d, 2: 4 + (r - g) / d}[[r, g, b].index(v)]
            h6 = (h6 + 6 * factor) % 6
            sector, f = int(h6), h6 - int(h6)
            p, q, t = m, v - f * d, m + f * d
            out.append([(v, q, p, p, t, v)[sector], (t, v, v, q, p, p)[sector], (p, p, t, v, v, q)[sector]])
    return torch.tensor(out).T.reshape(1, 3, 2, 2)


@pytest.mark.parametrize('op,index,factor', [('brightness', 0, 1.25), ('brightness', 0, 0.8), ('contrast', 1, 1.25),
                                             ('contrast', 1, 0.75), ('saturation', 2, 0.5), ('saturation', 2, 1.2),
                                             ('hue', 3, 1 / 6), ('hue', 3, -0.2)])
def test_color_jitter_operations_match_kornia_by_hand(op, index, factor):
    """Each of kornia 0.5.8's ColorJitter operations alone (the others at identity) on a 2x2 image."""
    x = JITTER_PIXELS.T.reshape(1, 3, 2, 2)
    factors = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.0])]
    factors[index] = torch.tensor([factor])
    order = torch.tensor([[index] + [i for i in range(4) if i != index]])
    # the identity HSV steps round-trip through kornia's eps = 1e-6 saturation, hence the tolerance
    torch.testing.assert_close(jitter_images(x, *factors, order), jitter_by_hand(op, factor), atol=1e-5, rtol=0)


def test_color_jitter_order_and_per_image_factors():
    x = JITTER_PIXELS.T.reshape(1, 3, 2, 2)
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    bright_then_contrast = jitter_images(x, torch.tensor([1.25]), torch.tensor([1.25]), one, zero,
                                           torch.tensor([[0, 1, 2, 3]]))
    contrast_then_bright = jitter_images(x, torch.tensor([1.25]), torch.tensor([1.25]), one, zero,
                                           torch.tensor([[1, 0, 2, 3]]))
    torch.testing.assert_close(bright_then_contrast[0, :, 0, 0], torch.tensor([0.5625, 0.8125, 1.0]))
    torch.testing.assert_close(contrast_then_bright[0, :, 0, 0], torch.tensor([0.5, 0.75, 1.0]))
    # a batch: each image with its own factors and order equals that image jittered alone
    torch.manual_seed(0)
    batch = torch.rand(3, 3, 5, 7)
    factors = [torch.rand(3) + 0.5, torch.rand(3) + 0.5, torch.rand(3) + 0.5, torch.rand(3) - 0.5]
    order = torch.rand(3, 4).argsort(dim=1)
    together = jitter_images(batch, *factors, order)
    for i in range(3):
        alone = jitter_images(batch[i:i + 1], *(f[i:i + 1] for f in factors), order[i:i + 1])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=0)


def test_jitter_and_blur_decide_once_per_batch_and_draw_per_image():
    """As DACS and DAFormer: one draw decides jitter (blur) for the whole batch; factors and sigma per image."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 20, 30)
    for augment in (lambda t: color_jitter(t, 0.25, 0.5), lambda t: gaussian_blur(t, 0.5)):
        changed = [tuple(not torch.equal(a, b) for a, b in zip(augment(x), x)) for _ in range(40)]
        assert set(changed) == {(True,) * 4, (False,) * 4}
    twins = x[:1].expand(4, -1, -1, -1)
    jittered, blurred = color_jitter(twins, 0.25, 1.0), gaussian_blur(twins, 1.0)
    assert len({tuple(img.flatten()[:5].tolist()) for img in jittered}) == 4
    assert len({tuple(img.flatten()[:5].tolist()) for img in blurred}) == 4


def test_blur_kernel_is_ten_percent_of_each_side_as_kornia():
    assert [blur_kernel_size(n) for n in (512, 1024, 64, 128, 20, 30)] == [51, 103, 7, 13, 1, 3]
    impulse = torch.zeros(1, 3, 64, 128)
    impulse[:, :, 32, 64] = 1
    out = gaussian_blur(impulse, 1.0, sigma_range=(0.8, 0.8))[0, 0]
    rows, cols = out.nonzero().unbind(1)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (32 - 3, 32 + 3, 64 - 6, 64 + 6)  # 7 x 13 taps

    def gaussian(size):  # kornia.filters.kernels.gaussian
        taps = torch.arange(size, dtype=torch.float64) - size // 2
        g = torch.exp(-taps ** 2 / (2 * 0.8 ** 2))
        return g / g.sum()
    expected = torch.outer(gaussian(7), gaussian(13))
    torch.testing.assert_close(out[29:36, 58:71].double(), expected.flip(0).flip(1), atol=1e-7, rtol=1e-5)


def test_class_mix_takes_half_of_the_batch_classes_in_daformer():
    """DAFormer's get_class_masks draws from torch.unique of the WHOLE source batch: an image may paste
    none of its own pixels; DACS draws from each image's own classes."""
    torch.manual_seed(0)
    labels = torch.tensor([[[0, 0], [1, 1]], [[2, 2], [3, 3]]])
    per_image = {len(set(labels[0][T.class_mix_masks(labels)[0]].tolist())) for _ in range(100)}
    batch = [T.class_mix_masks(labels, batch_classes=True) for _ in range(300)]
    assert per_image == {1}
    assert {len(set(labels[0][m[0]].tolist())) for m in batch} == {0, 1, 2}
    pasted = np.mean([len(set(labels[0][m[0]].tolist())) for m in batch])
    assert abs(pasted - 1.0) < 0.15  # 2 of the 4 batch classes, each one of image 0's with probability 1/2


def test_ema_follows_dacs_formula():
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    before = teacher.weight.detach().clone()
    assert T.ema_alpha(9, 0.99) == pytest.approx(0.9) and T.ema_alpha(999, 0.99) == 0.99
    T.update_ema(teacher, student, 1 - T.ema_alpha(9, 0.99))  # alpha = min(1 - 1/10, 0.99) = 0.9
    torch.testing.assert_close(teacher.weight, 0.9 * before + 0.1 * student.weight)
    as_float = copy.deepcopy(teacher)
    T.update_ema(as_float, student, 1 - 0.99)
    T.update_ema(teacher, student, torch.tensor(1 - 0.99))  # the graph step's device weight: the same bits
    assert torch.equal(teacher.weight, as_float.weight) and torch.equal(teacher.bias, as_float.bias)
    T.update_ema(teacher, student, torch.tensor(1 - T.ema_alpha(0, 0.99)))  # alpha 0: a copy of the student
    torch.testing.assert_close(teacher.weight, student.weight)


def test_lr_schedules():
    dacs = SimpleNamespace(iters=100, poly_power=0.9, warmup_iters=0)
    assert lr_factor(dacs, 0) == 1.0 and lr_factor(dacs, 50) == pytest.approx(0.5 ** 0.9)
    daformer = SimpleNamespace(iters=40000, poly_power=1.0, warmup_iters=1500)
    assert lr_factor(daformer, 0) == pytest.approx(1e-6)
    assert lr_factor(daformer, 750) == pytest.approx((1 - 750 / 40000) * (1 - 0.5 * (1 - 1e-6)))
    assert lr_factor(daformer, 20000) == pytest.approx(0.5)


# ---------------------------------------------------------------- MIC's masks, the other MRM modes, HRDA's loss

def test_mic_block_mask_ratio_and_size():
    """MIC's BlockMaskGenerator: round(H/b) x round(W/b) blocks, each kept iff U(0,1) > ratio, nearest-upsampled;
    masked pixels take the colour that normalises to 0."""
    torch.manual_seed(0)
    flat = torch.full((8, 3, 512, 512), 0.3)
    fill = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    out = T.mic_masked_images(flat, fill, 0.0, 0.8, mask_ratio=0.7, block_size=32)
    masked = (out - fill).abs().sum(dim=1) < 1e-6
    kept = (out - 0.3).abs().sum(dim=1) < 1e-4  # strength 0: jitter and blur leave a flat image flat
    assert (masked ^ kept).all()
    blocks = masked.view(8, 16, 32, 16, 32)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant over every 32 x 32 block
    assert abs(masked.float().mean().item() - 0.7) < 0.03  # 8 x 256 Bernoulli(0.7) blocks
    odd = T.mic_masked_images(torch.full((1, 3, 100, 60), 0.3), fill, 0.0, 0.8, 0.7, 32)
    assert odd.shape == (1, 3, 100, 60)
    assert Normalize("caffe").zero_colour().flatten().tolist() == pytest.approx(
        [122.67891434 / 255, 116.66876762 / 255, 104.00698793 / 255])


def test_mic_augments_its_batch_in_one_kornia_call(monkeypatch):
    """MIC jitters and blurs the target batch in one call: factors per image, but one operation order and
    one blur sigma for the batch (DACS/DAFormer call kornia per mixed image: an order and a sigma each)."""
    torch.manual_seed(0)
    twins = torch.rand(1, 3, 20, 30).expand(4, -1, -1, -1)
    one, each = gaussian_blur(twins, 1.0, one_call=True), gaussian_blur(twins, 1.0)
    assert all(torch.equal(one[0], img) for img in one) and not torch.equal(each[0], each[1])
    orders = []
    real = jitter_images
    monkeypatch.setattr(support.augment, "jitter_images", lambda x, *f: orders.append(f[-1]) or real(x, *f))
    color_jitter(twins, 0.25, 1.0, one_call=True)
    color_jitter(twins, 0.25, 1.0)
    assert (orders[0] == orders[0][:1]).all() and len({tuple(o.tolist()) for o in orders[1]}) > 1


def test_masking_ablation_zeroes_masked_cells_and_has_no_parameters():
    masking = Masking(grid_size=4)
    f = torch.randn(2, 5, 8, 12)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 1, 2] = 1
    out = masking(f, mask)
    assert (out[0, :, 2:4, 6:9] == 0).all() and torch.equal(out[0, :, :2], f[0, :, :2]) and torch.equal(out[1], f[1])
    levels = masking([f, f[..., ::2, ::2]], mask)
    assert isinstance(levels, list) and (levels[1][0, :, 1:2, 3:5] == 0).all()
    assert abs(masking.random_mask(3).mean().item() - round(0.4 * 16) / 16) < 1e-6
    nets = build_nets(T.parse_args(["--task", "toy", "--device", "cpu", "--mrm-mode", "mask-only"]))
    assert isinstance(nets.rebuilder, Masking) and len(nets.optimizers) == 1
    assert not any(p is q for g in nets.optimizers[0].param_groups for p in g["params"] for q in nets.rebuilder.parameters())


def test_pixel_and_feature_objectives_against_a_float64_recomputation():
    torch.manual_seed(0)
    head = nn.Conv2d(6, 3 * PIXELS_PER_CELL ** 2, 1)
    rebuilt = torch.randn(2, 6, 8, 8)
    images = torch.rand(2, 3, 64, 64)
    mask = (torch.rand(2, 1, 4, 4) < 0.4).float()
    mask[0, 0, 0, 0] = 1
    loss = T.masked_pixel_loss(head, rebuilt, images, mask)
    q, total, count = PIXELS_PER_CELL, 0.0, 0
    small = F.avg_pool2d(images.double(), 2)  # 64 -> 32 = 4 cells x 8 pixels
    pooled = F.avg_pool2d(rebuilt.double(), 2)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                if mask[b, 0, i, j]:
                    patch = small[b, :, i * q:(i + 1) * q, j * q:(j + 1) * q].reshape(-1)
                    target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
                    out = head.weight.double()[:, :, 0, 0] @ pooled[b, :, i, j] + head.bias.double()
                    # pixel_unshuffle orders a patch's values channel-major, as reshape(-1) of (3, q, q)
                    total, count = total + (out - target).pow(2).mean(), count + 1
    torch.testing.assert_close(loss.double(), total / count, rtol=1e-5, atol=1e-6)
    levels = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    targets = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    expected = []
    for f, t in zip(levels, targets):
        m = F.interpolate(mask, size=f.shape[-2:], mode="nearest")[:, 0].double()
        error = (f.double() - t.double()).pow(2).mean(dim=1)
        expected.append((error * m).sum() / m.sum())
    torch.testing.assert_close(T.masked_feature_loss(levels, targets, mask).double(), sum(expected) / 2)


def test_hrda_losses_are_0_9_fused_and_0_1_detail_against_float64():
    cfg = SimpleNamespace(align_corners=False, hr_loss_weight=0.1)
    torch.manual_seed(2)
    fused, detail = torch.randn(2, 5, 16, 16), torch.randn(2, 5, 8, 8)
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :4] = 255
    weight = torch.rand(2, 64, 64)
    out = HRDAOutput(fused, detail, [(8, 24)], 32)

    def ce(logits, y, w):  # mean over all pixels of w * CE, ignored pixels 0
        up = F.interpolate(logits.double(), size=y.shape[-2:], mode="bilinear", align_corners=False)
        logp = up.log_softmax(dim=1)
        picked = torch.zeros(y.shape, dtype=torch.float64)
        for b in range(y.shape[0]):
            for i in range(y.shape[1]):
                for j in range(y.shape[2]):
                    if y[b, i, j] != 255:
                        picked[b, i, j] = -logp[b, y[b, i, j], i, j]
        return (picked * w.double()).mean()

    expected = 0.9 * ce(fused, labels, weight) + 0.1 * ce(detail, labels[:, 8:40, 24:56], weight[:, 8:40, 24:56])
    assert HRDAModel.loss(cfg, out, labels, weight).item() == pytest.approx(expected.item(), rel=1e-6)
    scalar = 0.9 * ce(fused, labels, torch.ones(1)) + 0.1 * ce(detail, labels[:, 8:40, 24:56], torch.ones(1))
    assert HRDAModel.loss(cfg, out, labels, 1.0).item() == pytest.approx(scalar.item(), rel=1e-6)
