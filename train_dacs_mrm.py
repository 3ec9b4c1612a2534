"""DACS + Masked Representation Modeling (MRM): domain-adaptive semantic segmentation in one file.

    python train_dacs_mrm.py --task toy                                      # DACS + MRM on toy scenes, CPU
    python train_dacs_mrm.py --task gta2cs --pretrained resnet101COCO-41f33a49.pth          # DACS's own setting
    python train_dacs_mrm.py --task gta2cs --pretrained resnet101COCO-41f33a49.pth --no-mrm # the DACS baseline
    python train_dacs_mrm.py --task gta2cs --arch dlv2-v1c --pretrained resnet101_v1c-e67eebb6.pth  # in mmseg
    python train_dacs_mrm.py --task gta2cs --arch mitb5 --pretrained mit_b5.pth             # DAFormer
    python train_dacs_mrm.py --task gta2cs --recipe hrda --mic --pretrained mit_b5.pth      # MIC on HRDA

Each iteration (DACS, Tranheden et al. 2021, with MRM, Zhou et al. 2025, Algorithm 1), forward_backward below:
  1. source loss CE(D(E(x_s)), y_s)
  2. EMA teacher pseudo-labels on the target batch, weighted by the share of confident pixels
  3. ClassMix: half the classes of each source image pasted onto a target image
  4. colour jitter and blur on the mixed images
  5. L_u = weighted CE(D(E(x_mix)), y_mix), and L_mrm = CE(D(R(E(x_mix))), y_mix) on the SAME encoder
     features (mrm.py): one encoder pass, two decoder passes
  6. loss = L_s + L_u + lambda * L_mrm; optimizer step (the Rebuilder's: AdamW); EMA update of the teacher
A recipe reproduces the official code around a baseline (DACS's trainUDA.py, DAFormer's and HRDA's mmseg
code); docs/fidelity.md lists what still differs. HRDA's model (HRDAModel) gives E a context and a detail view
and D their fused prediction; its two losses are segmentation_loss's. Under torchrun one run spans several
processes (DDP).

The file reads top to bottom: config tables, DACS operations, MRM's losses, the step, the training loop and
main; then an appendix: models, data, checkpoints and evaluation, several processes, speed machinery, modes,
toy scenes.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import platform
import random
import re
import signal
import struct
import sys
import shutil
import tempfile
import textwrap
import time
import warnings
import weakref
import zlib
from datetime import timedelta
from functools import lru_cache
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_png, read_file
from PIL import Image, ImageDraw

from mrm import Masking, Rebuilder, mrm_loss, resize_mask, segmentation_ce


# ============================================================================= config: flags, recipes, architectures, tasks
# What a run can be told, and the tables that fill in the rest: a recipe per official code base, an entry
# per encoder, a task per pair of datasets.


# Every key is a flag: --mask-ratio 0.5, and for a switch --mrm / --no-mrm. A value comes from, last wins: the
# default here, the recipe, the task, the command line. --help prints each flag's help, default and choices.
DEFAULT_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
FLAGS = {
    "run and data": dict(
        task=("toy", "what to adapt: GTA5 -> Cityscapes, SYNTHIA -> Cityscapes, or generated toy scenes (CPU)"),
        data_root=("data", "folder holding gta/, synthia/ and cityscapes/ (see README for the layout)"),
        pretrained=("", "ImageNet / MS-COCO weights of the encoder; required for gta2cs and syn2cs, 'none' "
                        "trains from scratch"),
        work_dir=("", "where checkpoint.pth, config.json, log.jsonl and model.pth go "
                      "(default runs/<task>-<arch>-<method>-seed<seed>)"),
        seed=(0, "seed of every random draw: batches, masks, ClassMix, augmentation, initialisation"),
        workers=(DEFAULT_WORKERS, "data loader processes, by default one per core up to 4"),
        log_every=(50, "iterations between progress lines and log.jsonl records (the first is printed at once)"),
        val_every=(5000, "iterations between validations on the target val split"),
        checkpoint_every=(1000, "iterations between checkpoints (atomic: a crash keeps the last one)"),
        stop_after=(0, "stop after this many iterations of this run, checkpointed; continue with --resume (0: off)"),
        resume=(False, "continue from the work dir's checkpoint (the same experiment: see the end of --help)"),
        overwrite=(False, "start over in a work dir that holds another run, removing its files"),
        max_skips=(10, "corrupt files a run may skip (each is named) before it stops"),
        debug_every=(1000, "iterations between debug grids of the first image of a batch in work_dir/debug/ (0: off)"),
    ),
    "model": dict(
        arch=("", "encoder (default: the task's); *-tiny are for tests and the toy task"),
        decoder=("", "segmentation head (default: the arch's first): deeplabv2 | deeplabv3plus (ResNets), "
                     "daformer (MiT)"),
        aspp_dilations=("6,12", "DeepLabV2 classifier branches: 6,12 as every UDA baseline ran it, or the "
                                "four of the DeepLabV2 paper", ("6,12", "6,12,18,24")),
    ),
    "recipe and schedule": dict(
        recipe=("", "the official training code to reproduce (default: the arch's; see README 'What the "
                    "recipes do')"),
        iters=(0, "training iterations"),
        batch_size=(2, "source images and target images per iteration (per process under torchrun)"),
        crop=(512, "square training crop (0: whole images)"),
        optimizer=("sgd", "optimizer of the network", ("sgd", "adamw")),
        lr=(2.5e-4, "encoder learning rate"),
        head_lr_mult=(10.0, "decoder learning rate = lr x this"),
        momentum=(0.9, "SGD momentum"),
        weight_decay=(5e-4, "weight decay of the network"),
        norm_no_decay=(False, "no weight decay on LayerNorm parameters (mmseg's paramwise_cfg)"),
        poly_power=(0.9, "poly learning-rate decay to 0 at --iters"),
        warmup_iters=(0, "linear warm-up iterations (mmcv's, ratio 1e-6)"),
        dacs_param_slots=("official", "DACS's SGD: update each tensor once per time DACS's parameter list "
                                      "holds it (official) or once (unique)", ("official", "unique")),
    ),
    "DACS": dict(
        source_only=(False, "train on the source only: no target, no teacher, no MRM"),
        ema=(0.99, "teacher EMA: alpha = min(1 - 1/(iteration+1), this)"),
        pseudo_threshold=(0.968, "pseudo-label weight = share of target pixels at least this confident"),
        jitter=(0.25, "colour jitter strength (brightness, contrast, saturation, hue) on the mixed images"),
        jitter_p=(0.8, "probability that a batch is jittered"),
        blur_p=(0.5, "probability that a batch is blurred"),
        align_corners=(True, "align_corners of every logit upsampling, in training and evaluation"),
        flip=(False, "random horizontal flip of the crops"),
        cat_max_ratio=(1.0, "re-crop the source up to 10 times while one class covers this share or more (1: off)"),
        rcs_temperature=(0.0, "rare class sampling of source images, DAFormer's temperature (0: off)"),
        rcs_min_pixels=(3000, "rare class sampling: an image qualifies for a class with more pixels of it"),
        rcs_min_crop_ratio=(0.5, "rare class sampling: re-crop (up to 10 times) until the crop holds more than this "
                                 "x --rcs-min-pixels pixels of the class"),
        fd_weight=(0.0, "weight of DAFormer's ImageNet feature distance on thing classes (0: off)"),
        pl_crop=(False, "pseudo-label weight 0 on the top 15 and bottom 120 rows of the crop (DAFormer)"),
        pseudo_margins=("0,0,0,0", "pseudo-label weight 0 on this many top,bottom,left,right rows and columns of "
                                   "the whole target image, carried through crop and flip"),
    ),
    "MRM and the paper's ablations": dict(
        mrm=(True, "the MRM auxiliary task (--no-mrm: the baseline)"),
        mrm_weight=(1.0, "lambda of Eq. 5"),
        mask_ratio=(0.4, "share of the grid's cells masked"),
        rebuilder_dim=(512, "Rebuilder width (Table 2a)"),
        rebuilder_depth=(2, "Rebuilder transformer blocks (Table 2b)"),
        rebuilder_heads=(16, "Rebuilder attention heads"),
        rebuilder_grid=(16, "mask grid side (Table 2d)"),
        rebuilder_lr=(2e-4, "Rebuilder learning rate; it always trains with AdamW"),
        rebuilder_weight_decay=(0.01, "Rebuilder weight decay"),
        mrm_domain=("target", "whose features MRM rebuilds (Table 3)", ("target", "source", "both")),
        mrm_mode=("rebuild", "rebuild the masked cells, only mask them (Table 2c), or mask the mixed image "
                             "itself and run the student again (Table 6, input space)", ("rebuild", "mask-only", "input")),
        mrm_objective=("cls", "what the rebuilt features learn (Table 2e): the decoder's classes (Eq. 4), "
                              "image patches or features", ("cls", "pixel", "feature-teacher", "feature-student")),
        mrm_trains=("both", "what the MRM loss's gradient reaches besides the Rebuilder (Table 4)",
                    ("both", "encoder", "decoder")),
    ),
    "MIC": dict(
        mic=(False, "MIC's masked image consistency on the target batch (Hoyer et al. 2023)"),
        mic_mask_ratio=(0.7, "share of MIC's image blocks masked"),
        mic_block_size=(32, "MIC's block side in pixels"),
        mic_weight=(1.0, "weight of MIC's loss"),
    ),
    "HRDA": dict(
        resolution=(1, "training and evaluation images at this multiple (1 or 2) of DAFormer's sizes (GTA "
                       "1280x720, SYNTHIA 1280x760, Cityscapes 1024x512)"),
        detail_crop=(0, "HRDA's multi-resolution model: the side of its full-resolution detail window in the crop "
                        "(0: a single-scale model)"),
        context_scale=(0.5, "HRDA: the context view is the whole crop resized by this"),
        hr_loss_weight=(0.1, "HRDA: the loss is (1 - this) x CE(fused) + this x CE(detail window)"),
    ),
    "precision and speed": dict(
        device=("", "where to train (default: cuda when available)", ("cpu", "cuda")),
        amp=("off", "autocast precision: off (fp32, the official setting), bf16 (faster) or fp16",
             ("off", "bf16", "fp16")),
        channels_last=(True, "channels-last memory format on CUDA"),
        compile=(False, "torch.compile the encoder and decoder"),
        cuda_graph=(False, "capture the step once as a CUDA graph and replay it (one GPU; opt-in until measured "
                           "on a GPU)"),
        checkpoint_blocks=(False, "recompute the MiT blocks' activations in backward (less memory)"),
        aspp_depthwise=("direct", "how the separable ASPP's dilated depth-wise convs run (the same result)",
                        ("direct", "nchw", "space-to-batch")),
    ),
    "several GPUs (torchrun)": dict(
        sync_bn=(False, "synchronise the student's BatchNorm statistics across processes (GPUs only)"),
    ),
    "modes (each does its work and exits)": dict(
        check_data=(False, "list and pair every split the task reads, print the counts"),
        decode=(False, "with --check-data: also decode and validate every image and label, in --workers processes"),
        print_config=(False, "print the resolved configuration as JSON"),
        count_flops=(False, "count the forward multiply-adds of the model and of MRM's extra decoder pass"),
        bench=(0, "time N training steps on random batches of the paper's sizes"),
        bench_data=(0, "time N batches of the data pipeline on GTA-sized PNGs"),
        estimate_memory=(False, "the peak memory of this run's training step at its real sizes, without a GPU: two "
                                "steps on fake tensors, every tensor's bytes counted while it lives"),
        plot=([], "draw the losses, pseudo-label weight, lr and validation mIoU of these run dirs into curves.png "
                  "in the current folder"),
    ),
}
DEFAULTS = {key: entry[0] for group in FLAGS.values() for key, entry in group.items()}


# A recipe's framework decides what the official code around it did: "dacs" is DACS's trainUDA.py (images
# resized exactly with PIL, ClassMix classes per image, source loss over labelled pixels, EMA after the step);
# "mmseg" is DAFormer's mmsegmentation code (resize keeping the aspect ratio, ClassMix classes of the whole
# batch, every loss averaged over all pixels, EMA before the next step).
RECIPES = {
    "dacs": dict(framework="dacs", iters=250_000, optimizer="sgd", lr=2.5e-4, head_lr_mult=10.0, momentum=0.9,
                 weight_decay=5e-4, norm_no_decay=False, poly_power=0.9, warmup_iters=0, ema=0.99, jitter=0.25,
                 align_corners=True, flip=False, cat_max_ratio=1.0, rcs_temperature=0.0, fd_weight=0.0,
                 pl_crop=False),
    "mmseg-dacs": dict(framework="mmseg", iters=40_000, optimizer="adamw", lr=6e-5, head_lr_mult=10.0,
                       weight_decay=0.01, norm_no_decay=True, poly_power=1.0, warmup_iters=1500, ema=0.99,
                       jitter=0.2, align_corners=False, flip=True, cat_max_ratio=0.75, rcs_temperature=0.0,
                       fd_weight=0.0, pl_crop=False),
}
RECIPES["daformer"] = dict(RECIPES["mmseg-dacs"], ema=0.999, rcs_temperature=0.01, fd_weight=0.005, pl_crop=True)
RECIPES["hrda"] = dict(RECIPES["daformer"], resolution=2, crop=1024, detail_crop=512, context_scale=0.5,
                       hr_loss_weight=0.1, rcs_min_crop_ratio=2.0, pl_crop=False, pseudo_margins="30,240,30,30",
                       mic_block_size=64, arch="mitb5")  # arch: the default of --arch under this recipe
RECIPES["toy"] = dict(RECIPES["dacs"], iters=1000, batch_size=8, crop=0, optimizer="adamw", lr=1e-3,
                      head_lr_mult=1.0, weight_decay=1e-4, align_corners=False, rebuilder_lr=1e-3,
                      rebuilder_dim=64, rebuilder_heads=4, rebuilder_grid=8, mic_block_size=8, log_every=50,
                      val_every=500, checkpoint_every=500, debug_every=500, workers=0)
TOY_SIZES = {"train": 2000, "val": 200}  # scenes per toy split: a finite target set, as in real UDA

# Label tables: the 19 Cityscapes classes in train-id order (cityscapesscripts labels.py), Table 1's order.
CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
           'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorbike',
           'bicycle')
PALETTE = np.array([(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                    (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)
SYNTHIA_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)  # no terrain, truck, train
SYNTHIA_13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)  # additionally no wall, fence, pole
TOY_CLASSES = ('road', 'sidewalk', 'building', 'vegetation', 'sky', 'car', 'pole')
TOY_PALETTE = np.array([(128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35),
                        (70, 130, 180), (0, 0, 142), (153, 153, 153)], np.uint8)  # Cityscapes colours

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
TASKS = {
    "gta2cs": dict(source="gta", target="cityscapes", arch="dlv2", class_names=CLASSES, palette=PALETTE,
                   eval_classes={"19": tuple(range(19))}),
    "syn2cs": dict(source="synthia", target="cityscapes", arch="dlv2", class_names=CLASSES, palette=PALETTE,
                   eval_classes={"16": SYNTHIA_16, "13": SYNTHIA_13}),
    "toy": dict(source="toy-source", target="toy-target", arch="dlv2-tiny", recipe="toy", class_names=TOY_CLASSES,
                palette=TOY_PALETTE, eval_classes={str(len(TOY_CLASSES)): tuple(range(len(TOY_CLASSES)))}),
}
TABLE_CHOICES = dict(task=TASKS, arch=ARCHS, recipe=RECIPES,
                     decoder={d: None for spec in ARCHS.values() for d in spec["decoders"]})


class ConfigError(Exception):
    """A bad flag or combination of flags; main() prints it as one line and exits 2."""


class DataError(Exception):
    """A dataset, weights or checkpoint problem; the message is one line naming the path and what was expected."""


class CorruptFile(DataError):
    def __init__(self, path, reason='unreadable'):
        self.path = path
        reason = ' '.join(str(reason).split())  # the message must stay on one line
        super().__init__(f'{path}: corrupt or unreadable file, expected a valid PNG ({reason})')


class NonFiniteLoss(RuntimeError):
    pass


# ============================================================================= DACS operations, batched on the device
# Pseudo-labels, ClassMix, colour jitter and blur, the EMA teacher, rare class sampling, the ImageNet feature
# distance and MIC's masked images: each a tensor function, no per-image Python loop.


def pseudo_label(teacher_logits, threshold):
    """Argmax pseudo-label and DACS's weight: the share of target pixels whose max prob >= threshold."""
    prob, label = teacher_logits.float().softmax(dim=1).max(dim=1)
    return label, (prob >= threshold).float().mean()


def class_mix_masks(labels, batch_classes=False):
    """ClassMix: per source image, ceil(n/2) of n classes at random (the ignore value counts as a class, as in
    DACS and DAFormer); the mask is 1 on their pixels. The n classes are the image's own (DACS), or with
    batch_classes those of the whole source batch (DAFormer's get_class_masks takes torch.unique(labels)).
    Batched: random ranks among the present classes."""
    B = labels.shape[0]
    flat = labels.reshape(B, -1).long()
    present = torch.zeros(B, 256, dtype=torch.bool, device=labels.device).scatter_(1, flat, True)
    if batch_classes:
        present = present.any(dim=0, keepdim=True).expand(B, -1)
    scores = torch.rand(B, 256, device=labels.device).masked_fill(~present, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    chosen = rank < (present.sum(dim=1, keepdim=True) + 1) // 2
    return chosen.gather(1, flat).view(labels.shape)


# colour jitter and blur as DACS and DAFormer draw them: one draw per iteration decides whether the whole batch
# is jittered (p) and one whether it is blurred; the jitter factors and the blur sigma are drawn per image.
# The jitter is kornia 0.5.8's ColorJitter (DAFormer's pin) in plain torch.
def color_jitter(x, strength, p, one_call=False):
    """kornia.augmentation.ColorJitter(brightness=s, contrast=s, saturation=s, hue=s) of (B, 3, H, W) RGB in
    [0, 1], applied to the whole batch with probability p. Factors are drawn per image; the order of the
    operations per kornia call: per image (DACS/DAFormer call it per mixed image), or one for the batch
    with one_call (MIC calls it once on the target batch)."""
    B, device = x.shape[0], x.device

    def uniform(low, high):
        return low + (high - low) * torch.rand(B, device=device)

    factors = (uniform(max(0.0, 1 - strength), min(2.0, 1 + strength)), uniform(max(0.0, 1 - strength), 1 + strength),
               uniform(max(0.0, 1 - strength), 1 + strength), uniform(max(-0.5, -strength), min(0.5, strength)))
    order = torch.rand(1 if one_call else B, 4, device=device).argsort(dim=1).expand(B, 4)  # random permutations
    return torch.where(torch.rand((), device=device) < p, jitter_images(x, *factors, order), x)


def jitter_images(x, brightness, contrast, saturation, hue, order):
    """kornia 0.5.8 ColorJitter's apply_transform with per-image factors (B,) and orders (B, 4) of the operations
    0 brightness: x + (b - 1); 1 contrast: x * c; 2 saturation: HSV saturation * a; 3 hue: HSV hue + h * 2 pi
    (mod 2 pi); each clamps to [0, 1]. Each of the four steps computes the linear and the HSV kind for the batch
    and keeps the one the image's order names (no host sync); the other factors are the identity there, which
    leaves pixels bit-identical."""
    B = x.shape[0]
    brightness, contrast, saturation = (f.view(B, 1, 1, 1) for f in (brightness - 1, contrast, saturation))
    hue = hue.view(B, 1, 1, 1) * 2 * math.pi
    for step in range(4):
        op = order[:, step].view(B, 1, 1, 1)
        linear = ((x + torch.where(op == 0, brightness, 0)).clamp(0, 1) * torch.where(op == 1, contrast, 1)).clamp(0, 1)
        h, s, v = rgb_to_hsv(x).split(1, dim=1)
        hsv = torch.cat([torch.fmod(h + torch.where(op == 3, hue, 0), 2 * math.pi),
                         (s * torch.where(op == 2, saturation, 1)).clamp(0, 1), v], dim=1)
        x = torch.where(op >= 2, hsv_to_rgb(hsv), linear)
    return x


def rgb_to_hsv(x, eps=1e-6):
    """kornia's rgb_to_hsv of (B, 3, H, W) in [0, 1]: hue in [0, 2 pi), saturation (max - min) / (max + eps)."""
    value, argmax = x.max(dim=1)
    delta = value - x.min(dim=1).values
    saturation = delta / (value + eps)
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)  # grey pixels: hue 0, no 0/0
    rc, gc, bc = (value[:, None] - x).unbind(dim=1)
    sextant = torch.stack([bc - gc, 2 * delta + rc - bc, 4 * delta + gc - rc], dim=1)
    hue = sextant.gather(1, argmax[:, None])[:, 0] / delta
    return torch.stack([2 * math.pi * ((hue / 6) % 1), saturation, value], dim=1)


def hsv_to_rgb(hsv):
    """kornia's hsv_to_rgb: the inverse of rgb_to_hsv (up to its eps), any real hue."""
    hue, saturation, value = hsv.unbind(dim=1)
    hue = hue / (2 * math.pi)
    sector = torch.floor(hue * 6) % 6
    fraction = (hue * 6) % 6 - sector
    p = value * (1 - saturation)
    q = value * (1 - fraction * saturation)
    t = value * (1 - (1 - fraction) * saturation)
    index = sector.long()[:, None]
    red, green, blue = ([value, q, p, p, t, value], [t, value, value, q, p, p], [p, p, t, value, value, q])
    return torch.cat([torch.stack(channel, dim=1).gather(1, index) for channel in (red, green, blue)], dim=1)


def blur_kernel_size(side):
    """DACS/DAFormer: about 10% of the side, odd (51 for 512)."""
    k = math.ceil(0.1 * side)
    return int(math.floor(k - 0.5 + k % 2))


def gaussian_blur(x, p, sigma_range=(0.15, 1.15), one_call=False):
    """kornia's GaussianBlur2d (reflect padding) with a kernel of ~10% of each side, for the whole batch with
    probability p; sigma uniform in the range per image, or one for the batch with one_call (as color_jitter).
    Separable: one grouped convolution per direction."""
    B, C, H, W = x.shape
    sigma = sigma_range[0] + torch.rand(1 if one_call else B, 1, device=x.device).expand(B, 1) * (
        sigma_range[1] - sigma_range[0])

    def kernel(size):
        taps = torch.arange(size, device=x.device, dtype=torch.float32) - size // 2
        weights = torch.exp(-taps ** 2 / (2 * sigma ** 2))
        return (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0).to(x.dtype)

    kh, kw = blur_kernel_size(H), blur_kernel_size(W)
    y = F.pad(x.reshape(1, B * C, H, W), (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    y = F.conv2d(y, kernel(kw).view(B * C, 1, 1, kw), groups=B * C)
    y = F.conv2d(y, kernel(kh).view(B * C, 1, kh, 1), groups=B * C).view(B, C, H, W)
    return torch.where(torch.rand((), device=x.device) < p, y, x)


def ema_alpha(iteration, max_alpha):
    """DACS: alpha = min(1 - 1/(it+1), max_alpha)."""
    return min(1 - 1 / (iteration + 1), max_alpha)


@torch.no_grad()
def update_ema(teacher, student, weight):
    """teacher = alpha * teacher + (1 - alpha) * student, as a lerp towards the student by weight = 1 - alpha: a
    float, or a 0-dim device tensor (what a captured step reads; the same bits, one lerp per tensor)."""
    teacher_params = list(teacher.parameters())
    weights = [weight] * len(teacher_params) if isinstance(weight, torch.Tensor) else weight
    torch._foreach_lerp_(teacher_params, list(student.parameters()), weights)


def teacher_mode(teacher):
    """The teacher stays in train mode (BatchNorm on batch statistics, as DACS), without dropout."""
    teacher.train()
    for m in teacher.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d, DropPath)):
            m.eval()


# Rare class sampling
def rcs_class_probabilities(class_pixel_counts, temperature=0.01):
    """p(c) = softmax((1 - f_c) / T), f_c = class pixel share (ignore 255 not counted by the caller).
    Returns a float64 numpy array."""
    counts = np.asarray(class_pixel_counts, dtype=np.float64)
    logits = (1.0 - counts / counts.sum()) / temperature
    p = np.exp(logits - logits.max())  # shift for numerical stability
    return p / p.sum()


def rcs_pick(rng, probs, images_per_class):
    """Sample a class by probs, then uniformly one source image holding enough pixels of it."""
    # our choice: a class without any qualifying image gets probability 0, the rest is renormalised
    p = np.asarray(probs, dtype=np.float64) * np.array([len(imgs) > 0 for imgs in images_per_class])
    if p.sum() == 0:
        raise ValueError('rcs_pick: no class has a qualifying source image')
    c = int(rng.choice(len(p), p=p / p.sum()))
    return c, int(images_per_class[c][rng.integers(len(images_per_class[c]))])


def crop_has_enough(label_crop, cls, min_pixels=1500):
    """The data loader re-crops (up to 10 times) until this holds."""
    return int((label_crop == cls).sum()) > min_pixels


# ImageNet feature distance
def feature_distance(student, imagenet, labels, thing_classes=(6, 7, 11, 12, 13, 14, 15, 16, 17, 18),
                     min_share=0.75):
    """Mean L2 distance between student and frozen ImageNet features over cells showing a thing class.
    labels (B,H,W) must be an exact multiple of the feature size (h,w), else ValueError. Each cell gets
    the majority label of its block (255 counts as a label of its own, as in DAFormer) if that label
    covers >= min_share of the block, else 255."""
    B, _, h, w = student.shape
    H, W = labels.shape[1:]
    if H % h or W % w:
        raise ValueError(f'feature_distance: labels {H}x{W} not a multiple of features {h}x{w}')
    kh, kw = H // h, W // w
    blocks = labels.long().reshape(B, h, kh, w, kw).permute(0, 1, 3, 2, 4).reshape(B, h, w, kh * kw)
    # label histogram per cell, DAFormer's one-hot average pooling (a share >= min_share > 0.5 has no ties)
    counts = torch.zeros(B, h, w, 256, device=labels.device).scatter_add_(3, blocks, torch.ones_like(blocks).float())
    share, major = (counts / (kh * kw)).max(dim=-1)
    cell = torch.where(share >= min_share, major, torch.full_like(major, 255))
    mask = torch.stack([cell == c for c in thing_classes]).any(dim=0)  # no class tensor to copy to the GPU
    dist = (student - imagenet.detach()).norm(dim=1)  # the ImageNet features are a fixed target
    # masked sum / count: no boolean indexing (a host sync), and an empty mask gives 0, not NaN
    return (dist * mask).sum() / mask.sum().clamp(min=1)


def mic_masked_images(x, fill, strength, p, mask_ratio, block_size):
    """MIC's MaskingConsistencyModule ('separatetrgaug'): one colour-jitter and blur call of its own on the
    target batch (the blur drawn with p 0.5 even where the recipe's blur is off), then a block mask per image:
    round(H/b) x round(W/b) blocks, each kept iff U(0, 1) > mask_ratio, nearest-upsampled. Masked pixels
    take `fill`, the colour that normalises to 0: MIC multiplies the normalised image by the mask."""
    x = gaussian_blur(color_jitter(x, strength, p, one_call=True), 0.5, one_call=True)
    B, _, H, W = x.shape
    grid = (round(H / block_size), round(W / block_size))
    keep = torch.rand(B, 1, *grid, device=x.device) > mask_ratio
    return torch.where(F.interpolate(keep.float(), size=(H, W), mode="nearest").bool(), x, fill)


# ============================================================================= MRM's auxiliary losses
# Eq. 4 through mrm.py, and the other objectives of Table 2(e).


def mrm_auxiliary_loss(cfg, nets, features, images, labels, weight, mask=None):
    """L_mrm on the encoder's `features` of `images`: Eq. 4's CE(D(R(f)), y) (--mrm-objective cls) or one of
    Table 2(e)'s regressions at masked cells (README). --mrm-trains (Table 4) holds a part fixed for this loss
    only: decoder: the features are detached; encoder: the decoder runs with detached weights. mask: the
    Rebuilder's (B, 1, grid, grid) mask, drawn here when not given."""
    if mask is None:
        mask = draw_mrm_mask(nets.rebuilder, features, images)
    if cfg.mrm_trains == "decoder":
        features = detached(features)
    if cfg.mrm_objective == "cls":
        if cfg.mrm_trains == "encoder":
            weights = {name: p.detach() for name, p in nets.model.decoder.named_parameters()}

            def decoder(f):
                return torch.func.functional_call(nets.model.decoder, weights, (f,))
        else:
            decoder = nets.calls.decoder
        if isinstance(features, Views):  # HRDA: both views rebuilt, decoded with their window, HRDA's two losses
            return segmentation_loss(cfg, decoder(rebuild(nets.calls.rebuilder, features, mask)), labels, weight)
        return mrm_loss(decoder, nets.calls.rebuilder, features, labels, weight, align_corners=cfg.align_corners,
                        mask=mask)
    rebuilt = nets.calls.rebuilder(features, mask)
    if cfg.mrm_objective == "pixel":
        return masked_pixel_loss(nets.calls.pixel_head, last_level(rebuilt), images, mask)
    if cfg.mrm_objective == "feature-teacher":
        with torch.no_grad():
            features = nets.teacher.encoder(images)
    return masked_feature_loss(rebuilt, features, mask)


def draw_mrm_mask(rebuilder, features, images):
    """The Rebuilder's random masks for the images' features: one per image, and for HRDA's views one per view."""
    return rebuilder.random_mask(images.shape[0] * (2 if isinstance(features, Views) else 1), images.device)


def rebuild(rebuilder, features, mask):
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


def masked_input(images, mask, fill):
    """Table 6's "Input Space" masking: the grid's masked cells of the images (nearest-upsampled) take `fill`,
    the colour that normalises to 0. The paper does not say what fills them; we chose MIC's."""
    return torch.where(F.interpolate(mask, size=images.shape[-2:], mode="nearest").bool(), fill, images)


PIXELS_PER_CELL = 8  # the pixel objective's target: each grid cell's image patch, area-resized to 8 x 8


def masked_pixel_loss(head, rebuilt, images, mask):
    """Table 2(e) "pixel rec. (w/ norm)", MAE-style: a linear head on the rebuilt last-level features, pooled to
    the mask grid, predicts each cell's image patch (area-resized to PIXELS_PER_CELL^2 pixels), normalised by
    the patch's own mean and variance; squared error averaged over the masked cells only."""
    grid = mask.shape[-1]
    prediction = head(F.adaptive_avg_pool2d(rebuilt, grid)).float()
    patches = F.pixel_unshuffle(F.adaptive_avg_pool2d(images.float(), grid * PIXELS_PER_CELL), PIXELS_PER_CELL)
    mean, var = patches.mean(dim=1, keepdim=True), patches.var(dim=1, keepdim=True)
    target = (patches - mean) / (var + 1e-6).sqrt()
    error = (prediction - target).pow(2).mean(dim=1, keepdim=True)
    return (error * mask).sum() / mask.sum().clamp(min=1)


def masked_feature_loss(rebuilt, targets, mask):
    """Table 2(e) "feature rec.": squared error between rebuilt and target features, averaged over channels
    and the masked cells of each level, then over the levels."""
    levels = list(zip(rebuilt, targets)) if isinstance(rebuilt, list) else [(rebuilt, targets)]
    losses = []
    for f_r, f_target in levels:
        level_mask = resize_mask(mask, f_r.shape[-2:])
        error = (f_r.float() - f_target.detach().float()).pow(2).mean(dim=1, keepdim=True)
        losses.append((error * level_mask).sum() / level_mask.sum().clamp(min=1))
    return sum(losses) / len(losses)


# ============================================================================= one training step
# forward_backward is the iteration of DACS (+ MRM, + MIC); device_step adds the optimizer and the EMA.


def segmentation_loss(cfg, logits, labels, weight=None):
    """mrm.segmentation_ce of a prediction; of HRDA's (HRDAOutput) as HRDAHead.losses: (1 - w) CE(fused) +
    w CE(the detail window's logits, labels and pixel weights cropped to the window), w = --hr-loss-weight."""
    if not isinstance(logits, HRDAOutput):
        return segmentation_ce(logits, labels, weight, align_corners=cfg.align_corners)
    (top, left), side = logits.boxes[0], logits.side

    def window(t):
        return t[:, top:top + side, left:left + side] if isinstance(t, torch.Tensor) and t.dim() == 3 else t

    fused = segmentation_ce(logits.fused, labels, weight, align_corners=cfg.align_corners)
    detail = segmentation_ce(logits.detail, window(labels), window(weight), align_corners=cfg.align_corners)
    return (1 - cfg.hr_loss_weight) * fused + cfg.hr_loss_weight * detail


def forward_backward(cfg, nets, x_s, y_s, x_t, valid_t=None):
    """Steps (1)-(6) of the iteration: the losses and their gradients. Source and mixed losses are
    backpropagated separately, which frees the source graph before the mixed forward (same gradients, lower
    peak memory). valid_t: 0 on the target pixels whose pseudo-labels never count (--pseudo-margins). Returns
    the detached losses as one tensor."""
    model, rebuilder, scaler = nets.model, nets.rebuilder, nets.scaler
    encoder, decoder = nets.calls.encoder, nets.calls.decoder
    mmseg = cfg.framework == "mmseg"
    autocast = torch.autocast(nets.device.type, dtype=torch.float16 if cfg.amp == "fp16" else torch.bfloat16,
                              enabled=cfg.amp != "off")
    zero = torch.zeros((), device=nets.device)
    loss_u = loss_mrm_s = loss_mrm_t = loss_mic = loss_fd = weight = zero
    nets.seen = dict(source_image=x_s, source_label=y_s)  # what the debug panels show (references, no copies)
    source_weight = 1.0 if mmseg else None  # mmseg 0.16 averages over all pixels, DACS over labelled ones

    # (1) supervised source loss, Eq. 1 (+ DAFormer's ImageNet feature distance)
    with without_gradient_sync(cfg, nets):
        with autocast:
            f_s = encoder(x_s)
            loss_s = segmentation_loss(cfg, decoder(f_s), y_s, source_weight)
            if nets.imagenet is not None:
                with torch.no_grad():
                    f_imagenet = last_level(nets.imagenet(x_s))  # HRDA: of the context view
                loss_fd = feature_distance(last_level(f_s), f_imagenet, y_s)
            if rebuilder is not None and cfg.mrm_domain in ("source", "both"):
                loss_mrm_s = mrm_auxiliary_loss(cfg, nets, f_s, x_s, y_s, source_weight)
        scaler.scale(loss_s + cfg.fd_weight * loss_fd + cfg.mrm_weight * loss_mrm_s).backward()
    del f_s

    if not cfg.source_only:
        # (2) pseudo-labels from the EMA teacher on the un-augmented target batch
        with torch.inference_mode(), autocast:
            teacher_logits = nets.teacher(x_t)  # HRDA's inference forward returns them at the input's size
            if teacher_logits.shape[-2:] != x_t.shape[-2:]:
                teacher_logits = F.interpolate(teacher_logits, size=x_t.shape[-2:], mode="bilinear",
                                               align_corners=cfg.align_corners)
            pseudo, weight = pseudo_label(teacher_logits, cfg.pseudo_threshold)
        pixel_weight = weight.expand_as(pseudo)  # inference tensors: read below, never saved for backward
        if cfg.pl_crop:  # DAFormer: the top and bottom rows (sky border, ego car) are unreliable
            pixel_weight = pixel_weight.clone()
            pixel_weight[:, :15].zero_()
            pixel_weight[:, -120:].zero_()
        if valid_t is not None:  # HRDA's margins of the whole target image
            pixel_weight = pixel_weight * valid_t
        # (3) ClassMix source onto target; pasted source pixels keep their label, weight 1
        mix = class_mix_masks(y_s, batch_classes=mmseg)
        x_m = torch.where(mix[:, None], x_s, x_t)
        y_m = torch.where(mix, y_s, pseudo)
        w_m = torch.where(mix, 1.0, pixel_weight)
        # (4) colour jitter and blur on the mixed images
        x_m = gaussian_blur(color_jitter(x_m, cfg.jitter, cfg.jitter_p), cfg.blur_p)
        # (5) L_u on the mixed batch, and MRM on the same encoder features (Algorithm 1, Eq. 5)
        with autocast:
            f_m = encoder(x_m.contiguous(memory_format=nets.memory_format))
            loss_u = segmentation_loss(cfg, decoder(f_m), y_m, w_m)
            if isinstance(f_m, Views):  # the debug grid shows HRDA's detail window (host numbers, no copy)
                nets.seen.update(detail_window=[(*f_m.boxes[0], f_m.side)])
            if rebuilder is not None and cfg.mrm_domain in ("target", "both"):
                if cfg.mrm_mode == "input":  # Table 6: the image masked, a second encoder and decoder pass
                    mrm_mask = rebuilder.random_mask(x_m.shape[0], x_m.device)
                    x_masked = masked_input(x_m, mrm_mask, model.encoder.normalize.zero_colour())
                    loss_mrm_t = segmentation_loss(
                        cfg, decoder(encoder(x_masked.contiguous(memory_format=nets.memory_format))), y_m, w_m)
                    nets.seen.update(mrm_input=x_masked)
                else:
                    mrm_mask = draw_mrm_mask(rebuilder, f_m, x_m)
                    loss_mrm_t = mrm_auxiliary_loss(cfg, nets, f_m, x_m, y_m, w_m, mrm_mask)
                nets.seen.update(mrm_mask=mrm_mask)
        scaler.scale(loss_u + cfg.mrm_weight * loss_mrm_t).backward()
        del f_m
        nets.seen.update(target_image=x_t, pseudo_label=pseudo, pixel_weight=pixel_weight, mix=mix, mixed_image=x_m,
                         mixed_label=y_m)
        # (6) MIC: the student on block-masked target images against the teacher's pseudo-labels of the
        # clean ones, with the un-mixed pixel weight; its own backward
        if cfg.mic:
            x_mic = mic_masked_images(x_t, model.encoder.normalize.zero_colour(), cfg.jitter, cfg.jitter_p,
                                      cfg.mic_mask_ratio, cfg.mic_block_size)
            with autocast:  # clones: autograd may save them, which it refuses for inference tensors
                loss_mic = segmentation_loss(cfg, decoder(encoder(x_mic.contiguous(memory_format=nets.memory_format))),
                                             pseudo.clone(), pixel_weight.clone())
            scaler.scale(cfg.mic_weight * loss_mic).backward()
            nets.seen.update(mic_image=x_mic)
    return torch.stack([loss_s, loss_u, loss_mrm_s + loss_mrm_t, loss_mic, loss_fd, weight]).detach().float()


def device_step(cfg, nets, source_image, source_label, target_image, target_valid=None):
    """The device's part of an iteration, from the uint8 batch on the device to the EMA update: no host sync,
    no host random numbers and no host values that change between iterations, so that CudaGraphStep can
    capture it once."""
    nets.model.train()
    # Autocast drops its low-precision copies of the weights when the outermost autocast scope exits: this
    # scope, closed before the optimizer step, makes the source, mixed and MIC passes cast each weight once.
    with torch.autocast(nets.device.type, enabled=False):
        losses = forward_backward(cfg, nets, *step_inputs(nets, source_image, source_label, target_image,
                                                          target_valid))
    for optimizer in nets.optimizers:
        nets.scaler.step(optimizer)
    nets.scaler.update()
    for optimizer in nets.optimizers:
        optimizer.zero_grad(set_to_none=True)
    if nets.teacher is not None:
        update_ema(nets.teacher, nets.model, nets.ema_weight)
    return losses


def begin_step(cfg, nets, iteration):
    """The host's part of an iteration: its learning rates and EMA weight, written where device_step reads them."""
    set_learning_rates(cfg, nets, iteration)
    # DACS updates the teacher after the step with alpha(it); DAFormer at the start of the next one, alpha(it + 1)
    weight = 1 - ema_alpha(iteration + 1 if cfg.framework == "mmseg" else iteration, cfg.ema)
    if isinstance(nets.ema_weight, torch.Tensor):
        nets.ema_weight.fill_(weight)
    else:
        nets.ema_weight = weight


def train_step(cfg, nets, batch, iteration):
    """One DACS(+MRM, +MIC) iteration, eagerly: the host's part, then the device's. Returns the detached
    losses [L_s, L_u, L_mrm, L_mic, L_fd, pseudo weight] as one tensor (no host sync here)."""
    begin_step(cfg, nets, iteration)
    return device_step(cfg, nets, *to_device(batch, nets))


def lr_factor(cfg, iteration):
    """Poly decay to 0 at cfg.iters, times a linear warm-up (mmcv's, ratio 1e-6) over warmup_iters."""
    factor = (1 - iteration / cfg.iters) ** cfg.poly_power
    if iteration < cfg.warmup_iters:
        factor *= 1 - (1 - iteration / cfg.warmup_iters) * (1 - 1e-6)
    return factor


def set_learning_rates(cfg, nets, iteration):
    """Each group's initial_lr times the schedule; a device tensor lr (CUDA graph) is written in place."""
    for optimizer in nets.optimizers:
        for group in optimizer.param_groups:
            lr = group["initial_lr"] * lr_factor(cfg, iteration)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr


def last_level(features):
    """The coarsest level of a hierarchical encoder's list, or a single-scale encoder's one map; of HRDA's views,
    the context's."""
    if isinstance(features, Views):
        features = features.context
    return features[-1] if isinstance(features, (list, tuple)) else features


# target_valid, 1 where a target pixel's pseudo-label may count, comes only with --pseudo-margins
BATCH_KEYS = ("source_image", "source_label", "target_image", "target_valid")


def to_device(batch, nets):
    """The batch's uint8 images and labels, as they are, on the device."""
    return [batch[key].to(nets.device, non_blocking=True) for key in BATCH_KEYS if key in batch]


def step_inputs(nets, source_image, source_label, target_image, target_valid=None):
    """uint8 images -> float RGB in [0, 1], labels -> int64, the pseudo-label mask -> float: on the device."""
    def image(t):
        return t.float().div_(255).contiguous(memory_format=nets.memory_format)
    valid = None if target_valid is None else target_valid.float()
    return image(source_image), source_label.long(), image(target_image), valid


# ============================================================================= the training loop and main
# The run: data, networks, resume, the loop with its log, validation and checkpoints; main maps errors to exits.


def train(cfg):
    rank, world = init_distributed(cfg)
    say = print if rank == 0 else (lambda *args, **kwargs: None)  # the other processes stay quiet
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.device == "cuda":
        torch.backends.cudnn.benchmark = True
    source = Domain(cfg.source, cfg.data_root, "train", cfg.seed, cfg.framework, cfg.resolution)
    target = Domain(cfg.target, cfg.data_root, "train", cfg.seed, cfg.framework, cfg.resolution)
    # the mmseg protocol, whatever the recipe
    val = Domain(cfg.target, cfg.data_root, "val", cfg.seed, resolution=cfg.resolution)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:  # torchrun --max-restarts: go on, or start over
        cfg.resume = os.path.exists(os.path.join(cfg.work_dir, "checkpoint.pth"))
        cfg.overwrite = not cfg.resume
    if rank == 0:
        check_work_dir(cfg)
    state = read_resume_checkpoint(cfg) if cfg.resume else None
    nets = build_nets(cfg, rank, world)  # the same seed everywhere: identical initial models on every rank
    if world > 1:  # from here each process draws its own random numbers (masks, ClassMix, jitter)
        seed = int(np.random.SeedSequence([cfg.seed, rank]).generate_state(1)[0])
        torch.manual_seed(seed)
        random.seed(seed)
    start = resume(cfg, nets, state) if state is not None else 0
    rcs = rcs_statistics(cfg, source, say) if cfg.rcs_temperature > 0 else None
    # every check that can refuse the run has passed: from here on the work dir is this run's
    with WorkDirLock(cfg.work_dir, say) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            start_work_dir(cfg, state, say)
        stop = min(cfg.iters, start + cfg.stop_after) if cfg.stop_after else cfg.iters
        initialisation = cfg.pretrained if cfg.pretrained not in ("", "none") else "random weights"
        changed = resume_changes(cfg, state) if state is not None else []
        say(f"{cfg.task}: {cfg.arch} ({cfg.recipe} recipe), {'source only' if cfg.source_only else 'DACS'}"
            f"{' + MRM' if nets.rebuilder is not None else ''}{' + MIC' if cfg.mic else ''}, iterations "
            f"{start}..{stop} of {cfg.iters}, {len(source)} source / {len(target)} target images"
            f"{f', {world} processes' if world > 1 else ''}\n  from {initialisation}; "
            f"{'fp32' if cfg.amp == 'off' else cfg.amp} on {cfg.device}, step "
            f"{'as one CUDA graph' if nets.graph else 'eager'}{f' ({why_eager(cfg, world)})' if not nets.graph else ''}"
            f"; work dir {cfg.work_dir}{' (--overwrite)' if cfg.overwrite else ''}"
            + (f"\n  resumed with {', '.join(changed)}" if changed else ""), flush=True)
        loader = make_loader(cfg, TrainBatches(cfg, source, target, rcs, rank, world), start)
        with open(os.path.join(cfg.work_dir, "log.jsonl"), "a") if rank == 0 else contextlib.nullcontext() as log:
            return training_loop(cfg, nets, loader, val, start, stop, log, say)


def training_loop(cfg, nets, loader, val, start, stop, log, say):
    """Iterations start..stop: the step, a progress line and log record every --log-every iterations, validation
    and checkpoints at their intervals; a SIGINT or SIGTERM ends it after the current iteration, checkpointed."""
    step = CudaGraphStep(nets) if nets.graph else train_step
    sums, count, skipped_total, warned = torch.zeros(6, device=nets.device), 0, 0, 0
    clock, clock_iteration = time.time(), start
    with StopSignals() as signals:
        for iteration, batch in zip(range(start, stop), loader):
            if batch.get("error"):  # raised in a loader worker, re-raised here as the same one line
                raise DataError(batch["error"])
            skipped = batch.pop("skipped")
            for note in batch.pop("notes"):
                warned += 1
                if warned <= 10:
                    say(f"warning: {note}" + ("; further label warnings not shown" if warned == 10 else ""),
                        flush=True)
            if skipped:
                skipped_total += len(skipped)
                for message in skipped:
                    print(f"skipped: {message}", file=sys.stdout if nets.rank == 0 else sys.stderr, flush=True)
                if skipped_total > cfg.max_skips:
                    raise DataError(f"{skipped_total} corrupt files skipped (more than --max-skips "
                                    f"{cfg.max_skips}), last: {skipped[-1]}")
            sums += step(cfg, nets, batch, iteration)
            count += 1
            done = iteration + 1
            logged = done % cfg.log_every == 0 or done == stop or done % cfg.checkpoint_every == 0
            if done == start + 1 and not logged and nets.world == 1:  # a first sign of life, at once; no record
                say(progress_line(cfg, done, (sums / count).tolist(), 1 / (time.time() - clock)), flush=True)
            if logged:
                if nets.world > 1:  # every rank sees the mean over all ranks, and stops together on a NaN
                    dist.all_reduce(sums)
                    sums /= nets.world
                means = (sums / count).tolist()  # the one host sync, every log_every iterations
                if not all(map(math.isfinite, means)):
                    raise NonFiniteLoss(f"non-finite loss between iterations {done - count} and {done}: {means}; "
                                        f"the last checkpoint in {cfg.work_dir} is untouched")
                speed = (done - clock_iteration) / (time.time() - clock)
                clock, clock_iteration = time.time(), done
                if log is not None:
                    record = dict(iteration=done, loss_source=means[0], loss_uda=means[1], loss_mrm=means[2],
                                  loss_mic=means[3], loss_fd=means[4], pseudo_weight=means[5],
                                  lr=float(nets.optimizers[0].param_groups[0]["lr"]), it_per_s=speed,
                                  time=time.time())
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                say(progress_line(cfg, done, means, speed), flush=True)
                sums.zero_()
                count = 0
            if nets.rank == 0 and cfg.debug_every and done % cfg.debug_every == 0 and not cfg.source_only:
                write_debug_grid(cfg, nets, os.path.join(cfg.work_dir, "debug", f"iteration_{done:06d}.png"))
            if nets.rank == 0 and done % cfg.val_every == 0 and done != cfg.iters:
                validate(cfg, nets, val, done, log)  # the other ranks wait at their next collective
            interrupted = signals.requested(nets)
            if done % cfg.checkpoint_every == 0 or done == stop or interrupted:
                save_checkpoint(cfg, nets, done)
            if interrupted:
                raise Interrupted(interrupted, done)
    if nets.rank != 0:
        return None
    if stop == cfg.iters:
        export_model(os.path.join(cfg.work_dir, "model.pth"), nets.model, nets.info, cfg.num_classes)
        return validate(cfg, nets, val, cfg.iters, log)
    print(f"stopped after iteration {stop} (--stop-after); continue with --resume", flush=True)
    return None


def validate(cfg, nets, val, iteration, log):
    conf = evaluate(nets.model, val, cfg.num_classes, nets.device, cfg.align_corners, cfg.amp,
                    workers=min(cfg.workers, 4), say=print)
    table, miou = miou_report(conf, cfg.eval_classes, cfg.class_names)
    print(f"validation at iteration {iteration} on {len(val)} {cfg.target} images:\n{table}", flush=True)
    ious = [None if math.isnan(iou) else 100 * iou for iou in iou_per_class(conf.cpu()).tolist()]
    log.write(json.dumps(dict(iteration=iteration, val_miou=miou, val_iou=ious)) + "\n")
    log.flush()
    from eval import plot_curves  # eval.py imports this file, so it is imported here, once both exist
    try:
        plot_curves([cfg.work_dir], os.path.join(cfg.work_dir, "curves.png"))
    except DataError as error:  # a picture is not worth stopping the run for
        print(f"warning: {error}", flush=True)
    return miou


def progress_line(cfg, done, means, speed):
    rate = f"{speed:.2f} it/s" if speed >= 1 else f"{1 / speed:.1f} s/it"
    return (f"[{done}/{cfg.iters}] L_s {means[0]:.4f}  L_u {means[1]:.4f}  L_mrm {means[2]:.4f}"
            f"{f'  L_mic {means[3]:.4f}' if cfg.mic else ''}{f'  L_fd {means[4]:.4f}' if cfg.fd_weight else ''}"
            f"  weight {means[5]:.3f}  {rate}  ETA {format_eta((cfg.iters - done) / speed)}")


def format_eta(seconds):
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def main(argv=None):
    try:
        cfg = parse_config(argv)
        if cfg.print_config:
            print(config_json(cfg), end="")
        elif cfg.count_flops:
            print_flops(cfg)
        elif cfg.check_data:
            check_data(cfg)
        elif cfg.bench:
            bench(cfg)
        elif cfg.bench_data:
            bench_data(cfg)
        elif cfg.estimate_memory:
            estimate_memory(cfg)
        elif cfg.plot:
            from eval import plot_curves
            drawn = plot_curves(cfg.plot, "curves.png")
            print(f"wrote curves.png: {', '.join(drawn) or 'nothing logged yet'} of {len(cfg.plot)} run(s)")
        else:
            train(cfg)
    except (ConfigError, DataError) as error:
        print(f"error: {rank_prefix()}{error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        if os.environ.get("RANK", "0") == "0":  # every process sees the same all-reduced NaN
            print(f"error: {error}", file=sys.stderr)
        return 3
    except Interrupted as error:
        if os.environ.get("RANK", "0") == "0":
            print(error, file=sys.stderr)
        return 128 + error.signum
    except KeyboardInterrupt:
        print(f"{rank_prefix()}interrupted: stopped at once, without a new checkpoint; the last one is intact "
              f"(continue with --resume)", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
        print(f"error: out of GPU memory (peak {peak:.1f} GiB allocated). Reduce it with --amp bf16, "
              f"a smaller --crop, --checkpoint-blocks (MiT) or --batch-size 1; --estimate-memory prints a "
              f"setting's peak without a GPU", file=sys.stderr)
        return 4
    except RuntimeError as error:
        if "DataLoader worker" in str(error):  # killed by a signal or the out-of-memory killer
            print(f"error: {rank_prefix()}a data loader process died ({one_line(error)[:160]}); the last checkpoint "
                  f"in {cfg.work_dir} is intact: continue with --resume", file=sys.stderr)
            return 5
        if not lost_a_process(error):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: another process of this run stopped ({one_line(error)[:120]}...); the last checkpoint "
                  f"in {cfg.work_dir} is intact: continue with --resume", file=sys.stderr)
        return 5
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ============================================================================= appendix: models
# The networks of the step (student, teacher, Rebuilder, ImageNet copy) and their optimizers, then the
# architectures: dilated ResNets with the DeepLabV2 classifier, MiT with the DAFormer head, DeepLabV3+, and
# HRDA's multi-resolution model around a MiT.


def aspp_dilations(cfg):
    return tuple(int(d) for d in cfg.aspp_dilations.split(","))


def build_nets(cfg, rank=0, world=1):
    """The student, EMA teacher, Rebuilder, frozen ImageNet encoder (FD) and optimizers, on the device; under
    torchrun (world > 1) what the step calls is wrapped in DistributedDataParallel."""
    device = torch.device(cfg.device)
    pretrained = "" if cfg.pretrained == "none" else cfg.pretrained
    model, info = build_model(cfg.arch, cfg.num_classes, pretrained, cfg.checkpoint_blocks, aspp_dilations(cfg),
                              cfg.decoder, hrda=hrda_views(cfg))
    info["align_corners"] = cfg.align_corners  # evaluation must resample the logits as training did
    if cfg.resolution != 1:  # and see images at the size training saw
        info["resolution"] = cfg.resolution
    for module in model.modules():  # a speed choice of training only: the same result, the same weights
        if isinstance(module, DepthwiseConv3x3):
            module.form = cfg.aspp_depthwise
    rebuilder, pixel_head = build_rebuilder(cfg, model.encoder) if cfg.mrm and not cfg.source_only else (None, None)
    imagenet = None
    if cfg.fd_weight > 0:  # HRDA: on the context view, as the student's features it is compared with
        imagenet = (nn.Sequential(copy.deepcopy(model.encoder.downscale), copy.deepcopy(model.encoder.mit))
                    if isinstance(model, HRDAModel) else copy.deepcopy(model.encoder)).requires_grad_(False).eval()
    teacher = None if cfg.source_only else copy.deepcopy(model).requires_grad_(False)
    if teacher is not None:
        teacher_mode(teacher)
    if cfg.sync_bn and world > 1:  # the student only: the teacher and ImageNet copies keep per-process statistics
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format
    nets = SimpleNamespace(model=model, teacher=teacher, rebuilder=rebuilder, pixel_head=pixel_head, imagenet=imagenet,
                           info=info, device=device, memory_format=memory_format, rank=rank, world=world,
                           graph=not why_eager(cfg, world), ema_weight=0.0)
    for name in ("model", "teacher", "rebuilder", "pixel_head", "imagenet"):
        if getattr(nets, name) is not None:
            setattr(nets, name, getattr(nets, name).to(device, memory_format=memory_format))
    nets.optimizers = build_optimizers(cfg, nets)
    nets.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    nets.calls = step_calls(cfg, nets)
    return nets


def hrda_views(cfg):
    """HRDA's model settings from the config, or None for a single-scale model."""
    if not cfg.detail_crop:
        return None
    return dict(context_scale=cfg.context_scale, detail_crop=cfg.detail_crop, window=cfg.crop)


def build_rebuilder(cfg, encoder):
    """The Rebuilder (or Table 2(c)'s Masking), and the linear pixel head of Table 2(e)'s pixel objective. Table
    6's input-space masking needs neither (Masking draws its masks)."""
    if cfg.mrm_mode in ("mask-only", "input"):
        return Masking(cfg.rebuilder_grid, cfg.mask_ratio), None
    rebuilder = Rebuilder(encoder.out_channels, embed_dim=cfg.rebuilder_dim, depth=cfg.rebuilder_depth,
                          num_heads=cfg.rebuilder_heads, grid_size=cfg.rebuilder_grid, mask_ratio=cfg.mask_ratio,
                          scale_factors=rebuilder_scales(encoder))
    last_channels = rebuilder.in_channels[-1]
    return rebuilder, nn.Conv2d(last_channels, 3 * PIXELS_PER_CELL ** 2, 1) if cfg.mrm_objective == "pixel" else None


def rebuilder_scales(encoder):
    """The projectors' upsampling per level: level size / 16 at the paper's 512 crops (stride 8: 4)."""
    return [max(1, 32 // stride) for stride in encoder.out_strides]


def build_optimizers(cfg, nets):
    """[the network's optimizer] or, beside DACS's SGD, [SGD, the Rebuilder's own AdamW]. The paper gives the
    Rebuilder lr 2e-4 without its optimizer; MRM's code base is mmseg's, where every model trains with AdamW, so
    we chose AdamW for the Rebuilder in every recipe. Parameter groups: encoder at lr, decoder at lr * head_lr_mult,
    Rebuilder at its own lr; LayerNorms without weight decay when the recipe says so. Frozen parameters (DACS's
    BatchNorm) are left out. Under --recipe dacs the encoder's groups are split by DACS's slot counts. AdamW is
    capturable (its step count on the device) when the step runs as a CUDA graph."""
    def groups(module, lr, **options):
        params = [p for p in module.parameters() if p.requires_grad]
        norms = {p for m in module.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        no_decay = [p for p in params if cfg.norm_no_decay and p in norms]
        decay = [p for p in params if not (cfg.norm_no_decay and p in norms)]
        return [g for g in (dict(params=decay, initial_lr=lr, **options),
                            dict(params=no_decay, initial_lr=lr, **{**options, "weight_decay": 0.0})) if g["params"]]

    model, fused = nets.model, nets.device.type == "cuda"
    capturable = fused and nets.graph
    slotted = cfg.optimizer == "sgd" and cfg.recipe == "dacs" and cfg.dacs_param_slots == "official"
    if slotted:
        slots = dacs_parameter_slots(model.encoder.backbone)
        encoder = [dict(params=[p for p in slots if slots[p] == k], initial_lr=cfg.lr, slots=k)
                   for k in sorted(set(slots.values()))]
    else:
        encoder = groups(model.encoder, cfg.lr)
    network = encoder + groups(model.decoder, cfg.lr * cfg.head_lr_mult)
    rebuilder = [group for module in (nets.rebuilder, nets.pixel_head) if module is not None
                 for group in groups(module, cfg.rebuilder_lr, weight_decay=cfg.rebuilder_weight_decay)]
    if cfg.optimizer == "adamw":
        return [torch.optim.AdamW(network + rebuilder, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                  fused=fused, capturable=capturable)]
    if slotted:
        sgd = SlotSGD(network, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        sgd = torch.optim.SGD(network, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    return [sgd] + ([torch.optim.AdamW(rebuilder, lr=cfg.rebuilder_lr, betas=(0.9, 0.999), fused=fused,
                                       capturable=capturable)]
                    if rebuilder else [])


class SlotSGD(torch.optim.Optimizer):
    """Momentum SGD as DACS's optimizer really ran (DACS trainUDA.py, get_1x_lr_params_NOscale). DACS hands torch.optim.SGD a parameter
    list in which a tensor occurs several times (dacs_parameter_slots); torch 1.x then updated it once per
    occurrence, each time with its unchanged gradient and the ONE momentum buffer it kept per tensor. Here a
    parameter group holds tensors with the same count `slots` and applies that many updates in a row; with
    slots=1 this is torch's SGD (dampening 0, no Nesterov)."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, slots=1))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            lr = group["lr"]
            for _ in range(group["slots"]):
                steps = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, steps)
                if isinstance(lr, torch.Tensor):  # a device tensor under a CUDA graph: no host read
                    torch._foreach_sub_(params, torch._foreach_mul(buffers, lr))
                else:
                    torch._foreach_add_(params, buffers, alpha=-lr)


def dacs_parameter_slots(backbone):
    """How often DACS's get_1x_lr_params_NOscale yields each trainable backbone tensor: it walks modules() of
    conv1, bn1 and layer1-4 and yields the parameters of every module, so a tensor comes once per module that
    contains it (a conv in a bottleneck: layer, block, conv = 3; a downsample conv: 4; the stem conv: 1)."""
    slots = {}
    for top in (backbone.conv1, backbone.bn1, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        for module in top.modules():
            for p in module.parameters():
                if p.requires_grad:
                    slots[p] = slots.get(p, 0) + 1
    return slots


class SegModel(nn.Module):
    """encoder -> decoder; takes RGB images in [0, 1], returns logits at the decoder's resolution."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x):
        return self.decoder(self.encoder(x))


def build_model(arch, num_classes, pretrained="", checkpoint_blocks=False, aspp_dilations=(6, 12), decoder="",
                info=None, hrda=None):
    """(SegModel, info). info records what the weights decided (DeepLab style), the decoder and the classifier's
    dilations, HRDA's views, so that eval.py rebuilds the same network from a checkpoint without the pretrained
    file. hrda: dict(context_scale, detail_crop, window) builds HRDA's multi-resolution model on a MiT."""
    spec = ARCHS[arch]
    if pretrained and not os.path.isfile(pretrained):
        raise DataError(f"{pretrained}: pretrained weights file not found")
    try:
        if "mit" in spec:
            encoder = MiTEncoder(spec["mit"], checkpoint_blocks)
            if pretrained:
                load_mit_weights(encoder.backbone, pretrained)
            hrda = hrda or (info or {}).get("hrda")
            info = dict(arch=arch)
            if hrda:
                info["hrda"] = dict(hrda)
                return HRDAModel(encoder, num_classes, spec["head_dim"], **hrda), info
            decoder = DAFormerHead(encoder.out_channels, num_classes, embed_dim=spec["head_dim"])
        elif info is not None:
            encoder, decoder = build_deeplab_from_info(num_classes, info)
        else:
            encoder, decoder, info = build_deeplab(num_classes, pretrained or None, spec["layers"], spec["width"],
                                                   spec["styles"], aspp_dilations, decoder or spec["decoders"][0])
            info["arch"] = arch
    except ValueError as error:  # the loaders' one-line key/shape report
        raise DataError(str(error)) from None
    return SegModel(encoder, decoder), info


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


def load_state_file(path):
    """{name: tensor} from a .pth file, unwrapped from a 'state_dict' or 'model' entry. Weights files are
    untrusted input: torch.load with weights_only; any other content is one ValueError line naming the file."""
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        raise ValueError(f'{path}: not a readable PyTorch weights file ({one_line(error)})') from None
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


def build_deeplab_from_info(num_classes, info):
    if info['decoder'] == 'deeplabv3plus':
        encoder = ResNetEncoder(tuple(info['layers']), info['width'], info['style'], with_layer1=True)
        return encoder, DeepLabV3PlusHead(encoder.out_channels, num_classes)
    encoder = ResNetEncoder(tuple(info['layers']), info['width'], info['style'])
    decoder = ASPPClassifier(encoder.out_channels, num_classes, tuple(info['aspp_dilations']),
                             zero_bias=info['style'] == 'v1c')
    return encoder, decoder


def build_deeplab(num_classes, pretrained=None, layers=(3, 4, 23, 3), width=64, styles=('caffe', 'torchvision'),
                  aspp_dilations=(6, 12), decoder='deeplabv2'):
    """Returns (encoder, decoder, info); info rebuilds the same architecture without the file. styles: those the
    architecture takes; the file's keys choose among them (no file: the first). decoder: 'deeplabv2' (the ASPP
    classifier) or 'deeplabv3plus'."""
    style, sd = styles[0], None
    if pretrained is not None:
        sd = read_pretrained(pretrained)
        style = detect_style(sd, pretrained)
        if style not in styles:
            raise ValueError(f"{pretrained}: holds {style}-style ResNet weights; this architecture takes "
                             f"{' or '.join(styles)} (--arch dlv2 for caffe/torchvision, dlv2-v1c for v1c)")
    info = {'arch': 'dlv2', 'layers': list(layers), 'width': width, 'style': style,
            'aspp_dilations': list(aspp_dilations), 'decoder': decoder}
    encoder, decoder = build_deeplab_from_info(num_classes, info)
    if sd is not None:
        load_backbone_state(encoder.backbone, sd, pretrained)
    return encoder, decoder, info


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
    return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)


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
                    x = checkpoint(blk, x, H, W, use_reentrant=False)
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
            e = tokens_to_map(embed(f.flatten(2).transpose(1, 2)), H, W)
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
    """mmseg's slide windows of `side` at `stride` over height x width, the last row and column moved inside."""
    rows = max(height - side + stride - 1, 0) // stride + 1
    cols = max(width - side + stride - 1, 0) // stride + 1
    return [(max(min(r * stride + side, height) - side, 0), max(min(c * stride + side, width) - side, 0))
            for r in range(rows) for c in range(cols)]


def paste_mean(windows, boxes, side, size, stride=1):
    """Window logits (K*B, C, side/stride, side/stride), window after window, pasted at boxes / stride into a
    (B, C, *size) map and averaged where windows overlap; 0 where none lies (HRDAHead.decode_hr)."""
    n = side // stride
    total = windows.new_zeros(windows.shape[0] // len(boxes), windows.shape[1], *size)
    count = windows.new_zeros(1, 1, *size)
    for window, (top, left) in zip(windows.chunk(len(boxes)), boxes):
        top, left = top // stride, left // stride
        total = total + F.pad(window, (left, size[1] - left - n, top, size[0] - top - n))
        count[..., top:top + n, left:left + n] += 1
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
        """Inference views: the detail windows slide over the crop at half their side, one encoder batch."""
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

    def __init__(self, encoder, num_classes, embed_dim, context_scale, detail_crop, window):
        super().__init__(HRDAEncoder(encoder, context_scale, detail_crop),
                         HRDAHead(encoder.out_channels, num_classes, embed_dim, context_scale))
        self.window = window

    def encode_decode(self, x):
        """The whole crop as context, the detail windows sliding over it; logits at x's size."""
        fused = self.decoder(self.encoder.slide(x)).fused
        return F.interpolate(fused, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x):
        height, width = x.shape[-2:]
        if not self.window or (height <= self.window and width <= self.window):
            return self.encode_decode(x)
        boxes = slide_boxes(height, width, self.window, self.window // 2)
        windows = torch.cat([x[..., t:t + self.window, l:l + self.window] for t, l in boxes])
        return paste_mean(self.encode_decode(windows), boxes, self.window, (height, width))


# ============================================================================= appendix: data
# Datasets as the official loaders read them: label tables, folder layouts, decoding, resizing, the training
# batches (a pure function of seed and iteration), rare-class statistics, fake datasets for tests.


# Cityscapes label ids of the 19 evaluated classes, in train-id order (cityscapesscripts labels.py)
CITYSCAPES_ID_TO_TRAIN = np.full(256, 255, dtype=np.uint8)


CITYSCAPES_ID_TO_TRAIN[[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]] = np.arange(19)


# SYNTHIA ids are stored in 16 bits; ids of classes SYNTHIA lacks (16 terrain, 18 truck, 20 train) stay 255
SYNTHIA_ID_TO_TRAIN = np.full(65536, 255, dtype=np.uint8)


for _raw, _train in {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13,
                     19: 15, 12: 17, 11: 18}.items():
    SYNTHIA_ID_TO_TRAIN[_raw] = _train


# Training sizes (w, h). DACS resizes to exactly this size with PIL (GTA and SYNTHIA bicubic, Cityscapes
# bilinear); mmseg keeps the aspect ratio to fit it (a 1914x1052 GTA image becomes 1280x704).
DATASETS = {'gta': dict(size=(1280, 720), dacs_filter=Image.Resampling.BICUBIC),
            'cityscapes': dict(size=(1024, 512), dacs_filter=Image.Resampling.BILINEAR),
            'synthia': dict(size=(1280, 760), dacs_filter=Image.Resampling.BICUBIC)}


# folder discovery. Under ROOT: image and label folders; name patterns are regexes over the path relative
# to the folder whose group 1 pairs an image with its label; 'naming' is what error messages show.
_CITY = r'(([a-z][\w-]*)/\2_\d{6}_\d{6})'


_LAYOUT = {
    'gta': dict(images='gta/images', labels='gta/labels', image_re=r'(\d{5})\.png', label_re=r'(\d{5})\.png',
                naming=('NNNNN.png', 'NNNNN.png'),
                skip_re=r'\d{5}_labelTrainIds\.png'),  # written by DAFormer's converter; we map ids on the fly
    'synthia': dict(images='synthia/RGB', labels='synthia/GT/LABELS', image_re=r'(\d{7})\.png',
                    label_re=r'(\d{7})\.png', naming=('NNNNNNN.png', 'NNNNNNN.png'),
                    skip_re=r'\d{7}_labelTrainIds\.png'),
    'cityscapes': dict(images='cityscapes/leftImg8bit/{split}', labels='cityscapes/gtFine/{split}',
                       image_re=_CITY + r'_leftImg8bit\.png', label_re=_CITY + r'_gtFine_labelIds\.png',
                       naming=('CITY/CITY_NNNNNN_NNNNNN_leftImg8bit.png',
                               'CITY/CITY_NNNNNN_NNNNNN_gtFine_labelIds.png'),
                       skip_re=r'[^/]+/[^/]+_gtFine_(color|instanceIds|labelTrainIds)\.png'),
}


class Domain:
    """One dataset, indexable: load(i) -> (uint8 HxWx3 RGB image, uint8 HxW train-id label), already
    resized as `framework` resizes ("dacs" or "mmseg", see resize_pair) to DATASETS' size times `resolution`.
    Folder datasets read files; the toy domains draw scene i (as drawn, whatever the resolution)."""

    def __init__(self, name, root="data", split="train", seed=0, framework="mmseg", resolution=1):
        self.name = name
        if name.startswith("toy-"):
            self.style = name[4:]
            self.count = TOY_SIZES[split]
            self.seed = (seed, 0 if split == "train" else 1, 0 if self.style == "source" else 1)
        else:
            self.pairs = find_pairs(name, root, split)
            self.count = len(self.pairs)
            self.size = tuple(side * resolution for side in DATASETS[name]["size"])
            self.dacs_filter = DATASETS[name]["dacs_filter"] if framework == "dacs" else None

    def __len__(self):
        return self.count

    def load(self, i, full_label=False, with_label=True):
        """full_label: keep the label at its original size (the mmseg evaluation protocol). with_label=False: the
        label is all ignore (255), not read."""
        if self.name.startswith("toy-"):
            return make_toy_scene(np.random.default_rng([*self.seed, i]), self.style)
        image = read_image(self.pairs[i][0])
        if not with_label:
            return resize_pair(image, np.full(image.shape[:2], 255, np.uint8), self.size, self.dacs_filter)
        label = self.full_label(i)
        (h, w), (lh, lw) = image.shape[:2], label.shape
        # GTA's few documented image/label size mismatches are a few pixels; resize_pair gives the label the
        # image's size
        if (h, w) != (lh, lw) and not (self.name == "gta" and abs(lh - h) <= 0.05 * h and abs(lw - w) <= 0.05 * w):
            raise BadLabel(self.pairs[i][1], self.name, f"{lw}x{lh} pixels, its image {self.pairs[i][0]} {w}x{h}")
        return resize_pair(image, label, self.size, self.dacs_filter, resize_label=not full_label)

    def full_label(self, i):
        return self.load(i)[1] if self.name.startswith("toy-") else read_label(self.pairs[i][1], self.name)


class TrainBatches(torch.utils.data.Dataset):
    """Item `it` is the whole batch of iteration `it`, a pure function of (seed, it) (and of the rank under
    torchrun): loader workers need no shared state, and a resumed run reads exactly the batches it would have read."""

    def __init__(self, cfg, source, target, rcs=None, rank=0, world=1):
        self.cfg, self.source, self.target, self.rcs = cfg, source, target, rcs
        self.stream = [rank] if world > 1 else []  # under torchrun each process draws its own batch
        self.margins = pseudo_margins(cfg)

    def __len__(self):
        return self.cfg.iters

    def __getitem__(self, iteration):
        """The batch, with the corrupt files skipped on the way and the label warnings; a data error as
        dict(error=message): raised in a loader worker, it would reach the user wrapped in the worker's traceback."""
        rng = np.random.default_rng([self.cfg.seed, iteration, *self.stream])
        skipped = []
        try:
            source = [self.sample(self.source, rng, skipped, is_source=True) for _ in range(self.cfg.batch_size)]
            target = [self.sample(self.target, rng, skipped) for _ in range(self.cfg.batch_size)]
        except DataError as error:
            return dict(error=str(error))
        notes = LABEL_NOTES[:]
        LABEL_NOTES.clear()
        batch = dict(source_image=torch.from_numpy(np.stack([s[0] for s in source])).permute(0, 3, 1, 2),
                     source_label=torch.from_numpy(np.stack([s[1] for s in source])),
                     target_image=torch.from_numpy(np.stack([t[0] for t in target])).permute(0, 3, 1, 2),
                     skipped=skipped, notes=notes)
        if self.margins:  # the margin mask went through crop and flip as a label: 1 inside, 0 margin or padding
            batch["target_valid"] = torch.from_numpy(np.stack([t[1] == 1 for t in target]).astype(np.uint8))
        return batch

    def sample(self, domain, rng, skipped, is_source=False):
        """Pick an image (rare-class sampling on the source when on) and run the pipeline (crop, flip) on it. A
        corrupt file is recorded and replaced by another draw; the training loop decides when that is too many."""
        for _ in range(self.cfg.max_skips + 1):
            rare_class, index = (rcs_pick(rng, *self.rcs) if is_source and self.rcs
                                 else (None, int(rng.integers(len(domain)))))
            try:
                # target labels are never used: not read
                image, label = domain.load(index) if is_source else domain.load(index, with_label=False)
            except CorruptFile as error:
                skipped.append(str(error))
                continue
            if not is_source and self.margins:
                label = margin_mask(image.shape[:2], self.margins)
            sample = self.pipeline(image, label, rng, is_source)
            if rare_class is not None:  # DAFormer re-runs the pipeline up to 10 more times, keeping the last
                for _ in range(10):
                    if crop_has_enough(sample[1], rare_class, self.cfg.rcs_min_pixels * self.cfg.rcs_min_crop_ratio):
                        break
                    sample = self.pipeline(image, label, rng, is_source)
            return sample
        raise DataError(f"{len(skipped)} corrupt files in a row (more than --max-skips {self.cfg.max_skips}), "
                        f"last: {skipped[-1]}")

    def pipeline(self, image, label, rng, is_source):
        """Random crop, then flip. mmseg's RandomCrop checks up to 10 crops for no class covering cat_max_ratio
        or more, drawing a new one after each failure and keeping the last unchecked (source only here: target
        labels are never read)."""
        if self.cfg.crop:
            size = (self.cfg.crop, self.cfg.crop)
            image_crop, label_crop = random_crop(image, label, size, rng)
            if is_source and self.cfg.cat_max_ratio < 1:
                for _ in range(10):
                    counts = np.bincount(label_crop[label_crop != 255], minlength=256)
                    if counts.max(initial=0) < self.cfg.cat_max_ratio * counts.sum():
                        break
                    image_crop, label_crop = random_crop(image, label, size, rng)
            image, label = image_crop, label_crop
        if self.cfg.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


def pseudo_margins(cfg):
    """--pseudo-margins as (top, bottom, left, right), or None when all are 0."""
    margins = tuple(int(m) for m in cfg.pseudo_margins.split(","))
    return margins if any(margins) else None


def margin_mask(size, margins):
    """HRDA's crop_pseudo_margins (lhoyer/HRDA mmseg/datasets/cityscapes.py): 1, with 0 on the margins of an
    image of `size` (h, w); made on the whole image before crop and flip, which it follows as a label does."""
    (top, bottom, left, right), mask = margins, np.ones(size, np.uint8)
    mask[:top], mask[size[0] - bottom:], mask[:, :left], mask[:, size[1] - right:] = 0, 0, 0, 0
    return mask


def make_loader(cfg, dataset, start_iteration):
    # Its own generator: creating the loader must not draw from the global RNG, or a resumed run
    # (which creates it at another point of the RNG stream) would diverge from a straight one.
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start_iteration, cfg.iters), num_workers=cfg.workers,
        pin_memory=cfg.device == "cuda", persistent_workers=cfg.workers > 0, worker_init_fn=ignore_stop_signals,
        prefetch_factor=4 if cfg.workers else None, generator=torch.Generator().manual_seed(cfg.seed))


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGINT and SIGTERM (sent to the whole process group by Ctrl-C or a cluster) to the
    main process, which finishes the iteration and checkpoints."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def rcs_statistics(cfg, source, say=print):
    """Per-class pixel counts of every source label, computed once and cached beside the data (or in the work
    dir when the data folder is read-only), keyed by the label files' sizes and modification times: a changed
    label or a corrupt cache is counted anew. Returns (class probabilities, images per class)."""
    cache_name = f"rcs_stats_{source.name}_{len(source)}.json"
    candidates = [os.path.join(cfg.data_root, source.name, cache_name), os.path.join(cfg.work_dir, cache_name)]
    stats = [os.stat(label) for _, label in getattr(source, "pairs", [])]  # toy scenes: no files
    key = zlib.crc32(json.dumps([(s.st_size, s.st_mtime_ns) for s in stats]).encode())
    counts = None
    for path in candidates:
        try:
            cached = json.load(open(path))
            if cached["key"] == key and len(cached["counts"]) == len(source):
                counts = cached["counts"]
                break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if counts is None:
        say(f"rare class sampling: counting classes in {len(source)} source labels...", flush=True)
        counts = [np.bincount(source.full_label(i).ravel(), minlength=256)[:cfg.num_classes].tolist()
                  for i in range(len(source))]
        LABEL_NOTES.clear()  # the loader reports them, once per file
        for path in candidates:
            if os.path.isdir(os.path.dirname(path)):
                try:
                    atomic_write(path, lambda f: f.write(json.dumps(dict(key=key, counts=counts)).encode()))
                    break
                except DataError:
                    continue
    counts = np.array(counts)
    images_per_class = [np.flatnonzero(counts[:, c] > cfg.rcs_min_pixels).tolist() for c in range(cfg.num_classes)]
    if not any(images_per_class):
        raise DataError(f"rare class sampling: no {source.name} image has more than --rcs-min-pixels "
                        f"{cfg.rcs_min_pixels} pixels of any class")
    return rcs_class_probabilities(counts.sum(axis=0), cfg.rcs_temperature), images_per_class


def _list_pngs(folder, pattern, skip, naming):
    """Map pairing key -> path for every .png under folder (listing only, nothing is decoded)."""
    if not os.path.isdir(folder):
        raise DataError(f'{folder}: folder not found, expected files named {naming}')
    found, seen = {}, set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):  # data folders are often symlinks
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in seen:  # a symlink loop: each folder is listed once
            dirnames.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        for name in filenames:
            if not name.endswith('.png'):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder).replace(os.sep, '/')
            match = re.fullmatch(pattern, rel)
            if match:
                found[match.group(1)] = path
            elif not (skip and re.fullmatch(skip, rel)):
                raise DataError(f'{path}: unexpected file name, expected {naming} in {folder}')
    return found


def find_pairs(dataset, root, split):
    """Sorted (image, label) paths of dataset under root (the folder holding gta/, synthia/, cityscapes/).
    gta and synthia have only a 'train' split holding all files; cityscapes has 'train' and 'val'."""
    if dataset not in _LAYOUT:
        raise ValueError(f'unknown dataset {dataset!r}, expected one of {sorted(_LAYOUT)}')
    if split not in (('train', 'val') if dataset == 'cityscapes' else ('train',)):
        raise ValueError(f'{dataset} has no split {split!r}')
    layout = _LAYOUT[dataset]
    image_naming, label_naming = layout['naming']
    image_dir = os.path.join(root, layout['images'].format(split=split))
    label_dir = os.path.join(root, layout['labels'].format(split=split))
    images = _list_pngs(image_dir, layout['image_re'], None, image_naming)
    if not images:
        raise DataError(f'{image_dir}: no images found, expected files named {image_naming}')
    labels = _list_pngs(label_dir, layout['label_re'], layout['skip_re'], label_naming)
    for have, want, folder, what in ((images, labels, label_dir, 'labels for images'),
                                     (labels, images, image_dir, 'images for labels')):
        missing = sorted(set(have) - set(want))
        if missing:
            raise DataError(f'{folder}: missing {len(missing)} {what}, first: {have[missing[0]]}')
    return [(images[key], labels[key]) for key in sorted(images)]


# reading
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _pil_array(source, path, mode=None):
    """Decode an image with PIL; any failure on a damaged file becomes CorruptFile naming path."""
    try:
        with Image.open(source) as im:
            return np.array(im.convert(mode) if mode else im)
    except Exception as e:  # PIL raises many different exception types on damaged files
        raise CorruptFile(path, e) from e


def _png(width, height, depth, color_type, scanlines, level=6):
    """Bytes of a non-interlaced PNG from its filtered scanlines (each row starts with its filter byte)."""
    def chunk(tag, body):
        return struct.pack('>I', len(body)) + tag + body + struct.pack('>I', zlib.crc32(body, zlib.crc32(tag)))
    header = struct.pack('>IIBBBBB', width, height, depth, color_type, 0, 0, 0)
    return (_PNG_SIGNATURE + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(scanlines, level))
            + chunk(b'IEND', b''))


def _first_channel(path):
    """First channel of a label PNG at full depth: torchvision decodes 16-bit PNGs (SYNTHIA's labels) as
    uint16, where PIL keeps only the high byte of 16-bit colour."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image IO in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_png(read_file(path))[0].numpy()
    except Exception as e:  # a RuntimeError from libpng, or an OSError
        raise CorruptFile(path, e) from e


def read_image(path):
    """HxWx3 uint8 RGB. PNGs are decoded by torchvision (the same pixels as PIL, faster), others by PIL."""
    if not path.lower().endswith('.png'):
        return _pil_array(path, path, 'RGB')
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image IO in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_png(read_file(path), mode=ImageReadMode.RGB)
    except Exception as e:  # a RuntimeError from libpng, or an OSError
        raise CorruptFile(path, e) from e
    return image.permute(1, 2, 0).numpy() if image.dtype == torch.uint8 else _pil_array(path, path, 'RGB')


# What a label file must be, per dataset: PNG colour types (0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA), bit
# depths and the raw ids it may hold (Cityscapes labelIds 0-33, and 255 where cityscapesscripts wrote id -1).
LABEL_FORMATS = {'gta': dict(color_types=(0, 3), depths=(8,), ids=(*range(34), 255)),
                 'cityscapes': dict(color_types=(0, 3), depths=(8,), ids=(*range(34), 255)),
                 'synthia': dict(color_types=(0, 2, 4, 6), depths=(8, 16), ids=tuple(range(23)))}


class BadLabel(CorruptFile):
    """A label file that decodes but is not what its dataset writes; skipped in training like a corrupt file."""

    def __init__(self, path, dataset, reason):
        self.path = path
        DataError.__init__(self, f'{path}: not a {dataset} label file ({reason})')


def check_label_header(path, dataset):
    """The PNG signature and IHDR (bit depth, colour type) of a label, read without decoding it."""
    try:
        with open(path, 'rb') as f:
            head = f.read(26)
    except OSError as e:
        raise CorruptFile(path, e) from e
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b'IHDR':
        kind = 'a JPEG' if head[:3] == b'\xff\xd8\xff' else 'not a PNG'
        raise BadLabel(path, dataset, f'{kind}: its first bytes are {head[:8]!r}')
    depth, color_type = head[24], head[25]
    format_ = LABEL_FORMATS[dataset]
    if depth not in format_['depths'] or color_type not in format_['color_types']:
        raise BadLabel(path, dataset, f'PNG of bit depth {depth} and colour type {color_type}; expected depth '
                                      f"{' or '.join(map(str, format_['depths']))}, colour type "
                                      f"{' or '.join(map(str, format_['color_types']))}")


LABEL_NOTES = []  # read_label's reports of unknown ids in this process, taken by whoever shows them


def check_label_ids(ids, path, dataset):
    """Raw ids outside the dataset's table: a label made mostly of them is refused (BadLabel); a few are read as
    ignore (255), as the id tables map them, and reported in LABEL_NOTES."""
    counts = np.bincount(ids.ravel())
    present = np.flatnonzero(counts)
    unknown = np.setdiff1d(present, LABEL_FORMATS[dataset]['ids'])
    if not unknown.size:
        return
    share = counts[unknown].sum() / ids.size
    reason = (f"ids {unknown[:8].tolist()}{' ...' if unknown.size > 8 else ''} are not {dataset} label ids, on "
              f"{share:.1%} of its pixels" + (" (channels in another order?)" if dataset == 'synthia' else ''))
    if share > 0.5:
        raise BadLabel(path, dataset, reason)
    LABEL_NOTES.append(f'{path}: {reason}; read as ignore (255)')


def read_label(path, dataset):
    """HxW uint8 train ids (255 = ignore), mapped from the dataset's raw label ids, after checking that the file
    is a label of that dataset (check_label_header, check_label_ids)."""
    check_label_header(path, dataset)
    if dataset == 'synthia':
        ids = _first_channel(path)
        check_label_ids(ids, path, dataset)
        return SYNTHIA_ID_TO_TRAIN[ids]
    ids = _pil_array(path, path)
    if ids.ndim != 2 or ids.dtype != np.uint8:
        raise BadLabel(path, dataset, f'expected an 8-bit single-channel PNG of Cityscapes label ids, got shape '
                                      f'{ids.shape} of {ids.dtype}')
    check_label_ids(ids, path, dataset)
    return CITYSCAPES_ID_TO_TRAIN[ids]


# geometry
def mmseg_rescale_size(width, height, size_wh):
    """mmcv.imrescale's size: the largest scale that fits the long side into max(size_wh) and the short side
    into min(size_wh), each side rounded."""
    scale = min(max(size_wh) / max(width, height), min(size_wh) / min(width, height))
    return int(width * scale + 0.5), int(height * scale + 0.5)


def resize_pair(image, label, size_wh, dacs_filter=None, resize_label=True):
    """Resize an image and its label (nearest) for training or evaluation; the label takes the image's new size,
    which also removes GTA's few image/label size mismatches. dacs_filter (a PIL filter): DACS, exactly size_wh
    with PIL (antialiased when shrinking). None: mmseg, keeping the aspect ratio, bilinear without antialiasing
    as OpenCV, with torchvision. resize_label=False keeps the full-size label (mmseg evaluation)."""
    if dacs_filter is not None:
        image = np.array(Image.fromarray(image).resize(size_wh, dacs_filter))
        if resize_label:
            label = np.array(Image.fromarray(label).resize(size_wh, Image.Resampling.NEAREST))
        return image, label
    width, height = mmseg_rescale_size(image.shape[1], image.shape[0], size_wh)
    image = TF.resize(torch.from_numpy(image).permute(2, 0, 1), [height, width],
                      TF.InterpolationMode.BILINEAR, antialias=False).permute(1, 2, 0).numpy()
    if resize_label:
        label = TF.resize(torch.from_numpy(label)[None], [height, width], TF.InterpolationMode.NEAREST)[0].numpy()
    return image, label


def random_crop(image, label, crop, rng):
    """A random crop (h, w) of an aligned pair; a smaller pair is first padded bottom/right (image 0,
    label 255) so the crop always has the requested size."""
    if image.shape[:2] != label.shape:
        raise ValueError(f'image {image.shape[:2]} and label {label.shape} differ in size')
    (h, w), (height, width) = crop, label.shape
    pad_h, pad_w = max(h - height, 0), max(w - width, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=255)
    y = rng.integers(0, label.shape[0] - h + 1)
    x = rng.integers(0, label.shape[1] - w + 1)
    return image[y:y + h, x:x + w], label[y:y + h, x:x + w]


def write_fake_dataset(root, dataset, n, size_wh, seed=0):
    """Write n random image/label pairs of dataset under root in the real layout and naming (cityscapes: n
    per split, alternating between two cities). Labels hold raw ids (incl. ids mapped to 255) in 8x8 blocks;
    SYNTHIA labels are 16-bit RGB with instance ids > 255 in channel 1. Images are the palette colour of each
    pixel's class plus noise, so a model can learn something. As in real GTA, the last GTA label (n > 1) is
    2 px wider than its image."""
    rng = np.random.default_rng(seed)
    width, height = size_wh
    if dataset == 'cityscapes':
        names = []
        for split, cities in (('train', ('aachen', 'bochum')), ('val', ('frankfurt', 'lindau'))):
            for i in range(n):
                stem = f'{cities[i % 2]}/{cities[i % 2]}_{i:06d}_000019'
                names.append((split, stem + '_leftImg8bit.png', stem + '_gtFine_labelIds.png'))
    elif dataset == 'gta':  # real GTA names start at 00001
        names = [('train', f'{i:05d}.png', f'{i:05d}.png') for i in range(1, n + 1)]
    else:  # real SYNTHIA names start at 0000000
        names = [('train', f'{i:07d}.png', f'{i:07d}.png') for i in range(n)]
    num_ids, table = (23, SYNTHIA_ID_TO_TRAIN) if dataset == 'synthia' else (34, CITYSCAPES_ID_TO_TRAIN)
    for k, (split, image_name, label_name) in enumerate(names):
        image_path = os.path.join(root, _LAYOUT[dataset]['images'].format(split=split), image_name)
        label_path = os.path.join(root, _LAYOUT[dataset]['labels'].format(split=split), label_name)
        os.makedirs(os.path.dirname(image_path), exist_ok=True)
        os.makedirs(os.path.dirname(label_path), exist_ok=True)
        label_width = width + 2 if dataset == 'gta' and n > 1 and k == n - 1 else width
        blocks = rng.integers(0, num_ids, size=(-(-height // 8), -(-label_width // 8)))
        ids = blocks.repeat(8, axis=0).repeat(8, axis=1)[:height, :label_width]
        train_ids = table[ids[:, :width]]
        colours = np.where(train_ids[..., None] < len(PALETTE), PALETTE[np.minimum(train_ids, len(PALETTE) - 1)], 0)
        image = colours + rng.integers(-20, 21, size=(height, width, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(image_path)
        if dataset != 'synthia':
            Image.fromarray(ids.astype(np.uint8)).save(label_path)
            continue
        channels = np.stack([ids, rng.integers(256, 4000, size=ids.shape), np.zeros_like(ids)], axis=-1)
        scanlines = channels.astype('>u2').view(np.uint8).reshape(height, -1)
        with open(label_path, 'wb') as f:  # PIL cannot write 16-bit RGB; each row gets filter byte 0 (none)
            f.write(_png(label_width, height, 16, 2, np.pad(scanlines, ((0, 0), (1, 0))).tobytes()))


# ============================================================================= appendix: checkpoints and evaluation
# Atomic writes, checkpoints and strict loading, resume, export, and the mIoU of the paper's protocol.


def one_line(error):
    """An exception as one short line (PyTorch's load errors span many)."""
    return ' '.join(f'{type(error).__name__}: {error}'.split())[:300]


def atomic_write(path, write):
    """Write to a temporary file, fsync, rename: a crash at any moment leaves the old file or the new. A write
    that fails (a full disk, an I/O error) removes the temporary file and is one DataError line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)[:160]
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 30:.2f} GiB free there"
        raise DataError(f"{path}: could not write it ({reason}); the previous {os.path.basename(path)}, if any, "
                        f"is intact") from None


def save_checkpoint(cfg, nets, iteration):
    """Rank 0 writes the checkpoint; under torchrun every process sends it its random state first (a
    collective: every rank calls this at the same iterations)."""
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state() if nets.device.type == "cuda" else None)
    rngs = [rng]
    if nets.world > 1:
        rngs = [None] * nets.world if nets.rank == 0 else None
        dist.gather_object(rng, rngs, dst=0)
    if nets.rank != 0:
        return
    state = dict(iteration=iteration, config=vars(cfg), arch=nets.info, model=nets.model.state_dict(),
                 teacher=nets.teacher.state_dict() if nets.teacher is not None else None,
                 rebuilder=nets.rebuilder.state_dict() if nets.rebuilder is not None else None,
                 pixel_head=nets.pixel_head.state_dict() if nets.pixel_head is not None else None,
                 optimizers=[optimizer.state_dict() for optimizer in nets.optimizers], scaler=nets.scaler.state_dict(),
                 world_size=nets.world, rng=rngs)
    atomic_write(os.path.join(cfg.work_dir, "checkpoint.pth"), lambda f: torch.save(state, f))


def load_checkpoint(path):
    """Checkpoints are untrusted input: tensors and plain containers only (weights_only)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(f"{path}: not a readable checkpoint ({one_line(error)})") from None


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


def load_model_state(model, state, path):
    """A checkpoint's segmentation model, strictly; a misfit (another architecture or class count) is a DataError."""
    try:
        strict_load(model, state, path, "this model (another architecture or number of classes?)")
    except ValueError as error:
        raise DataError(str(error)) from None


def resume(cfg, nets, state=None):
    """Restore nets and the random state from the work dir's checkpoint (read_resume_checkpoint's `state`);
    returns its iteration."""
    path = os.path.join(cfg.work_dir, "checkpoint.pth")
    state = read_resume_checkpoint(cfg) if state is None else state
    if state["arch"] != nets.info:
        raise DataError(f"{path}: checkpoint is {state['arch']}, this run builds {nets.info}")
    load_model_state(nets.model, state["model"], path)
    if nets.teacher is not None:
        nets.teacher.load_state_dict(state["teacher"])
    if nets.rebuilder is not None:
        nets.rebuilder.load_state_dict(state["rebuilder"])
    if nets.pixel_head is not None:
        nets.pixel_head.load_state_dict(state["pixel_head"])
    if len(state["optimizers"]) != len(nets.optimizers):
        raise DataError(f"{path}: checkpoint holds {len(state['optimizers'])} optimizer(s), this run builds "
                        f"{len(nets.optimizers)} (another --optimizer or --no-mrm?)")
    for optimizer, optimizer_state in zip(nets.optimizers, state["optimizers"]):
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # a CUDA graph's device-tensor lr comes back as a plain number
            group["lr"] = float(group["lr"])
    nets.scaler.load_state_dict(state["scaler"])
    if state["world_size"] != nets.world:
        raise DataError(f"{path}: written by {state['world_size']} process(es), this run has {nets.world}: each "
                        f"process's data and random state depend on its rank, so resume with as many processes")
    rng = state["rng"][nets.rank]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if nets.device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    return state["iteration"]


def export_model(path, model, info, num_classes):
    """Inference-only file: the segmentation model and how to build it; no Rebuilder, no optimiser."""
    state = dict(arch=info, num_classes=num_classes, model=model.state_dict())
    atomic_write(path, lambda f: torch.save(state, f))


@torch.no_grad()
def evaluate(model, domain, num_classes, device, align_corners, amp="off", protocol="mmseg", on_prediction=None,
             workers=0, say=None):
    """Confusion matrix over a labelled domain: the whole image at the training input size, logits
    resized bilinearly (with the align_corners the model was trained with) to the label (mmseg protocol:
    the full-resolution label; dacs: the label resized to the input size), argmax.
    on_prediction(i, image, prediction) sees every prediction; say (print) gets about ten progress lines."""
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    items = torch.utils.data.DataLoader(EvalImages(domain, protocol == "mmseg"), batch_size=None,
                                        num_workers=workers)
    autocast = torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                              enabled=amp != "off")
    start, every = time.perf_counter(), max(1, len(domain) // 10)
    for i, (image, label) in enumerate(items):
        if say is not None and i and i % every == 0:
            seconds = (time.perf_counter() - start) / i
            say(f"  evaluated {i}/{len(domain)} images, {seconds:.2f} s/image, ETA "
                f"{format_eta(seconds * (len(domain) - i))}", flush=True)
        x = image.to(device).permute(2, 0, 1)[None].float() / 255
        with autocast:
            logits = model(x)
        prediction = F.interpolate(logits.float(), size=label.shape, mode="bilinear",
                                   align_corners=align_corners).argmax(dim=1)[0]
        conf += confusion_matrix(prediction, label.to(device), num_classes)
        if on_prediction is not None:
            on_prediction(i, image.numpy(), prediction.to(torch.uint8).cpu().numpy())
    LABEL_NOTES.clear()  # unknown label ids are reported by training and --check-data --decode
    return conf


class EvalImages(torch.utils.data.Dataset):
    def __init__(self, domain, full_label):
        self.domain, self.full_label = domain, full_label

    def __len__(self):
        return len(self.domain)

    def __getitem__(self, i):
        image, label = self.domain.load(i, full_label=self.full_label)
        return torch.from_numpy(image), torch.from_numpy(label)


def miou_report(conf, eval_classes, class_names):
    """The per-class table (paper Table 1 order) for each class subset, and the first subset's mIoU."""
    ious = iou_per_class(conf.cpu())
    tables = [f"mIoU over {name} classes:\n{format_table(ious, ids, class_names)}"
              for name, ids in eval_classes.items()]
    first = next(iter(eval_classes.values()))
    return "\n".join(tables), float(np.nanmean(np.asarray(ious)[list(first)]) * 100)


# evaluation
def confusion_matrix(pred, label, num_classes, ignore_index=255):
    """int64 (num_classes, num_classes) pixel counts, rows = ground truth, columns = prediction."""
    label = torch.as_tensor(label)
    pred = torch.as_tensor(pred, device=label.device)
    if pred.shape != label.shape:
        raise ValueError(f'prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape')
    label, pred = label.reshape(-1).long(), pred.reshape(-1).long()
    keep = label != ignore_index
    label, pred = label[keep], pred[keep]
    # an out-of-range id would silently land in a neighbouring cell of the flattened matrix
    if ((label < 0) | (label >= num_classes) | (pred < 0) | (pred >= num_classes)).any():
        raise ValueError(f'labels and predictions must be in [0, {num_classes}) or {ignore_index}')
    return torch.bincount(label * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(conf):
    """float64 IoU per class; nan for a class absent from both ground truth and prediction."""
    conf = torch.as_tensor(conf).double()
    hits = conf.diag()
    return hits / (conf.sum(0) + conf.sum(1) - hits)


def format_table(ious, class_ids, names=CLASSES):
    """Two aligned rows like the paper's Table 1: class names + mIoU, then IoU * 100 (mIoU = nanmean over
    class_ids)."""
    ious = torch.as_tensor(ious, dtype=torch.float64).cpu().numpy() * 100
    class_ids = list(class_ids)
    header = [names[i] for i in class_ids] + ['mIoU']
    values = [f'{v:.1f}' for v in list(ious[class_ids]) + [np.nanmean(ious[class_ids])]]
    widths = [max(len(name), 5) for name in header]
    return '\n'.join(' | '.join(cell.rjust(width) for cell, width in zip(row, widths)) for row in (header, values))


# ============================================================================= appendix: debug grids
# What one iteration did, for the first image of its batch, as DAFormer's and MIC's debug images show it, plus
# MRM's view: the masked cells and what the decoder predicts from the rebuilt features.

def debug_panels(cfg, nets):
    """[(title, HxWx3 uint8)] of the last step's tensors (nets.seen, first image); the predictions are the
    student's after that step, in eval mode, on the step's own mixed image, MRM mask and MIC image."""
    seen = {key: value[:1] for key, value in nets.seen.items()}
    palette = np.concatenate([TASKS[cfg.task]["palette"], np.zeros((256 - len(TASKS[cfg.task]["palette"]), 3),
                                                                     np.uint8)])  # ignore (255) is black

    def image(x):
        return (x[0].float().clamp(0, 1).permute(1, 2, 0) * 255).round().byte().cpu().numpy()

    def labels(y):
        return palette[y[0].cpu().numpy().astype(np.uint8)]

    def grey(w):
        return np.repeat((w[0].float().clamp(0, 1) * 255).round().byte().cpu().numpy()[..., None], 3, axis=-1)

    def predict(logits, size):
        logits = logits.fused if isinstance(logits, HRDAOutput) else logits
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=cfg.align_corners).argmax(1)

    x_m, y_m = seen["mixed_image"], seen["mixed_label"]
    size = x_m.shape[-2:]
    panels = [("source image", image(seen["source_image"])), ("source label", labels(seen["source_label"])),
              ("target image", image(seen["target_image"])), ("pseudo-label", labels(seen["pseudo_label"])),
              ("pseudo-label weight", grey(seen["pixel_weight"])), ("ClassMix mask", grey(seen["mix"].float())),
              ("mixed image", image(x_m)), ("mixed target", labels(y_m))]
    if "detail_window" in seen:
        (top, left, side), = seen["detail_window"]
        outside = np.full(image(x_m).shape[:2] + (1,), 0.3)
        outside[top:top + side, left:left + side] = 1
        panels.append((f"HRDA detail window ({side}x{side})", (image(x_m) * outside).round().astype(np.uint8)))
    model, training = nets.model, nets.model.training
    model.eval()
    try:
        with torch.no_grad():
            # HRDA: the inference views (detail windows sliding over the crop), which draw no random window
            features = model.encoder.slide(x_m) if isinstance(model, HRDAModel) else model.encoder(x_m)
            clean = predict(model.decoder(features), size)
            panels.append(("prediction on the mixed image", labels(clean)))
            if "mrm_input" in seen:
                panels += [("MRM masked input", image(seen["mrm_input"])),
                           ("prediction on the masked input", labels(predict(model(seen["mrm_input"]), size)))]
            elif "mrm_mask" in seen:
                mask = seen["mrm_mask"]
                dark = F.interpolate(mask.float(), size=size, mode="nearest")[0, 0].cpu().numpy()[..., None]
                if isinstance(features, Views):  # the context's mask, and on every detail window the same
                    mask = mask.repeat(1 + len(features.boxes), 1, 1, 1)
                rebuilt = predict(model.decoder(rebuild(nets.rebuilder, features, mask)), size)
                differs = rebuilt != clean
                wrong = (rebuilt != y_m) & (y_m != 255)
                panels += [(f"MRM mask ({mask.shape[-1]}x{mask.shape[-1]})",
                            (image(x_m) * (1 - 0.7 * dark)).round().astype(np.uint8)),
                           ("prediction from rebuilt features", labels(rebuilt)),
                           ("rebuilt differs from clean", grey(differs.float())),
                           ("rebuilt differs from target", grey(wrong.float()))]
            if "mic_image" in seen:
                panels += [("MIC masked image", image(seen["mic_image"])),
                           ("MIC prediction", labels(predict(model(seen["mic_image"]), size)))]
    finally:
        model.train(training)
    return panels


def write_debug_grid(cfg, nets, path, columns=4, width=256):
    """The panels, each scaled to `width` pixels wide under its title, `columns` a row."""
    panels = debug_panels(cfg, nets)
    h, w = panels[0][1].shape[:2]
    scale = width / w
    cell_w, cell_h, title = round(w * scale), round(h * scale), 14
    rows = -(-len(panels) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + title)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (name, picture) in enumerate(panels):
        x, y = (k % columns) * cell_w, (k // columns) * (cell_h + title)
        draw.text((x + 2, y + 1), name, fill="black")
        grid.paste(Image.fromarray(picture).resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y + title))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: grid.save(f, format="PNG"))
    return panels


# ============================================================================= appendix: run safety
# A work dir belongs to one run: checked before anything is written, locked while the run lives, resumed only
# with the experiment it holds; signals and full disks end a run with a checkpoint or an intact one.

RUN_FILES = ("checkpoint.pth", "config.json", "log.jsonl", "model.pth", "curves.png", "debug")
# Settings that may differ on --resume (they do not change what is computed); every other flag must match.
RESUME_MAY_CHANGE = ("data_root", "work_dir", "workers", "log_every", "val_every", "checkpoint_every", "stop_after",
                     "resume", "overwrite", "max_skips", "device", "compile", "cuda_graph", "channels_last",
                     "checkpoint_blocks", "aspp_depthwise", "debug_every")
CHECKPOINT_KEYS = {"iteration", "config", "arch", "model", "optimizers", "scaler", "rng", "world_size"}


def check_work_dir(cfg):
    """Refuse, before writing anything, a work dir that cannot hold this run: a file, under a file, not
    writable, or holding another run (unless --resume or --overwrite)."""
    path = cfg.work_dir
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--work-dir {path}: is a file, not a folder")
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"--work-dir {path}: {parent} is a file, not a folder")
    if not os.access(parent or ".", os.W_OK | os.X_OK):
        raise ConfigError(f"--work-dir {path}: {parent or '.'} is not writable")
    held = [name for name in RUN_FILES if os.path.exists(os.path.join(path, name))]
    if held and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"--work-dir {path} holds a run ({', '.join(held)}): pass --resume to continue it, "
                          f"--overwrite to start it over, or another --work-dir")


def read_resume_checkpoint(cfg):
    """The work dir's checkpoint, after checking that it is a training checkpoint of the same experiment."""
    path = os.path.join(cfg.work_dir, "checkpoint.pth")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise DataError(f"{path}: not a training checkpoint of train_dacs_mrm.py (an export or another file?); "
                        f"--resume continues from the checkpoint.pth a run wrote")
    saved = state["config"]
    differences = [f"--{key.replace('_', '-')} {saved[key]} (now {getattr(cfg, key)})" for key in DEFAULTS
                   if key not in RESUME_MAY_CHANGE and key in saved and saved[key] != getattr(cfg, key)]
    if differences:
        raise ConfigError(f"{path}: checkpoint is of another experiment, run with " + ", ".join(differences) +
                          ": resume with the same settings, or start a new --work-dir")
    if state["iteration"] > cfg.iters:
        raise ConfigError(f"{path} is at iteration {state['iteration']}, past --iters {cfg.iters}")
    return state


def resume_changes(cfg, state):
    """The settings a resumed run changes, for its header."""
    saved = state["config"]
    return [f"--{key.replace('_', '-')} {saved[key]} -> {getattr(cfg, key)}" for key in RESUME_MAY_CHANGE
            if key in saved and key not in ("resume", "overwrite") and saved[key] != getattr(cfg, key)]


class WorkDirLock:
    """work_dir/.lock, holding this process's pid and host while the run lives. A second run in the same dir
    stops in one line; a lock left by a process that died is taken over (saying so)."""

    def __init__(self, work_dir, say=print):
        self.path, self.say = os.path.join(work_dir, ".lock"), say

    def __enter__(self):
        me = f"{os.getpid()} {platform.node()}"
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue
                pid, host = owner
                if host != platform.node() or pid_alive(pid):
                    raise DataError(f"{os.path.dirname(self.path)}: in use by another run (process {pid} on {host}); "
                                    f"remove {self.path} if that run is gone")
                self.say(f"taking over the lock of process {pid}, which is gone", flush=True)
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return self
        raise DataError(f"{self.path}: cannot take the lock")

    def owner(self):
        try:
            pid, host = open(self.path).read().split(" ", 1)
            return int(pid), host
        except (OSError, ValueError):
            return None if not os.path.exists(self.path) else (0, platform.node())

    def __exit__(self, *exc):
        if self.owner() == (os.getpid(), platform.node()):
            os.remove(self.path)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def start_work_dir(cfg, state, say):
    """Under the lock: remove what interrupted writes left, start over (--overwrite) or cut the log back to the
    checkpoint's iteration (--resume), and write config.json."""
    for name in os.listdir(cfg.work_dir):
        if re.fullmatch(r".+\.tmp\d+", name):
            os.remove(os.path.join(cfg.work_dir, name))
    if state is None:
        removed = [name for name in RUN_FILES if os.path.exists(os.path.join(cfg.work_dir, name))]
        for name in removed:
            path = os.path.join(cfg.work_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if removed:
            say(f"--overwrite: removed {', '.join(removed)} of the previous run in {cfg.work_dir}", flush=True)
    else:
        log = os.path.join(cfg.work_dir, "log.jsonl")
        if os.path.exists(log):
            kept = []
            for line in open(log):
                try:
                    if json.loads(line)["iteration"] <= state["iteration"]:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill
            atomic_write(log, lambda f: f.write("".join(kept).encode()))
    atomic_write(os.path.join(cfg.work_dir, "config.json"), lambda f: f.write(config_json(cfg).encode()))


class Interrupted(Exception):
    def __init__(self, signum, iteration):
        self.signum, self.iteration = signum, iteration
        super().__init__(f"interrupted at iteration {iteration}: checkpoint written; continue with --resume")


class StopSignals:
    """SIGINT and SIGTERM during the loop: the first asks it to stop after the current iteration with a
    checkpoint; a second SIGINT stops at once (KeyboardInterrupt, without a traceback in main)."""

    def __init__(self):
        self.signum = 0

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self, nets):
        """The signal any process received (one all-reduce under torchrun, so that all stop together), or 0."""
        if nets.world == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=nets.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


# ============================================================================= appendix: several processes (torchrun)
# One run on N processes (GPUs, or CPU processes with gloo) started by torchrun. Each process trains on its own
# batch; DistributedDataParallel averages the gradients, so every process takes the same optimiser step from the
# same weights: the students stay identical, and so do the EMA teachers computed from them. Rank 0 alone logs,
# validates and writes checkpoints.

class Stopped(RuntimeError):
    """SIGTERM: torchrun stops this process because another one failed, or the job was cancelled."""


def on_sigterm(signum, frame):
    raise Stopped("stopped by torchrun (another process of this run failed, or the job was cancelled)")


def lost_a_process(error):
    """Whether `error` is how a collective fails when another process of the run died (NCCL: DistError;
    gloo: a RuntimeError from its transport), or torchrun's SIGTERM."""
    return dist.is_initialized() and (isinstance(error, (Stopped, dist.DistError)) or "gloo" in str(error))


def init_distributed(cfg):
    """(rank, world size) of this process; (0, 1) when not started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # long enough for rank 0's validation and checkpoint, during which the others wait in a collective
    dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", timeout=timedelta(hours=2))
    signal.signal(signal.SIGTERM, on_sigterm)
    return dist.get_rank(), world


def step_calls(cfg, nets):
    """How the training step calls the student's encoder and decoder, the Rebuilder and the pixel head: the
    modules themselves, or under torchrun each wrapped in DistributedDataParallel (Masking has no parameters to
    wrap) and with --compile encoder and decoder compiled. The modules stay nets.model, nets.rebuilder and
    nets.pixel_head (what checkpoints, the EMA and evaluation read)."""
    def prepare(module, compile_it=False):
        if module is None:
            return None
        if nets.world > 1 and any(p.requires_grad for p in module.parameters()):
            device_ids = [torch.cuda.current_device()] if nets.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=device_ids)
        return torch.compile(module) if compile_it else module

    return SimpleNamespace(encoder=prepare(nets.model.encoder, cfg.compile),
                           decoder=prepare(nets.model.decoder, cfg.compile),
                           rebuilder=prepare(nets.rebuilder), pixel_head=prepare(nets.pixel_head))


def without_gradient_sync(cfg, nets):
    """Under torchrun, the source pass skips the all-reduce of the modules the mixed pass uses again: that pass
    then averages the sum of both passes' gradients (DDP's no_sync), one all-reduce per step instead of two."""
    stack = contextlib.ExitStack()
    if nets.world > 1 and not cfg.source_only:
        calls = nets.calls
        again = [calls.encoder, calls.decoder] + ([calls.rebuilder, calls.pixel_head] if cfg.mrm_domain == "both" else [])
        for module in again:
            if isinstance(getattr(module, "_orig_mod", module), DistributedDataParallel):
                stack.enter_context(module.no_sync())
    return stack


def rank_prefix():
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"[rank {rank}] "


# ============================================================================= appendix: speed machinery
# The step as one CUDA graph, the per-image reference step and the benchmarks (--bench, --bench-data).


def why_eager(cfg, world):
    """Why the step cannot run as one CUDA graph here, or "" when it can (the default on one GPU)."""
    reasons = ((not cfg.cuda_graph, "without --cuda-graph"), (cfg.device != "cuda", "not on CUDA"),
               (world > 1, "torchrun: DDP's all-reduce"), (cfg.compile, "--compile"),
               (cfg.amp == "fp16", "fp16's loss scaler reads the gradients on the host"),
               (cfg.checkpoint_blocks, "--checkpoint-blocks saves the random state on the host"),
               (cfg.detail_crop > 0, "HRDA's detail windows are drawn on the host"))
    return next((why for applies, why in reasons if applies), "")


def device_scalars(nets):
    """What the host changes between iterations, every group's lr and the EMA weight, as 0-dim float32 device
    tensors, which a captured step reads and begin_step writes in place."""
    for optimizer in nets.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=nets.device)
    nets.ema_weight = torch.tensor(float(nets.ema_weight), device=nets.device)


class CaptureFailed(ConfigError):
    pass


class CudaGraphStep:
    """train_step as one CUDA graph: device_step is captured once and replayed every iteration, one launch
    instead of thousands, which takes the host off the critical path (shapes are static: crop and batch).
    Before each replay the host writes the batch into the graph's input buffers and, through begin_step, the
    learning rates and EMA weight into device tensors; random numbers come from the CUDA generator, which
    advances at each replay. The first `warmup` iterations run eagerly on a side stream, as CUDA graph capture
    asks (optimizer states, cuDNN's algorithm search), and the next one is captured and replayed. Without a GPU
    (capture=False, the default there) the same calls run the step from the same buffers, so that the CPU tests
    check every piece but the capture itself. A capture that fails stops the run with one line: the CUDA
    generator may be left in capture mode, so continuing eagerly in this process is not safe."""

    warmup_steps = 3

    def __init__(self, nets, warmup=warmup_steps, capture=None):
        capture = nets.device.type == "cuda" if capture is None else capture
        self.warmup, self.capture, self.steps, self.replay = warmup, capture, 0, None
        device_scalars(nets)

    def __call__(self, cfg, nets, batch, iteration):
        begin_step(cfg, nets, iteration)
        if self.replay is not None:
            for buffer, key in zip(self.inputs, BATCH_KEYS):
                if buffer.shape != batch[key].shape:
                    raise ValueError(f"CUDA graph step: {key} {tuple(batch[key].shape)}, captured with "
                                     f"{tuple(buffer.shape)}: every batch must have the same shape")
                buffer.copy_(batch[key], non_blocking=True)
            self.replay()
            return self.losses.clone()
        self.steps += 1
        self.inputs = to_device(batch, nets)
        if self.steps <= self.warmup:
            with self.side_stream(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
                return device_step(cfg, nets, *self.inputs)
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            try:  # thread_local: the loader's pin-memory thread may allocate meanwhile
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.losses = device_step(cfg, nets, *self.inputs)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:
                raise CaptureFailed(f"the step could not be captured as one CUDA graph ({one_line(error)[:200]}); "
                                    f"run without --cuda-graph (and --resume, from the last checkpoint)") from error
            self.replay = graph.replay
        else:
            def replay():
                self.losses = device_step(cfg, nets, *self.inputs)
            self.replay = replay
        self.replay()
        return self.losses.clone()

    @contextlib.contextmanager
    def side_stream(self):
        if not self.capture:
            yield
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)


def reference_step(cfg, nets, batch, iteration):
    """The same iteration written as DACS's official code does it, for --bench to compare against:
    fp32, per-image Python loops (ClassMix from torch.unique + np.random.choice, pseudo-label weight
    read back with .item(), augmentation decided by Python's random), one backward of the summed loss, EMA by a parameter loop."""
    model, rebuilder = nets.model, nets.rebuilder
    x_s, y_s, x_t, _ = step_inputs(nets, *to_device(batch, nets))
    set_learning_rates(cfg, nets, iteration)
    model.train()
    loss_s = segmentation_ce(model(x_s), y_s, align_corners=cfg.align_corners)
    with torch.no_grad():
        teacher_logits = F.interpolate(nets.teacher(x_t), size=x_t.shape[-2:], mode="bilinear",
                                       align_corners=cfg.align_corners)
        prob, pseudo = teacher_logits.softmax(dim=1).max(dim=1)
        weight = (prob >= cfg.pseudo_threshold).sum().item() / prob.numel()
    images, labels, weights = [], [], []
    jitter_p, blur_p = float(random.random() < cfg.jitter_p), float(random.random() < cfg.blur_p)
    for i in range(x_s.shape[0]):
        classes = torch.unique(y_s[i])
        chosen = classes[torch.from_numpy(np.random.choice(len(classes), (len(classes) + 1) // 2, replace=False))]
        mask = (y_s[i][..., None] == chosen).any(dim=-1)
        image = torch.where(mask, x_s[i], x_t[i])[None]
        images.append(gaussian_blur(color_jitter(image, cfg.jitter, jitter_p), blur_p))
        labels.append(torch.where(mask, y_s[i], pseudo[i]))
        weights.append(torch.where(mask, 1.0, weight))
    x_m, y_m, w_m = torch.cat(images), torch.stack(labels), torch.stack(weights)
    f_m = model.encoder(x_m)
    loss = loss_s + segmentation_ce(model.decoder(f_m), y_m, w_m, align_corners=cfg.align_corners)
    if rebuilder is not None:
        loss = loss + cfg.mrm_weight * mrm_loss(model.decoder, rebuilder, f_m, y_m, w_m,
                                                align_corners=cfg.align_corners)
    loss.backward()
    for optimizer in nets.optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    alpha = min(1 - 1 / (iteration + 1), cfg.ema)
    with torch.no_grad():
        for teacher_param, param in zip(nets.teacher.parameters(), model.parameters()):
            teacher_param.mul_(alpha).add_(param, alpha=1 - alpha)
    return loss.detach()


def bench(cfg):
    """--bench N: training steps on random batches shaped like gta2cs (1280x720 source, 1024x512 target, times
    --resolution, cropped), data loading excluded. Every variant warms up (and, on CUDA, captures its graph)
    first; then N rounds time one step of each in turn (A, B, C, A, B, C ...), so that their ratios share the machine's state,
    and each reports its median. Variants: the step as configured (DACS+MRM), without MRM, eager instead of one
    CUDA graph, fp32 instead of --amp, the other --aspp-depthwise forms (DAFormer and DeepLabV3+ heads), and
    (DACS recipe) DACS's per-image fp32 reference_step. All are alive at once: the run needs about their sum in
    memory. On CUDA, torch.profiler over 3 more steps of the first variant gives the GPU-busy time and the kernels
    and host launches per step. On the CPU the tiny model of the same family runs, so that a test can run it."""
    if cfg.device == "cpu":
        cfg = SimpleNamespace(**{**vars(cfg), "arch": cfg.arch if cfg.arch.endswith("tiny") else
                                 ("mit-tiny" if "mit" in cfg.arch else "dlv2-tiny"), "crop": min(cfg.crop or 64, 64),
                                 "detail_crop": min(cfg.detail_crop, 32)})
    rng = np.random.default_rng(cfg.seed)
    crop = (cfg.crop, cfg.crop)

    def random_pair(width, height):
        label = rng.integers(0, cfg.num_classes, size=(height // 64 + 1, width // 64 + 1)).repeat(64, 0).repeat(64, 1)
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        return random_crop(image, label[:height, :width].astype(np.uint8), crop, rng)

    source = [random_pair(1280 * cfg.resolution, 720 * cfg.resolution) for _ in range(cfg.batch_size)]
    target = [random_pair(1024 * cfg.resolution, 512 * cfg.resolution) for _ in range(cfg.batch_size)]
    batch = dict(source_image=torch.from_numpy(np.stack([s[0] for s in source])).permute(0, 3, 1, 2),
                 source_label=torch.from_numpy(np.stack([s[1] for s in source])),
                 target_image=torch.from_numpy(np.stack([t[0] for t in target])).permute(0, 3, 1, 2))
    if pseudo_margins(cfg):
        batch["target_valid"] = torch.ones_like(batch["source_label"])
    cuda = cfg.device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    graph = not why_eager(cfg, 1)
    mode = "CUDA graph" if graph else "eager"
    variants = {f"DACS+MRM ({mode})": dict(mrm=True), f"DACS ({mode})": dict(mrm=False)}
    if graph:
        variants["DACS+MRM (eager)"] = dict(mrm=True, cuda_graph=False)
    if cfg.amp != "off":
        variants[f"DACS+MRM fp32 ({mode})"] = dict(mrm=True, amp="off")
    if cfg.decoder in ("daformer", "deeplabv3plus"):
        for form in DEPTHWISE_FORMS:
            if form != cfg.aspp_depthwise:
                variants[f"DACS+MRM ({mode}, --aspp-depthwise {form})"] = dict(mrm=True, aspp_depthwise=form)
    if cfg.recipe == "dacs":  # the reference implements the DACS recipe only
        variants["DACS+MRM fp32 per-image reference"] = dict(mrm=True, amp="off", channels_last=False,
                                                             cuda_graph=False, reference=True)
    print(f"bench on {device_name(cfg.device)}, torch {torch.__version__}: {cfg.arch} ({cfg.recipe} recipe), batch "
          f"{cfg.batch_size}+{cfg.batch_size}, {cfg.crop}x{cfg.crop} crops, amp={cfg.amp}; {cfg.bench} interleaved "
          f"rounds", flush=True)

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    runs, warmup = {}, max(CudaGraphStep.warmup_steps + 2, cfg.bench // 10)
    for name, overrides in variants.items():
        run = SimpleNamespace(**{**vars(cfg), **overrides, "iters": 10 ** 9})
        before = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        nets = build_nets(run)
        step = reference_step if overrides.get("reference") else CudaGraphStep(nets) if nets.graph else train_step
        for i in range(warmup):
            step(run, nets, batch, i)
        synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 30 if cuda else float("nan")
        runs[name] = SimpleNamespace(run=run, nets=nets, step=step, peak=peak, times=[])
    for i in range(warmup, warmup + cfg.bench):
        for variant in runs.values():
            synchronize()
            start = time.perf_counter()
            variant.step(variant.run, variant.nets, batch, i)
            synchronize()
            variant.times.append(time.perf_counter() - start)

    iters = RECIPES[cfg.recipe]["iters"]
    for name, variant in runs.items():
        variant.ms = 1000 * float(np.median(variant.times))
        peak = f"peak {variant.peak:.2f} GiB, " if cuda else ""
        print(f"  {name}: {variant.ms:.1f} ms/iteration (median), {2 * cfg.batch_size * 1000 / variant.ms:.1f} "
              f"images/s, {peak}{iters} iterations in {variant.ms * iters / 3.6e6:.1f} h", flush=True)
    first, ms = next(iter(runs.values())), [variant.ms for variant in runs.values()]
    if cuda:
        activity = profile_steps(lambda i: first.step(first.run, first.nets, batch, i), warmup + cfg.bench, 3)
        busy = activity["gpu_busy_ms"]
        print(f"  GPU busy {busy:.1f} of {first.ms:.1f} ms per step ({100 * busy / first.ms:.0f}%), "
              f"{activity['kernels']:.0f} kernels and {activity['launches']:.0f} host launches per step "
              f"(torch.profiler, 3 steps of {next(iter(runs))})", flush=True)
    others = [f"{variant.ms / ms[0]:.2f}x as fast as {name}" for name, variant in list(runs.items())[2:]]
    print(f"  MRM step-time overhead {ms[0] / ms[1]:.3f}x" + (f"; {next(iter(runs))} is " + ", ".join(others)
                                                              if others else ""), flush=True)
    return {name: (variant.ms, variant.peak) for name, variant in runs.items()}


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def busy_time(intervals):
    """Length of the union of (start, end) intervals: how long at least one of them ran."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_steps(step, first_iteration, steps, cuda=True):
    """torch.profiler over `steps` calls of step(iteration): GPU-busy milliseconds (the union of kernel, copy and
    memset intervals), GPU kernels and host launch calls (kernels, graph launches, copies), each per step."""
    from torch.profiler import ProfilerActivity, profile
    from torch.autograd import DeviceType
    launch_calls = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                    "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(first_iteration, first_iteration + steps):
            step(i)
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    return dict(gpu_busy_ms=busy_time([(e.time_range.start, e.time_range.end) for e in gpu]) / 1000 / steps,
                kernels=sum("memcpy" not in e.name.lower() and "memset" not in e.name.lower() for e in gpu) / steps,
                launches=sum(e.name in launch_calls for e in events) / steps)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage an operation under it creates, from its creation until nothing
    (a variable, autograd's saved tensors, an optimizer) holds it any more: `live` now, `peak` the most so far."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes, self.held = {}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares its input's storage, which may predate this counter (a fake copy
        # of a real weight): not new memory
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()  # torch keeps one Python object per storage while it lives
            if storage._cdata not in self.sizes and storage._cdata not in inputs:
                self.sizes[storage._cdata] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self.free, storage._cdata)
        return out

    def free(self, key):
        self.live -= self.sizes.pop(key)

    def known(self, tensors):
        """Tensors counted elsewhere (the fake copies of real weights, held here so that every operation gets
        the same copy): never new memory."""
        self.held = list(tensors)
        for t in self.held:
            self.sizes[t.untyped_storage()._cdata] = 0


def fake_step_batch(cfg):
    """A batch of the run's shapes: uint8 images at the crop, labels of the task's classes, the margin mask."""
    B, (h, w) = cfg.batch_size, (cfg.crop, cfg.crop) if cfg.crop else (64, 128)
    batch = dict(source_image=torch.randint(0, 256, (B, 3, h, w), dtype=torch.uint8),
                 source_label=torch.randint(0, cfg.num_classes, (B, h, w), dtype=torch.uint8),
                 target_image=torch.randint(0, 256, (B, 3, h, w), dtype=torch.uint8))
    if pseudo_margins(cfg):
        batch["target_valid"] = torch.ones(B, h, w, dtype=torch.uint8)
    return batch


def step_memory(cfg, fake=True):
    """(peak, after the networks are built) bytes of live tensors over two training steps (the second one with
    the optimizer states the first created). The networks are real CPU tensors with random weights; with fake,
    the steps run on fake tensors (shapes and dtypes only: no memory, no arithmetic; the weights stay as built)."""
    cfg = SimpleNamespace(**{**vars(cfg), "device": "cpu", "pretrained": "none", "compile": False, "cuda_graph": False})
    counter = LiveBytes()
    with counter:
        nets = build_nets(cfg)
    networks = counter.live
    fake_mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    with fake_mode or contextlib.nullcontext(), counter:  # the counter on top: it sees what the fake mode returns
        if fake_mode is not None:
            modules = [m for m in (nets.model, nets.teacher, nets.rebuilder, nets.pixel_head, nets.imagenet)
                       if m is not None]
            counter.known(fake_mode.from_tensor(t) for m in modules for t in [*m.parameters(), *m.buffers()])
        for iteration in range(2):
            train_step(cfg, nets, fake_step_batch(cfg), iteration)
    return counter.peak, networks


def estimate_memory(cfg):
    start = time.perf_counter()
    peak, networks = step_memory(cfg)
    gib = 2 ** 30
    print(f"{cfg.task}: {cfg.arch} ({cfg.recipe} recipe), {'DACS' if not cfg.source_only else 'source only'}"
          f"{' + MRM' if cfg.mrm and not cfg.source_only else ''}{' + MIC' if cfg.mic else ''}, batch "
          f"{cfg.batch_size}+{cfg.batch_size}, {f'{cfg.crop}x{cfg.crop} crops' if cfg.crop else 'whole images'}"
          f"{f', {cfg.detail_crop} detail window' if cfg.detail_crop else ''}, "
          f"{'fp32' if cfg.amp == 'off' else cfg.amp}{', --checkpoint-blocks' if cfg.checkpoint_blocks else ''}:\n"
          f"  peak of live tensors in a training step {peak / gib:.2f} GiB (networks, teacher and Rebuilder "
          f"{networks / gib:.2f} GiB, then gradients, optimizer states and activations); a GPU adds its CUDA "
          f"context and the caching allocator's rounding ({time.perf_counter() - start:.0f} s on fake tensors)",
          flush=True)
    return peak


def bench_data(cfg):
    """--bench-data N: for each recipe of the paper's tasks, the decode + resize + crop (+ rare class sampling)
    speed of one loader worker on GTA-sized PNGs (1914x1052) written to a temporary folder, and the workers a
    45 ms and a 100 ms step need; then the training DataLoader of this run's recipe with --workers workers."""
    with tempfile.TemporaryDirectory() as root:
        write_fake_dataset(root, "gta", 4, (1914, 1052), seed=cfg.seed)
        write_fake_dataset(root, "cityscapes", 2, (2048, 1024), seed=cfg.seed)
        rates, loaders = {}, {}
        recipes = dict.fromkeys(("dacs", "daformer", "hrda", cfg.recipe))
        defaults = {key: DEFAULTS[key] for name in recipes for key in RECIPES[name] if key in DEFAULTS}
        for name in recipes:
            run = SimpleNamespace(**{**vars(cfg), **defaults, **RECIPES[name], "recipe": name, "source": "gta",
                                     "target": "cityscapes", "data_root": root, "work_dir": root,
                                     "iters": cfg.bench_data + cfg.workers})
            source, target = (Domain(d, root, framework=run.framework, resolution=run.resolution)
                              for d in ("gta", "cityscapes"))
            rcs = rcs_statistics(run, source, lambda *a, **k: None) if run.rcs_temperature > 0 else None
            batches = TrainBatches(run, source, target, rcs)
            loaders[name] = (run, batches)
            batches[0]
            start = time.perf_counter()
            for i in range(1, cfg.bench_data + 1):
                batches[i]
            rates[name] = cfg.bench_data / (time.perf_counter() - start)
            needs = ", ".join(f"a {ms} ms step {math.ceil(1000 / ms / rates[name])}" for ms in (45, 100))
            print(f"{name} recipe, one worker: {2 * cfg.batch_size * rates[name]:.1f} image pairs/s ({rates[name]:.2f} "
                  f"batches of {cfg.batch_size}+{cfg.batch_size}/s); workers needed: {needs}", flush=True)
        if cfg.workers:
            run, batches = loaders[cfg.recipe]
            # Timed from the batch at which every worker has delivered its first one: steady state.
            for i, _ in enumerate(make_loader(run, batches, 0), start=1):
                if i == cfg.workers:
                    start = time.perf_counter()
            loader_batches_per_s = cfg.bench_data / (time.perf_counter() - start)
            print(f"the training loader of the {run.recipe} recipe with --workers {cfg.workers}: "
                  f"{loader_batches_per_s:.2f} batches/s ({1000 / loader_batches_per_s:.0f} ms per batch)", flush=True)
    return rates


# ============================================================================= appendix: modes
# The command line (flags -> config) and the modes that do one thing and exit: --check-data, --count-flops.


# Allowed ranges: (low, high, low is allowed, high is allowed); None: unbounded. Checked for every run.
RANGES = dict(
    seed=(0, None, True, None), workers=(0, None, True, None), log_every=(1, None, True, None),
    val_every=(1, None, True, None), checkpoint_every=(1, None, True, None), stop_after=(0, None, True, None),
    max_skips=(0, None, True, None), iters=(1, None, True, None), batch_size=(1, None, True, None),
    crop=(0, None, True, None), lr=(0, None, False, None), head_lr_mult=(0, None, False, None),
    momentum=(0, 1, True, False), weight_decay=(0, None, True, None), poly_power=(0, None, True, None),
    warmup_iters=(0, None, True, None), ema=(0, 1, True, False), pseudo_threshold=(0, 1, True, True),
    jitter=(0, 0.5, True, True), jitter_p=(0, 1, True, True), blur_p=(0, 1, True, True),
    cat_max_ratio=(0, 1, False, True), rcs_temperature=(0, None, True, None), rcs_min_pixels=(0, None, True, None),
    fd_weight=(0, None, True, None), mrm_weight=(0, None, True, None), mask_ratio=(0, 1, True, True),
    rebuilder_dim=(4, None, True, None), rebuilder_depth=(1, None, True, None), rebuilder_heads=(1, None, True, None),
    rebuilder_grid=(1, None, True, None), rebuilder_lr=(0, None, False, None),
    rebuilder_weight_decay=(0, None, True, None), mic_mask_ratio=(0, 1, True, True),
    mic_block_size=(1, None, True, None), mic_weight=(0, None, True, None), bench=(0, None, True, None),
    bench_data=(0, None, True, None), debug_every=(0, None, True, None), rcs_min_crop_ratio=(0, None, True, None),
    resolution=(1, 2, True, True), detail_crop=(0, None, True, None), context_scale=(0, 1, False, True),
    hr_loss_weight=(0, 1, True, True),
)
MRM_FLAGS = ("mrm_weight", "mask_ratio", "rebuilder_dim", "rebuilder_depth", "rebuilder_heads", "rebuilder_grid",
             "rebuilder_lr", "rebuilder_weight_decay", "mrm_domain", "mrm_mode", "mrm_objective", "mrm_trains")
MIC_FLAGS = ("mic_mask_ratio", "mic_block_size", "mic_weight")
TARGET_FLAGS = ("ema", "pseudo_threshold", "jitter", "jitter_p", "blur_p", "pl_crop", "mic") + MRM_FLAGS


def check_ranges(cfg, given):
    """Every number in its range (NaN and inf refused), the Rebuilder's shape consistent, the crop one the
    network can take. Returns a warning for each flag given that the run ignores (scripts often pass one set of
    flags to several runs, so these do not stop a run)."""
    for key, (low, high, low_ok, high_ok) in RANGES.items():
        value = cfg[key]
        text = (("[" if low_ok else "(") + f"{low}, " + (f"{high}" + ("]" if high_ok else ")") if high is not None
                                                         else "inf)"))
        if not math.isfinite(value) or value < low or (value == low and not low_ok) or \
                (high is not None and (value > high or (value == high and not high_ok))):
            raise ConfigError(f"--{key.replace('_', '-')} {value}: must be in {text}")
    if cfg["rebuilder_dim"] % 4 or cfg["rebuilder_dim"] % cfg["rebuilder_heads"]:
        raise ConfigError(f"--rebuilder-dim {cfg['rebuilder_dim']}: must be a multiple of 4 (the sin-cos position "
                          f"embedding) and of --rebuilder-heads {cfg['rebuilder_heads']}")
    largest = max(max(DATASETS[name]["size"]) * cfg["resolution"] if name in DATASETS else 128
                  for name in (cfg["source"], cfg["target"]))
    if cfg["crop"] and not 32 <= cfg["crop"] <= largest:
        raise ConfigError(f"--crop {cfg['crop']}: must be 0 (whole images) or from 32 (the encoders' stride) to "
                          f"{largest} (the task's largest training image side)")
    if not cfg["crop"] and cfg["task"] != "toy":
        raise ConfigError(f"--crop 0 (whole images) is for the toy task: {cfg['task']}'s images differ in size")
    ignored = [(key, "--source-only") for key in TARGET_FLAGS if cfg["source_only"] and key in given]
    ignored += [(key, "--no-mrm") for key in MRM_FLAGS if not cfg["mrm"] and key in given]
    ignored += [(key, "without --mic") for key in MIC_FLAGS if not cfg["mic"] and key in given]
    return [f"--{key.replace('_', '-')} {given[key]} does nothing {'with ' * (why[0] == '-')}{why}"
            for key, why in ignored]


def flag_help(key, default, text):
    """A flag's help line: its text, its default, and the recipes that set it otherwise."""
    by_value = {}
    for name, recipe in RECIPES.items():
        if key in recipe and recipe[key] != default:
            by_value.setdefault(recipe[key], []).append(name)
    shown = "" if default in ("", []) else f"; default {default}"
    recipes = "; ".join(f"{', '.join(names)}: {value}" for value, names in by_value.items())
    return (text + shown + (f" (recipe {recipes})" if recipes else "")).replace("%", "%%")


def build_parser():
    may_change = ", ".join("--" + key.replace("_", "-") for key in RESUME_MAY_CHANGE if key in DEFAULTS)
    epilog = (f"--resume continues a run only as the experiment it was: these flags may differ from the checkpoint's "
              f"(they change how, not what, is computed): {may_change}; every other flag must match, or the run "
              f"stops naming each difference.")
    parser = argparse.ArgumentParser(usage="python train_dacs_mrm.py [--task T] [--arch A] [--pretrained FILE] [...]",
                                     description=__doc__,
                                     epilog="\n".join(textwrap.wrap(epilog, 100, break_on_hyphens=False)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, flags in FLAGS.items():
        group = parser.add_argument_group(title)
        for key, (default, text, *choices) in flags.items():
            choices = choices[0] if choices else tuple(TABLE_CHOICES.get(key, ()))
            flag, help_text = "--" + key.replace("_", "-"), flag_help(key, default, text)
            if isinstance(default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=help_text)
            elif isinstance(default, list):
                group.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="RUN_DIR", help=help_text)
            else:
                metavar = ("|".join(choices) if choices else "T,B,L,R" if key == "pseudo_margins" else
                           {int: "N", float: "X"}.get(type(default), "PATH"))
                group.add_argument(flag, type=type(default), default=argparse.SUPPRESS, metavar=metavar,
                                   help=help_text)
    return parser


def parse_config(argv=None):
    given = vars(build_parser().parse_args(argv))
    if given.get("bench") or given.get("bench_data"):  # the benchmarks measure the paper's setting
        given.setdefault("task", "gta2cs")

    def one_of(key, value, allowed):
        if value not in allowed:
            raise ConfigError(f"--{key.replace('_', '-')} {value}: must be one of {' | '.join(allowed)}")

    one_of("task", given.get("task", DEFAULTS["task"]), TASKS)
    task = TASKS[given.get("task", DEFAULTS["task"])]
    arch = given.get("arch") or RECIPES.get(given.get("recipe"), {}).get("arch") or task["arch"]
    one_of("arch", arch, ARCHS)
    recipe = given.get("recipe") or task.get("recipe") or ARCHS[arch]["recipe"]
    one_of("recipe", recipe, RECIPES)
    if recipe != "toy" and RECIPES[recipe]["framework"] != ARCHS[arch]["framework"]:
        fitting = [a for a, spec in ARCHS.items() if spec["framework"] == RECIPES[recipe]["framework"]]
        raise ConfigError(f"--recipe {recipe} does not run --arch {arch}: it runs {', '.join(fitting)}")
    cfg = {**DEFAULTS, **RECIPES[recipe], **given, "arch": arch, "recipe": recipe}
    cfg.update({k: v for k, v in task.items() if k not in ("arch", "recipe", "palette")},
               num_classes=len(task["class_names"]))
    cfg["device"] = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg["decoder"] = cfg["decoder"] or ARCHS[arch]["decoders"][0]
    for flags in FLAGS.values():
        for key, (_, _, *choices) in flags.items():
            if choices:
                one_of(key, cfg[key], choices[0])
    one_of("decoder", cfg["decoder"], TABLE_CHOICES["decoder"])
    if "dacs_param_slots" in given and not (recipe == "dacs" and cfg["optimizer"] == "sgd"):
        raise ConfigError(f"--dacs-param-slots applies to DACS's SGD only (--recipe dacs), not --recipe {recipe}")
    if "aspp_depthwise" in given and cfg["decoder"] not in ("daformer", "deeplabv3plus"):
        raise ConfigError(f"--aspp-depthwise applies to the separable ASPP of --decoder daformer | deeplabv3plus, "
                          f"not {cfg['decoder']}")
    if cfg["decoder"] not in ARCHS[arch]["decoders"]:
        fitting = [a for a, spec in ARCHS.items() if cfg["decoder"] in spec["decoders"]]
        raise ConfigError(f"--decoder {cfg['decoder']} does not fit --arch {arch}: it needs --arch {' | '.join(fitting)}")
    mrm_flags = [f"--{k.replace('_', '-')} {given[k]}" for k in ("mrm_mode", "mrm_objective", "mrm_trains") if k in given]
    if mrm_flags and (not cfg["mrm"] or cfg["source_only"]):
        raise ConfigError(f"{mrm_flags[0]} needs MRM, which --no-mrm / --source-only switch off")
    if cfg["mrm_mode"] == "input" and (cfg["mrm_domain"] != "target" or cfg["mrm_trains"] != "both"):
        raise ConfigError("--mrm-mode input masks the mixed target images and trains the whole student on them: "
                          "it takes --mrm-domain target and --mrm-trains both")
    if cfg["mrm_objective"] != "cls" and (cfg["mrm_mode"] != "rebuild" or cfg["mrm_trains"] != "both"):
        raise ConfigError(f"--mrm-objective {cfg['mrm_objective']} regresses the Rebuilder's output without the "
                          f"decoder: it needs --mrm-mode rebuild and --mrm-trains both")
    margins = cfg["pseudo_margins"].split(",")
    if len(margins) != 4 or not all(m.strip().isdigit() for m in margins):  # pseudo_margins() then reads them
        raise ConfigError(f"--pseudo-margins {cfg['pseudo_margins']}: must be four pixel counts top,bottom,left,right "
                          f"(HRDA: 30,240,30,30)")
    check_hrda(cfg, given)
    if cfg["sync_bn"] and cfg["device"] != "cuda":
        raise ConfigError("--sync-bn needs --device cuda (torch's SyncBatchNorm runs on GPUs only)")
    if cfg["mic"] and cfg["source_only"]:
        raise ConfigError("--mic needs target images and pseudo-labels, which --source-only switches off")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if cfg["iters"] <= 0 or cfg["batch_size"] <= 0:
        raise ConfigError("--iters and --batch-size must be positive")
    for warning in check_ranges(cfg, given):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if cfg["resume"] and cfg["overwrite"]:
        raise ConfigError("--resume continues the work dir's run and --overwrite removes it: pass one of them")
    if cfg["decode"] and not cfg["check_data"]:
        raise ConfigError("--decode works with --check-data")
    mode = any(cfg[key] for key in FLAGS["modes (each does its work and exits)"])
    weights = ARCHS[arch]["weights"]
    if not cfg["pretrained"] and weights and cfg["task"] != "toy" and not mode:
        raise ConfigError(f"--arch {arch} starts from pretrained weights: pass --pretrained FILE with {weights}; "
                          f"--pretrained none trains from random weights")
    if not cfg["work_dir"]:
        method = "source-only" if cfg["source_only"] else "dacs-mrm" if cfg["mrm"] else "dacs"
        method = ("" if recipe == (task.get("recipe") or ARCHS[arch]["recipe"]) else f"{recipe}-") + method
        method += "-mic" if cfg["mic"] else ""
        cfg["work_dir"] = os.path.join("runs", f"{cfg['task']}-{arch}-{method}-seed{cfg['seed']}")
    return SimpleNamespace(**cfg)


def check_hrda(cfg, given):
    """HRDA's model needs a MiT, window sides whose strides stay whole cells, and the Rebuilder's class objective."""
    if not cfg["detail_crop"]:
        hrda_only = [key for key in ("context_scale", "hr_loss_weight") if key in given]
        if hrda_only:
            raise ConfigError(f"--{hrda_only[0].replace('_', '-')} is a setting of HRDA's model: it needs "
                              f"--detail-crop (or --recipe hrda)")
        return
    up = 1 / cfg["context_scale"]
    if abs(up - round(up)) > 1e-9:
        raise ConfigError(f"--context-scale {cfg['context_scale']}: must be 1 / an integer (HRDA: 0.5)")
    cell = 8 * round(up)  # half a detail window (its slide stride) in whole cells of the context logits
    if "mit" not in ARCHS[cfg["arch"]]:
        raise ConfigError(f"--detail-crop: HRDA's model runs a MiT (--arch mitb5 | mitb3 | mitb2 | mit-tiny), "
                          f"not --arch {cfg['arch']}")
    if cfg["detail_crop"] % cell or (cfg["crop"] and (cfg["crop"] % cell or cfg["detail_crop"] > cfg["crop"])):
        raise ConfigError(f"--detail-crop {cfg['detail_crop']}, --crop {cfg['crop']}: both must be multiples of "
                          f"{cell} (8 / --context-scale), the detail window at most the crop")
    if cfg["mrm"] and cfg["mrm_objective"] != "cls":
        raise ConfigError(f"--mrm-objective {cfg['mrm_objective']}: with HRDA's model MRM trains on its losses "
                          f"(--mrm-objective cls)")
    if cfg["compile"]:
        raise ConfigError("--compile: HRDA's detail window moves at every forward, which torch.compile would "
                          "recompile for; train HRDA without it")


def config_json(cfg):
    return json.dumps(vars(cfg), indent=1, sort_keys=True) + "\n"


def check_data(cfg):
    """List and pair every split the task reads and print the counts; with --decode also decode and validate
    every pair (check_pair) in --workers processes, with a progress line, and list every problem."""
    domains = [Domain(name, cfg.data_root, split, cfg.seed) for name, split in
               ((cfg.source, "train"), (cfg.target, "train"), (cfg.target, "val"))]
    for domain, split in zip(domains, ("train", "train", "val")):
        print(f"{domain.name} {split}: {len(domain)} image/label pairs", flush=True)
    if not cfg.decode:
        return
    items = [(domain, i) for domain in domains if hasattr(domain, "pairs") for i in range(len(domain))]
    problems, notes, start = [], [], time.perf_counter()
    results = torch.utils.data.DataLoader(PairCheck(items), batch_size=None, num_workers=cfg.workers)
    for done, (problem, note) in enumerate(results, start=1):
        problems += [problem] if problem else []
        notes += note
        if done % max(1, len(items) // 10) == 0 or done == len(items):
            seconds = (time.perf_counter() - start) / done
            print(f"  decoded {done}/{len(items)} pairs, {len(problems)} problems, ETA "
                  f"{format_eta(seconds * (len(items) - done))}", flush=True)
    for line in problems + [f"warning: {note}" for note in notes]:
        print(line, flush=True)
    if problems:
        raise DataError(f"{len(problems)} of {len(items)} image/label pairs are unreadable or not labels of "
                        f"their dataset (listed above)")


class PairCheck(torch.utils.data.Dataset):
    """Item i: (problem or "", label warnings) of decoding the i-th (domain, index) pair as training does."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        domain, index = self.items[i]
        LABEL_NOTES.clear()
        try:
            domain.load(index, full_label=True)
            problem = ""
        except DataError as error:
            problem = str(error)
        return problem, LABEL_NOTES[:]


def count_flops(arch="dlv2", size=(512, 512), num_classes=19, rebuilder_kw=None, dilations=(6, 12), decoder="",
                mode="rebuild", hrda=None):
    """Forward multiply-accumulates of D(E(x)) and of what MRM adds for one image, the extra D(R(f)) (mode
    rebuild) or a second D(E(x)) of the masked image (mode input), counted by torch.utils.flop_counter on the
    meta device (shapes only: instant, no memory). hrda: HRDA's training forward (both views, one window)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model, _ = build_model(arch, num_classes, aspp_dilations=dilations, decoder=decoder, hrda=hrda)
        model.eval()  # the same FLOPs; BatchNorm of DeepLabV3+'s image pooling refuses one image in train mode
        rebuilder = Rebuilder(model.encoder.out_channels, **(rebuilder_kw or {}),
                              scale_factors=rebuilder_scales(model.encoder))
        x = torch.empty(1, 3, *size)
        with FlopCounterMode(display=False) as base:
            features = model.encoder(x)
            model.decoder(features)
        with FlopCounterMode(display=False) as extra:
            if mode == "input":
                model.decoder(model.encoder(x))
            else:
                model.decoder(rebuild(rebuilder, features, draw_mrm_mask(rebuilder, features, x)))
    trainable = sum(p.numel() for p in rebuilder.parameters() if p.requires_grad) if mode != "input" else 0
    return dict(model_gmac=base.get_total_flops() / 2e9, extra_gmac=extra.get_total_flops() / 2e9,
                rebuilder_params=trainable, ratio=1 + extra.get_total_flops() / base.get_total_flops(),
                encoder_params=sum(p.numel() for p in model.encoder.parameters()),
                decoder_params=sum(p.numel() for p in model.decoder.parameters()))


def print_flops(cfg):
    crop = cfg.crop or 512
    kw = dict(embed_dim=cfg.rebuilder_dim, depth=cfg.rebuilder_depth, num_heads=cfg.rebuilder_heads,
              grid_size=cfg.rebuilder_grid, mask_ratio=cfg.mask_ratio)
    r = count_flops(cfg.arch, (crop, crop), cfg.num_classes, kw, aspp_dilations(cfg), cfg.decoder, cfg.mrm_mode,
                    hrda_views(cfg))
    extra = "decoder(encoder(masked x))" if cfg.mrm_mode == "input" else "decoder(rebuilder(f))"
    views = f" (HRDA: context {cfg.context_scale}, a {cfg.detail_crop} detail window)" if cfg.detail_crop else ""
    print(f"{cfg.arch} + {cfg.decoder}{views}: encoder {r['encoder_params']:,} + decoder {r['decoder_params']:,} parameters; "
          f"Rebuilder {r['rebuilder_params']:,} trainable parameters\n"
          f"at {crop}x{crop}: encoder+decoder {r['model_gmac']:.2f} GMAC; "
          f"{extra} adds {r['extra_gmac']:.2f} GMAC ({r['ratio']:.3f}x)")


# ============================================================================= appendix: toy scenes
# Street scenes drawn on the fly in a game-like source style and a photo-like target style (--task toy).


ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, POLE = range(len(TOY_CLASSES))


# Base colour per class. Target objects blend towards the target colours (hue, brightness shifts
# that avoid other classes' source colours), so shape, layout and relative brightness transfer.
_BASE = {'source': np.array([(90, 90, 100), (200, 170, 150), (180, 110, 80), (60, 170, 60),
                             (110, 180, 250), (0, 0, 0), (200, 190, 60)], float),
         'target': np.array([(115, 105, 100), (185, 150, 140), (185, 155, 110), (120, 140, 50),
                             (165, 195, 225), (0, 0, 0), (80, 80, 85)], float)}


# Car paints replace the class base colour; a target car blends from its source paint.
_CAR_PAINT = {'source': np.array([(220, 40, 40), (40, 80, 220), (240, 200, 30), (240, 240, 240),
                                  (30, 160, 160)]),
              'target': np.array([(60, 60, 65), (175, 175, 180), (150, 40, 40), (50, 70, 130),
                                  (220, 220, 215)])}


# Geometry differs a little between domains: the target city is greener and has less traffic.
_COUNTS = {'source': dict(trees=(0, 3), cars=(1, 5), poles=(1, 4), hedge=0.3),
           'target': dict(trees=(2, 6), cars=(0, 3), poles=(1, 4), hedge=0.6)}


BODY, GLASS, DARK, MARKING = range(4)  # parts within an object, rendered differently per style


# Per part: colour = object colour * mul + add (windows, tyres/trunks, lane paint).
_PARTS = {'source': (np.array([[1], [0.6], [0.2], [0]], np.float32),
                    np.array([(0, 0, 0), (60, 70, 90), (40, 35, 30), (250, 250, 250)], np.float32)),
          'target': (np.array([[1], [0.3], [0.2], [0]], np.float32),
                    np.array([(0, 0, 0), (45, 60, 80), (40, 35, 30), (230, 225, 200)], np.float32))}


# Target textures: weight per class of (fine noise, blotches, paving joints, facade stripes, height).
_TEXTURE = np.array([(6, 10, 0, 0, 0), (5, 0, -25, 0, 0), (6, 0, 0, 8, 0), (30, 20, 0, 0, 0),
                     (0, 15, 0, 0, 40), (4, 0, 0, 0, 0), (4, 0, 0, 0, 0)], np.float32)


@lru_cache(maxsize=8)
def _grid(h, w):
    """Pixel coordinates plus the static target patterns, cached per image size."""
    yy, xx = np.mgrid[:h, :w]
    tiles = ((yy % 4 == 0) | (xx % 6 == 0)).astype(np.float32)  # paving joints
    stripes = np.sin(xx * 1.3).astype(np.float32)  # facade columns / window frames
    vignette = 1 - 0.4 * (((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2)
    return yy, xx, tiles, stripes, (yy / h).astype(np.float32), vignette.astype(np.float32)


def toy_layout(rng, style='source', size=(64, 128)):
    """Random street geometry: object-index map, per-object classes, part map and label map."""
    H, W = size
    yy, xx = _grid(H, W)[:2]
    counts = _COUNTS[style]
    h0 = int(H * rng.uniform(0.35, 0.5))  # horizon row, also the road's vanishing row

    # Facades of random widths along the horizon; per-column lookups keep this vectorised.
    nb = 14  # enough facades of at least 0.08 W to span the image
    right = np.cumsum((W * rng.uniform(0.08, 0.22, nb)).astype(int)) - int(rng.uniform(0, 0.1) * W)
    left = np.concatenate([[right[0] - W], right[:-1]])
    top = h0 - (H * rng.uniform(0.1, 0.38, nb)).astype(int)
    top[rng.random(nb) < 0.15] = h0  # occasional gap lets the sky reach the horizon
    py, px = rng.integers(3, 6, nb), rng.integers(3, 6, nb)  # window grid periods
    # Facade index of each column; on tiny images rounding may leave a remainder for the last one.
    b = np.minimum(np.searchsorted(right, xx[0], side='right'), nb - 1)
    tc, lc, rc, pyc, pxc = top[b], left[b], right[b], py[b], px[b]
    y, x = yy[:h0], xx[:h0]
    obj = np.zeros(size, np.int32)
    obj[:h0] = np.where(y >= tc, 1 + b, 0)
    part = np.zeros(size, np.uint8)
    part[:h0] = GLASS * ((y > tc) & (y < h0 - 2) & (x > lc) & (x < rc - 1)
                         & ((y - tc) % pyc < pyc // 2) & ((x - lc) % pxc < pxc // 2))
    classes = [SKY] + [BUILDING] * nb

    # Ground: perspective road, sidewalks beside it, then facades or hedges at the image sides.
    vx, cb = W * rng.uniform(0.35, 0.65), W * rng.uniform(0.4, 0.6)
    rw, sw = rng.uniform(0.3, 0.45), rng.uniform(1.3, 1.7)
    t = (np.arange(h0, H) - h0 + 1) / (H - h0)  # 0 at the horizon, 1 at the bottom row
    dx = xx[h0:] - (vx + (cb - vx) * t)[:, None]
    ad, road_hw = np.abs(dx), (rw * W * t)[:, None]
    n = len(classes)  # ids: road, left/right sidewalk, left/right outer strip
    obj[h0:] = np.where(ad < road_hw, n, np.where(ad < sw * road_hw, n + 1, n + 3) + (dx >= 0))
    classes += [ROAD, SIDEWALK, SIDEWALK] + [VEGETATION if rng.random() < counts['hedge'] else BUILDING
                                             for _ in range(2)]
    # Dashed centre line; dashes repeat in depth (1/t), so they shorten towards the horizon.
    dash = (2.0 / t) % 1 < 0.5
    part[h0:][(ad < np.maximum(0.5, 0.012 * W * t)[:, None]) & dash[:, None]] = MARKING

    def paint(cls, y0, y1, x0, x1, shape=None, p=BODY, i=None):
        """Painter's algorithm on a clipped box; `shape` carves a mask out of the box."""
        if i is None:
            classes.append(cls)
            i = len(classes) - 1
        ys, xs = slice(max(int(y0), 0), min(int(y1), H)), slice(max(int(x0), 0), min(int(x1), W))
        if ys.start < ys.stop and xs.start < xs.stop:
            m = slice(None) if shape is None else shape(yy[ys, :1], xx[:1, xs])  # column x row
            obj[ys, xs][m], part[ys, xs][m] = i, p
        return i

    def uni(lo, hi):  # Generator.uniform costs ~5 us per scalar call, too slow here
        return lo + (hi - lo) * rng.random()

    # Trees, poles and cars, painted far-to-near; `near` is 0 at the horizon, 1 at the bottom.
    things = [(kind, h0 + uni(*span) * (H - h0))
              for kind, span in (('tree', (0, 0.4)), ('pole', (0.1, 0.8)), ('car', (0.1, 1.1)))
              for _ in range(rng.integers(*counts[kind + 's']) + 1)]
    for kind, yb in sorted(things, key=lambda k: k[1]):
        near, side = (yb - h0 + 1) / (H - h0), -1 if rng.random() < 0.5 else 1
        cx, road_hw, s = vx + (cb - vx) * near, rw * W * near, 0.2 + near  # s: perspective scale
        if kind == 'tree':
            r = s * H * uni(0.12, 0.22)
            x, trunk = cx + side * (road_hw * sw + r * uni(-0.5, 1.5)), r * uni(0.5, 1.2)
            i = paint(VEGETATION, yb - trunk - r, yb, x - max(1, r * 0.15), x + max(1, r * 0.15), p=DARK)
            for _ in range(3):  # a few overlapping ellipses make a blobby canopy
                ey, ex = yb - trunk - r * uni(0.6, 1.2), x + r * uni(-0.6, 0.6)
                ry, rx = r * uni(0.6, 1.0), r * uni(0.7, 1.2)
                paint(VEGETATION, ey - ry, ey + ry + 1, ex - rx, ex + rx + 1, i=i,
                      shape=lambda y, x_: ((y - ey) / ry) ** 2 + ((x_ - ex) / rx) ** 2 < 1)
        elif kind == 'pole':
            ph, pw = s * H * uni(0.45, 0.7), max(1, round(s * 1.5))
            x = cx + side * road_hw * uni(1.05, 1.25)
            i = paint(POLE, yb - ph, yb, x, x + pw)
            if rng.random() < 0.5:  # street-lamp arm reaching over the road
                arm = x - side * s * W * 0.06
                paint(POLE, yb - ph, yb - ph + pw, min(x, arm), max(x + pw, arm), i=i)
        else:
            cw = s * W * uni(0.2, 0.26)
            ch, x0 = cw * uni(0.55, 0.7), cx + uni(-0.8, 0.8) * road_hw - cw / 2
            i = paint(CAR, yb - 0.2 * ch, yb, x0 + 0.08 * cw, x0 + 0.3 * cw, p=DARK)  # tyres
            paint(CAR, yb - 0.2 * ch, yb, x0 + 0.7 * cw, x0 + 0.92 * cw, p=DARK, i=i)
            paint(CAR, yb - 0.6 * ch, yb - 0.15 * ch, x0, x0 + cw, i=i)  # body
            paint(CAR, yb - ch, yb - 0.6 * ch, x0 + 0.15 * cw, x0 + 0.85 * cw, i=i)  # cabin
            paint(CAR, yb - 0.9 * ch, yb - 0.62 * ch, x0 + 0.2 * cw, x0 + 0.8 * cw, p=GLASS, i=i)
    classes = np.array(classes)
    return obj, classes, part, np.take(classes.astype(np.uint8), obj)


def _smooth_noise(rng, h, w, cell):
    """Bilinearly upsampled Gaussian noise: blotches about `cell` pixels wide."""
    g = rng.standard_normal((h // cell + 2, w // cell + 2), np.float32)
    y, x = np.arange(h, dtype=np.float32) / cell, np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], x - x0
    rows = np.take(g, y0, 0) * (1 - fy) + np.take(g, y0 + 1, 0) * fy  # interpolate rows, then columns
    return np.take(rows, x0, 1) * (1 - fx) + np.take(rows, x0 + 1, 1) * fx


def _blur(img):
    """Separable [1, 2, 1] / 4 blur of a CxHxW image with edge replication, like a soft lens."""
    p = np.concatenate([img[:, :1], img, img[:, -1:]], 1)
    img = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    p = np.concatenate([img[..., :1], img, img[..., -1:]], 2)
    return (p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]) / 4


def toy_render(rng, layout, style):
    """Colour a layout in 'source' (flat game look) or 'target' (textured, lit, noisy photo look)."""
    obj, classes, part, lab = layout
    H, W = lab.shape
    n, cars = len(classes), classes == CAR
    paint = rng.integers(len(_CAR_PAINT['source']), size=cars.sum())  # each car keeps its paint
    colours = _BASE['source'][classes]
    colours[cars] = _CAR_PAINT['source'][paint]
    if style == 'target':
        # Each object lies between its game look and the target look, so self-training can
        # spread from source-like (easy) objects to fully shifted ones.
        shifted = _BASE['target'][classes]
        shifted[cars] = _CAR_PAINT['target'][paint]
        a = rng.uniform(0, 1, (n, 1))
        colours = (1 - a) * colours + a * shifted
    # Per-object variation, mostly in brightness; real objects vary more than game assets.
    shade, tint = (20, 8) if style == 'target' else (10, 6)
    colours += rng.normal(0, shade, (n, 1)) + rng.normal(0, tint, (n, 3))
    mul, add = _PARTS[style]
    table = (colours[:, None] * mul + add).reshape(-1, 3).T.astype(np.float32)  # (3, object*part)
    # Channel-first with np.take: numpy broadcasts over a trailing axis of 3 very slowly.
    img = np.take(table, obj * len(mul) + part, 1)
    noise = rng.standard_normal((H, W), np.float32)  # luminance noise; cheaper than per channel
    if style == 'target':
        _, _, tiles, stripes, height, vignette = _grid(H, W)
        fine = rng.standard_normal((H, W), np.float32)
        patterns = (fine, _smooth_noise(rng, H, W, 6), tiles, stripes, height)
        img += sum(np.take(weight, lab) * pattern for weight, pattern in zip(_TEXTURE.T, patterns))
        # Global lighting: colour cast, exposure and contrast, a top-to-bottom gradient, vignette.
        cast = (rng.uniform(0.94, 1.06, 3) * rng.uniform(0.8, 1.15)).astype(np.float32)[:, None, None]
        light = (1 + rng.uniform(-0.2, 0.2) * (height - 0.5)) * vignette
        img = _blur(((img - 128) * rng.uniform(0.85, 1.1) + 128) * light * cast)
    img += (6 if style == 'target' else 3) * noise
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)), lab


def make_toy_scene(rng, style, size=(64, 128)):
    """One (image uint8 HxWx3 RGB, label uint8 HxW) scene in 'source' or 'target' style."""
    if style not in _BASE:
        raise ValueError(f"style must be 'source' or 'target', got {style!r}")
    return toy_render(rng, toy_layout(rng, style, size), style)


if __name__ == "__main__":
    sys.exit(main())
