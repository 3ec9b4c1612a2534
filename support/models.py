"""The segmentation networks: dilated ResNets with the DeepLabV2 classifier (DACS's caffe style, torchvision's,
mmseg's ResNetV1c), DeepLabV3+, MiT (SegFormer) with the DAFormer head, their input normalisation and the
loading of pretrained weights. ARCHS names each architecture; every model takes RGB images in [0, 1]."""
import math
import pickle
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

from mrm import segmentation_ce
from support.base import one_line


MIT_B5 = dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1))


MIT_B2, MIT_B3 = dict(MIT_B5, depths=(3, 4, 6, 3)), dict(MIT_B5, depths=(3, 4, 18, 3))  # SegFormer's


MIT_TINY = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2), sr_ratios=(8, 4, 2, 1))


# framework: the recipes' framework an architecture belongs to (the toy recipe runs any); styles: RESNET_STYLES;
# decoders: the first is the default of --decoder; weights: the pretrained file the paper's runs start from.
RESNET = dict(decoders=("deeplabv2", "deeplabv3plus"))


COCO_INIT = ("resnet101COCO-41f33a49.pth, the MS-COCO DeepLab init that DACS's trainUDA.py loads (AdvSemiSeg's "
             "release), or torchvision's ImageNet resnet101")


MMCV_V1C = "mmcv's ImageNet {} (open-mmlab://{} in mmcv's model_zoo/open_mmlab.json)"


SEGFORMER = "SegFormer's ImageNet {} (NVlabs/SegFormer README, 'ImageNet-1K pretrained weights')"


DACS_RESNET = dict(RESNET, recipe="dacs", framework="dacs", styles=("caffe", "torchvision"))


MMSEG_RESNET = dict(RESNET, recipe="mmseg-dacs", framework="mmseg", styles=("v1c",))


MIT = dict(recipe="daformer", framework="mmseg", decoders=("daformer",), head_dim=256)


ARCHS = {
    "dlv2": dict(DACS_RESNET, layers=(3, 4, 23, 3), width=64, weights=COCO_INIT),
    "dlv2-r50": dict(DACS_RESNET, layers=(3, 4, 6, 3), width=64, weights="torchvision's ImageNet resnet50-11ad3fa6.pth"),
    "dlv2-tiny": dict(DACS_RESNET, layers=(1, 1, 1, 1), width=16, weights=""),
    "dlv2-v1c": dict(MMSEG_RESNET, layers=(3, 4, 23, 3), width=64,
                     weights=MMCV_V1C.format("resnet101_v1c-e67eebb6.pth", "resnet101_v1c")),
    "dlv2-v1c-r50": dict(MMSEG_RESNET, layers=(3, 4, 6, 3), width=64,
                         weights=MMCV_V1C.format("resnet50_v1c-2cccc1ad.pth", "resnet50_v1c")),
    "dlv2-v1c-tiny": dict(MMSEG_RESNET, layers=(1, 1, 1, 1), width=16, weights=""),
    "mitb5": dict(MIT, mit=MIT_B5, weights=SEGFORMER.format("mit_b5.pth")),
    "mitb3": dict(MIT, mit=MIT_B3, weights=SEGFORMER.format("mit_b3.pth")),
    "mitb2": dict(MIT, mit=MIT_B2, weights=SEGFORMER.format("mit_b2.pth")),
    "mit-tiny": dict(MIT, mit=MIT_TINY, head_dim=32, weights=""),
}
DECODERS = {decoder: None for spec in ARCHS.values() for decoder in spec["decoders"]}  # --decoder's choices


class SegModel(nn.Module):
    """encoder -> decoder; takes RGB images in [0, 1], returns logits at the decoder's resolution. loss() is the
    training loss of a prediction, as mmseg's decode heads own theirs: Eq. 1's pixel-wise CE (mrm.segmentation_ce)
    of the logits upsampled to the labels with the recipe's align_corners (build_nets sets it)."""

    align_corners = False

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def loss(self, logits, labels, weight=None):
        return segmentation_ce(logits, labels, weight, align_corners=self.align_corners)


# Dilated ResNet (output stride 8) + the DeepLabV2 classifier, in the styles that UDA code uses:
#   caffe        DACS / AdaptSegNet (MS-COCO DeepLab init): stride in the first 1x1 conv of a bottleneck
#   torchvision  the same network for torchvision's ImageNet weights: stride in the 3x3 conv
#   v1c          mmseg's ResNetV1c (DAFormer, MIC, MRM): deep 3x3 stem, floor-mode max-pool, contract dilation
# caffe and torchvision keep DACS's 7x7 stem, ceil-mode max-pool (65x65 features at 512) and frozen BatchNorm
# affine parameters; v1c trains its BatchNorm and gives 64x64 features at 512.
RESNET_STYLES = {
    'caffe': dict(stride_in_1x1=True, deep_stem=False, frozen_bn=True, norm='caffe'),
    'torchvision': dict(stride_in_1x1=False, deep_stem=False, frozen_bn=True, norm='imagenet'),
    'v1c': dict(stride_in_1x1=False, deep_stem=True, frozen_bn=False, norm='imagenet'),
}


CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # 0-255 scale, BGR order


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Maps our RGB [0, 1] input to what the pretrained weights were trained on."""

    def __init__(self, kind: str):
        super().__init__()
        if kind == 'caffe':
            mean, std = CAFFE_MEAN_BGR, (1.0, 1.0, 1.0)
        elif kind == 'imagenet':
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            raise ValueError(f"unknown normalisation {kind!r} (expected 'caffe' or 'imagenet')")
        self.kind = kind
        # non-persistent: constants, so they stay out of the state dict
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        if self.kind == 'caffe':
            x = x.flip(1) * 255.0  # RGB -> BGR, 0-255
        return (x - self.mean) / self.std

    def zero_colour(self):
        """The RGB [0, 1] colour that normalises to 0, (1, 3, 1, 1)."""
        return self.mean.flip(1) / 255.0 if self.kind == 'caffe' else self.mean


def frozen_bn(channels):
    # affine params stay at their pretrained values; running stats still update in train mode
    bn = nn.BatchNorm2d(channels)
    for p in bn.parameters():
        p.requires_grad = False
    return bn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, stride_in_1x1=True,
                 norm=frozen_bn):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNetDilated(nn.Module):
    """ResNet with layer3/layer4 dilated (2, 4) instead of strided: output stride 8. style: RESNET_STYLES."""

    def __init__(self, layers=(3, 4, 23, 3), width=64, style='caffe'):
        super().__init__()
        self.style = style
        options = RESNET_STYLES[style]
        self.stride_in_1x1 = options['stride_in_1x1']
        self.norm = frozen_bn if options['frozen_bn'] else nn.BatchNorm2d
        if options['deep_stem']:  # mmseg: 3x3 convs 3 -> w/2 (stride 2) -> w/2 -> w, keys stem.0 ... stem.7
            half = width // 2
            self.stem = nn.Sequential(
                nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), self.norm(half), nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, padding=1, bias=False), self.norm(half), nn.ReLU(inplace=True),
                nn.Conv2d(half, width, 3, padding=1, bias=False), self.norm(width), nn.ReLU(inplace=True))
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = self.norm(width)
            self.relu = nn.ReLU(inplace=True)
        # the caffe DeepLab pools in ceil mode: 512 -> 256 -> 129 (mmseg: 128)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=not options['deep_stem'])
        self.inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], dilation=2)
        self.layer4 = self._make_layer(width * 8, layers[3], dilation=4)
        self.out_channels = width * 8 * Bottleneck.expansion

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out or dilation in (2, 4):
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False), self.norm(out))
        # mmseg's contract_dilation: the first block of a dilated stage uses half the dilation
        first_dilation = dilation // 2 if self.style == 'v1c' and dilation > 1 else dilation
        block = [Bottleneck(self.inplanes, planes, stride, first_dilation, downsample, self.stride_in_1x1, self.norm)]
        self.inplanes = out
        block += [Bottleneck(out, planes, 1, dilation, None, self.stride_in_1x1, self.norm) for _ in range(1, blocks)]
        return nn.Sequential(*block)

    def forward(self, x, with_layer1=False):
        x = self.stem(x) if hasattr(self, 'stem') else self.relu(self.bn1(self.conv1(x)))
        c1 = self.layer1(self.maxpool(x))
        c4 = self.layer4(self.layer3(self.layer2(c1)))
        return [c1, c4] if with_layer1 else c4


class ResNetEncoder(nn.Module):
    """Normalisation + dilated ResNet: layer4 (stride 8) for DeepLabV2, [layer1 (stride 4), layer4] with_layer1
    for DeepLabV3+'s low-level skip."""

    def __init__(self, layers=(3, 4, 23, 3), width=64, style='caffe', with_layer1=False):
        super().__init__()
        self.normalize = Normalize(RESNET_STYLES[style]['norm'])
        self.backbone = ResNetDilated(layers, width, style)
        self.with_layer1 = with_layer1
        last = self.backbone.out_channels
        self.out_channels, self.out_strides = ([width * 4, last], [4, 8]) if with_layer1 else (last, [8])

    def forward(self, x):
        return self.backbone(self.normalize(x), self.with_layer1)


class ASPPClassifier(nn.Module):
    """DeepLabV2 'layer5' (DACS) / DLV2Head (mmseg): the sum of parallel dilated 3x3 convs, each straight to
    class logits. Every published UDA DeepLabV2 number used dilations (6, 12): AdaptSegNet's code, copied by
    DACS, returns inside its loop over four branches, and DAFormer's deeplabv2red config sets two on purpose."""

    def __init__(self, in_channels, num_classes, dilations=(6, 12), zero_bias=False):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            if zero_bias:  # mmcv's NormalInit; DACS keeps PyTorch's default bias
                nn.init.zeros_(conv.bias)

    def forward(self, f):
        return sum(conv(f) for conv in self.conv2d_list)


# pretrained weights: DeepLab MS-COCO init (caffe), torchvision ImageNet, mmcv ResNetV1c ImageNet
TOP_LEVEL = {'conv1', 'bn1', 'stem', 'layer1', 'layer2', 'layer3', 'layer4', 'layer5', 'fc'}


CLASSIFIER_PREFIXES = ('layer5.', 'fc.')


def load_tensors(path):
    """torch.load of an untrusted file: tensors and plain containers only (weights_only), without torch's
    warnings (they would precede the one-line error); a file it cannot read is one ValueError line naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f'{path}: holds more than tensors and plain containers (Python objects, which are never '
                         f'unpickled: untrusted code could run), or is not a PyTorch file') from None
    except Exception as error:
        raise ValueError(f'{path}: not a readable PyTorch file, damaged or cut short ({one_line(error)[:160]})') \
            from None


def load_state_file(path):
    """{name: tensor} from a .pth file, unwrapped from a 'state_dict' or 'model' entry. Weights files are
    untrusted input (load_tensors); any other content is one ValueError line naming the file."""
    sd = load_tensors(path)
    for wrapper in ('state_dict', 'model'):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f'{path}: not a state dict of tensors (nor one under a "state_dict" or "model" key)')
    return sd


def read_pretrained(path):
    """A backbone file as a flat state dict with any wrapper prefix ('Scale.', 'module.', 'backbone.') removed."""
    sd = load_state_file(path)
    # the official DeepLab loaders drop the first dotted component; do so only where there is one
    return {(k if k.split('.')[0] in TOP_LEVEL else k.split('.', 1)[-1]): v for k, v in sd.items()}


def detect_style(sd, path):
    """The RESNET_STYLES entry matching how the file's weights were trained."""
    if 'stem.0.weight' in sd:
        return 'v1c'  # mmcv's resnet101_v1c: deep stem
    if 'fc.weight' in sd:
        return 'torchvision'  # stride in the 3x3 conv, RGB ImageNet statistics
    if any(k.startswith('layer5.') for k in sd):
        return 'caffe'  # DeepLab COCO init: stride in the 1x1 conv, BGR 0-255 minus mean
    raise ValueError(f"{path}: cannot tell the weights' kind (no 'stem.*', 'fc.*' nor 'layer5.*' keys)")


def _ignored(key):
    return key.endswith('num_batches_tracked') or key.startswith(CLASSIFIER_PREFIXES)


def load_backbone_state(backbone, sd, path):
    """Strict load of a flat backbone state dict (from read_pretrained); BatchNorm counters and the classifier are
    not compared."""
    strict_load(backbone, sd, path, "the backbone", ignore=_ignored)


def build_deeplab_from_record(num_classes, arch_record):
    if arch_record['decoder'] == 'deeplabv3plus':
        encoder = ResNetEncoder(tuple(arch_record['layers']), arch_record['width'], arch_record['style'],
                                with_layer1=True)
        return encoder, DeepLabV3PlusHead(encoder.out_channels, num_classes)
    encoder = ResNetEncoder(tuple(arch_record['layers']), arch_record['width'], arch_record['style'])
    decoder = ASPPClassifier(encoder.out_channels, num_classes, tuple(arch_record['aspp_dilations']),
                             zero_bias=arch_record['style'] == 'v1c')
    return encoder, decoder


def build_deeplab(num_classes, pretrained=None, layers=(3, 4, 23, 3), width=64, styles=('caffe', 'torchvision'),
                  aspp_dilations=(6, 12), decoder='deeplabv2'):
    """Returns (encoder, decoder, arch_record); arch_record rebuilds the same architecture without the file. styles:
    those the architecture takes; the file's keys choose among them (no file: the first). decoder: 'deeplabv2' (the
    ASPP classifier) or 'deeplabv3plus'."""
    style, sd = styles[0], None
    if pretrained is not None:
        sd = read_pretrained(pretrained)
        style = detect_style(sd, pretrained)
        if style not in styles:
            raise ValueError(f"{pretrained}: holds {style}-style ResNet weights; this architecture takes "
                             f"{' or '.join(styles)} (--arch dlv2 for caffe/torchvision, dlv2-v1c for v1c)")
    arch_record = {'arch': 'dlv2', 'layers': list(layers), 'width': width, 'style': style,
            'aspp_dilations': list(aspp_dilations), 'decoder': decoder}
    encoder, decoder = build_deeplab_from_record(num_classes, arch_record)
    if sd is not None:
        load_backbone_state(encoder.backbone, sd, pretrained)
    return encoder, decoder, arch_record


class MiTEncoder(nn.Module):
    def __init__(self, config, checkpoint_blocks=False):
        super().__init__()
        self.normalize = Normalize("imagenet")
        self.backbone = MixVisionTransformer(**config, checkpoint_blocks=checkpoint_blocks)
        self.out_channels, self.out_strides = self.backbone.out_channels, [4, 8, 16, 32]

    def forward(self, x):
        return self.backbone(self.normalize(x))


# MiT encoder
def tokens_to_map(x, H, W):
    """(B, H*W, C) tokens as a (B, C, H, W) map: a channels-last-strided view (SegFormer's too, for its convs)."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)


def layout_of(x):
    """x's memory format: channels_last only where x is laid out so and not also NCHW-contiguous."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)
        return x * mask / keep


class OverlapPatchEmbed(nn.Module):

    def __init__(self, in_ch, dim, kernel, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, unlike the block norms

    def forward(self, x):
        x = self.proj(x)
        H, W = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class Attention(nn.Module):
    """Efficient self-attention: keys/values come from a map shrunk by sr."""

    def __init__(self, dim, num_heads, sr_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(tokens_to_map(x, H, W)).flatten(2).transpose(1, 2))
        # kv output channels are [K | V], each split into heads
        k, v = self.kv(x).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # default scale = head_dim**-0.5, as SegFormer
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class DWConv(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, H, W):
        return self.dwconv(tokens_to_map(x, H, W)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """MLP with a 3x3 depth-wise conv: gives positional information instead of a pos embedding."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), H, W)))


class MiTBlock(nn.Module):

    def __init__(self, dim, num_heads, sr_ratio, mlp_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class MixVisionTransformer(nn.Module):
    """Takes ImageNet-normalised images, returns 4 NCHW maps at strides 4, 8, 16, 32."""

    def __init__(self, embed_dims, depths, num_heads, sr_ratios, mlp_ratio=4,
                 drop_path_rate=0.1, checkpoint_blocks=False):
        super().__init__()
        self.out_channels = list(embed_dims)
        self.checkpoint_blocks = checkpoint_blocks
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()  # floats, even under a meta device
        in_chs = [3] + list(embed_dims[:-1])
        for i in range(4):
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f'patch_embed{i + 1}', OverlapPatchEmbed(in_chs[i], embed_dims[i], kernel, stride))
            start = sum(depths[:i])
            setattr(self, f'block{i + 1}', nn.ModuleList(
                MiTBlock(embed_dims[i], num_heads[i], sr_ratios[i], mlp_ratio, dpr[start + j])
                for j in range(depths[i])))
            setattr(self, f'norm{i + 1}', nn.LayerNorm(embed_dims[i], eps=1e-6))
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(m.bias)

    def forward(self, x):
        outs = []
        for i in range(1, 5):
            x, H, W = getattr(self, f'patch_embed{i}')(x)
            for blk in getattr(self, f'block{i}'):
                if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                    # recompute activations in backward; RNG state is replayed so DropPath matches
                    x = recompute(blk, x, H, W, use_reentrant=False)
                else:
                    x = blk(x, H, W)
            x = tokens_to_map(getattr(self, f'norm{i}')(x), H, W).contiguous()
            outs.append(x)
        return outs


def load_mit_weights(encoder, path):
    """Strictly load SegFormer's ImageNet mit_b*.pth (its classifier head.* is dropped)."""
    sd = {k: v for k, v in load_state_file(path).items() if not k.startswith('head.')}
    strict_load(encoder, sd, path, "the MiT encoder")


# DAFormer head
def conv_bn_relu(in_ch, out_ch, kernel, dilation=1, groups=1, conv_class=nn.Conv2d):
    conv = conv_class(in_ch, out_ch, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                      groups=groups, bias=False)  # BN supplies the bias
    nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')  # mmcv ConvModule default
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


def separable_conv_bn_relu(in_ch, out_ch, dilation=1):
    """mmcv's DepthwiseSeparableConvModule: a 3x3 depth-wise conv, then a 1x1 conv, each with BN and ReLU."""
    return nn.Sequential(conv_bn_relu(in_ch, in_ch, 3, dilation=dilation, groups=in_ch, conv_class=DepthwiseConv3x3),
                         conv_bn_relu(in_ch, out_ch, 1))


DEPTHWISE_FORMS = ("direct", "nchw", "space-to-batch")


class DepthwiseConv3x3(nn.Conv2d):
    """The separable ASPP's 3x3 depth-wise convolution with dilation d (padding d), which a GPU may run slowly
    (the direct cuDNN kernel for bf16 channels_last). `form` picks one of three computations of the same
    result (--aspp-depthwise): direct; nchw, in the contiguous layout (PyTorch's own depth-wise kernel); or
    space-to-batch: the d x d interleaved sub-images of the zero-padded input as one batch, each convolved
    without dilation (output pixel (r + d i, c + d j) only sees sub-image (r, c))."""
    form = "direct"

    def forward(self, x):
        d = self.dilation[0]
        if self.form == "direct" or d == 1:
            return super().forward(x)
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and \
            not x.is_contiguous() else torch.contiguous_format
        if self.form == "nchw":
            return super().forward(x.contiguous()).contiguous(memory_format=layout)
        B, C, H, W = x.shape
        h, w = -(-H // d), -(-W // d)
        x = F.pad(x, (0, w * d - W, 0, h * d - H)).reshape(B, C, h, d, w, d)
        x = x.permute(0, 3, 5, 1, 2, 4).reshape(B * d * d, C, h, w).contiguous(memory_format=layout)
        y = F.conv2d(x, self.weight, self.bias, padding=1, groups=self.groups)
        y = y.reshape(B, d, d, C, h, w).permute(0, 3, 4, 1, 5, 2).reshape(B, C, h * d, w * d)
        return y[:, :, :H, :W].contiguous(memory_format=layout)


def classifier(in_ch, num_classes):
    """mmseg's conv_seg: a 1x1 conv, weights normal(0, 0.01), bias 0."""
    conv = nn.Conv2d(in_ch, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


class DAFormerHead(nn.Module):
    """Context-aware fusion: embed each level, upsample to stride 4, fuse with a separable ASPP. Without
    fusion_dilations the fusion is one 1x1 conv + BN + ReLU (SegFormer's MLP decoder: HRDA's scale attention)."""

    def __init__(self, in_channels, num_classes, embed_dim=256, fusion_dilations=(6, 12, 18), dropout=0.1):
        super().__init__()
        self.embed_layers = nn.ModuleList(nn.Linear(c, embed_dim) for c in in_channels)
        cat_ch = embed_dim * len(in_channels)
        self.branches = nn.ModuleList([conv_bn_relu(cat_ch, embed_dim, 1)] + [
            separable_conv_bn_relu(cat_ch, embed_dim, d) for d in fusion_dilations])
        self.bottleneck = (conv_bn_relu(embed_dim * len(self.branches), embed_dim, 3) if fusion_dilations
                           else nn.Identity())
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = classifier(embed_dim, num_classes)

    def forward(self, feats):
        size = feats[0].shape[2:]
        embedded = []
        for f, embed in zip(feats, self.embed_layers):
            H, W = f.shape[2:]
            # in the level's own layout (mmseg: permute(0, 2, 1).contiguous().reshape, NCHW as the MiT hands them),
            # not tokens_to_map's channels-last-strided view: on the CPU train-mode BatchNorm rounds such maps
            # worse in fp32, the more so the more pixels (test_daformer_head_works_on_nchw_maps_as_mmseg_hands_them)
            e = tokens_to_map(embed(f.flatten(2).transpose(1, 2)), H, W).contiguous(memory_format=layout_of(f))
            if e.shape[2:] != size:
                e = F.interpolate(e, size=size, mode='bilinear', align_corners=False)
            embedded.append(e)
        x = torch.cat(embedded, dim=1)
        x = self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))
        return self.conv_seg(self.dropout(x))


# DeepLabV3+ head (mmseg's DepthwiseSeparableASPPHead, deeplabv3plus_r50-d8 config)
class DeepLabV3PlusHead(nn.Module):
    """Separable ASPP with image pooling on layer4 (dilations 1, 12, 24, 36, 512 channels), a 3x3
    bottleneck, then upsampled to layer1's stride-4 grid and fused with its 48-channel projection by two
    separable 3x3 convs; dropout 0.1, 1x1 classifier. in_channels: [layer1, layer4] channels."""

    def __init__(self, in_channels, num_classes, channels=512, dilations=(1, 12, 24, 36), c1_channels=48,
                 dropout=0.1):
        super().__init__()
        c1_in, c4_in = in_channels
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(c4_in, channels, 1))
        self.aspp = nn.ModuleList(conv_bn_relu(c4_in, channels, 1) if d == 1 else
                                  separable_conv_bn_relu(c4_in, channels, d) for d in dilations)
        self.bottleneck = conv_bn_relu((len(dilations) + 1) * channels, channels, 3)
        self.c1_bottleneck = conv_bn_relu(c1_in, c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(separable_conv_bn_relu(channels + c1_channels, channels),
                                            separable_conv_bn_relu(channels, channels))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = classifier(channels, num_classes)

    def forward(self, feats):
        c1, x = feats
        pooled = F.interpolate(self.image_pool(x), size=x.shape[2:], mode='bilinear', align_corners=False)
        x = self.bottleneck(torch.cat([pooled] + [branch(x) for branch in self.aspp], dim=1))
        x = F.interpolate(x, size=c1.shape[2:], mode='bilinear', align_corners=False)
        x = self.sep_bottleneck(torch.cat([x, self.c1_bottleneck(c1)], dim=1))
        return self.conv_seg(self.dropout(x))


def strict_load(module, state, path, what, ignore=lambda key: False):
    """load_state_dict(strict=True), its refusal one line: path, then up to 10 names of each kind of problem."""
    state = {k: v for k, v in state.items() if not ignore(k)}
    own = {k: v for k, v in module.state_dict().items() if not ignore(k)}
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = []
    for kind, keys in (("missing", own.keys() - state.keys()), ("unexpected", state.keys() - own.keys()),
                       ("shape mismatch (file vs model)", mismatched)):
        keys = sorted(keys)
        if keys:
            more = f" ... (+{len(keys) - 10} more)" if len(keys) > 10 else ""
            problems.append(f"{len(keys)} {kind} [{', '.join(keys[:10])}]{more}")
    if problems:
        raise ValueError(f"{path} does not fit {what}: " + "; ".join(problems))
    module.load_state_dict(state, strict=False)  # strict up to the ignored keys, compared above
