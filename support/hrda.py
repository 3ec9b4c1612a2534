"""HRDA's multi-resolution model (Hoyer et al. 2022; lhoyer/HRDA hrda_encoder_decoder.py, hrda_head.py) around a
MiT: a context view of the whole crop at half resolution, a full-resolution detail window, a scale attention
that fuses them, and the sliding inference. The helpers at the end let the training step treat a single-scale
model's features and HRDA's two views alike."""
import random
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mrm import segmentation_ce
from support.models import DAFormerHead, SegModel


# HRDA (Hoyer et al. 2022; lhoyer/HRDA mmseg/models/segmentors/hrda_encoder_decoder.py, decode_heads/hrda_head.py):
# a context view (the whole crop, downscaled) and a full-resolution detail window, one encoder run each with the
# same weights, one DAFormer head for both, fused by a class-wise scale attention predicted from the context.
class Views(NamedTuple):
    """An HRDA encoder's output: the context view's and the detail windows' feature levels, and the windows'
    (top, left) corners in the crop's full-resolution pixels (training: one window for the whole batch; inference:
    the slide windows, their features stacked window after window along the batch)."""
    context: list
    detail: list
    boxes: list
    side: int


class HRDAOutput(NamedTuple):
    """The fused logits (stride 4 of the crop) and the detail windows' own logits (stride 4 of a window)."""
    fused: torch.Tensor
    detail: torch.Tensor
    boxes: list
    side: int


class Downscale(nn.Module):
    """Bilinear, align_corners False, no antialiasing (mmseg's resize, as HRDA makes its context view)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)


def slide_boxes(height, width, side, stride):
    """mmseg's slide windows of `side` at `stride` over height x width (EncoderDecoder.slide_inference,
    HRDAEncoderDecoder.extract_slide_feat): (top, left) corners, the last row and column moved inside. A window is
    x[..., top:top + side, left:left + side]: where the image is smaller than `side` it is the image's extent
    (one row or column at 0), so the windows of an image all have one shape, min(side, height) x min(side, width)."""
    rows = max(height - side + stride - 1, 0) // stride + 1
    cols = max(width - side + stride - 1, 0) // stride + 1
    return [(max(min(r * stride + side, height) - side, 0), max(min(c * stride + side, width) - side, 0))
            for r in range(rows) for c in range(cols)]


def paste_mean(windows, boxes, side, size, stride=1):
    """Window logits (K*B, C, h, w), window after window, pasted at boxes // stride (HRDAHead.decode_hr's
    scale_box) into a (B, C, *size) map, cut where they pass its edge (decode_hr's F.pad with a negative pad) and
    averaged where windows overlap; 0 where none lies. h x w is the logits' own shape: at most side / stride (a
    window is smaller where the image is, see slide_boxes); logits of a window whose side is not a multiple of
    the stride reach the cell its last pixels fall in."""
    height, width = windows.shape[-2:]
    assert max(height, width) <= -(-side // stride), (tuple(windows.shape), side, stride)
    total = windows.new_zeros(windows.shape[0] // len(boxes), windows.shape[1], *size)
    count = windows.new_zeros(1, 1, *size)
    for window, (top, left) in zip(windows.chunk(len(boxes)), boxes):
        top, left = top // stride, left // stride
        total = total + F.pad(window, (left, size[1] - left - width, top, size[0] - top - height))
        count[..., top:top + height, left:left + width] += 1
    return total / count.clamp(min=1)


class HRDAEncoder(nn.Module):
    """The MiT encoder run on both views. forward (training) draws one detail window for the batch, at offsets
    that are multiples of the context logits' cell (8 crop pixels at scale 0.5), a new one at every call, from
    Python's random (what checkpoints save; a host number, whatever device or fake tensors the step runs on)."""

    def __init__(self, encoder, context_scale, detail_side):
        super().__init__()
        self.mit, self.downscale, self.side = encoder, Downscale(context_scale), detail_side
        self.cell = round(4 / context_scale)
        self.out_channels, self.out_strides = encoder.out_channels, encoder.out_strides

    @property
    def normalize(self):
        return self.mit.normalize

    def draw_box(self, height, width):
        def offset(extent):
            steps = (extent - self.side + 1) // self.cell  # HRDA's get_crop_bbox: the last offset is never drawn
            return random.randrange(steps) * self.cell if steps > 0 else 0
        return offset(height), offset(width)

    def forward(self, x):
        top, left = self.draw_box(*x.shape[-2:])
        detail = x[..., top:top + self.side, left:left + self.side]
        return Views(self.mit(self.downscale(x)), self.mit(detail), [(top, left)], self.side)

    def slide(self, x):
        """Inference views: the detail windows slide over the crop at half their side, one encoder batch
        (extract_slide_feat: where the crop is smaller than a window, the windows are the crop's extent there)."""
        boxes = slide_boxes(*x.shape[-2:], self.side, self.side // 2)
        windows = torch.cat([x[..., t:t + self.side, l:l + self.side] for t, l in boxes])
        return Views(self.mit(self.downscale(x)), self.mit(windows), boxes, self.side)


class HRDAHead(nn.Module):
    """HRDAHead: lr = head(context), a = sigmoid(attention(context)), hr = head(detail); with one training window a
    is 0 outside it; fused = up(a) * hr pasted + up((1 - a) * lr), at stride 4 of the crop."""

    def __init__(self, in_channels, num_classes, embed_dim, context_scale):
        super().__init__()
        self.head = DAFormerHead(in_channels, num_classes, embed_dim)
        self.scale_attention = DAFormerHead(in_channels, num_classes, embed_dim, fusion_dilations=())
        self.up = round(1 / context_scale)

    def forward(self, views):
        lr = self.head(views.context)
        attention = torch.sigmoid(self.scale_attention(views.context))
        hr = self.head(views.detail)
        size = (lr.shape[-2] * self.up, lr.shape[-1] * self.up)
        if len(views.boxes) == 1:  # training: the attention only where the window is
            (top, left), cell, n = views.boxes[0], 4 * self.up, views.side // (4 * self.up)
            inside = torch.zeros_like(attention[:1, :1])
            inside[..., top // cell:top // cell + n, left // cell:left // cell + n] = 1
            attention = attention * inside
        lr = (1 - attention) * lr

        def upsample(t):
            return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

        fused = upsample(attention) * paste_mean(hr, views.boxes, views.side, size, stride=4) + upsample(lr)
        return HRDAOutput(fused, hr, views.boxes, views.side)


class HRDAModel(SegModel):
    """forward(x) is HRDA's inference: windows of `window` (the training crop) at half stride over the image (one
    batch), each through encode_decode, logits resized to the window and averaged where windows overlap."""

    hr_loss_weight = 0.1

    def __init__(self, encoder, num_classes, embed_dim, context_scale, detail_crop, window):
        super().__init__(HRDAEncoder(encoder, context_scale, detail_crop),
                         HRDAHead(encoder.out_channels, num_classes, embed_dim, context_scale))
        self.window = window

    def loss(self, prediction, labels, weight=None):
        """HRDAHead.losses: (1 - w) CE(fused) + w CE(the detail window's logits, with the labels and pixel weights
        cropped to the window), w = hr_loss_weight (build_nets sets the run's)."""
        (top, left), side = prediction.boxes[0], prediction.side

        def window(t):
            return t[:, top:top + side, left:left + side] if isinstance(t, torch.Tensor) and t.dim() == 3 else t

        fused = segmentation_ce(prediction.fused, labels, weight, align_corners=self.align_corners)
        detail = segmentation_ce(prediction.detail, window(labels), window(weight), align_corners=self.align_corners)
        return (1 - self.hr_loss_weight) * fused + self.hr_loss_weight * detail

    def encode_decode(self, x):
        """The whole crop as context, the detail windows sliding over it; logits at x's size, for a crop of any
        shape. The fused map is the upsampled context's (x2 of the context's stride-4 logits: 226 cells for a 900
        side), which can pass the crop's stride-4 grid (225) by a cell that no detail window reaches where a side
        is not a multiple of 8 (HRDA's decode_hr map is the windows' 225 and would not add to it). The map is cut to
        the cells the windows reach (no cut where the sides are multiples of 8) before the resize to x's size."""
        out = self.decoder(self.encoder.slide(x))
        (height, width), cell = out.detail.shape[-2:], 4  # the head's output stride, HRDAHead's paste
        rows = max(top // cell for top, _ in out.boxes) + height
        cols = max(left // cell for _, left in out.boxes) + width
        return F.interpolate(out.fused[..., :rows, :cols], size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x):
        """mmseg's slide_inference over an image of any shape: windows of `window` at stride window // 2 (one
        encoder batch: an image's windows share one shape, min(window, its side) a side), each window's logits at
        its size, summed at its place and divided by the windows' count."""
        height, width = x.shape[-2:]
        if not self.window or (height <= self.window and width <= self.window):
            return self.encode_decode(x)  # one window, the whole image
        boxes = slide_boxes(height, width, self.window, self.window // 2)
        windows = torch.cat([x[..., t:t + self.window, l:l + self.window] for t, l in boxes])
        return paste_mean(self.encode_decode(windows), boxes, self.window, (height, width))


# The training step's view of the features: a single-scale model's, or HRDA's two views alike.
def draw_mrm_mask(rebuilder, features, images):
    """The Rebuilder's random masks for the images' features: one per image, and for HRDA's views one per view."""
    return rebuilder.random_mask(images.shape[0] * (2 if isinstance(features, Views) else 1), images.device)


def rebuilt_features(rebuilder, features, mask):
    """The Rebuilder on the encoder's features; on HRDA's views, one Rebuilder (the same weights) on each view's
    pyramid, the context with the first B masks and the detail windows with the rest, the windows kept (the
    paper: MRM "trained using both the fused multi-scale predictions and the detail crop predictions")."""
    if not isinstance(features, Views):
        return rebuilder(features, mask)
    batch = features.context[0].shape[0]
    return features._replace(context=rebuilder(features.context, mask[:batch]),
                             detail=rebuilder(features.detail, mask[batch:]))


def detached(features):
    """The encoder's features cut from its graph: a tensor, a list of levels, or HRDA's views."""
    if isinstance(features, Views):
        return features._replace(context=detached(features.context), detail=detached(features.detail))
    return [f.detach() for f in features] if isinstance(features, list) else features.detach()


def last_level(features):
    """The coarsest level of a hierarchical encoder's list, or a single-scale encoder's one map; of HRDA's views,
    the context's."""
    if isinstance(features, Views):
        features = features.context
    return features[-1] if isinstance(features, (list, tuple)) else features


def detail_window(features):
    """[(top, left, side)] of HRDA's training window (host numbers, what the debug grid marks), or None."""
    return [(*features.boxes[0], features.side)] if isinstance(features, Views) and len(features.boxes) == 1 else None
