"""The networks of a run and how they learn: build_model (an architecture by name), build_nets (the student,
the EMA teacher, the Rebuilder, the frozen ImageNet encoder of the feature distance), the optimizers with their
parameter groups and learning-rate schedule, and what the step calls under torchrun or torch.compile."""
import contextlib
import copy
import os
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from mrm import Masking, Rebuilder
from support.base import DataError
from support.hrda import HRDAModel
from support.models import (ARCHS, DAFormerHead, DepthwiseConv3x3, DropPath, MiTEncoder, SegModel, build_deeplab,
                            build_deeplab_from_record, load_mit_weights)


def teacher_mode(teacher):
    """The teacher stays in train mode (BatchNorm on batch statistics, as DACS), without dropout."""
    teacher.train()
    for m in teacher.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d, DropPath)):
            m.eval()


PIXELS_PER_CELL = 8  # the pixel objective's target: each grid cell's image patch, area-resized to 8 x 8


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


def aspp_dilations(cfg):
    return tuple(int(d) for d in cfg.aspp_dilations.split(","))


def build_nets(cfg, rank=0, world=1):
    """The student, EMA teacher, Rebuilder, frozen ImageNet encoder (FD) and optimizers, on the device; under
    torchrun (world > 1) what the step calls is wrapped in DistributedDataParallel."""
    device = torch.device(cfg.device)
    pretrained = "" if cfg.pretrained == "none" else cfg.pretrained
    # the flags of one kind of network are read only when building that kind (the run warns of flags it never read)
    recompute = "mit" in ARCHS[cfg.arch] and cfg.checkpoint_blocks
    dilations = aspp_dilations(cfg) if cfg.decoder == "deeplabv2" else (6, 12)
    model, arch_record = build_model(cfg.arch, cfg.num_classes, pretrained, recompute, dilations, cfg.decoder,
                                     hrda=hrda_views(cfg))
    arch_record["align_corners"] = cfg.align_corners  # evaluation must resample the logits as training did
    model.align_corners, model.hr_loss_weight = cfg.align_corners, cfg.hr_loss_weight  # its loss's settings
    if cfg.resolution != 1:  # and see images at the size training saw
        arch_record["resolution"] = cfg.resolution
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
                           arch_record=arch_record, device=device, memory_format=memory_format, rank=rank, world=world,
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
    rebuilder = [group for module in (nets.rebuilder, nets.pixel_head) if module is not None and
                 any(p.requires_grad for p in module.parameters())  # --mrm-mode mask-only, input: none
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
    """Momentum SGD as DACS's optimizer really ran (DACS trainUDA.py, get_1x_lr_params_NOscale). DACS hands
    torch.optim.SGD a parameter list in which a tensor occurs several times (dacs_parameter_slots); torch 1.x then
    updated it once per occurrence, each time with its unchanged gradient and the ONE momentum buffer it kept per
    tensor. Here a parameter group holds tensors with the same count `slots` and applies that many updates in a row;
    with slots=1 this is torch's SGD (dampening 0, no Nesterov)."""

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


def build_model(arch, num_classes, pretrained="", checkpoint_blocks=False, aspp_dilations=(6, 12), decoder="",
                arch_record=None, hrda=None):
    """(SegModel, arch_record). arch_record records what the weights decided (DeepLab style), the decoder and the
    classifier's dilations, HRDA's views, so that eval.py rebuilds the same network from a checkpoint without the
    pretrained file. hrda: dict(context_scale, detail_crop, window) builds HRDA's multi-resolution model on a MiT."""
    spec = ARCHS[arch]
    if pretrained and not os.path.isfile(pretrained):
        raise DataError(f"{pretrained}: pretrained weights file not found")
    try:
        if "mit" in spec:
            encoder = MiTEncoder(spec["mit"], checkpoint_blocks)
            if pretrained:
                load_mit_weights(encoder.backbone, pretrained)
            hrda = hrda or (arch_record or {}).get("hrda")
            arch_record = dict(arch=arch)
            if hrda:
                arch_record["hrda"] = dict(hrda)
                return HRDAModel(encoder, num_classes, spec["head_dim"], **hrda), arch_record
            decoder = DAFormerHead(encoder.out_channels, num_classes, embed_dim=spec["head_dim"])
        elif arch_record is not None:
            encoder, decoder = build_deeplab_from_record(num_classes, arch_record)
        else:
            encoder, decoder, arch_record = build_deeplab(num_classes, pretrained or None, spec["layers"],
                                                          spec["width"], spec["styles"], aspp_dilations,
                                                          decoder or spec["decoders"][0])
            arch_record["arch"] = arch
    except ValueError as error:  # the loaders' one-line key/shape report
        raise DataError(str(error)) from None
    return SegModel(encoder, decoder), arch_record


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


def why_eager(cfg, world):
    """Why the step cannot run as one CUDA graph here, or "" when it can (the default on one GPU)."""
    reasons = ((not cfg.cuda_graph, "without --cuda-graph"), (not cfg.device.startswith("cuda"), "not on CUDA"),
               (world > 1, "torchrun: DDP's all-reduce"), (cfg.compile, "--compile"),
               (cfg.amp == "fp16", "fp16's loss scaler reads the gradients on the host"),
               ("mit" in ARCHS[cfg.arch] and cfg.checkpoint_blocks,
                "--checkpoint-blocks saves the random state on the host"),
               (cfg.detail_crop > 0, "HRDA's detail windows are drawn on the host"))
    return next((why for applies, why in reasons if applies), "")
