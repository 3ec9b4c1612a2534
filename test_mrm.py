"""Tests for mrm.py, train_dacs_mrm.py and eval.py. CPU only, tiny models, data made on the fly."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mrm import Rebuilder, mrm_loss, segmentation_ce, sincos_pos_embed_2d

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
    convs = [[(m.in_channels, m.out_channels, type(m).__name__) for m in p if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
             for p in rebuilder.projectors]
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
    assert float(loss) == pytest.approx(total / count, rel=1e-5)  # DACS: mean over all pixels

    total, _ = reference_weighted_ce(logits, target, None, 255)
    valid = int((target != 255).sum())
    loss = mrm_loss(decoder, rebuilder, f, target, mask=mask)
    assert float(loss) == pytest.approx(total / valid, rel=1e-5)  # no weight: mean over valid pixels


def test_all_ignored_gives_zero_not_nan():
    decoder, rebuilder = nn.Conv2d(8, 4, 1), tiny_rebuilder(8)
    f = torch.randn(1, 8, 6, 6, requires_grad=True)
    target = torch.full((1, 12, 12), 255)
    for weight in (None, torch.rand(1, 12, 12)):
        loss = mrm_loss(decoder, rebuilder, f, target, weight=weight)
        assert float(loss) == 0.0
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
