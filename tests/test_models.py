"""DeepLabV2 (caffe, torchvision and mmseg ResNets), MiT and the DAFormer head, DeepLabV3+, pretrained files."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import support.models
import train_dacs_mrm as T
from support.base import ConfigError, DataError
from support.models import (ASPPClassifier, Attention, DAFormerHead, DEPTHWISE_FORMS, DeepLabV3PlusHead,
                            DepthwiseConv3x3, DropPath, MIT_B2, MIT_B3, MIT_B5, MIT_TINY, MiTEncoder,
                            MixVisionTransformer, Normalize, ResNetDilated, build_deeplab, build_deeplab_from_record,
                            load_backbone_state, load_mit_weights, read_pretrained)
from support.networks import build_model, build_nets

from helpers import DLV2_TINY, MIT_B5_PARAMS, fake_batch


# ---------------------------------------------------------------- DeepLabV2

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


def test_deeplabv2_classifier_defaults_to_the_two_branches_uda_code_ran(one_error_line):
    """AdaptSegNet/DACS return inside the loop over four branches and DAFormer's deeplabv2red sets (6, 12):
    two branches by default in every DeepLabV2 setting, four on request, anything else refused."""
    assert [c.dilation for c in ASPPClassifier(8, 3).conv2d_list] == [(6, 6), (12, 12)]
    for arch in ('dlv2-tiny', 'dlv2-v1c-tiny'):
        model, arch_record = build_model(arch, 5)
        assert len(model.decoder.conv2d_list) == 2 and arch_record['aspp_dilations'] == [6, 12]
    nets = build_nets(T.parse_args(['--task', 'toy', '--device', 'cpu', '--aspp-dilations', '6,12,18,24']))
    assert [c.dilation[0] for c in nets.model.decoder.conv2d_list] == [6, 12, 18, 24]
    assert nets.arch_record['aspp_dilations'] == [6, 12, 18, 24]
    one_error_line('--aspp-dilations 6,12,18: must be one of 6,12 | 6,12,18,24', T.main,
                   ['--task', 'toy', '--aspp-dilations', '6,12,18'])


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


# ---------------------------------------------------------------- ASPP's depthwise forms, more encoders, DeepLabV3+

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
