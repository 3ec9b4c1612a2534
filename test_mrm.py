"""Tests for mrm.py, train_dacs_mrm.py and eval.py. CPU only, tiny models, data made on the fly."""
import argparse
import collections
import copy
import glob
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from types import SimpleNamespace
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import eval as E
import support.augment
import support.data
import support.models
import support.networks
import train_dacs_mrm as T
from eval import main as eval_main
from mrm import Masking, Rebuilder, mrm_loss, segmentation_ce, sincos_pos_embed_2d
from support.augment import blur_kernel_size, color_jitter, gaussian_blur, jitter_images
from support.base import ConfigError, CorruptFile, DataError
from support.cli import CORES, DEFAULT_WORKERS, DEFAULTS, FLAG_KEYS, FLAGS, UNLISTED, build_parser, cpu_threads
from support.data import (BATCH_KEYS, BadLabel, CITYSCAPES_ID_TO_TRAIN, CLASSES, DATASETS, Domain, LABEL_NOTES, PALETTE,
                          SYNTHIA_13, SYNTHIA_16, SYNTHIA_ID_TO_TRAIN, TOY_SIZES, TrainBatches, crop_has_enough,
                          find_pairs, margin_mask, mmseg_rescale_size, random_crop, rcs_class_probabilities, rcs_pick,
                          rcs_statistics, read_image, read_label, resize_pair, step_inputs, to_device,
                          write_fake_dataset)
from eval import confusion_matrix, evaluate, format_table, iou_per_class
from support.hrda import HRDAEncoder, HRDAModel, HRDAOutput, Views, rebuilt_features, slide_boxes
from support.models import (ASPPClassifier, Attention, DAFormerHead, DEPTHWISE_FORMS, DeepLabV3PlusHead,
                            DepthwiseConv3x3, DropPath, MIT_B2, MIT_B3, MIT_B5, MIT_TINY, MiTEncoder,
                            MixVisionTransformer, Normalize, ResNetDilated, build_deeplab, build_deeplab_from_record,
                            load_backbone_state, load_mit_weights, read_pretrained)
from support.networks import (PIXELS_PER_CELL, SlotSGD, build_model, build_nets, dacs_parameter_slots, lr_factor,
                              set_learning_rates, why_eager)
from support.reports import debug_panels
from support.runs import export_model, resume, save_checkpoint
from train_dacs_mrm import feature_distance
from support.speed import (CudaGraphStep, LiveBytes, busy_time, count_flops, device_name, device_scalars, profile_steps,
                           reference_step, step_memory)
from support.toy import TOY_CLASSES, TOY_PALETTE, make_toy_scene, toy_layout, toy_render

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


# ---------------------------------------------------------------- DeepLabV2

DLV2_TINY = dict(layers=(1, 1, 1, 1), width=8)


def expected_size(n):
    n = (n + 2 * 3 - 7) // 2 + 1  # 7x7 stem conv, stride 2, pad 3
    n = math.ceil((n + 2 * 1 - 3) / 2) + 1  # 3x3 max-pool, stride 2, pad 1, ceil_mode
    return (n - 1) // 2 + 1  # layer2 stride 2; layer3/4 are dilated, not strided


def dlv2_bn_keys(prefix):
    return [f'{prefix}.{n}' for n in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]


def dlv2_block_keys(prefix):
    keys = []
    for i in (1, 2, 3):
        keys += [f'{prefix}.conv{i}.weight'] + dlv2_bn_keys(f'{prefix}.bn{i}')
    return keys + [f'{prefix}.downsample.0.weight'] + dlv2_bn_keys(f'{prefix}.downsample.1')


def randomized_dlv2(model):
    # non-default BN statistics too, so that a load is visible in every tensor
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if not k.endswith('num_batches_tracked'):
            assert torch.equal(sa[k], sb[k]), k


def test_expected_size_formula():
    assert expected_size(512) == 65  # the real DeepLabV2 case (outS in DACS)
    assert (expected_size(129), expected_size(97), expected_size(161)) == (17, 13, 21)


@pytest.mark.parametrize('style', ['caffe', 'torchvision'])
@pytest.mark.parametrize('hw', [(129, 129), (97, 161)])
def test_output_shape_tiny(style, hw):
    model = ResNetDilated(**DLV2_TINY, style=style).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *hw))
    assert model.out_channels == 8 * 8 * 4
    assert out.shape == (1, model.out_channels, expected_size(hw[0]), expected_size(hw[1]))


def test_full_size_structure_on_meta():
    # meta tensors carry shapes only: the real ResNet-101 at 512x512 costs nothing here
    with torch.device('meta'):
        model = ResNetDilated().eval()
        out = model(torch.empty(1, 3, 512, 512))
    assert model.out_channels == 2048
    assert out.shape == (1, 2048, 65, 65)

    keys = list(model.state_dict().keys())
    assert keys[:6] == ['conv1.weight'] + dlv2_bn_keys('bn1')
    assert keys[6:30] == dlv2_block_keys('layer1.0')
    start = keys.index('layer3.0.conv1.weight')
    assert keys[start:start + 24] == dlv2_block_keys('layer3.0')
    # 33 blocks x 3 (conv + 5 bn keys), 4 downsamples x 6, stem 6
    assert len(keys) == 33 * 18 + 4 * 6 + 6 == 624
    # torchvision resnet101 has 44,549,160 parameters, fc 2048*1000+1000 of them
    assert sum(p.numel() for p in model.parameters()) == 44_549_160 - 2_049_000 == 42_500_160


def test_bn_affine_frozen_but_running_stats_update():
    model = ResNetDilated(**DLV2_TINY).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 1 + 4 * 4  # stem + (3 in block + downsample) per layer
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    assert all(m.weight.requires_grad for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    before = model.layer3[0].bn2.running_mean.clone()
    model(torch.rand(2, 3, 33, 33))
    assert not torch.equal(before, model.layer3[0].bn2.running_mean)


@pytest.mark.parametrize('name,prefix', [('DeepLab_resnet_pretrained_init-f81d91e8.pth', 'Scale.'),  # AdaptSegNet's
                                         ('resnet101COCO-41f33a49.pth', '')])  # DACS's trainUDA.py
def test_load_coco_init_layout(tmp_path, name, prefix):
    src = randomized_dlv2(ResNetDilated(**DLV2_TINY, style='caffe'))
    sd = {f'{prefix}{k}': v for k, v in src.state_dict().items() if not k.endswith('num_batches_tracked')}
    sd.update({f'{prefix}layer5.conv2d_list.{i}.{n}': torch.zeros(1) for i in range(4) for n in ('weight', 'bias')})
    path = tmp_path / name
    torch.save(sd, path, _use_new_zipfile_serialization=False)  # the 2017 files predate the zip format

    encoder, decoder, arch_record = build_deeplab(19, pretrained=str(path), **DLV2_TINY)
    assert arch_record == {'arch': 'dlv2', 'layers': [1, 1, 1, 1], 'width': 8, 'style': 'caffe', 'aspp_dilations': [6, 12],
                    'decoder': 'deeplabv2'}
    assert encoder.normalize.kind == 'caffe'
    assert encoder.backbone.layer2[0].conv1.stride == (2, 2)
    assert_same_state(src, encoder.backbone)

    fresh = ResNetDilated(**DLV2_TINY)
    load_backbone_state(fresh, read_pretrained(path), path)
    assert_same_state(src, fresh)


def test_load_torchvision_layout_wrapped(tmp_path):
    src = randomized_dlv2(ResNetDilated(**DLV2_TINY, style='torchvision'))
    sd = dict(src.state_dict(), **{'fc.weight': torch.zeros(10, 256), 'fc.bias': torch.zeros(10)})
    path = tmp_path / 'resnet101-63fe2227.pth'
    torch.save({'state_dict': sd}, path)

    encoder, decoder, arch_record = build_deeplab(19, pretrained=path, **DLV2_TINY)
    assert arch_record['style'] == 'torchvision'
    assert encoder.normalize.kind == 'imagenet'
    assert encoder.backbone.layer2[0].conv1.stride == (1, 1)
    assert encoder.backbone.layer2[0].conv2.stride == (2, 2)
    assert_same_state(src, encoder.backbone)


def test_load_mismatch_raises_readable_error(tmp_path):
    sd = ResNetDilated(**DLV2_TINY).state_dict()
    del sd['layer1.0.conv1.weight']
    sd['layer2.0.extra.weight'] = torch.zeros(1)
    sd['layer4.0.conv3.weight'] = torch.zeros(1)
    path = tmp_path / 'broken.pth'
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_backbone_state(ResNetDilated(**DLV2_TINY), read_pretrained(path), path)
    msg = str(err.value)
    assert str(path) in msg and 'layer1.0.conv1.weight' in msg and 'layer2.0.extra.weight' in msg
    assert 'layer4.0.conv3.weight' in msg  # shape mismatch


def test_unknown_file_kind_raises(tmp_path):
    path = tmp_path / 'bare.pth'
    torch.save(ResNetDilated(**DLV2_TINY).state_dict(), path)  # neither fc.* nor layer5.*
    with pytest.raises(ValueError, match='kind'):
        build_deeplab(19, pretrained=path, **DLV2_TINY)


def test_real_torchvision_resnet101_keys_load(tmp_path):
    tv = torchvision.models.resnet101(weights=None)
    path = tmp_path / 'resnet101-cd907fc2.pth'
    torch.save(tv.state_dict(), path)
    model = ResNetDilated(style='torchvision')
    load_backbone_state(model, read_pretrained(path), path)
    assert torch.equal(model.layer3[22].conv2.weight, tv.layer3[22].conv2.weight)
    assert torch.equal(model.layer4[0].downsample[1].running_var, tv.layer4[0].downsample[1].running_var)


def test_build_default_and_from_info():
    encoder, decoder, arch_record = build_deeplab(5, **DLV2_TINY)
    assert arch_record['style'] == 'caffe'
    enc2, dec2 = build_deeplab_from_record(5, arch_record)
    enc2.load_state_dict(encoder.state_dict())  # strict: identical architecture
    dec2.load_state_dict(decoder.state_dict())
    assert list(decoder.state_dict()) == [f'conv2d_list.{i}.{n}' for i in range(2) for n in ('weight', 'bias')]
    assert not any('normalize' in k for k in encoder.state_dict())
    x = torch.rand(1, 3, 41, 41)
    encoder.eval()
    assert decoder(encoder(x)).shape == (1, 5, expected_size(41), expected_size(41))


def test_normalize():
    x = torch.zeros(1, 3, 2, 2)
    x[0, :, 1, 0] = torch.tensor([0.2, 0.4, 0.6])  # R, G, B
    caffe = Normalize('caffe')(x)[0, :, 1, 0]
    assert torch.allclose(caffe, torch.tensor([0.6 * 255 - 104.00698793, 0.4 * 255 - 116.66876762,
                                               0.2 * 255 - 122.67891434]))
    imnet = Normalize('imagenet')(x)[0, :, 1, 0]
    assert torch.allclose(imnet, torch.tensor([(0.2 - 0.485) / 0.229, (0.4 - 0.456) / 0.224,
                                               (0.6 - 0.406) / 0.225]))
    assert len(Normalize('caffe').state_dict()) == 0
    with pytest.raises(ValueError):
        Normalize('bgr')


@pytest.mark.parametrize('dilations', [(6, 12), (6, 12, 18, 24)])
def test_aspp_is_sum_of_dilated_convs(dilations):
    head = ASPPClassifier(8, 3, dilations)
    f = torch.randn(2, 8, 9, 11)
    expected = sum(F.conv2d(f, c.weight, c.bias, padding=d, dilation=d) for c, d in zip(head.conv2d_list, dilations))
    out = head(f)
    assert out.shape == (2, 3, 9, 11) and len(head.conv2d_list) == len(dilations)
    assert torch.allclose(out, expected, atol=1e-6)
    assert all(c.weight.std() < 0.02 for c in head.conv2d_list)  # normal(0, 0.01) init


def test_deeplabv2_classifier_defaults_to_the_two_branches_uda_code_ran(capsys):
    """AdaptSegNet/DACS return inside the loop over four branches and DAFormer's deeplabv2red sets (6, 12):
    two branches by default in every DeepLabV2 setting, four on request, anything else refused."""
    assert [c.dilation for c in ASPPClassifier(8, 3).conv2d_list] == [(6, 6), (12, 12)]
    for arch in ('dlv2-tiny', 'dlv2-v1c-tiny'):
        model, arch_record = build_model(arch, 5)
        assert len(model.decoder.conv2d_list) == 2 and arch_record['aspp_dilations'] == [6, 12]
    nets = build_nets(T.parse_args(['--task', 'toy', '--device', 'cpu', '--aspp-dilations', '6,12,18,24']))
    assert [c.dilation[0] for c in nets.model.decoder.conv2d_list] == [6, 12, 18, 24]
    assert nets.arch_record['aspp_dilations'] == [6, 12, 18, 24]
    assert T.main(['--task', 'toy', '--aspp-dilations', '6,12,18']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--aspp-dilations 6,12,18: must be one of 6,12 | 6,12,18,24' in err


V1C_TINY = dict(layers=(1, 2, 2, 2), width=8, style='v1c')


def test_resnet_v1c_structure_like_mmseg():
    """mmseg's ResNetV1c (DAFormer's DeepLabV2): deep 3x3 stem, floor-mode max-pool (64x64 at 512), stride in
    the 3x3 conv, contract dilation (first block of layer3/4 at dilation 1/2), trainable BatchNorm."""
    with torch.device('meta'):
        full = ResNetDilated(style='v1c')
        assert full(torch.empty(1, 3, 512, 512)).shape == (1, 2048, 64, 64)
    # torchvision's resnet101 minus fc, with the 7x7 stem (9408 + bn 128) swapped for the deep stem
    stem = 3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + 2 * (32 + 32 + 64)
    assert sum(p.numel() for p in full.parameters()) == 42_500_160 - 9408 - 128 + stem == 42_519_392
    keys = list(full.state_dict())
    assert keys[:2] == ['stem.0.weight', 'stem.1.weight'] and 'stem.7.running_var' in keys and 'conv1.weight' not in keys
    assert [full.layer3[i].conv2.dilation[0] for i in range(3)] == [1, 2, 2]
    assert [full.layer4[i].conv2.dilation[0] for i in range(3)] == [2, 4, 4]
    assert full.layer2[0].conv1.stride == (1, 1) and full.layer2[0].conv2.stride == (2, 2)
    tiny = ResNetDilated(**V1C_TINY)
    assert all(p.requires_grad for p in tiny.parameters())
    x = torch.rand(1, 3, 97, 161)
    assert tiny.eval()(x).shape[-2:] == ((97 + 1) // 2 // 2 // 2 + 1, 161 // 2 // 2 // 2 + 1) == (13, 21)
    assert build_model('dlv2-v1c-tiny', 3)[0].encoder.normalize.kind == 'imagenet'


def test_load_mmcv_resnet_v1c_layout(tmp_path):
    """mmcv's resnet101_v1c file (open-mmlab://resnet101_v1c): stem.*, layerX.*, maybe fc.*; loads strictly."""
    src = randomized_dlv2(ResNetDilated(**V1C_TINY))
    sd = dict(src.state_dict(), **{'fc.weight': torch.zeros(10, 256), 'fc.bias': torch.zeros(10)})
    path = tmp_path / 'resnet101_v1c-e67eebb6.pth'
    torch.save({'meta': {'epoch': 100}, 'state_dict': sd}, path)
    encoder, decoder, arch_record = build_deeplab(19, pretrained=str(path), layers=(1, 2, 2, 2), width=8, styles=('v1c',))
    assert arch_record['style'] == 'v1c' and encoder.normalize.kind == 'imagenet'
    assert_same_state(src, encoder.backbone)
    assert all(c.bias.abs().sum() == 0 for c in decoder.conv2d_list)  # mmcv's NormalInit: bias 0
    del sd['stem.3.weight']
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"1 missing \[stem.3.weight\]"):
        build_deeplab(19, pretrained=str(path), layers=(1, 2, 2, 2), width=8, styles=('v1c',))
    caffe = tmp_path / 'coco.pth'
    torch.save(dict(ResNetDilated(**DLV2_TINY).state_dict(), **{'layer5.conv2d_list.0.weight': torch.zeros(1)}), caffe)
    with pytest.raises(ValueError, match='caffe-style ResNet weights; this architecture takes v1c'):
        build_deeplab(19, pretrained=str(caffe), **DLV2_TINY, styles=('v1c',))


# ---------------------------------------------------------------- MiT-B5 and DAFormer head

MIT_TINY_CFG = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 2), sr_ratios=(8, 4, 2, 1))
MIT_B5_PARAMS = 81_443_008


@pytest.fixture(scope='module')
def b5():
    with torch.device('meta'):  # same constructor, no memory or init cost: only names, shapes, counts
        return MixVisionTransformer(**MIT_B5)


def tiny_mit(**kw):
    torch.manual_seed(0)
    return MixVisionTransformer(**MIT_TINY_CFG, **kw)

# -----------------------------------------------------------------------------
# MiT-B5 layout

def mit_block_keys(prefix, with_sr):
    mods = ['norm1', 'attn.q', 'attn.kv', 'attn.proj']
    mods += ['attn.sr', 'attn.norm'] if with_sr else []
    mods += ['norm2', 'mlp.fc1', 'mlp.dwconv.dwconv', 'mlp.fc2']
    return [f'{prefix}.{m}.{p}' for m in mods for p in ('weight', 'bias')]


def test_b5_key_names(b5):
    sd = b5.state_dict()
    for stage, depth in zip(range(1, 5), MIT_B5['depths']):
        for j in (0, depth - 1):
            prefix = f'block{stage}.{j}'
            assert [k for k in sd if k.startswith(prefix + '.')] == mit_block_keys(prefix, with_sr=stage < 4)
        assert f'block{stage}.{depth}.norm1.weight' not in sd
    top = [k for k in sd if not k.startswith('block')]
    assert sorted(top) == sorted(f'{m}{i}.{p}' for i in range(1, 5) for m in ('patch_embed', 'norm')
                                 for p in (['proj.weight', 'proj.bias', 'norm.weight', 'norm.bias']
                                           if m == 'patch_embed' else ['weight', 'bias']))
    assert sd['patch_embed1.proj.weight'].shape == (64, 3, 7, 7)
    assert sd['patch_embed2.proj.weight'].shape == (128, 64, 3, 3)
    assert sd['block1.0.attn.sr.weight'].shape == (64, 64, 8, 8)
    assert sd['block3.0.attn.kv.weight'].shape == (640, 320)
    assert sd['block4.0.mlp.dwconv.dwconv.weight'].shape == (2048, 1, 3, 3)


def test_b5_param_count(b5):
    n = sum(p.numel() for p in b5.parameters())
    print(f'MiT-B5 encoder parameters: {n:,}')
    # independent count from the architecture description
    expected = 0
    for i, (d, depth, sr) in enumerate(zip(MIT_B5['embed_dims'], MIT_B5['depths'], MIT_B5['sr_ratios'])):
        in_ch, k = ((3, 7) if i == 0 else (MIT_B5['embed_dims'][i - 1], 3))
        expected += in_ch * d * k * k + d + 2 * d + 2 * d  # patch embed conv + norm, stage-end norm
        hid = 4 * d
        block = 4 * d + 4 * (d * d + d)  # norm1, norm2; q, kv, proj
        block += (d * hid + hid) + hid * 10 + (hid * d + d)  # fc1, 3x3 depth-wise conv, fc2
        block += (d * d * sr * sr + d + 2 * d) if sr > 1 else 0  # sr conv + its norm
        expected += depth * block
    assert n == expected == MIT_B5_PARAMS
    assert abs(n - 81.4e6) < 0.3e6


def test_drop_path_schedule(b5):
    rates = [blk.drop_path.p for s in range(1, 5) for blk in getattr(b5, f'block{s}')]
    assert len(rates) == 52 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates == pytest.approx(torch.linspace(0, 0.1, 52).tolist())
    assert b5.block1[0].norm1.eps == 1e-6 and b5.norm4.eps == 1e-6
    assert b5.patch_embed1.norm.eps == 1e-5 and b5.block1[0].attn.norm.eps == 1e-5

# -----------------------------------------------------------------------------
# weight loading

def official_layout(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd['head.weight'], sd['head.bias'] = torch.randn(1000, 32), torch.randn(1000)
    return sd


@pytest.mark.parametrize('wrapper', [None, 'state_dict', 'model'])
def test_load_official_layout(tmp_path, wrapper):
    src = tiny_mit()
    sd = official_layout(src)
    path = tmp_path / 'mit_tiny.pth'
    torch.save(sd if wrapper is None else {wrapper: sd}, path)
    torch.manual_seed(1)
    dst = MixVisionTransformer(**MIT_TINY_CFG)
    load_mit_weights(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_mismatch_message(tmp_path):
    sd = official_layout(tiny_mit())
    del sd['norm4.weight']
    sd['block9.0.extra.weight'] = torch.zeros(1)
    sd['block1.0.attn.q.weight'] = torch.zeros(3, 3)
    path = tmp_path / 'broken.pth'
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_mit_weights(tiny_mit(), path)
    msg = str(err.value)
    for part in ('broken.pth', 'norm4.weight', 'block9.0.extra.weight', 'block1.0.attn.q.weight', '(3, 3)'):
        assert part in msg
    assert 'head.' not in msg

# -----------------------------------------------------------------------------
# forward

def conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize('size', [(512, 512), (512, 1024), (65, 97)])
def test_forward_shapes(size):
    model = tiny_mit().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    h, w = conv_out(size[0], 7, 4, 3), conv_out(size[1], 7, 4, 3)
    assert len(outs) == 4 and model.out_channels == list(MIT_TINY_CFG['embed_dims'])
    for i, (o, c) in enumerate(zip(outs, MIT_TINY_CFG['embed_dims'])):
        if i > 0:
            h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
        assert o.shape == (1, c, h, w)
        if size[0] % 32 == 0:
            assert (h, w) == (size[0] // 2 ** (i + 2), size[1] // 2 ** (i + 2))


@pytest.mark.parametrize('drop_path_rate', [0.0, 0.5])
def test_checkpointing_matches(drop_path_rate):
    plain = tiny_mit(drop_path_rate=drop_path_rate)
    ckpt = tiny_mit(drop_path_rate=drop_path_rate, checkpoint_blocks=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    calls, block_forward = [], ckpt.block1[0].forward
    ckpt.block1[0].forward = lambda *a: calls.append(1) or block_forward(*a)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same DropPath masks in both runs
        outs = model(x)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing is really on
    (o1, g1), (o2, g2) = results
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], msg=n)

def test_attention_matches_explicit_formula():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2, sr_ratio=2)
    H, W = 4, 6
    x = torch.randn(3, H * W, 8)
    xs = attn.norm(attn.sr(x.transpose(1, 2).reshape(3, 8, H, W)).flatten(2).transpose(1, 2))
    kv = attn.kv(xs)
    k, v = kv[..., :8], kv[..., 8:]  # first d outputs are K, the next d are V
    q = attn.q(x)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        a = (q[..., s] @ k[..., s].transpose(1, 2) / 2.0).softmax(-1)  # scale 1/sqrt(head_dim=4)
        heads.append(a @ v[..., s])
    torch.testing.assert_close(attn(x, H, W), attn.proj(torch.cat(heads, -1)))

# -----------------------------------------------------------------------------
# DAFormer head

def test_head_shape_and_backward():
    torch.manual_seed(0)
    head = DAFormerHead(MIT_TINY_CFG['embed_dims'], num_classes=5, embed_dim=16)
    feats = [torch.randn(2, c, 16 // 2 ** i, 24 // 2 ** i, requires_grad=True)
             for i, c in enumerate(MIT_TINY_CFG['embed_dims'])]
    out = head(feats)
    assert out.shape == (2, 5, 16, 24)
    out.square().mean().backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all(f.grad is not None for f in feats)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 2 + 1 + 1  # 1x1 branch, 3 separable branches, bottleneck, classifier
    assert all(c.bias is None for c in convs if c is not head.conv_seg)
    assert [c.dilation[0] for c in convs if c.groups > 1] == [6, 12, 18]
    assert all(c.groups == 64 and c.padding == c.dilation for c in convs if c.groups > 1)
    assert head.bottleneck[0].kernel_size == (3, 3) and head.bottleneck[0].in_channels == 64

# -----------------------------------------------------------------------------
# rare class sampling

def test_rcs_probabilities_by_hand():
    p = rcs_class_probabilities([900, 90, 10])
    e = [math.exp((1 - f) / 0.01) for f in (0.9, 0.09, 0.01)]
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, [v / sum(e) for v in e], rtol=1e-12)


def test_rcs_pick_skips_classes_without_images():
    rng = np.random.default_rng(0)
    probs = rcs_class_probabilities([1000, 50, 0, 20])  # class 2 is the most likely but has no image
    images = [[0, 1], [2], [], [3, 4, 5]]
    picks = [rcs_pick(rng, probs, images) for _ in range(500)]
    assert all(c != 2 and i in images[c] for c, i in picks)
    assert {c for c, _ in picks} >= {1, 3}


def test_crop_has_enough():
    crop = np.zeros((64, 64), dtype=np.uint8)
    crop.flat[:1500] = 7
    assert not crop_has_enough(crop, 7)
    crop.flat[1500] = 7
    assert crop_has_enough(crop, 7) and crop_has_enough(torch.from_numpy(crop), 7)

# -----------------------------------------------------------------------------
# ImageNet feature distance

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


# ---------------------------------------------------------------- labels, data and metric

# official cityscapesscripts labels.py: label id -> train id (255 = ignore); -1 (license plate) is not stored
CITYSCAPES_EXPECTED = {0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255,
                       11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8,
                       22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17,
                       33: 18}
# SYNTHIA RAND_CITYSCAPES README ids -> Cityscapes train ids (terrain 16, truck 18, train 20 absent)
SYNTHIA_EXPECTED = {0: 255, 1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17,
                    13: 255, 14: 255, 15: 6, 16: 255, 17: 12, 18: 255, 19: 15, 20: 255, 21: 3, 22: 255}


def write_png16(path, pixels, color_type):
    """16-bit PNG written by hand, row r using PNG filter type (4 - r) % 5 so all five filters are decoded."""
    height, width, channels = pixels.shape
    raw = pixels.astype('>u2').view(np.uint8).reshape(height, -1).astype(np.int64)
    step = 2 * channels  # bytes per pixel: filters look at the same byte of the previous pixel
    left = np.pad(raw, ((0, 0), (step, 0)))[:, :-step]
    up = np.pad(raw, ((1, 0), (0, 0)))[:-1]
    up_left = np.pad(raw, ((1, 0), (step, 0)))[:-1, :-step]
    p = left + up - up_left
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    predictors = [np.zeros_like(raw), left, up, (left + up) // 2, paeth]
    filters = [(4 - r) % 5 for r in range(height)]
    scanlines = b''.join(bytes([f]) + ((raw[r] - predictors[f][r]) % 256).astype(np.uint8).tobytes()
                         for r, f in enumerate(filters))

    def chunk(tag, body):
        return struct.pack('>I', len(body)) + tag + body + struct.pack('>I', zlib.crc32(tag + body))
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0))
                + chunk(b'IDAT', zlib.compress(scanlines)) + chunk(b'IEND', b''))


# -----------------------------------------------------------------------------
# label tables and reading


def test_cityscapes_table_and_gta_cityscapes_labels(tmp_path):
    assert CITYSCAPES_ID_TO_TRAIN.dtype == np.uint8 and CITYSCAPES_ID_TO_TRAIN.shape == (256,)
    assert {i: int(CITYSCAPES_ID_TO_TRAIN[i]) for i in range(34)} == CITYSCAPES_EXPECTED
    assert (CITYSCAPES_ID_TO_TRAIN[34:] == 255).all()
    ids = np.array([list(range(34)) + [34, 255]], dtype=np.uint8)
    expected = np.array([[CITYSCAPES_EXPECTED[i] for i in range(34)] + [255, 255]], dtype=np.uint8)
    Image.fromarray(ids).save(tmp_path / 'grey.png')
    palettized = Image.frombytes('P', (36, 1), ids.tobytes())  # original GTA labels are palette PNGs
    palettized.putpalette(np.arange(256).repeat(3).astype(np.uint8).tobytes())
    palettized.save(tmp_path / 'palette.png')
    for dataset, name in (('cityscapes', 'grey.png'), ('gta', 'palette.png')):
        label = read_label(str(tmp_path / name), dataset)
        assert label.dtype == np.uint8 and (label == expected).all()


def test_synthia_table():
    assert SYNTHIA_ID_TO_TRAIN.dtype == np.uint8 and SYNTHIA_ID_TO_TRAIN.shape == (65536,)
    assert {i: int(SYNTHIA_ID_TO_TRAIN[i]) for i in range(23)} == SYNTHIA_EXPECTED
    assert (SYNTHIA_ID_TO_TRAIN[23:] == 255).all()
    present = sorted(set(SYNTHIA_EXPECTED.values()) - {255})
    assert tuple(present) == SYNTHIA_16 and set(SYNTHIA_13) == set(SYNTHIA_16) - {3, 4, 5}


@pytest.mark.parametrize('color_type,channels', [(2, 3), (6, 4), (4, 2), (0, 1)])
def test_synthia_16bit_label_uses_full_first_channel(tmp_path, color_type, channels):
    rng = np.random.default_rng(0)
    first = rng.integers(0, 23, size=(11, 9))
    first[0, :3] = [3 + 256, 21 + 512, 65535]  # road/wall in the low byte only: must map to 255
    pixels = np.stack([first] + [rng.integers(256, 65536, size=first.shape) for _ in range(channels - 1)], -1)
    if channels > 1:
        pixels[1, :, 1] = 3  # 'road' in channel 1 must not leak into the result
    path = str(tmp_path / '0000000.png')
    write_png16(path, pixels, color_type)
    label = read_label(path, 'synthia')
    assert label.dtype == np.uint8 and label.shape == (11, 9)
    assert (label == np.vectorize(lambda i: SYNTHIA_EXPECTED.get(i, 255))(first)).all()
    assert (label[0, :3] == 255).all()


def test_synthia_8bit_label_via_pil(tmp_path):
    ids = np.array([[3, 21, 16], [1, 0, 22]], dtype=np.uint8)
    Image.fromarray(np.stack([ids, ids + 1, ids + 2], -1)).save(tmp_path / 'rgb.png')
    assert (read_label(str(tmp_path / 'rgb.png'), 'synthia') == [[0, 3, 255], [10, 255, 255]]).all()


@pytest.mark.parametrize('dataset', ['gta', 'synthia'])
def test_corrupt_png_raises_corrupt_file(tmp_path, dataset):
    write_fake_dataset(str(tmp_path), dataset, 1, (64, 48))
    (image, label), = find_pairs(dataset, str(tmp_path), 'train')
    for path in (image, label):
        with open(path, 'rb') as f:
            data = f.read()
        with open(path, 'wb') as f:
            f.write(data[:len(data) // 2])
    for read in (lambda: read_image(image), lambda: read_label(label, dataset)):
        with pytest.raises(CorruptFile) as err:
            read()
        assert isinstance(err.value, DataError) and '\n' not in str(err.value)
    assert label in str(err.value)
    (tmp_path / 'junk.png').write_bytes(b'not a png at all')
    with pytest.raises(CorruptFile, match='junk.png'):
        read_label(str(tmp_path / 'junk.png'), 'synthia')
    with pytest.raises(CorruptFile, match='missing.png'):
        read_image(str(tmp_path / 'missing.png'))


# -----------------------------------------------------------------------------
# folder discovery


def test_find_pairs_on_fake_layouts(tmp_path):
    root = str(tmp_path)
    for dataset in ('gta', 'synthia', 'cityscapes'):
        write_fake_dataset(root, dataset, 4, (32, 16))
    gta = find_pairs('gta', root, 'train')
    assert [os.path.relpath(p, root) for p in gta[0]] == ['gta/images/00001.png', 'gta/labels/00001.png']
    assert len(gta) == 4 and gta == sorted(gta)
    synthia = find_pairs('synthia', root, 'train')
    assert [os.path.relpath(p, root) for p in synthia[-1]] == ['synthia/RGB/0000003.png',
                                                              'synthia/GT/LABELS/0000003.png']
    # siblings that real Cityscapes (or DAFormer's converter) put next to the labels are ignored
    (tmp_path / 'cityscapes/gtFine/train/aachen/aachen_000000_000019_gtFine_color.png').write_bytes(b'')
    (tmp_path / 'cityscapes/gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json').write_bytes(b'')
    for split, cities in (('train', {'aachen', 'bochum'}), ('val', {'frankfurt', 'lindau'})):
        pairs = find_pairs('cityscapes', root, split)
        assert len(pairs) == 4 and pairs == sorted(pairs)
        assert {os.path.basename(os.path.dirname(image)) for image, _ in pairs} == cities
        for image, label in pairs:
            assert label == image.replace('leftImg8bit', 'gtFine', 1).replace('_leftImg8bit.png',
                                                                              '_gtFine_labelIds.png')
    for dataset, pairs in (('gta', gta), ('synthia', synthia)):
        for image, label in pairs:
            assert read_image(image).shape == (16, 32, 3)
            assert set(np.unique(read_label(label, dataset))) <= set(range(19)) | {255}


@pytest.mark.parametrize('case', ['missing folder', 'empty split', 'image without label', 'label without image',
                                  'bad naming'])
def test_find_pairs_errors(tmp_path, case):
    root = str(tmp_path)
    write_fake_dataset(root, 'gta', 3, (8, 8))
    write_fake_dataset(root, 'cityscapes', 2, (8, 8))
    dataset, split = 'gta', 'train'
    if case == 'missing folder':
        expected = os.path.join(root, 'gta/labels')
        for name in os.listdir(expected):
            os.remove(os.path.join(expected, name))
        os.rmdir(expected)
    elif case == 'empty split':
        dataset, split, expected = 'cityscapes', 'val', os.path.join(root, 'cityscapes/leftImg8bit/val')
        for city in ('frankfurt', 'lindau'):
            for name in os.listdir(os.path.join(expected, city)):
                os.remove(os.path.join(expected, city, name))
    elif case == 'image without label':
        os.remove(os.path.join(root, 'gta/labels/00002.png'))
        expected = os.path.join(root, 'gta/images/00002.png')
    elif case == 'label without image':
        os.remove(os.path.join(root, 'gta/images/00003.png'))
        expected = os.path.join(root, 'gta/labels/00003.png')
    else:
        expected = os.path.join(root, 'gta/images/00004 copy.png')
        open(expected, 'wb').close()
    with pytest.raises(DataError) as err:
        find_pairs(dataset, root, split)
    assert expected in str(err.value) and '\n' not in str(err.value)


# -----------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize('dacs_filter,size', [(Image.Resampling.BICUBIC, (16, 40)), (None, (16, 32))])
def test_resize_pair_fixes_gta_size_mismatch(dacs_filter, size):
    image = np.random.default_rng(0).integers(0, 256, size=(10, 20, 3), dtype=np.uint8)
    label = np.tile(np.array([0, 13, 255], dtype=np.uint8), (10, 7))  # 21 wide: one column more than image
    out_image, out_label = resize_pair(image, label, (40, 16), dacs_filter)  # mmseg: keep 2:1 -> 32x16
    assert out_image.shape == size + (3,) and out_label.shape == size
    assert set(np.unique(out_label)) == {0, 13, 255}  # nearest: no blended ids
    out_image, full_label = resize_pair(image, label, (40, 16), dacs_filter, resize_label=False)
    assert out_image.shape == size + (3,) and full_label is label


def test_random_crop_shape_and_padding():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, size=(6, 10, 3), dtype=np.uint8)
    label = rng.integers(0, 19, size=(6, 10), dtype=np.uint8)
    crop_image, crop_label = random_crop(image, label, (4, 5), rng)
    assert crop_image.shape == (4, 5, 3) and crop_label.shape == (4, 5)
    ys, xs = np.nonzero((np.lib.stride_tricks.sliding_window_view(label, (4, 5)) == crop_label).all((-2, -1)))
    assert any((image[y:y + 4, x:x + 5] == crop_image).all() for y, x in zip(ys, xs))
    padded_image, padded_label = random_crop(image, label, (8, 12), rng)
    assert padded_image.shape == (8, 12, 3) and padded_label.shape == (8, 12)
    assert (padded_image[:6, :10] == image).all() and (padded_label[:6, :10] == label).all()
    assert (padded_image[6:] == 0).all() and (padded_label[6:] == 255).all() and (padded_label[:, 10:] == 255).all()


# -----------------------------------------------------------------------------
# evaluation


def test_confusion_matrix_and_iou_by_hand():
    label = torch.tensor([[0, 0, 0, 1], [1, 255, 255, 0]], dtype=torch.uint8)
    pred = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 0]])  # predictions on ignored pixels do not count
    conf = confusion_matrix(pred, label, 3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 0]]
    iou = iou_per_class(conf)
    assert iou.dtype == torch.float64
    assert iou[0] == pytest.approx(3 / 5) and iou[1] == pytest.approx(1 / 3) and torch.isnan(iou[2])
    assert (confusion_matrix(pred.numpy(), label.numpy(), 3) == conf).all()
    assert iou_per_class(confusion_matrix(torch.tensor([2, 0]), torch.tensor([0, 0]), 3))[2] == 0  # pred only
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)


def test_format_table_numbers_in_order():
    ious = np.full(19, np.nan)
    ious[list(SYNTHIA_16)] = np.linspace(0.1, 0.85, 16)
    table = format_table(torch.tensor(ious), SYNTHIA_13)
    header, values = ([cell.strip() for cell in line.split('|')] for line in table.splitlines())
    assert header == [CLASSES[i] for i in SYNTHIA_13] + ['mIoU']
    assert values == [f'{ious[i] * 100:.1f}' for i in SYNTHIA_13] + [f'{np.mean(ious[list(SYNTHIA_13)]) * 100:.1f}']
    assert values[:2] == ['10.0', '15.0']
    header, values = ([cell.strip() for cell in line.split('|')] for line in format_table(ious, range(19))
                      .splitlines())
    assert header[-1] == 'mIoU' and values[9] == 'nan' and values[-1] == f'{np.nanmean(ious) * 100:.1f}'


def test_palette():
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (19, 3)
    assert PALETTE[0].tolist() == [128, 64, 128] and PALETTE[10].tolist() == [70, 130, 180]
    assert PALETTE[13].tolist() == [0, 0, 142] and PALETTE[18].tolist() == [119, 11, 32]




# ---------------------------------------------------------------- toy scenes

STYLES = ('source', 'target')


def _toy_split(style, n, seed, size=(64, 128)):
    rng = np.random.default_rng(seed)
    images, labels = zip(*(make_toy_scene(rng, style, size) for _ in range(n)))
    return np.stack(images), np.stack(labels)


def test_toy_classes_are_cityscapes_subset():
    assert 5 <= len(TOY_CLASSES) <= 8 and set(TOY_CLASSES) <= set(CLASSES)
    assert TOY_PALETTE.shape == (len(TOY_CLASSES), 3) and TOY_PALETTE.dtype == np.uint8


@pytest.mark.parametrize('style', STYLES)
def test_toy_deterministic_for_seed(style):
    a, b, c = _toy_split(style, 5, seed=3), _toy_split(style, 5, seed=3), _toy_split(style, 5, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize('style', STYLES)
@pytest.mark.parametrize('size', [(64, 128), (32, 48), (97, 201), (128, 256)])
def test_toy_shapes_and_dtypes(style, size):
    img, lab = make_toy_scene(np.random.default_rng(0), style, size)
    assert img.shape == (*size, 3) and img.dtype == np.uint8
    assert lab.shape == size and lab.dtype == np.uint8
    imgs, labs = _toy_split(style, 3, seed=0, size=size)
    assert imgs.shape == (3, *size, 3) and labs.shape == (3, *size)
    assert imgs.dtype == np.uint8 and labs.dtype == np.uint8


def test_toy_default_size():
    img, lab = make_toy_scene(np.random.default_rng(0), 'source')
    assert img.shape == (64, 128, 3) and lab.shape == (64, 128)


def test_toy_unknown_style_rejected():
    with pytest.raises(ValueError):
        make_toy_scene(np.random.default_rng(0), 'night')


@pytest.mark.parametrize('style', STYLES)
def test_toy_every_class_appears_and_labels_in_range(style):
    _, labs = _toy_split(style, 50, seed=0)
    assert labs.max() < len(TOY_CLASSES)
    assert set(np.unique(labs)) == set(range(len(TOY_CLASSES)))


def _toy_class_stats(style, n=30):
    """Per-class mean colour and fine texture (median |horizontal step| inside the class),
    rendering the same layouts in the given style."""
    rng = np.random.default_rng(0)
    means, steps = [[] for _ in TOY_CLASSES], [[] for _ in TOY_CLASSES]
    for k in range(n):
        layout = toy_layout(np.random.default_rng(k), 'source')
        img, lab = toy_render(rng, layout, style)
        assert np.array_equal(lab, layout[-1])  # rendering never changes the geometry
        img = img.astype(float)
        step = np.abs(img[:, 1:] - img[:, :-1]).mean(-1)
        inside = lab[:, 1:] == lab[:, :-1]
        for c in range(len(TOY_CLASSES)):
            means[c].append(img[lab == c])
            steps[c].append(step[inside & (lab[:, 1:] == c)])
    return (np.array([np.concatenate(m).mean(0) for m in means]),
            np.array([np.median(np.concatenate(s)) for s in steps]))


def test_toy_styles_differ_in_colour_statistics_for_same_geometry():
    src_mean, src_texture = _toy_class_stats('source')
    tgt_mean, tgt_texture = _toy_class_stats('target')
    shift = np.linalg.norm(src_mean - tgt_mean, axis=1)
    # Road keeps roughly its grey on purpose; every other class moves its mean colour.
    assert (np.delete(shift, TOY_CLASSES.index('road')) > 20).all()
    # Target is textured and noisy where source is flat.
    assert (tgt_texture > src_texture + 2).all()


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


def test_recipe_and_arch_that_make_no_sense_together_are_one_line(capsys):
    for args in (["--recipe", "dacs", "--arch", "mitb5"], ["--recipe", "daformer", "--arch", "dlv2"],
                 ["--recipe", "mmseg-dacs", "--arch", "dlv2-tiny"], ["--recipe", "sgd"], ["--arch", "resnet"]):
        assert T.main(["--task", "gta2cs"] + args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --") and "Traceback" not in err
    assert T.main(["--task", "gta2cs", "--recipe", "daformer", "--arch", "dlv2-v1c", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert (config["recipe"], config["arch"], config["framework"], config["ema"]) == ("daformer", "dlv2-v1c", "mmseg", 0.999)


def fake_batch(size=32, source_label=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 5, (2, size, size), generator=generator, dtype=torch.uint8) if source_label is None \
        else source_label
    return dict(source_image=torch.randint(0, 256, (2, 3, size, size), generator=generator, dtype=torch.uint8),
                source_label=label,
                target_image=torch.randint(0, 256, (2, 3, size, size), generator=generator, dtype=torch.uint8))


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


def test_resize_as_each_framework_does():
    """DACS: PIL, exactly 1280x720 (GTA bicubic). mmseg: keep the aspect ratio (1914x1052 -> 1280x704),
    bilinear without antialiasing; labels nearest, to the image's new size."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(1052, 1914, 3), dtype=np.uint8)
    label = rng.integers(0, 19, size=(1052, 1916), dtype=np.uint8)  # GTA: a label 2 px wider than its image
    mmseg_image, mmseg_label = resize_pair(image, label, (1280, 720))
    assert mmseg_image.shape == (704, 1280, 3) and mmseg_label.shape == (704, 1280)
    reference = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(704, 1280),
                              mode="bilinear", align_corners=False, antialias=False)[0].permute(1, 2, 0)
    # torchvision's uint8 path interpolates in fixed point, as OpenCV does: within one grey level
    assert (torch.from_numpy(mmseg_image).float() - reference).abs().max() < 1.01
    rows, cols = (np.arange(704) * 1052 / 704).astype(int), (np.arange(1280) * 1916 / 1280).astype(int)
    assert (mmseg_label == label[rows][:, cols]).all()  # OpenCV's nearest: floor(dst * scale)
    dacs_image, dacs_label = resize_pair(image, label, (1280, 720), DATASETS["gta"]["dacs_filter"])
    expected = np.array(Image.fromarray(image).resize((1280, 720), Image.Resampling.BICUBIC))
    assert dacs_image.shape == (720, 1280, 3) and (dacs_image == expected).all() and dacs_label.shape == (720, 1280)
    assert mmseg_rescale_size(2048, 1024, (1024, 512)) == (1024, 512)
    assert mmseg_rescale_size(1280, 760, (1280, 760)) == (1280, 760)


class CountingDomain:
    """One image whose label is class 1 except a rare class 2 in a 4x4 corner, counting pipeline runs."""
    name = "fake"

    def __init__(self, size=64):
        self.label = np.ones((size, size), np.uint8)
        self.label[:4, :4] = 2
        self.image = np.zeros((size, size, 3), np.uint8)

    def __len__(self):
        return 1

    def load(self, i):
        return self.image, self.label


def test_rare_class_sampling_reruns_the_whole_pipeline_up_to_ten_more_times(monkeypatch):
    """DAFormer's get_rare_class_sample: while the crop holds <= min_pixels / 2 of the class, run the
    pipeline (crop with its own cat_max_ratio checks, flip) again on the same image, at most 10 more times."""
    cfg = SimpleNamespace(seed=0, batch_size=1, crop=16, flip=True, cat_max_ratio=1.0, max_skips=0, rcs_min_pixels=40,
                          rcs_min_crop_ratio=0.5, iters=1, pseudo_margins="0,0,0,0")
    domain = CountingDomain(size=20)
    batches = TrainBatches(cfg, domain, domain, rcs=(np.array([0.0, 0.0, 1.0]), [[], [], [0]]))
    runs = []  # pixels of class 2 in each run's crop
    real = batches.pipeline

    def counted(*args):
        result = real(*args)
        runs.append(int((result[1] == 2).sum()))
        return result

    monkeypatch.setattr(batches, "pipeline", counted)
    rng = np.random.default_rng(0)
    image, label = batches.sample(domain, rng, [], is_source=True)
    assert len(runs) == 11 and label.shape == (16, 16)  # 16 pixels of class 2 at most: never > 20
    cfg.rcs_min_pixels = 10  # > 5 pixels: a crop holding the corner is enough
    lengths = set()
    for _ in range(30):
        runs.clear()
        image, label = batches.sample(domain, rng, [], is_source=True)
        assert all(n <= 5 for n in runs[:-1]) and (runs[-1] > 5 or len(runs) == 11)  # stops at the first hit
        assert (label == 2).sum() == runs[-1]  # the last run is the sample
        lengths.add(len(runs))
    assert len(lengths) > 2
    # mmseg's cat_max_ratio: a one-class crop is never balanced: 10 checks, 11 crops drawn, the last one kept
    cfg.cat_max_ratio, cfg.rcs_min_pixels = 0.75, 0
    crops = []
    real_crop = random_crop
    monkeypatch.setattr(support.data, "random_crop", lambda *a: crops.append(1) or real_crop(*a))
    batches.pipeline(np.zeros((64, 64, 3), np.uint8), np.ones((64, 64), np.uint8), rng, True)
    assert len(crops) == 11
    crops.clear()
    batches.pipeline(np.zeros((64, 64, 3), np.uint8), np.ones((64, 64), np.uint8), rng, False)
    assert len(crops) == 1  # target crops: labels are not read


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


def test_teacher_is_deterministic_but_stays_in_train_mode():
    """DAFormer switches off the teacher's DropPath and dropout only (BatchNorm stays in train mode)."""
    nets = build_nets(T.parse_args(["--task", "toy", "--arch", "mit-tiny", "--device", "cpu"]))
    assert nets.teacher.training
    assert any(isinstance(m, DropPath) and m.p > 0 for m in nets.teacher.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(nets.teacher(x), nets.teacher(x), rtol=0, atol=0)
        assert not torch.equal(nets.model(x), nets.model(x))  # the student's DropPath is on


def test_lr_schedules():
    dacs = SimpleNamespace(iters=100, poly_power=0.9, warmup_iters=0)
    assert lr_factor(dacs, 0) == 1.0 and lr_factor(dacs, 50) == pytest.approx(0.5 ** 0.9)
    daformer = SimpleNamespace(iters=40000, poly_power=1.0, warmup_iters=1500)
    assert lr_factor(daformer, 0) == pytest.approx(1e-6)
    assert lr_factor(daformer, 750) == pytest.approx((1 - 750 / 40000) * (1 - 0.5 * (1 - 1e-6)))
    assert lr_factor(daformer, 20000) == pytest.approx(0.5)


def test_mrm_adds_at_most_14_percent_forward_flops_for_deeplabv2():
    """Paper Table 6: 1.13x. Counted on the meta device: the full ResNet-101 at 512x512, instantly."""
    r = count_flops("dlv2", (512, 512))
    assert 170 < r["model_gmac"] < 200
    assert r["ratio"] <= 1.14
    assert r["rebuilder_params"] == 10_246_016


def test_count_flops_prints_the_mitb5_encoder_size(capsys):
    assert T.main(["--task", "gta2cs", "--arch", "mitb5", "--count-flops"]) == 0
    out = capsys.readouterr().out
    assert f"mitb5 + daformer: encoder {MIT_B5_PARAMS:,} + decoder 3,712,275 parameters" in out and "GMAC" in out


def test_reference_step_computes_what_train_step_computes():
    """The per-image fp32 reference that --bench compares against is the same iteration: with
    single-class source images (ClassMix then pastes the whole image, no randomness) and no
    augmentation, both give the same loss and the same weights after two steps."""
    cfg = T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--no-mrm", "--device", "cpu",
                          "--jitter-p", "0", "--blur-p", "0", "--iters", "10"])
    generator = torch.Generator().manual_seed(0)
    batch = dict(source_image=torch.randint(0, 256, (2, 3, 32, 32), generator=generator, dtype=torch.uint8),
                 source_label=torch.tensor([3, 7], dtype=torch.uint8)[:, None, None].expand(2, 32, 32),
                 target_image=torch.randint(0, 256, (2, 3, 32, 32), generator=generator, dtype=torch.uint8))
    torch.manual_seed(0)
    fast = build_nets(cfg)
    torch.manual_seed(0)
    reference = build_nets(cfg)
    for iteration in range(2):
        losses, _ = T.train_step(cfg, fast, batch, iteration)
        reference_loss = reference_step(cfg, reference, batch, iteration)
        torch.testing.assert_close(reference_loss, losses[0] + losses[1])
    for a, b in zip(fast.model.state_dict().values(), reference.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    for a, b in zip(fast.teacher.parameters(), reference.teacher.parameters()):
        torch.testing.assert_close(a, b)



# ----------------------------------------------------------------------------- the step as one CUDA graph
# The DACS recipe (SlotSGD beside the Rebuilder's AdamW, EMA after the step) and DAFormer's (AdamW, EMA before
# the next step, MIC and the feature distance on); short schedules, so that every iteration has its own lr.
GRAPH_CASES = [["--task", "gta2cs", "--arch", "dlv2-tiny", "--iters", "8"],
               ["--task", "gta2cs", "--arch", "mit-tiny", "--mic", "--iters", "8", "--warmup-iters", "2"]]
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique",
              "_unique2", "unique_dim", "unique_consecutive", "bincount", "repeat_interleave", "lift_fresh"}


def unchecked(function):
    def run_outside_the_modes(*args, **kwargs):
        with _disable_current_modes():
            return function(*args, **kwargs)
    return run_outside_the_modes


class HostReads(TorchDispatchMode):
    """Records the operations a CUDA graph cannot hold: those that read a tensor's values on the host, size a
    result by them (boolean indexing included) or copy a new host tensor in."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1])
        if name in HOST_READS or boolean_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("flags", GRAPH_CASES + [
    ["--task", "gta2cs", "--arch", "dlv2-tiny", "--mrm-objective", "pixel"],
    ["--task", "gta2cs", "--arch", "dlv2-tiny", "--mrm-mode", "mask-only", "--mic"],
    ["--task", "gta2cs", "--arch", "mit-tiny", "--mrm-trains", "encoder", "--mrm-domain", "both"],
    ["--task", "gta2cs", "--arch", "mit-tiny", "--mrm-objective", "feature-teacher"],
    ["--task", "gta2cs", "--arch", "dlv2-tiny", "--mrm-mode", "input"]])
def test_device_step_reads_nothing_on_the_host(monkeypatch, flags):
    """What CudaGraphStep captures after its warm-up, for every kind of step: no operation that reads values on
    the host and no host random numbers. torch's own SGD and AdamW are left out: on the CPU they read a tensor
    lr and their step count on the host, on CUDA they run fused and capturable (torch refuses to capture them
    otherwise). The detector itself finds the .item() and torch.unique of the per-image reference."""
    cfg = T.parse_args(flags + ["--device", "cpu"])
    nets = build_nets(cfg)
    device_scalars(nets)
    T.train_step(cfg, nets, fake_batch(seed=1), 0)  # the warm-up: optimizer states exist
    inputs = to_device(fake_batch(), nets)
    for optimizer in nets.optimizers:
        if type(optimizer) in (torch.optim.SGD, torch.optim.AdamW):
            monkeypatch.setattr(optimizer, "step", unchecked(optimizer.step))

    def host_random(*args, **kwargs):
        raise AssertionError("host random numbers in the device step")

    for name in ("random", "randint", "uniform", "choice", "shuffle", "sample"):
        monkeypatch.setattr(random, name, host_random)
    for name in ("choice", "rand", "randint", "default_rng", "permutation"):
        monkeypatch.setattr(np.random, name, host_random)
    with HostReads() as reads:
        T.device_step(cfg, nets, *inputs)
    assert reads.found == []
    monkeypatch.undo()
    if cfg.framework == "dacs" and not cfg.mic:
        with HostReads() as reads:
            reference_step(cfg, nets, fake_batch(), 0)
        assert {"_local_scalar_dense", "_unique2"} <= set(reads.found)


@pytest.mark.parametrize("flags", GRAPH_CASES)
def test_graph_step_computes_what_train_step_computes(flags):
    """CudaGraphStep without a GPU (capture=False: the same input buffers, device-tensor learning rates and EMA
    weight, warm-up, then every iteration run from the buffers, only not captured) against the eager train_step
    over 5 iterations of different batches: the same losses, weights, teacher and optimizer states."""
    cfg = T.parse_args(flags + ["--device", "cpu"])
    torch.manual_seed(0)
    eager = build_nets(cfg)
    torch.manual_seed(0)
    graphed = build_nets(cfg)
    initial = copy.deepcopy(graphed.model.state_dict())
    step = CudaGraphStep(graphed, T.begin_step, T.device_step, warmup=2, capture=False)
    for iteration in range(5):
        batch = fake_batch(seed=iteration)
        torch.manual_seed(100 + iteration)
        expected, _ = T.train_step(cfg, eager, batch, iteration)
        torch.manual_seed(100 + iteration)
        torch.testing.assert_close(step(cfg, graphed, batch, iteration)[0], expected)
        graphed_lrs = [g["lr"] for o in graphed.optimizers for g in o.param_groups]
        assert all(isinstance(lr, torch.Tensor) and lr.dim() == 0 for lr in graphed_lrs)
        assert [float(lr) for lr in graphed_lrs] == pytest.approx([g["lr"] for o in eager.optimizers
                                                                   for g in o.param_groups])
    assert step.replay is not None and step.steps == 3  # 2 warm-up iterations, then captured (here: recorded)
    assert isinstance(graphed.ema_weight, torch.Tensor) and float(graphed.ema_weight) == pytest.approx(eager.ema_weight)
    for name in ("model", "teacher", "rebuilder"):
        for (key, a), b in zip(getattr(graphed, name).state_dict().items(), getattr(eager, name).state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"{name}.{key}")
    for a, b in zip(graphed.optimizers, eager.optimizers):
        for p, q in zip([p for g in a.param_groups for p in g["params"]], [q for g in b.param_groups for q in g["params"]]):
            for key, value in a.state[p].items():
                torch.testing.assert_close(value, b.state[q][key])
    moved = [(a - b).abs().max() for a, b in zip(graphed.model.state_dict().values(), initial.values())
             if a.is_floating_point()]
    assert max(moved) > 1e-4  # the iterations trained


def test_a_graph_checkpoint_resumes_with_plain_learning_rates(tmp_path):
    cfg = T.parse_args(GRAPH_CASES[0] + ["--device", "cpu", "--work-dir", str(tmp_path)])
    nets = build_nets(cfg)
    step = CudaGraphStep(nets, T.begin_step, T.device_step, warmup=1, capture=False)
    for iteration in range(2):
        step(cfg, nets, fake_batch(seed=iteration), iteration)
    save_checkpoint(cfg, nets, 2)
    resumed = build_nets(cfg)
    assert resume(cfg, resumed) == 2
    lrs = [g["lr"] for o in resumed.optimizers for g in o.param_groups]
    assert all(type(lr) is float for lr in lrs)
    assert lrs == pytest.approx([float(g["lr"]) for o in nets.optimizers for g in o.param_groups])


def test_a_failed_capture_stops_with_one_line_and_other_shapes_are_refused(tmp_path, monkeypatch, capsys):
    """A training run whose capture fails (simulated: capture forced on, torch.cuda.graph refusing): one line
    naming the cause and the eager step, exit 2, no traceback. A replayed step refuses a batch of another shape."""
    class RefusingCapture:
        def __init__(self, graph, capture_error_mode):
            assert capture_error_mode == "thread_local"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore lines")

    real_step = CudaGraphStep
    monkeypatch.setattr(support.networks, "why_eager", lambda cfg, world: "")
    monkeypatch.setattr(T, "CudaGraphStep", lambda *args: real_step(*args, warmup=0, capture=True))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", RefusingCapture)
    assert T.main(tiny_dacs_run(tmp_path, iters=2, checkpoint_every=1) + ["--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "could not be captured as one CUDA graph (RuntimeError: CUDA error: operation not permitted when stream " \
           "is capturing more lines); run without --cuda-graph" in err
    monkeypatch.undo()
    cfg = T.parse_args(GRAPH_CASES[0] + ["--device", "cpu"])
    nets = build_nets(cfg)
    step = CudaGraphStep(nets, T.begin_step, T.device_step, warmup=0, capture=False)
    step(cfg, nets, fake_batch(), 0)
    with pytest.raises(ValueError, match=r"source_image \(2, 3, 16, 16\), captured with \(2, 3, 32, 32\)"):
        step(cfg, nets, fake_batch(size=16), 1)


def test_the_step_is_one_cuda_graph_only_when_asked_for_and_where_it_can_be():
    cfg = T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--device", "cpu"])
    assert cfg.cuda_graph is False and why_eager(cfg, 1) == "without --cuda-graph" and not build_nets(cfg).graph
    cfg = T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--device", "cpu", "--cuda-graph"])
    assert why_eager(cfg, 1) == "not on CUDA" and not build_nets(cfg).graph
    on_gpu = SimpleNamespace(**{**vars(cfg), "device": "cuda"})
    assert why_eager(on_gpu, 1) == ""
    assert why_eager(on_gpu, 2).startswith("torchrun")
    for key, value, why in (("amp", "fp16", "fp16"), ("checkpoint_blocks", True, "--checkpoint-blocks"),
                            ("compile", True, "--compile"), ("cuda_graph", False, "without --cuda-graph")):
        assert why_eager(SimpleNamespace(**{**vars(on_gpu), key: value}), 1).startswith(why)


def test_the_step_casts_each_weight_once_under_autocast():
    """bf16 autocast keeps one low-precision copy of each trainable weight for the whole forward/backward part
    of the step: the source, mixed and MRM passes share it (each pass cast them anew before)."""
    cfg = T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--device", "cpu", "--amp", "bf16"])
    nets = build_nets(cfg)
    trainable = {p.data_ptr() for p in nets.model.parameters() if p.requires_grad}

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and (kwargs or {}).get("dtype") == torch.bfloat16 \
                    and args[0].data_ptr() in trainable:
                self.counts[args[0].data_ptr()] += 1
            return func(*args, **(kwargs or {}))

    with Casts() as casts:
        T.train_step(cfg, nets, fake_batch(), 0)
    convolutions = sum(m.weight.requires_grad for m in nets.model.modules() if isinstance(m, nn.Conv2d))
    assert len(casts.counts) >= convolutions and set(casts.counts.values()) == {1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("flags", GRAPH_CASES)
def test_cuda_graph_replays_what_the_eager_step_computes_on_the_gpu(monkeypatch, flags):
    """The capture itself, on a GPU: 6 iterations (2 eager warm-up, capture, replays) against eager ones with
    the same seeds; fp32 and deterministic cuDNN, so that only atomic additions may order sums differently."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    cfg = T.parse_args(flags + ["--device", "cuda", "--amp", "off", "--cuda-graph"])
    torch.manual_seed(0)
    eager = build_nets(SimpleNamespace(**{**vars(cfg), "cuda_graph": False}))
    torch.manual_seed(0)
    graphed = build_nets(cfg)
    assert graphed.graph and not eager.graph
    step = CudaGraphStep(graphed, T.begin_step, T.device_step, warmup=2)
    for iteration in range(6):
        batch = fake_batch(seed=iteration)
        torch.manual_seed(100 + iteration)
        expected, _ = T.train_step(cfg, eager, batch, iteration)
        torch.manual_seed(100 + iteration)
        torch.testing.assert_close(step(cfg, graphed, batch, iteration)[0], expected, rtol=1e-3, atol=1e-4)
    for a, b in zip(graphed.model.state_dict().values(), eager.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)

@pytest.mark.parametrize("arch,reference", [("dlv2", True), ("mitb5", False)])
def test_bench_runs_on_cpu_with_the_tiny_model(capsys, monkeypatch, arch, reference):
    """The variants run interleaved after their warm-ups: the MRM and no-MRM steps alternate, 3 rounds."""
    calls = []
    real_step = T.device_step
    monkeypatch.setattr(T, "device_step", lambda cfg, *args: calls.append(cfg.mrm) or real_step(cfg, *args))
    results = T.main(["--arch", arch, "--bench", "3", "--device", "cpu", "--amp", "bf16"])  # --task gta2cs
    assert results == 0
    out = capsys.readouterr().out
    tiny = "dlv2-tiny" if arch == "dlv2" else "mit-tiny"
    assert f"bench on {device_name('cpu')}" in out and f": {tiny} (" in out and "3 interleaved rounds" in out
    names = ["DACS+MRM (eager)", "DACS (eager)", "DACS+MRM fp32 (eager)"]
    if arch == "mitb5":
        names += ["DACS+MRM (eager, --aspp-depthwise nchw)", "DACS+MRM (eager, --aspp-depthwise space-to-batch)"]
    for name in names:
        assert re.search(rf"  {re.escape(name)}: [0-9.]+ ms/iteration \(median\), [0-9.]+ images/s", out), name
    assert "MRM step-time overhead " in out and "x as fast as DACS+MRM fp32 (eager)" in out
    assert ("fp32 per-image reference" in out) == reference
    warmup = CudaGraphStep.warmup_steps + 2
    round_of_steps = [True, False, True] + ([True, True] if arch == "mitb5" else [])  # device_step's cfg.mrm
    assert calls[-3 * len(round_of_steps):] == round_of_steps * 3 and calls[:warmup] == [True] * warmup


@pytest.mark.parametrize("dilation,size", [(6, (20, 33)), (12, (32, 32)), (18, (17, 40)), (1, (9, 7))])
def test_depthwise_forms_compute_the_dilated_convolution(dilation, size):
    """--aspp-depthwise: nchw and space-to-batch against F.conv2d with dilation, in float64, for sides that are
    and are not multiples of d and both memory formats: outputs, input and weight gradients, the layout kept."""
    torch.manual_seed(0)
    conv = DepthwiseConv3x3(8, 8, 3, padding=dilation, dilation=dilation, groups=8, bias=False).double()
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    weight = conv.weight.detach().clone().requires_grad_(True)
    reference_input = x.clone().requires_grad_(True)
    reference = F.conv2d(reference_input, weight, padding=dilation, dilation=dilation, groups=8)
    upstream = torch.randn_like(reference)
    reference_grads = torch.autograd.grad(reference, (reference_input, weight), upstream)
    for form in DEPTHWISE_FORMS:
        conv.form = form
        for layout in (torch.contiguous_format, torch.channels_last):
            inp = x.clone().contiguous(memory_format=layout).requires_grad_(True)
            out = conv(inp)
            torch.testing.assert_close(out, reference, rtol=0, atol=1e-13)
            assert out.is_contiguous(memory_format=layout)
            grads = torch.autograd.grad(out, (inp, conv.weight), upstream)
            for got, expected in zip(grads, reference_grads):
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_aspp_depthwise_flag_reaches_the_heads_and_leaves_the_result():
    outputs = []
    for form in DEPTHWISE_FORMS:
        torch.manual_seed(0)
        cfg = T.parse_args(["--task", "gta2cs", "--arch", "mit-tiny", "--device", "cpu", "--aspp-depthwise", form])
        nets = build_nets(cfg)
        forms = {m.form for net in (nets.model, nets.teacher) for m in net.modules()
                 if isinstance(m, DepthwiseConv3x3)}
        assert forms == {form}
        nets.model.eval()
        with torch.no_grad():
            outputs.append(nets.model(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))))
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="--aspp-depthwise applies to the separable ASPP"):
        T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--aspp-depthwise", "nchw"])
    with pytest.raises(ConfigError, match="--aspp-depthwise sideways: must be one of direct | nchw"):
        T.parse_args(["--task", "gta2cs", "--arch", "mit-tiny", "--aspp-depthwise", "sideways"])

def test_busy_time_is_the_union_of_intervals():
    assert busy_time([]) == 0
    assert busy_time([(0, 2), (1, 3), (5, 6), (5.5, 5.7), (10, 11)]) == pytest.approx(3 + 1 + 1)
    assert busy_time([(4, 9), (0, 1), (2, 5)]) == pytest.approx(1 + 7)


def test_profile_steps_counts_no_gpu_work_on_the_cpu():
    """The profiler plumbing --bench uses on CUDA: it runs each step once and finds no GPU activity here."""
    cfg = T.parse_args(["--task", "gta2cs", "--arch", "dlv2-tiny", "--device", "cpu"])
    nets, iterations = build_nets(cfg), []
    activity = profile_steps(lambda i: iterations.append(i) or T.train_step(cfg, nets, fake_batch(), i), 5, 2,
                               cuda=False)
    assert iterations == [5, 6] and activity == dict(gpu_busy_ms=0, kernels=0, launches=0)

def test_bench_data_reports_pairs_per_second(capsys, monkeypatch):
    """The printed rate is the measured one rounded, and the workers are computed from the measured (unrounded)
    rate: relations that hold whatever the machine's speed."""
    rates, measure = {}, T.bench_data
    monkeypatch.setattr(T, "bench_data", lambda cfg, recipes: rates.update(measure(cfg, recipes)) or rates)
    assert T.main(["--bench-data", "1", "--batch-size", "1", "--workers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines[:3]] == ["dacs recipe", "daformer recipe", "hrda recipe"]
    assert list(rates) == ["dacs", "daformer", "hrda"]
    for line, rate in zip(lines[:3], rates.values()):
        assert f"({rate:.2f} batches of 1+1/s)" in line and f": {2 * rate:.1f} image pairs/s" in line
        workers = [int(n) for n in re.findall(r"a \d+ ms step (\d+)", line)]
        assert workers == [math.ceil(1000 / 45 / rate), math.ceil(1000 / 100 / rate)]
    assert lines[3].startswith("the training loader of the dacs recipe with --workers 1: ") and len(lines) == 4


# ---------------------------------------------------------------- the paper's other experiments

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


def mit_param_count(config, in_chans=3, mlp_ratio=4):
    """MiT parameters from SegFormer's layer list (NVlabs/SegFormer mix_transformer.py), written out by hand."""
    total, c_in = 0, in_chans
    for i, (d, depth, sr) in enumerate(zip(config["embed_dims"], config["depths"], config["sr_ratios"])):
        k = 7 if i == 0 else 3
        total += k * k * c_in * d + d + 2 * d  # overlapping patch embed + LayerNorm
        h = mlp_ratio * d
        block = 2 * d + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + 2 * d + (d * h + h) + (9 * h + h) + (h * d + d)
        if sr > 1:
            block += d * d * sr * sr + d + 2 * d
        total += depth * block + 2 * d  # blocks + stage norm
        c_in = d
    return total


def test_new_encoders_have_their_reference_parameter_counts():
    """SegFormer reports 24.2 M (B2), 44.0 M (B3) and 81.4 M (B5) encoder parameters; torchvision's resnet50
    has 25,557,032 with its 2,049,000-parameter classifier."""
    with torch.device("meta"):
        counts = {arch: sum(p.numel() for p in build_model(arch, 19)[0].encoder.parameters())
                  for arch in ("mitb2", "mitb3", "mitb5", "dlv2-r50", "dlv2-v1c-r50")}
    assert counts["mitb5"] == mit_param_count(MIT_B5) == MIT_B5_PARAMS
    assert counts["mitb2"] == mit_param_count(MIT_B2) == 24_196_288
    assert counts["mitb3"] == mit_param_count(MIT_B3) == 44_072_128
    assert counts["dlv2-r50"] == 25_557_032 - 2_049_000 == 23_508_032
    assert counts["dlv2-v1c-r50"] == 23_508_032 - 9408 - 128 + 3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + 256


def test_new_pretrained_layouts_load_strictly(tmp_path):
    tv = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50-11ad3fa6.pth"
    torch.save(tv.state_dict(), path)
    model, arch_record = build_model("dlv2-r50", 19, pretrained=str(path))
    assert arch_record["style"] == "torchvision" and arch_record["layers"] == [3, 4, 6, 3]
    assert torch.equal(model.encoder.backbone.layer3[5].conv2.weight, tv.layer3[5].conv2.weight)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MixVisionTransformer(**MIT_B2).state_dict().items()}
    weights = {k: torch.zeros(shape, dtype=torch.float16) for k, shape in shapes.items()}
    torch.save(dict(weights, **{"head.weight": torch.zeros(1000, 512), "head.bias": torch.zeros(1000)}),
               tmp_path / "mit_b2.pth")
    model, _ = build_model("mitb2", 19, pretrained=str(tmp_path / "mit_b2.pth"))
    assert model.encoder.backbone.block3[5].mlp.fc1.weight.abs().sum() == 0
    del weights["block3.5.mlp.fc1.weight"]
    torch.save(weights, tmp_path / "broken_b2.pth")
    with pytest.raises(DataError, match=r"1 missing \[block3.5.mlp.fc1.weight\]"):
        build_model("mitb2", 19, pretrained=str(tmp_path / "broken_b2.pth"))
    with pytest.raises(DataError, match="missing"):  # B2's file does not fit B3
        build_model("mitb3", 19, pretrained=str(tmp_path / "mit_b2.pth"))


@pytest.mark.parametrize("arch", ["dlv2-tiny", "dlv2-v1c-tiny"])
def test_deeplabv3plus_head_like_mmseg_and_wrapped_by_the_rebuilder(arch):
    with torch.device("meta"):
        head = DeepLabV3PlusHead([256, 2048], 19)
    c4, c1, ch = 2048, 256, 512  # mmseg's deeplabv3plus_r50-d8: by hand, BN = 2 per channel
    expected = (2 * (c4 * ch + 2 * ch) + 3 * (c4 * 9 + 2 * c4 + c4 * ch + 2 * ch) + 5 * ch * ch * 9 + 2 * ch
                + c1 * 48 + 96 + (560 * 9 + 1120 + 560 * ch + 2 * ch) + (ch * 9 + 2 * ch + ch * ch + 2 * ch) + ch * 19 + 19)
    assert sum(p.numel() for p in head.parameters()) == expected == 17_697_923
    nets = build_nets(T.parse_args(["--task", "gta2cs", "--arch", arch, "--decoder", "deeplabv3plus",
                                        "--device", "cpu"]))
    assert nets.arch_record["decoder"] == "deeplabv3plus" and nets.rebuilder.in_channels == [64, 512]
    assert [len(p) for p in nets.rebuilder.projectors] == [9, 6]  # x8 for layer1 (stride 4), x4 for layer4
    x = torch.rand(2, 3, 64, 64)
    features = nets.model.encoder(x)
    assert [f.shape[1] for f in features] == [64, 512] and nets.model.decoder(features).shape[-2:] == features[0].shape[-2:]
    losses, _ = T.train_step(T.parse_args(["--task", "gta2cs", "--arch", arch, "--decoder", "deeplabv3plus",
                                             "--device", "cpu", "--iters", "10"]), nets, fake_batch(64), 0)
    assert torch.isfinite(losses).all() and losses[2] > 0


def test_experiment_switches_that_cannot_work_are_one_line(capsys):
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
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err


# ---------------------------------------------------------------- training runs (tiny, CPU)

TOY_FAST = ["--task", "toy", "--batch-size", "2", "--log-every", "2", "--checkpoint-every", "2", "--workers", "0"]


@pytest.fixture
def small_toy(monkeypatch):
    monkeypatch.setitem(TOY_SIZES, "val", 4)


def state_of(work_dir):
    return torch.load(os.path.join(work_dir, "checkpoint.pth"), weights_only=True)


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_checkpoints_equal(a, b):
    """Model, teacher, Rebuilder and every optimizer state bit-identical."""
    for part in ("model", "teacher", "rebuilder"):
        assert_states_equal(a[part], b[part])
    for optimizer_a, optimizer_b in zip(a["optimizers"], b["optimizers"], strict=True):
        for key, state in optimizer_a["state"].items():
            assert_states_equal(state, optimizer_b["state"][key])


def tiny_dacs_run(tmp_path, iters, checkpoint_every):
    """Arguments of a DACS-recipe run (dlv2-tiny, SlotSGD + the Rebuilder's AdamW) on a fake GTA/Cityscapes."""
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 3, (64, 48))
    write_fake_dataset(root, "cityscapes", 2, (64, 32))
    return ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--crop", "32", "--iters", str(iters),
            "--rebuilder-dim", "32", "--rebuilder-heads", "4", "--rebuilder-grid", "4", "--workers", "0",
            "--checkpoint-every", str(checkpoint_every), "--log-every", "1", "--val-every", "100"]


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


def test_gta2cs_starts_on_fake_data_in_the_real_layout(tmp_path, capsys):
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 3, (96, 64))
    write_fake_dataset(root, "cityscapes", 2, (128, 64))
    work = str(tmp_path / "run")
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--iters", "2", "--crop", "48",
            "--workers", "0", "--work-dir", work, "--log-every", "1"]
    assert T.main(args) == 0
    out = capsys.readouterr().out
    assert "3 source / 2 target images" in out and "mIoU over 19 classes" in out
    assert eval_main([os.path.join(work, "model.pth"), "--task", "gta2cs", "--data-root", root,
                      "--workers", "0", "--save-dir", str(tmp_path / "pred")]) == 0
    assert len(os.listdir(tmp_path / "pred")) == 2


@pytest.mark.parametrize("arch", ["dlv2", "dlv2-v1c", "mitb5"])
def test_documented_paper_command_starts_on_fake_data(tmp_path, monkeypatch, capsys, arch):
    """`--task gta2cs --data-root data [--arch dlv2-v1c --pretrained resnet101_v1c.pth | --arch mitb5
    --pretrained mit_b5.pth]` with the full-size networks, cut to one iteration on 64x64 crops; checkpoint
    writing and validation are recorded, not run (a MiT-B5 checkpoint with AdamW states is over 1 GB)."""
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 2, (1280, 720))
    write_fake_dataset(root, "cityscapes", 1, (1024, 512))
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
        args += ["--arch", "mitb5", "--pretrained", str(tmp_path / "mit_b5.pth")]
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


@pytest.mark.parametrize("task,arch,expected", [("gta2cs", "dlv2", "resnet101COCO-41f33a49.pth"),
                                                 ("syn2cs", "dlv2-v1c", "resnet101_v1c-e67eebb6.pth"),
                                                 ("gta2cs", "mitb5", "mit_b5.pth"),
                                                 ("gta2cs", "dlv2-r50", "resnet50-11ad3fa6.pth")])
def test_paper_tasks_refuse_to_start_from_random_weights_unless_asked(tmp_path, capsys, task, arch, expected):
    work = tmp_path / "run"
    assert T.main(["--task", task, "--arch", arch, "--work-dir", str(work)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "--pretrained none" in err and "Traceback" not in err
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


def test_daformer_recipe_on_fake_data_with_rare_class_sampling(tmp_path):
    root = str(tmp_path / "data")
    write_fake_dataset(root, "synthia", 3, (96, 64))
    write_fake_dataset(root, "cityscapes", 2, (128, 64))
    args = ["--task", "syn2cs", "--data-root", root, "--arch", "mit-tiny", "--iters", "2", "--crop", "64",
            "--rcs-min-pixels", "64",
            "--workers", "0", "--work-dir", str(tmp_path / "run"), "--log-every", "1"]
    assert T.main(args) == 0
    assert os.path.exists(os.path.join(root, "synthia", "rcs_stats_synthia_3.json"))



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


# ---------------------------------------------------------------- several processes (torchrun, gloo)

# Started by torchrun in a test: toy runs with 4 validation scenes; optional patches by environment variable.
TORCHRUN_SCRIPT = """
import os, sys
import numpy as np
import torch
import torch.distributed as dist
sys.path.insert(0, os.environ["REPO"])
import support.data
import train_dacs_mrm as T

support.data.TOY_SIZES.update(val=4)
if os.environ.get("CONSTANT_SCENES"):  # every scene the same one-class image: batches equal across ranks
    scene = (np.full((32, 64, 3), 90, np.uint8), np.zeros((32, 64), np.uint8))
    support.data.make_toy_scene = lambda rng, style, size=None: scene
if os.environ.get("CHECK_RANKS"):  # after every step, the ranks' students and teachers must be bit-identical
    real_step = T.train_step

    def checked_step(cfg, nets, batch, iteration):
        losses = real_step(cfg, nets, batch, iteration)
        for module in (nets.model, nets.teacher):
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(copies, flat)
            assert all(torch.equal(copies[0], c) for c in copies), f"ranks differ after iteration {iteration}"
        return losses

    T.train_step = checked_step
sys.exit(T.main(sys.argv[1:]))
"""


def torchrun(tmp_path, args, env=None, wait=True):
    script = tmp_path / "run_toy.py"
    script.write_text(TORCHRUN_SCRIPT)
    repo = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               *args]
    environment = dict(os.environ, REPO=repo, OMP_NUM_THREADS="1", **(env or {}))
    process = subprocess.Popen(command, cwd=repo, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True, text=True)
    if not wait:
        return process
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


TORCHRUN_TOY = ["--task", "toy", "--device", "cpu", "--batch-size", "2", "--workers", "0", "--log-every", "1",
                "--checkpoint-every", "1", "--val-every", "1000", "--rebuilder-dim", "32", "--rebuilder-heads", "4",
                "--rebuilder-grid", "4"]


def test_torchrun_ranks_stay_identical_and_rank_0_alone_writes(tmp_path):
    work = str(tmp_path / "run")
    code, out, err = torchrun(tmp_path, TORCHRUN_TOY + ["--iters", "4", "--work-dir", work], {"CHECK_RANKS": "1"})
    assert code == 0, err[-3000:]
    assert out.count("toy: dlv2-tiny (toy recipe), DACS + MRM") == 1 and "2 processes" in out
    assert out.count("[4/4]") == 1 and out.count("mIoU over 7 classes") == 1  # one rank prints, validates
    assert sorted(os.listdir(work)) == ["checkpoint.pth", "config.json", "curves.png", "log.jsonl", "model.pth"]
    records = [json.loads(line) for line in open(os.path.join(work, "log.jsonl"))]
    assert [r["iteration"] for r in records if "loss_sup" in r] == [1, 2, 3, 4]
    state = state_of(work)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank its own random stream
    # a different number of processes cannot continue this run: each rank's data and random state depend on it
    assert T.main(TORCHRUN_TOY + ["--iters", "6", "--work-dir", work, "--resume"]) == 2


def test_a_nan_stops_every_process_with_one_message_and_keeps_the_checkpoint(tmp_path):
    work = str(tmp_path / "run")
    code, _, err = torchrun(tmp_path, TORCHRUN_TOY + ["--iters", "6", "--lr", "1e12", "--work-dir", work])
    assert code != 0 and err.count("error: non-finite loss") == 1, err[-3000:]
    iteration = state_of(work)["iteration"]
    assert 0 < iteration < 6 and f"and {iteration + 1}:" in err  # the NaN step was not checkpointed


def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(tmp_path, monkeypatch):
    """Every scene the same one-class image (ClassMix then pastes all of it, BatchNorm sees the same statistics
    at any batch size, no batch-coupled layer): DDP's averaged gradients equal one process's on twice the batch.
    SGD, not the toy's AdamW, whose per-element normalisation turns float noise in near-zero gradients into
    whole steps."""
    common = ["--no-mrm", "--iters", "3", "--jitter-p", "0", "--blur-p", "0", "--log-every", "3", "--optimizer", "sgd",
              "--lr", "0.003"]
    code, _, err = torchrun(tmp_path, TORCHRUN_TOY + common + ["--batch-size", "1", "--work-dir", str(tmp_path / "two")],
                            {"CONSTANT_SCENES": "1"})
    assert code == 0, err[-3000:]
    scene = (np.full((32, 64, 3), 90, np.uint8), np.zeros((32, 64), np.uint8))
    monkeypatch.setattr(support.data, "make_toy_scene", lambda rng, style, size=None: scene)
    monkeypatch.setitem(TOY_SIZES, "val", 4)
    assert T.main(TORCHRUN_TOY + common + ["--batch-size", "2", "--work-dir", str(tmp_path / "one")]) == 0
    two, one = state_of(str(tmp_path / "two")), state_of(str(tmp_path / "one"))
    for part in ("model", "teacher"):
        for key in one[part]:
            if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):  # n/(n-1) depends on n
                torch.testing.assert_close(two[part][key], one[part][key], rtol=1e-4, atol=1e-6, msg=key)
    assert not torch.equal(two["model"]["decoder.conv2d_list.0.weight"], two["teacher"]["decoder.conv2d_list.0.weight"])


def signal_rank_1_after_two_records(process, work_dir, signum):
    """Once log.jsonl holds three lines, send signum to the rank-1 worker of a torchrun process."""
    log = os.path.join(work_dir, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and (not os.path.exists(log) or sum(1 for _ in open(log)) < 3):
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    rank_1 = next(pid for pid in workers if b"RANK=1" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"))
    os.kill(int(rank_1), signum)


def test_killed_rank_stops_the_run_and_resume_ends_where_a_straight_run_ends(tmp_path):
    """SIGKILL one of two processes: rank 0 says so in one line and the run stops; the last checkpoint
    loads, and --resume under two processes ends bit-identical to an uninterrupted two-process run."""
    args = TORCHRUN_TOY + ["--iters", "12"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    code, _, err = torchrun(tmp_path, args + ["--work-dir", straight])
    assert code == 0, err[-3000:]
    process = torchrun(tmp_path, args + ["--work-dir", killed], wait=False)
    signal_rank_1_after_two_records(process, killed, signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "error: another process of this run stopped" in err and "continue with --resume" in err
    assert 0 < state_of(killed)["iteration"] < 12
    code, _, err = torchrun(tmp_path, args + ["--work-dir", killed, "--resume"])
    assert code == 0, err[-3000:]
    a, b = state_of(straight), state_of(killed)
    for part in ("model", "teacher", "rebuilder"):
        assert_states_equal(a[part], b[part])


def test_sigterm_to_one_process_stops_every_rank_at_the_same_iteration_with_a_checkpoint(tmp_path):
    """A cluster's SIGTERM reaching one of two processes: both finish the same iteration, one checkpoint holds
    both ranks' random states, rank 0 says so in one line; --resume ends bit-identical to a straight run."""
    args = TORCHRUN_TOY + ["--iters", "12", "--checkpoint-every", "100"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    process = torchrun(tmp_path, args + ["--work-dir", stopped], wait=False)
    signal_rank_1_after_two_records(process, stopped, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    state = state_of(stopped)
    assert f"interrupted at iteration {state['iteration']}: checkpoint written; continue with --resume" in err, err
    assert 3 <= state["iteration"] < 12 and len(state["rng"]) == 2
    code, _, err = torchrun(tmp_path, args + ["--work-dir", stopped, "--resume"])
    assert code == 0, err[-3000:]
    code, _, err = torchrun(tmp_path, args + ["--work-dir", straight])
    assert code == 0, err[-3000:]
    a, b = state_of(straight), state_of(stopped)
    for part in ("model", "teacher", "rebuilder"):
        assert_states_equal(a[part], b[part])


# ---------------------------------------------------------------- hardening: bad input and faults

def test_missing_data_folder_is_one_line_exit_2(tmp_path, capsys):
    assert T.main(["--task", "gta2cs", "--data-root", str(tmp_path), "--check-data"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "gta" in err and "\n" not in err and "Traceback" not in err


def test_check_data_prints_counts(tmp_path, capsys):
    write_fake_dataset(str(tmp_path), "gta", 3, (32, 16))
    write_fake_dataset(str(tmp_path), "cityscapes", 2, (32, 16))
    assert T.main(["--task", "gta2cs", "--data-root", str(tmp_path), "--check-data"]) == 0
    out = capsys.readouterr().out
    assert "gta train: 3 image/label pairs" in out and "cityscapes val: 2 image/label pairs" in out


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("max_skips,code", [(50, 0), (0, 2)])
def test_corrupt_image_is_named_and_skipped_at_most_k_times(tmp_path, capsys, max_skips, code):
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 2, (64, 48))
    write_fake_dataset(root, "cityscapes", 1, (64, 32))
    truncate(os.path.join(root, "gta", "images", "00001.png"))
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--iters", "3", "--crop", "32",
            "--workers", "0", "--work-dir", str(tmp_path / "run"), "--max-skips", str(max_skips)]
    assert T.main(args) == code
    captured = capsys.readouterr()
    assert "00001.png" in captured.out + captured.err
    if code:
        assert "--max-skips" in captured.err


def test_crash_during_checkpoint_write_keeps_the_last_checkpoint(tmp_path, small_toy, monkeypatch):
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "4", "--stop-after", "2", "--work-dir", work]) == 0
    before = open(os.path.join(work, "checkpoint.pth"), "rb").read()

    def crash_midway(state, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if the process died between write and rename

    monkeypatch.setattr(T.torch, "save", crash_midway)
    assert T.main(TOY_FAST + ["--iters", "4", "--resume", "--work-dir", work]) == 130  # no traceback
    monkeypatch.undo()
    assert open(os.path.join(work, "checkpoint.pth"), "rb").read() == before
    assert state_of(work)["iteration"] == 2
    assert T.main(TOY_FAST + ["--iters", "4", "--resume", "--work-dir", work]) == 0
    assert state_of(work)["iteration"] == 4


def test_kill_9_at_random_moments_then_resume_is_bit_exact(tmp_path):
    """A real SIGKILL, twice, at a random moment while a subprocess checkpoints every iteration
    (so a kill may land inside a checkpoint write); each resume continues from a loadable
    checkpoint, and the final weights equal an uninterrupted run's."""
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 4, (64, 48))
    write_fake_dataset(root, "cityscapes", 2, (64, 32))
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--crop", "32", "--iters", "20",
            "--rebuilder-dim", "32", "--rebuilder-heads", "4", "--rebuilder-grid", "4",
            "--checkpoint-every", "1", "--log-every", "1", "--workers", "0", "--device", "cpu"]
    killed, rng = str(tmp_path / "killed"), np.random.default_rng(0)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    for attempt in range(2):
        command = [sys.executable, "train_dacs_mrm.py", *args, "--work-dir", killed] + (["--resume"] if attempt else [])
        process = subprocess.Popen(command, cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log = os.path.join(killed, "log.jsonl")
        start_lines = sum(1 for _ in open(log)) if os.path.exists(log) else 0
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline and (
                not os.path.exists(log) or sum(1 for _ in open(log)) < start_lines + 2):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))  # far from the end (iteration 20) even on a fast machine
        process.kill()
        process.wait()
        assert process.returncode == -9, process.stderr.read().decode()[-2000:]
        assert 0 < state_of(killed)["iteration"] < 20
    straight = str(tmp_path / "straight")
    assert T.main(args + ["--work-dir", straight]) == 0
    assert T.main(args + ["--work-dir", killed, "--resume"]) == 0
    a, b = state_of(straight), state_of(killed)
    for part in ("model", "teacher", "rebuilder"):
        assert_states_equal(a[part], b[part])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, small_toy, monkeypatch, capsys):
    work = str(tmp_path / "run")
    real_step = T.train_step

    def step(cfg, nets, batch, iteration):
        losses, seen = real_step(cfg, nets, batch, iteration)
        return (losses * float("nan") if iteration == 2 else losses), seen

    monkeypatch.setattr(T, "train_step", step)
    assert T.main(TOY_FAST + ["--iters", "6", "--work-dir", work]) == 3
    assert "non-finite loss" in capsys.readouterr().err
    assert state_of(work)["iteration"] == 2


def test_out_of_memory_names_the_switches_that_help(tmp_path, small_toy, monkeypatch, capsys):
    def step(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(T, "train_step", step)
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", str(tmp_path)]) == 4
    err = capsys.readouterr().err
    assert "out of GPU memory" in err and "--amp bf16" in err and "--checkpoint-blocks" in err


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


def test_bad_pretrained_files_and_checkpoints_are_one_line_exit_2(tmp_path, capsys):
    """A truncated, corrupt or non-checkpoint --pretrained file, and an unreadable eval checkpoint:
    one line naming the file (not PyTorch's multi-line advice), exit 2."""
    good = tmp_path / "good.pth"
    torch.save(ResNetDilated(**DLV2_TINY).state_dict(), good)
    truncated, text, listing = tmp_path / "truncated.pth", tmp_path / "notes.pth", tmp_path / "list.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    text.write_text("these are not weights\n")
    torch.save([1, 2, 3], listing)
    for path, arch in ((truncated, "dlv2-tiny"), (text, "dlv2-tiny"), (listing, "dlv2-tiny"), (truncated, "mit-tiny")):
        assert T.main(["--task", "toy", "--arch", arch, "--pretrained", str(path), "--work-dir", str(tmp_path / "w"),
                       "--iters", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err
    assert "not a state dict" in (T.main(["--task", "toy", "--pretrained", str(listing), "--work-dir",
                                          str(tmp_path / "w")]) and capsys.readouterr().err)
    assert eval_main([str(truncated), "--task", "toy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable checkpoint" in err and str(truncated) in err


class NotATensor:
    pass


def test_untrusted_or_foreign_checkpoints_are_refused_in_one_line(tmp_path, small_toy, capsys):
    pickled = str(tmp_path / "evil.pth")
    torch.save({"model": NotATensor()}, pickled)
    assert eval_main([pickled, "--task", "toy"]) == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and err.count("\n") == 1
    foreign = str(tmp_path / "foreign.pth")
    torch.save({"weight": torch.zeros(2)}, foreign)
    assert eval_main([foreign, "--task", "toy"]) == 2
    assert "not a checkpoint of train_dacs_mrm.py" in capsys.readouterr().err
    older = str(tmp_path / "older.pth")  # an architecture record from before the decoder and align_corners
    torch.save({"arch": {"arch": "dlv2-tiny", "layers": [1, 1, 1, 1], "width": 16, "style": "caffe",
                         "aspp_dilations": [6, 12]}, "num_classes": 7, "model": {}}, older)
    assert eval_main([older, "--task", "toy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "older train_dacs_mrm.py" in err and "['align_corners', 'decoder']" in err
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "2", "--stop-after", "1", "--work-dir", work]) == 0
    assert T.main(TOY_FAST + ["--iters", "2", "--resume", "--arch", "mit-tiny", "--work-dir", work]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint is" in err and "mit-tiny" in err


# ---------------------------------------------------------------- a run is never lost or silently wrong

def digest(folder):
    """{file name: sha256} of every file under folder."""
    import hashlib
    return {os.path.relpath(os.path.join(d, n), folder): hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _, names in os.walk(folder) for n in names}


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_work_dir_belongs_to_one_run(tmp_path, small_toy, capsys, monkeypatch):
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", work]) == 0
    before = digest(work)
    capsys.readouterr()
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", work]) == 2  # the same command again, no --resume
    assert "holds a run" in one_error_line(capsys) and digest(work) == before
    assert T.main(TOY_FAST + ["--iters", "2", "--resume", "--arch", "mit-tiny", "--work-dir", work]) == 2
    one_error_line(capsys)
    assert digest(work) == before  # config.json included: nothing written before the checks pass
    # a second run while the first lives: the lock of a live process (this one) refuses it
    lock = os.path.join(work, ".lock")
    open(lock, "w").write(f"{os.getpid()} {platform.node()}")
    assert T.main(TOY_FAST + ["--iters", "2", "--overwrite", "--work-dir", work]) == 2
    assert "in use by another run" in one_error_line(capsys) and digest(work) == {**before, ".lock": digest(work)[".lock"]}
    # a lock left by a dead process, and the temporary file of a write it did not finish, are cleaned up
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    open(lock, "w").write(f"{dead.pid} {platform.node()}")
    open(os.path.join(work, "checkpoint.pth.tmp12345"), "wb").write(b"half")
    assert T.main(TOY_FAST + ["--iters", "2", "--overwrite", "--work-dir", work]) == 0
    out = capsys.readouterr().out
    assert f"taking over the lock of process {dead.pid}" in out and "--overwrite: removed checkpoint.pth" in out
    assert sorted(os.listdir(work)) == ["checkpoint.pth", "config.json", "curves.png", "log.jsonl", "model.pth"]
    assert len([line for line in open(os.path.join(work, "log.jsonl")) if "loss_sup" in line]) == 1
    for bad, words in ((str(tmp_path / "run" / "model.pth"), "is a file"),
                       (str(tmp_path / "run" / "model.pth" / "sub"), "is a file, not a folder")):
        assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", bad]) == 2
        assert words in one_error_line(capsys)
    monkeypatch.setattr(T.os, "access", lambda path, mode: False)
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", str(tmp_path / "new")]) == 2
    assert "not writable" in one_error_line(capsys) and not (tmp_path / "new").exists()


def test_resume_checks_what_it_resumes(tmp_path, small_toy, capsys):
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "4", "--stop-after", "2", "--work-dir", work]) == 0
    before = digest(work)
    capsys.readouterr()
    for change, named in ((["--seed", "3"], "--seed 0 (now 3)"), (["--lr", "0.5"], "--lr 0.001 (now 0.5)"),
                          (["--batch-size", "3"], "--batch-size 2 (now 3)"), (["--no-mrm"], "--mrm True (now False)"),
                          (["--iters", "6"], "--iters 4 (now 6)")):
        assert T.main(TOY_FAST + ["--iters", "4", "--resume", "--work-dir", work] + change) == 2
        err = one_error_line(capsys)
        assert "another experiment" in err and named in err, err
    assert T.main(TOY_FAST + ["--iters", "1", "--resume", "--work-dir", work]) == 2  # below its iteration 2
    assert "another experiment" in one_error_line(capsys)
    assert digest(work) == before
    # settings that only change how it is computed may change, and the header names them
    with open(os.path.join(work, "log.jsonl"), "a") as log:  # what a killed run logged after its checkpoint
        log.write(json.dumps(dict(iteration=3, loss_sup=1.0)) + "\n" + '{"iteration": 4, "loss')
    assert T.main(TOY_FAST + ["--iters", "4", "--resume", "--log-every", "1", "--work-dir", work]) == 0
    assert "resumed with --log-every 2 -> 1" in capsys.readouterr().out
    iterations = [json.loads(line)["iteration"] for line in open(os.path.join(work, "log.jsonl"))
                  if "loss_sup" in line]
    assert iterations == [2, 3, 4]  # each iteration once
    # an export, a bare state dict: one line each
    for name, content in (("export", dict(arch={}, num_classes=7, model={})), ("weights", {"w": torch.zeros(1)})):
        other = str(tmp_path / name)
        os.makedirs(other)
        torch.save(content, os.path.join(other, "checkpoint.pth"))
        assert T.main(TOY_FAST + ["--iters", "4", "--resume", "--work-dir", other]) == 2
        assert "not a training checkpoint" in one_error_line(capsys)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_iteration_checkpoints_and_resumes_bit_exactly(tmp_path, signum, code):
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 4, (64, 48))
    write_fake_dataset(root, "cityscapes", 2, (64, 32))
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--crop", "32", "--iters", "12",
            "--rebuilder-dim", "32", "--rebuilder-heads", "4", "--rebuilder-grid", "4", "--checkpoint-every", "100",
            "--log-every", "1", "--workers", "1", "--device", "cpu"]
    work = str(tmp_path / "signalled")
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen([sys.executable, "train_dacs_mrm.py", *args, "--work-dir", work],
                               cwd=os.path.dirname(os.path.abspath(__file__)), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # the progress lines: signal after the second iteration
        if line.startswith("[2/12]"):
            break
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    iteration = state_of(work)["iteration"]
    assert err == f"interrupted at iteration {iteration}: checkpoint written; continue with --resume\n"
    assert 2 <= iteration < 12
    assert T.main(args + ["--work-dir", work, "--resume"]) == 0
    straight = str(tmp_path / "straight")
    assert T.main(args + ["--work-dir", straight]) == 0
    assert_checkpoints_equal(state_of(straight), state_of(work))


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, small_toy, monkeypatch, capsys):
    work = str(tmp_path / "run")
    real_step = T.train_step

    def step_then_two_ctrl_c(*args):
        losses = real_step(*args)
        signal.raise_signal(signal.SIGINT)  # the first asks for a checkpoint after this iteration...
        signal.raise_signal(signal.SIGINT)  # ...the second stops at once
        return losses

    monkeypatch.setattr(T, "train_step", step_then_two_ctrl_c)
    assert T.main(TOY_FAST + ["--iters", "4", "--work-dir", work]) == 130
    assert "interrupted: stopped at once" in one_error_line(capsys)
    assert not os.path.exists(os.path.join(work, "checkpoint.pth")) and not os.path.exists(os.path.join(work, ".lock"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_last(tmp_path, small_toy, monkeypatch,
                                                                             capsys):
    import errno
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "4", "--stop-after", "2", "--work-dir", work]) == 0
    before = open(os.path.join(work, "checkpoint.pth"), "rb").read()
    capsys.readouterr()

    def disk_full(state, f):
        f.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T.torch, "save", disk_full)
    assert T.main(TOY_FAST + ["--iters", "4", "--resume", "--work-dir", work]) == 2
    err = one_error_line(capsys)
    assert "checkpoint.pth: could not write it (No space left on device; " in err and "GiB free there" in err
    assert open(os.path.join(work, "checkpoint.pth"), "rb").read() == before
    assert not [name for name in os.listdir(work) if ".tmp" in name]


def test_labels_are_validated_where_they_are_read(tmp_path, capsys):
    root = str(tmp_path / "data")
    write_fake_dataset(root, "cityscapes", 2, (64, 32))
    write_fake_dataset(root, "synthia", 1, (64, 32))
    (_, label), _ = find_pairs("cityscapes", root, "val")
    Image.open(label).save(str(tmp_path / "as.jpg"), "JPEG")
    os.replace(str(tmp_path / "as.jpg"), label)  # a JPEG saved under the label's name
    with pytest.raises(BadLabel, match="a JPEG"):
        read_label(label, "cityscapes")
    Image.fromarray(np.full((16, 32), 7, np.uint8)).save(label)  # half the image's size
    with pytest.raises(BadLabel, match="32x16 pixels, its image .* 64x32"):
        Domain("cityscapes", root, "val").load(0)
    mostly_unknown = np.full((32, 64), 40, np.uint8)
    mostly_unknown[:4] = 7
    Image.fromarray(mostly_unknown).save(label)
    with pytest.raises(BadLabel, match=r"ids \[40\] are not cityscapes label ids, on 87.5% of its pixels"):
        read_label(label, "cityscapes")
    LABEL_NOTES.clear()
    a_few = np.full((32, 64), 7, np.uint8)
    a_few[0, :2] = 40
    Image.fromarray(a_few).save(label)
    assert (read_label(label, "cityscapes")[0, :3] == [255, 255, 0]).all()
    assert LABEL_NOTES == [f"{label}: ids [40] are not cityscapes label ids, on 0.1% of its pixels; read as "
                             f"ignore (255)"]
    (_, synthia), = find_pairs("synthia", root, "train")
    swapped = np.stack([np.full((32, 64), 300), np.full((32, 64), 3), np.zeros((32, 64))], -1)
    write_png16(synthia, swapped, 2)  # the instance channel first
    with pytest.raises(BadLabel, match=r"ids \[300\] .* \(channels in another order\?\)"):
        read_label(synthia, "synthia")
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(label)
    with pytest.raises(BadLabel, match="colour type 2"):
        read_label(label, "cityscapes")
    # --check-data --decode finds every problem, in parallel, and says so in one line
    write_fake_dataset(root, "gta", 2, (64, 32))
    assert T.main(["--task", "gta2cs", "--data-root", root, "--check-data", "--decode", "--workers", "2"]) == 2
    captured = capsys.readouterr()
    assert "decoded 6/6 pairs, 1 problems" in captured.out and "colour type 2" in captured.out
    assert captured.err == "error: 1 of 6 image/label pairs are unreadable or not labels of their dataset (listed above)\n"


def test_loader_worker_errors_are_the_same_one_line(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 2, (64, 48))
    write_fake_dataset(root, "cityscapes", 2, (64, 32))
    for _, label in find_pairs("gta", root, "train"):
        Image.fromarray(np.full((48, 64), 40, np.uint8)).save(label)  # every source label refused
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--crop", "32", "--iters", "2",
            "--max-skips", "1"]
    errors = []
    for workers in ("0", "2"):
        assert T.main(args + ["--workers", workers, "--work-dir", str(tmp_path / f"w{workers}")]) == 2
        errors.append(one_error_line(capsys))
    assert errors[0] == errors[1] and "corrupt files in a row" in errors[0]
    write_fake_dataset(root, "gta", 2, (64, 48))  # good labels again; now a worker dies
    real_step = T.train_step

    def step_then_kill_the_workers(*a):
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
        return real_step(*a)

    monkeypatch.setattr(T, "train_step", step_then_kill_the_workers)
    assert T.main(args + ["--iters", "20", "--workers", "1", "--work-dir", str(tmp_path / "killed")]) == 5
    assert "a data loader process died" in one_error_line(capsys)


def test_rare_class_statistics_follow_the_labels(tmp_path):
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 3, (64, 48))
    cfg = SimpleNamespace(data_root=root, work_dir=str(tmp_path / "w"), num_classes=19, rcs_min_pixels=0,
                          rcs_temperature=0.01)
    source = Domain("gta", root)
    said = []

    def say(*args, **kwargs):
        said.append(args)

    first = rcs_statistics(cfg, source, say)
    assert rcs_statistics(cfg, source, say)[1] == first[1] and len(said) == 1  # cached
    (_, label), *_ = source.pairs
    Image.fromarray(np.full((48, 64), 26, np.uint8)).save(label)  # all car now
    os.utime(label, ns=(1, 1))
    probabilities, per_class = rcs_statistics(cfg, source, say)
    assert len(said) == 2 and 0 in per_class[13]  # counted again: image 0 now qualifies for car
    cache = os.path.join(root, "gta", "rcs_stats_gta_3.json")
    open(cache, "w").write("{not json")
    assert rcs_statistics(cfg, source, say)[1] == per_class and len(said) == 3


def test_symlink_loops_do_not_hang_the_listing(tmp_path):
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 2, (64, 48))
    os.symlink(os.path.join(root, "gta", "images"), os.path.join(root, "gta", "images", "loop"))
    os.symlink(os.path.join(root, "gta"), os.path.join(root, "gta", "labels", "up"))
    with pytest.raises(DataError, match="unexpected file name"):  # loop/00001.png is not a GTA name
        find_pairs("gta", root, "train")


@pytest.mark.parametrize("flags,words", [
    (["--workers", "-1"], "--workers -1: must be in [0, inf)"), (["--mask-ratio", "1.5"], "must be in [0, 1]"),
    (["--checkpoint-every", "0"], "[1, inf)"), (["--log-every", "0"], "[1, inf)"),
    (["--rebuilder-grid", "0"], "[1, inf)"), (["--rebuilder-heads", "3"], "multiple of 4"),
    (["--seed", "-1"], "[0, inf)"), (["--max-skips", "-1"], "[0, inf)"), (["--crop", "0", "--crop", "-5"], "[0, inf)"),
    (["--crop", "100000"], "from 32"), (["--crop", "7"], "from 32"), (["--lr", "-1"], "(0, inf)"),
    (["--ema", "2"], "[0, 1)"), (["--pseudo-threshold", "2"], "[0, 1]"), (["--jitter-p", "5"], "[0, 1]"),
    (["--stop-after", "-1"], "[0, inf)"), (["--lr", "nan"], "--lr nan: must be in (0, inf)"),
    (["--task", "gta2cs", "--arch", "dlv2-tiny", "--crop", "0"], "--crop 0 (whole images) is for the toy task"),
    (["--resume", "--overwrite"], "pass one of them"), (["--decode"], "works with --check-data")])
def test_every_bad_flag_is_one_line_before_anything_is_written(tmp_path, capsys, flags, words):
    work = tmp_path / "run"
    assert T.main(TOY_FAST + flags + ["--work-dir", str(work)]) == 2
    assert words in one_error_line(capsys)
    assert not work.exists()


# ---------------------------------------------------------------- eval.py: any images, the benchmark server, summaries, curves

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


def snapshot(folder):
    """Every folder and every file's bytes (hashed) under folder."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            found[os.path.join(dirpath, name)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            found[path] = (os.readlink(path) if os.path.islink(path) else
                           hashlib.sha256(open(path, "rb").read()).hexdigest())
    return found


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
        assert np.array_equal(np.array(Image.open(out / f"{path.stem}_color.png")), TOY_PALETTE[ids])
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
    assert np.abs(np.array(Image.open(blended / "photo_color.png")) - expected).max() <= 0.5

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
    assert f"wrote 3 Cityscapes test labelIds PNGs" in captured.out and str(out) in captured.out
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
    assert E.TRAIN_TO_CITYSCAPES_ID[0] == 7 and E.TRAIN_TO_CITYSCAPES_ID[18] == 33

    out_val = tmp_path / "val_results"
    assert eval_main([city, "--task", "gta2cs", "--data-root", root, "--format", "cityscapes", "--out", str(out_val),
                      "--device", "cpu", "--workers", "0"]) == 0
    assert "official val split has 500" in capsys.readouterr().err
    assert sorted(os.listdir(out_val)) == ["frankfurt", "lindau"]
    assert os.listdir(out_val / "frankfurt") == ["frankfurt_000000_000019_leftImg8bit.png"]


def write_run(folder, records, **config):
    os.makedirs(folder)
    base = dict(task="gta2cs", arch="dlv2", recipe="dacs", mrm=True, mic=False, source_only=False, seed=0,
                workers=4, log_every=50, val_every=2000, device="cuda", data_root="data", work_dir=str(folder))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**base, **config}, f)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


def losses(iteration, scale=1.0):
    return dict(iteration=iteration, loss_sup=scale / iteration, loss_uda=0.5 * scale, loss_mrm=0.3, loss_mic=0.0,
                loss_fd=0.0, pseudo_weight=iteration / 4000, lr=2.5e-4 * (1 - iteration / 5000), it_per_s=2.0, time=0.0)


def test_summary_groups_runs_by_configuration_and_reports_mean_and_std(tmp_path, capsys):
    road = lambda v: [v] + [50.0] * 18  # noqa: E731 (per-class IoUs in %, only road varies)
    a = write_run(tmp_path / "a", [losses(2000), dict(iteration=2000, val_miou=30.0, val_iou=road(10.0)),
                                   dict(iteration=4000, val_miou=40.0, val_iou=road(90.0))], seed=0)
    b = write_run(tmp_path / "b", [dict(iteration=4000, val_miou=43.0, val_iou=road(93.0))], seed=1, workers=2,
                  device="cpu", data_root="/elsewhere")  # settings that do not change the experiment
    c = write_run(tmp_path / "c", [dict(iteration=4000, val_miou=37.25)], seed=0, mrm=False)
    d = write_run(tmp_path / "d", [losses(50)], seed=2)
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

    assert eval_main(["--summary", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "config.json" in err


def test_plot_curves_draws_each_logged_series_and_survives_a_partial_log(tmp_path, capsys):
    first = write_run(tmp_path / "first", [losses(i) for i in range(50, 4001, 50)] +
                      [dict(iteration=2000, val_miou=20.0), dict(iteration=4000, val_miou=30.0)])
    second = write_run(tmp_path / "second", [losses(i, 2.0) for i in range(50, 2001, 50)] +
                       [dict(iteration=2000, val_miou=25.0)])
    drawn = E.plot_curves([first], str(tmp_path / "first.png"))
    assert drawn == ["loss_sup", "loss_uda", "loss_mrm", "pseudo_weight", "lr", "val_miou"]  # no MIC, no FD
    # 6 panels: two rows of COLUMNS, one legend line
    size = (E.COLUMNS * E.PANEL[0], 2 * E.PANEL[1] + E.LEGEND_LINE + 8)
    assert Image.open(tmp_path / "first.png").size == size
    E.plot_curves([second], str(tmp_path / "second.png"))
    assert Image.open(tmp_path / "second.png").size == size
    assert not np.array_equal(np.array(Image.open(tmp_path / "first.png")),
                              np.array(Image.open(tmp_path / "second.png")))

    # a record being written and a damaged line are skipped: the same picture
    with open(os.path.join(first, "log.jsonl"), "a") as f:
        f.write('{"iteration": 4050, "loss_sou')
    assert E.plot_curves([first], str(tmp_path / "partial.png")) == drawn
    assert open(tmp_path / "partial.png", "rb").read() == open(tmp_path / "first.png", "rb").read()
    lines = open(os.path.join(first, "log.jsonl")).read().split("\n")
    with open(os.path.join(first, "log.jsonl"), "w") as f:
        f.write("\n".join(lines[:10] + ["{not json"] + lines[10:]))
    assert E.plot_curves([first], str(tmp_path / "damaged.png")) == drawn
    assert open(tmp_path / "damaged.png", "rb").read() == open(tmp_path / "first.png", "rb").read()

    # two runs: a line in each run's colour; an empty log draws a placeholder
    assert eval_main(["--plot", first, second, "--out", str(tmp_path / "both.png")]) == 0
    pixels = np.array(Image.open(tmp_path / "both.png")).reshape(-1, 3)
    for colour in E.RUN_COLOURS[:2]:
        assert (pixels == colour).all(axis=1).sum() > 100
    assert Image.open(tmp_path / "both.png").size == (size[0], size[1] + E.LEGEND_LINE)
    empty = write_run(tmp_path / "empty", [])
    assert E.plot_curves([empty], str(tmp_path / "empty.png")) == []

    # a whole DACS schedule's log (5000 records per series) draws one panel per series logged
    long_run = write_run(tmp_path / "long", [losses(i) for i in range(50, 250_001, 50)])
    assert E.plot_curves([long_run], str(tmp_path / "long.png")) == drawn[:-1]
    # a log that names L_sup loss_source (train_dacs_mrm.py's older logs) draws it as loss_sup
    older = write_run(tmp_path / "older", [{"loss_source" if k == "loss_sup" else k: v for k, v in losses(i).items()}
                                           for i in range(50, 501, 50)])
    assert E.plot_curves([older], str(tmp_path / "older.png"))[0] == "loss_sup"
    capsys.readouterr()


def refused(args, capsys, words, folder):
    before = snapshot(folder)
    assert eval_main(args) == 2, args
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err and "Traceback" not in err, err
    assert snapshot(folder) == before, args


def test_refusals_are_one_line_and_touch_nothing(tmp_path, monkeypatch, capsys):
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

    refused([city, "--export", other] + run, capsys, "exists; pass --overwrite", tmp_path)
    refused([city, "--export", city, "--overwrite"] + run, capsys, "checkpoint being read", tmp_path)
    refused([city, "--export", str(tmp_path / "link.pth"), "--overwrite"] + run, capsys, "checkpoint being read",
            tmp_path)
    def weight(path):
        return torch.load(path, weights_only=True)["model"]["decoder.conv2d_list.0.weight"]
    assert not torch.equal(weight(other), weight(city))  # the two models differ before the export, agree after it
    assert eval_main([city, "--export", other, "--overwrite"] + run) == 0
    assert torch.equal(weight(other), weight(city))
    capsys.readouterr()
    refused([city, "--save-dir", os.path.join(root, "preds")] + run, capsys, "inside --data-root", tmp_path)
    refused([city, "--images", images, "--out", os.path.join(root, "cityscapes", "p")] + run, capsys,
            "inside --data-root", tmp_path)
    refused([city, "--save-dir", str(tmp_path / "a_file")] + run, capsys, "existing file", tmp_path)
    refused([city, "--images", images, "--out", str(tmp_path / "a_file")] + run, capsys, "existing file", tmp_path)
    refused([city, "--images", images, "--out", str(tmp_path / "full")] + run, capsys, "not empty", tmp_path)
    refused([city, "--images", str(tmp_path / "*.webp"), "--out", str(tmp_path / "new")] + run, capsys,
            "no PNG or JPEG images matched", tmp_path)
    refused([city, "--device", "gpu"] + run[:-4], capsys, "unknown device", tmp_path)
    if not torch.cuda.is_available():
        refused([city, "--device", "cuda"] + run[:-4], capsys, "no CUDA device", tmp_path)

    # labels without a single labelled pixel: the mIoU would be nan
    val_labels = os.path.join(root, "cityscapes", "gtFine", "val")
    for dirpath, _, files in os.walk(val_labels):
        for name in files:
            Image.fromarray(np.zeros((64, 128), np.uint8)).save(os.path.join(dirpath, name))  # id 0: unlabeled
    refused([city] + run, capsys, "no labelled pixel", tmp_path)


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
    grid = Image.open(os.path.join(work, "debug", "iteration_000004.png"))
    assert grid.size == (4 * 256, 4 * (128 + 14))  # 15 panels (9 DACS, 4 MRM, 2 MIC), 64x128 scenes at 256 wide
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


def test_flags_the_run_ignores_are_named_in_a_warning(capsys):
    for flags, words in ((["--no-mrm", "--mask-ratio", "0.5"], "--mask-ratio 0.5 does nothing with --no-mrm"),
                         (["--mic-weight", "2"], "--mic-weight 2.0 does nothing without --mic"),
                         (["--source-only", "--ema", "0.9"], "--ema 0.9 does nothing with --source-only")):
        T.parse_args(["--task", "toy"] + flags)
        assert capsys.readouterr().err == f"warning: {words}\n"
    T.parse_args(["--task", "toy", "--mask-ratio", "0.5", "--mic", "--mic-weight", "2"])
    assert capsys.readouterr().err == ""


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


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_read_image_decodes_pngs_as_pil_does(tmp_path, mode):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, size=(13, 21, 3), dtype=np.uint8))
    picture = picture.quantize(16) if mode == "P" else picture.convert(mode)
    path = str(tmp_path / "image.png")
    picture.save(path)
    image = read_image(path)
    assert image.dtype == np.uint8 and np.array_equal(image, np.array(picture.convert("RGB")))


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
def test_hrda_flags_that_cannot_work_are_refused_in_one_line(capsys, args, message):
    assert T.main(["--task", "toy"] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


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


def test_hrda_toy_loss_falls(tmp_path, small_toy):
    work = str(tmp_path / "run")
    assert T.main(HRDA_TOY + ["--iters", "40", "--log-every", "5", "--checkpoint-every", "40", "--work-dir", work,
                              "--no-mrm"]) == 0
    losses = [json.loads(line)["loss_sup"] for line in open(os.path.join(work, "log.jsonl")) if "loss_sup" in line]
    assert len(losses) == 8 and sum(losses[-2:]) < 0.9 * sum(losses[:2])


def test_hrda_paper_command_starts_on_fake_data_at_full_resolution(tmp_path, monkeypatch, capsys):
    """`--task gta2cs --recipe hrda --pretrained mit_b5.pth` on GTA (1914x1052 -> 2560x1407) and Cityscapes
    (2048x1024) files, cut to one iteration of one image pair on 256 crops with a 128 window; checkpoints and
    validation recorded, not run."""
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 1, (1914, 1052))
    write_fake_dataset(root, "cityscapes", 1, (2048, 1024))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MixVisionTransformer(**MIT_B5).state_dict().items()}
    weights = {k: torch.zeros(shape, dtype=torch.half) for k, shape in shapes.items()}
    torch.save(weights, str(tmp_path / "mit_b5.pth"))
    seen, calls = [], []
    real_forward = T.forward_backward
    monkeypatch.setattr(T, "forward_backward", lambda cfg, nets, *inputs: seen.append(inputs) or real_forward(cfg, nets, *inputs))
    for name in ("save_checkpoint", "export_model", "validate"):
        monkeypatch.setattr(T, name, lambda *a, name=name: calls.append(name))
    args = ["--task", "gta2cs", "--recipe", "hrda", "--arch", "mitb5", "--pretrained", str(tmp_path / "mit_b5.pth"),
            "--data-root", root, "--iters", "1", "--crop", "256", "--detail-crop", "128", "--batch-size", "1",
            "--workers", "0", "--work-dir", str(tmp_path / "run")]
    assert T.main(args) == 0
    out = capsys.readouterr().out
    assert "gta2cs: mitb5 (hrda recipe), DACS + MRM" in out
    (x_s, y_s, x_t, valid), = seen
    assert x_s.shape == (1, 3, 256, 256) and valid.shape == (1, 256, 256)
    assert calls == ["save_checkpoint", "export_model", "validate"]
    source = Domain("gta", root, resolution=2)
    target = Domain("cityscapes", root, resolution=2)
    assert source.load(0)[0].shape == (1407, 2560, 3) and target.load(0)[0].shape == (1024, 2048, 3)


@pytest.mark.parametrize("args", [["--task", "gta2cs", "--arch", "dlv2-tiny", "--crop", "64"],
                                  ["--task", "gta2cs", "--arch", "mit-tiny", "--crop", "64", "--amp", "bf16"],
                                  ["--task", "gta2cs", "--recipe", "hrda", "--arch", "mit-tiny", "--crop", "64",
                                   "--detail-crop", "32", "--mic", "--checkpoint-blocks"]])
def test_memory_estimate_on_fake_tensors_agrees_with_a_real_cpu_step(args):
    """--estimate-memory's two steps on fake tensors hold within 1% of the bytes the same steps' real CPU tensors
    hold; MRM adds to it."""
    cfg = T.parse_args(args + ["--batch-size", "2", "--pretrained", "none"])
    (fake, networks), (real, real_networks) = step_memory(cfg, T.train_step, fake=True), step_memory(cfg, T.train_step, fake=False)
    assert networks == real_networks > 0 and fake > 2 * networks
    assert abs(fake - real) < 0.01 * real
    without = step_memory(T.parse_args(args + ["--batch-size", "2", "--pretrained", "none", "--no-mrm"]), T.train_step)[0]
    assert without < fake


def test_live_bytes_counts_tensors_while_they_live():
    with LiveBytes() as counter:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2
        view = b[:10]
        del a, b
        c = view + 1
    assert counter.peak == 8_000_000 and counter.live == 4_000_000 + 40_000
    del view, c
    assert counter.live == 0


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
        assert np.array_equal(np.array(Image.open(os.path.join(out, f"{name}_color.png"))), TOY_PALETTE[ids])


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


def test_a_task_that_contradicts_the_model_file_is_refused_in_one_line(tmp_path, capsys):
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
        refused(args + ["--data-root", root] + CPU, capsys, words, tmp_path)
    assert eval_main([toy, "--task", "toy", "--images", images, "--out", out] + CPU) == 0  # its own task: accepted


def test_an_export_without_the_record_needs_task(tmp_path, capsys):
    old, model = old_export(tmp_path / "old.pth", 7, align_corners=False)
    old_city, _ = old_export(tmp_path / "old_city.pth", 19, align_corners=True)
    root = str(tmp_path / "data")
    cityscapes_with_a_test_split(root)
    images, out = two_images(tmp_path / "images"), str(tmp_path / "out")
    for args in ([old, "--images", images, "--out", out], [old_city, "--images", images, "--out", out],
                 [old_city, "--format", "cityscapes", "--out", out], [old_city],
                 [old, "--export", str(tmp_path / "new.pth")]):
        refused(args + ["--data-root", root] + CPU, capsys, "pass --task", tmp_path)
    refused([old, "--task", "gta2cs", "--images", images, "--out", out] + CPU, capsys, "model predicts 7 classes, "
            "task gta2cs has 19", tmp_path)
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
                                                                                         capsys):
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
    refused([checkpoint_path, "--task", "gta2cs", "--images", images, "--out", str(tmp_path / "c")] + CPU, capsys,
            "a model of task toy", tmp_path)
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


# ---------------------------------------------------------------- MiT + DAFormer head: layout and fp32 gradients

def tiny_daformer(num_classes=5):
    torch.manual_seed(0)
    encoder = MiTEncoder(MIT_TINY)
    model = support.models.SegModel(encoder, DAFormerHead(encoder.out_channels, num_classes, 32)).train()
    for module in model.modules():  # no stochastic depth nor dropout: every run takes the same path
        if isinstance(module, (DropPath, nn.Dropout2d)):
            module.p = 0.0
    return model


def test_daformer_head_works_on_nchw_maps_as_mmseg_hands_them():
    """mmseg's DAFormerHead reshapes its embedded levels with permute(0, 2, 1).contiguous().reshape: NCHW maps,
    as the MiT hands them. tokens_to_map's view is channels-last-strided, and on the CPU train-mode BatchNorm
    rounds such maps worse in fp32, the more so the more pixels (input gradients off by 3e-5 at 2 x 512 x 512
    pixels a channel, 2e-7 on NCHW maps)."""
    model = tiny_daformer()
    layouts = []
    for name, module in model.decoder.named_modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            module.register_forward_hook(lambda m, inputs, output, name=name: layouts.append(
                (name, inputs[0].is_contiguous(), output.is_contiguous())))
    logits = model(torch.rand(2, 3, 64, 64))
    assert len(layouts) == 9 + 8  # 1x1, 3 x (depth-wise, 1x1), bottleneck, conv_seg; a BN after each but the last
    assert logits.is_contiguous() and [name for name, *flags in layouts if not all(flags)] == []


def test_mit_daformer_fp32_gradients_match_a_float64_run_of_the_same_step():
    """One step's gradients (CE of the upsampled logits) in fp32 and from the same weights and images in float64:
    within 1e-4 of the largest for every parameter. The float64 run takes the fp32 run's ReLU decisions (x > 0):
    a pre-activation within rounding of 0 lands on either side of the kink in the two precisions, and one such
    element moves a head gradient by ~1e-2 in either layout; the rest is rounding, ~1e-6 here."""
    model = tiny_daformer()
    reference = copy.deepcopy(model).double()
    torch.manual_seed(1)
    images, labels = torch.rand(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    decisions = []
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(lambda m, inputs, output: decisions.append(output > 0))
    for module in reference.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
            module.register_forward_hook(lambda m, inputs, output: inputs[0] * decisions.pop(0))

    def gradients(net, x):
        logits = F.interpolate(net(x), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        F.cross_entropy(logits, labels).backward()
        return {name: p.grad for name, p in net.named_parameters()}

    single = gradients(model, images)
    double = gradients(reference, images.double())
    assert not decisions and len(single) == len(double)
    errors = {name: ((single[name].double() - g).abs().max() / g.abs().max()).item() for name, g in double.items()}
    assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda item: item[1])[-3:]


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


# ---------------------------------------------------------------- data faults in loader worker processes

VALIDATION_FAULT_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
import eval as E
import train_dacs_mrm as T
if sys.argv[2] == "bug":  # a fault that is not a data problem, in every validation worker
    def broken(self, i):
        raise ValueError("a bug in a loader worker")
    E.EvalImages.__getitem__ = broken
sys.exit(T.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("fault", ["corrupt", "bug"])
def test_a_fault_in_validation_workers_neither_hangs_nor_loses_the_iteration(tmp_path, fault):
    """Real loader processes (--workers 2 for training and validation): a truncated val image is skipped and named,
    the run ends normally; a bug in a validation worker ends the run at once, its iteration checkpointed first,
    and no worker process outlives it (they ignore SIGTERM, on which multiprocessing's exit handler relies)."""
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 2, (1280, 720))
    write_fake_dataset(root, "cityscapes", 2, (1024, 512))
    bad = sorted(glob.glob(os.path.join(root, "cityscapes", "leftImg8bit", "val", "*", "*.png")))[0]
    with open(bad, "r+b") as f:
        f.truncate(3000)
    script = tmp_path / "run.py"
    script.write_text(VALIDATION_FAULT_RUN)
    work = str(tmp_path / "run")
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--pretrained", "none", "--device", "cpu",
            "--iters", "3", "--val-every", "2", "--crop", "64", "--batch-size", "1", "--workers", "2",
            "--work-dir", work]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(script), os.path.dirname(os.path.abspath(__file__)), fault, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=240)  # a hang fails here
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    left = subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the run still alive: {left}"
    if fault == "corrupt":
        assert process.returncode == 0, err[-2000:]
        assert f"skipped: {bad}: corrupt or unreadable file" in out and "Traceback" not in out + err
        assert "validation at iteration 2" in out and "validation at iteration 3" in out
    else:
        assert process.returncode == 1 and "a bug in a loader worker" in err
        assert torch.load(os.path.join(work, "checkpoint.pth"), weights_only=True)["iteration"] == 2


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
