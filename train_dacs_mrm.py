"""DACS + Masked Representation Modeling (MRM): domain-adaptive semantic segmentation.

    python train_dacs_mrm.py --task toy                                      # DACS + MRM on toy scenes, CPU
    python train_dacs_mrm.py --task gta2cs --pretrained resnet101COCO-41f33a49.pth          # DACS's own setting
    python train_dacs_mrm.py --task gta2cs --pretrained resnet101COCO-41f33a49.pth --no-mrm # the DACS baseline
    python train_dacs_mrm.py --task gta2cs --arch dlv2-v1c --pretrained resnet101_v1c-e67eebb6.pth  # in mmseg
    python train_dacs_mrm.py --task gta2cs --arch mitb5 --pretrained mit_b5.pth             # DAFormer
    python train_dacs_mrm.py --task gta2cs --recipe hrda --mic --pretrained mit_b5.pth      # MIC on HRDA
    python eval.py runs/RUN/model.pth                                        # evaluate a trained model

Each iteration (DACS, Tranheden et al. 2021, with MRM, Zhou et al. 2025, Algorithm 1), forward_backward below:
  1. L_sup = CE(D(E(x_s)), y_s) on the source batch
  2. EMA teacher pseudo-labels on the target batch, weighted by the share of confident pixels
  3. ClassMix: half the classes of each source image pasted onto a target image
  4. colour jitter and blur on the mixed images
  5. L_uda = weighted CE(D(E(x_mix)), y_mix), and L_mrm = CE(D(R(E(x_mix))), y_mix) on the SAME encoder
     features (mrm.py): one encoder pass, two decoder passes
  6. loss = L_sup + L_uda + lambda * L_mrm; optimizer step (the Rebuilder's: AdamW); EMA update of the teacher
A recipe reproduces the official code around a baseline (DACS's trainUDA.py, DAFormer's and HRDA's mmseg
code); docs/fidelity.md lists what still differs.

The file reads top to bottom: the recipes, the DACS operations, MRM's objectives, the iteration, the training
loop and main. The networks, data, run safety, torchrun and speed machinery live in support/.
"""
import contextlib
import math
import os
import random
import sys
import time

from support.base import stop_quietly_until_main

if __name__ == "__main__":  # torch takes seconds to load: a signal meanwhile is one line too
    stop_quietly_until_main()

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mrm import resize_mask
from eval import evaluate, iou_per_class, miou_report
from support.augment import color_jitter, gaussian_blur
from support.base import ConfigError, DataError, NonFiniteLoss, format_eta, one_line
from support.cli import cpu_threads, parse_config, unread_flags
from support.data import Domain, TrainBatches, check_data, make_loader, rcs_statistics, step_inputs, to_device
from support.hrda import detached, detail_window, draw_mrm_mask, last_level, rebuilt_features
from support.networks import PIXELS_PER_CELL, build_nets, set_learning_rates, why_eager, without_gradient_sync
from support.reports import plot_curves, write_debug_grid
from support.runs import (Interrupted, RunLog, StopSignals, WorkDirLock, check_work_dir, config_json, export_model,
                          finished, init_distributed, lost_a_process, rank_prefix, read_resume_checkpoint, resume,
                          resume_changes, save_checkpoint, start_work_dir)
from support.speed import CudaGraphStep, bench, bench_data, estimate_memory, print_flops


# ----------------------------------------------------------------------------- the recipes
# Each recipe reproduces one official code base; its values override the flags' defaults (support/cli.py) and a
# flag given on the command line overrides both. A recipe's framework decides what the official code around it
# did: "dacs" is DACS's trainUDA.py (images resized exactly with PIL, ClassMix classes per image, source loss over
# labelled pixels, EMA after the step); "mmseg" is DAFormer's mmsegmentation code (resize keeping the aspect
# ratio, ClassMix classes of the whole batch, every loss averaged over all pixels, EMA before the next step).
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


# ----------------------------------------------------------------------------- DACS operations
# Pseudo-labels, ClassMix, the EMA teacher, DAFormer's ImageNet feature distance and MIC's masked images, batched on
# the device (colour jitter and blur: support/augment.py; rare class sampling: support/data.py).


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


# ----------------------------------------------------------------------------- MRM's objectives
# Eq. 4 on the encoder's features (Algorithm 1), Table 2(e)'s other objectives and Table 6's input-space masking.


def mrm_auxiliary_loss(cfg, nets, features, images, labels, weight, mask=None):
    """L_mrm on the encoder's `features` of `images`: Eq. 4's CE(D(R(f)), y) with the model's own loss
    (--mrm-objective cls; mrm.mrm_loss, and HRDA's two losses on both views) or one of Table 2(e)'s
    regressions at masked cells (docs/ablations.md). --mrm-trains (Table 4) holds a part fixed for this loss
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
        return nets.model.loss(decoder(rebuilt_features(nets.calls.rebuilder, features, mask)), labels, weight)
    rebuilt = nets.calls.rebuilder(features, mask)
    if cfg.mrm_objective == "pixel":
        return masked_pixel_loss(nets.calls.pixel_head, last_level(rebuilt), images, mask)
    if cfg.mrm_objective == "feature-teacher":
        with torch.no_grad():
            features = nets.teacher.encoder(images)
    return masked_feature_loss(rebuilt, features, mask)


def target_mrm_loss(cfg, nets, f_m, x_m, y_m, w_m):
    """L_mrm of the mixed batch and what the debug grid shows of it: the Rebuilder on the features that L_uda
    computed, or Table 6's input-space masking (the mixed image masked, a second student pass)."""
    if cfg.mrm_mode != "input":
        mask = draw_mrm_mask(nets.rebuilder, f_m, x_m)
        return mrm_auxiliary_loss(cfg, nets, f_m, x_m, y_m, w_m, mask), dict(mrm_mask=mask)
    mask = nets.rebuilder.random_mask(x_m.shape[0], x_m.device)
    x_masked = masked_input(x_m, mask, nets.model.encoder.normalize.zero_colour())
    return nets.model.loss(student(nets, x_masked), y_m, w_m), dict(mrm_mask=mask, mrm_input=x_masked)


def masked_input(images, mask, fill):
    """Table 6's "Input Space" masking: the grid's masked cells of the images (nearest-upsampled) take `fill`,
    the colour that normalises to 0. The paper does not say what fills them; we chose MIC's."""
    return torch.where(F.interpolate(mask, size=images.shape[-2:], mode="nearest").bool(), fill, images)


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


# ----------------------------------------------------------------------------- the iteration
# forward_backward is Algorithm 1 (DACS + MRM, + MIC); device_step adds the optimizer and the EMA update.


def forward_backward(cfg, nets, x_s, y_s, x_t, valid_t=None):
    """Steps (1)-(6) of the iteration: the losses and their gradients. The source and the mixed losses are
    backpropagated separately, which frees the source graph before the mixed forward (the same gradients, a
    lower peak memory). valid_t: 0 on target pixels whose pseudo-labels never count (--pseudo-margins).
    Returns the detached [L_sup, L_uda, L_mrm, L_mic, L_fd, pseudo weight] as one tensor, and `seen`: what the
    debug grid shows (references, no copies)."""
    encoder, decoder, loss = nets.calls.encoder, nets.calls.decoder, nets.model.loss
    autocast = torch.autocast(nets.device.type, dtype=torch.float16 if cfg.amp == "fp16" else torch.bfloat16,
                              enabled=cfg.amp != "off")
    zero = torch.zeros((), device=nets.device)
    l_uda = l_mrm_s = l_mrm_t = l_mic = l_fd = weight = zero
    lambda_mrm = cfg.mrm_weight if nets.rebuilder is not None else 0.0  # Eq. 5's lambda
    source_weight = 1.0 if cfg.framework == "mmseg" else None  # mmseg 0.16 averages over all pixels, DACS over labelled
    seen = dict(source_image=x_s, source_label=y_s)

    # (1) L_sup on the source batch (Eq. 1), + DAFormer's ImageNet feature distance, + MRM on it (Table 3)
    with without_gradient_sync(cfg, nets):
        with autocast:
            f_s = encoder(x_s)
            l_sup = loss(decoder(f_s), y_s, source_weight)
            if nets.imagenet is not None:
                with torch.no_grad():
                    f_imagenet = last_level(nets.imagenet(x_s))
                l_fd = feature_distance(last_level(f_s), f_imagenet, y_s)
            if mrm_on(cfg, nets, "source"):
                l_mrm_s = mrm_auxiliary_loss(cfg, nets, f_s, x_s, y_s, source_weight)
        backward(nets, l_sup + cfg.fd_weight * l_fd + lambda_mrm * l_mrm_s)
    del f_s
    if not cfg.source_only:
        # (2) the EMA teacher's pseudo-labels of the un-augmented target batch, (3) ClassMix, (4) jitter and blur
        pseudo, weight, pixel_weight = teacher_pseudo_labels(cfg, nets, x_t, valid_t, autocast)
        x_m, y_m, w_m, mix = class_mix(cfg, x_s, y_s, x_t, pseudo, pixel_weight)
        # (5) L_uda on the mixed batch, and L_mrm on the SAME encoder features (Algorithm 1, Eq. 5)
        with autocast:
            f_m = encoder(x_m.contiguous(memory_format=nets.memory_format))
            l_uda = loss(decoder(f_m), y_m, w_m)
            if mrm_on(cfg, nets, "target"):
                l_mrm_t, mrm_seen = target_mrm_loss(cfg, nets, f_m, x_m, y_m, w_m)
                seen.update(mrm_seen)
        backward(nets, l_uda + lambda_mrm * l_mrm_t)
        seen.update(target_image=x_t, pseudo_label=pseudo, pixel_weight=pixel_weight, mix=mix, mixed_image=x_m,
                    mixed_label=y_m, detail_window=detail_window(f_m))
        del f_m
        # (6) MIC: the student on block-masked target images against the clean ones' pseudo-labels
        if cfg.mic:
            l_mic, seen["mic_image"] = mic_loss(cfg, nets, x_t, pseudo, pixel_weight, autocast)
            backward(nets, cfg.mic_weight * l_mic)
    return torch.stack([l_sup, l_uda, l_mrm_s + l_mrm_t, l_mic, l_fd, weight]).detach().float(), seen


def mrm_on(cfg, nets, domain):
    """Whether MRM runs on this domain's features (--mrm-domain, Table 3)."""
    return nets.rebuilder is not None and cfg.mrm_domain in (domain, "both")


def backward(nets, loss):
    nets.scaler.scale(loss).backward()


def student(nets, x):
    """D(E(x)) of the student as the step calls it."""
    return nets.calls.decoder(nets.calls.encoder(x.contiguous(memory_format=nets.memory_format)))


def teacher_pseudo_labels(cfg, nets, x_t, valid_t, autocast):
    """The pseudo-labels of the EMA teacher on the target batch, DACS's scalar weight, and the pixel weights:
    that scalar, 0 on DAFormer's unreliable rows (--pl-crop) and on HRDA's margins (valid_t)."""
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
    if valid_t is not None:
        pixel_weight = pixel_weight * valid_t
    return pseudo, weight, pixel_weight


def class_mix(cfg, x_s, y_s, x_t, pseudo, pixel_weight):
    """ClassMix source onto target (pasted source pixels keep their label, weight 1), then colour jitter and blur
    of the mixed images. Returns the mixed images, labels, pixel weights and the mask."""
    mix = class_mix_masks(y_s, batch_classes=cfg.framework == "mmseg")
    x_m = torch.where(mix[:, None], x_s, x_t)
    y_m = torch.where(mix, y_s, pseudo)
    w_m = torch.where(mix, 1.0, pixel_weight)
    return gaussian_blur(color_jitter(x_m, cfg.jitter, cfg.jitter_p), cfg.blur_p), y_m, w_m, mix


def mic_loss(cfg, nets, x_t, pseudo, pixel_weight, autocast):
    """MIC's loss: the student on its block-masked target images against the teacher's pseudo-labels of the
    clean images, with the un-mixed pixel weights. Returns it and the masked images."""
    x_mic = mic_masked_images(x_t, nets.model.encoder.normalize.zero_colour(), cfg.jitter, cfg.jitter_p,
                              cfg.mic_mask_ratio, cfg.mic_block_size)
    with autocast:  # clones: autograd may save them, which it refuses for inference tensors
        return nets.model.loss(student(nets, x_mic), pseudo.clone(), pixel_weight.clone()), x_mic


def device_step(cfg, nets, source_image, source_label, target_image, target_valid=None):
    """The device's part of an iteration, from the uint8 batch on the device to the EMA update: no host sync,
    no host random numbers and no host values that change between iterations, so that CudaGraphStep can
    capture it once. Returns forward_backward's losses and debug tensors."""
    nets.model.train()
    # Autocast drops its low-precision copies of the weights when the outermost autocast scope exits: this
    # scope, closed before the optimizer step, makes the source, mixed and MIC passes cast each weight once.
    with torch.autocast(nets.device.type, enabled=False):
        losses, seen = forward_backward(cfg, nets, *step_inputs(nets, source_image, source_label, target_image,
                                                                target_valid))
    for optimizer in nets.optimizers:
        nets.scaler.step(optimizer)
    nets.scaler.update()
    for optimizer in nets.optimizers:
        optimizer.zero_grad(set_to_none=True)
    if nets.teacher is not None:
        update_ema(nets.teacher, nets.model, nets.ema_weight)
    return losses, seen


def begin_step(cfg, nets, iteration):
    """The host's part of an iteration: its learning rates and EMA weight, written where device_step reads them."""
    set_learning_rates(cfg, nets, iteration)
    if nets.teacher is None:
        return
    # DACS updates the teacher after the step with alpha(it); DAFormer at the start of the next one, alpha(it + 1)
    weight = 1 - ema_alpha(iteration + 1 if cfg.framework == "mmseg" else iteration, cfg.ema)
    if isinstance(nets.ema_weight, torch.Tensor):
        nets.ema_weight.fill_(weight)
    else:
        nets.ema_weight = weight


def train_step(cfg, nets, batch, iteration):
    """One DACS(+MRM, +MIC) iteration, eagerly: the host's part, then the device's. Returns the detached losses
    [L_sup, L_uda, L_mrm, L_mic, L_fd, pseudo weight] as one tensor (no host sync here) and the debug tensors."""
    begin_step(cfg, nets, iteration)
    return device_step(cfg, nets, *to_device(batch, nets))


# ----------------------------------------------------------------------------- the training loop and main
# The run: data, networks, resume, the loop with its log, validation and checkpoints; main maps errors to exits.


def train(cfg, signals):
    """The run, under StopSignals: a signal before its first iteration stops it at once."""
    rank, world = init_distributed(cfg)
    torch.set_num_threads(cpu_threads(cfg))
    say = print if rank == 0 else (lambda *args, **kwargs: None)  # the other processes stay quiet
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    source = Domain.of_run(cfg, cfg.source, "train", cfg.framework)
    target = Domain.of_run(cfg, cfg.target, "train", cfg.framework)
    # the mmseg protocol, whatever the recipe
    val = Domain.of_run(cfg, cfg.target, "val")
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:  # torchrun --max-restarts: go on, or start over
        cfg.resume = os.path.exists(os.path.join(cfg.work_dir, "checkpoint.pth"))
        cfg.overwrite = not cfg.resume
    if rank == 0:
        check_work_dir(cfg)
    state = read_resume_checkpoint(cfg) if cfg.resume else None
    if state is not None and finished(cfg, state):
        say(f"{cfg.work_dir}: the run is finished (iteration {cfg.iters}, validated): nothing to resume", flush=True)
        return None
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
        threads = torch.get_num_threads()
        say(f"{cfg.task}: {cfg.arch} ({cfg.recipe} recipe), {'source only' if cfg.source_only else 'DACS'}"
            f"{' + MRM' if nets.rebuilder is not None else ''}{' + MIC' if cfg.mic else ''}, iterations "
            f"{start}..{stop} of {cfg.iters}, {len(source)} source / {len(target)} target images"
            f"{f', {world} processes' if world > 1 else ''}\n  from {initialisation}; "
            f"{'fp32' if cfg.amp == 'off' else cfg.amp} on {cfg.device} ({threads} CPU thread{'s' * (threads > 1)}), "
            f"step "
            f"{'as one CUDA graph' if nets.graph else 'eager'}{f' ({why_eager(cfg, world)})' if not nets.graph else ''}"
            f"; work dir {cfg.work_dir}{' (--overwrite)' if cfg.overwrite else ''}"
            + (f"\n  resumed with {', '.join(changed)}" if changed else ""), flush=True)
        loader = make_loader(cfg, TrainBatches(cfg, source, target, rcs, rank, world), start)
        with RunLog(cfg.work_dir) if rank == 0 else contextlib.nullcontext() as log:
            return training_loop(cfg, nets, loader, val, start, stop, log, say, signals)


def training_loop(cfg, nets, loader, val, start, stop, log, say, signals):
    """Iterations start..stop: the step, a progress line and log record every --log-every iterations, validation
    and checkpoints at their intervals; a SIGINT, SIGTERM or SIGHUP ends it after the current iteration,
    checkpointed, and during the final export and validation at once (the last iteration is checkpointed)."""
    step = CudaGraphStep(nets, begin_step, device_step) if nets.graph else train_step
    sums, count, skipped_total, warned = torch.zeros(6, device=nets.device), 0, 0, 0
    clock, clock_iteration = time.time(), start
    signals.defer()
    for iteration, batch in zip(range(start, stop), loader):
        if batch.get("error"):  # raised in a loader worker, re-raised here as the same one line
            raise DataError(batch["error"])
        skipped = batch.pop("skipped")
        cfg.read.update(batch.pop("flags_read", ()))  # what a loader worker read of the settings
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
        losses, seen = step(cfg, nets, batch, iteration)
        sums += losses
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
                record = dict(iteration=done, loss_sup=means[0], loss_uda=means[1], loss_mrm=means[2],
                              loss_mic=means[3], loss_fd=means[4], pseudo_weight=means[5],
                              lr=float(nets.optimizers[0].param_groups[0]["lr"]), it_per_s=speed,
                              time=time.time())
                log.append(record)
            say(progress_line(cfg, done, means, speed), flush=True)
            sums.zero_()
            count = 0
        try:
            if nets.rank == 0 and not cfg.source_only and cfg.debug_every and done % cfg.debug_every == 0:
                write_debug_grid(cfg, nets, seen, os.path.join(cfg.work_dir, "debug", f"iteration_{done:06d}.png"))
            if nets.rank == 0 and cfg.val_every and done % cfg.val_every == 0 and done != cfg.iters:
                validate(cfg, nets, val, done, log)  # the other ranks wait at their next collective
        except Exception:  # a picture or a validation that fails does not lose the iteration's work
            if nets.world == 1:
                save_checkpoint(cfg, nets, done)
            raise
        interrupted = signals.requested(nets)
        if done % cfg.checkpoint_every == 0 or done == stop or interrupted:
            save_checkpoint(cfg, nets, done)
        if interrupted:
            raise Interrupted(interrupted, done)
        unread = unread_flags(cfg) if done == start + 1 else []  # every part of an iteration has run once
        if unread:
            say(f"warning: {', '.join(unread)}: not read by this run's code (its method, architecture or recipe "
                f"takes no such setting), so they change nothing", flush=True)
    signals.at_once(stop)
    if nets.rank != 0:
        return None
    if stop == cfg.iters:
        export_model(os.path.join(cfg.work_dir, "model.pth"), nets.model, nets.arch_record, cfg.num_classes, cfg.task)
        return validate(cfg, nets, val, cfg.iters, log)
    print(f"stopped after iteration {stop} (--stop-after); continue with --resume", flush=True)
    return None


def validate(cfg, nets, val, iteration, log):
    conf = evaluate(nets.model, val, cfg.num_classes, nets.device, cfg.align_corners, cfg.amp,
                    workers=min(cfg.workers, 4), say=print)
    table, miou = miou_report(conf, cfg.eval_classes, cfg.class_names)
    print(f"validation at iteration {iteration} on {len(val)} {cfg.target} images:\n{table}", flush=True)
    ious = [None if math.isnan(iou) else 100 * iou for iou in iou_per_class(conf.cpu()).tolist()]
    log.append(dict(iteration=iteration, val_miou=miou, val_iou=ious))
    try:
        plot_curves([cfg.work_dir], os.path.join(cfg.work_dir, "curves.png"))
    except DataError as error:  # a picture is not worth stopping the run for
        print(f"warning: {error}", flush=True)
    return miou


def progress_line(cfg, done, means, speed):
    rate = f"{speed:.2f} it/s" if speed >= 1 else f"{1 / speed:.1f} s/it"
    return (f"[{done}/{cfg.iters}] L_sup {means[0]:.4f}  L_uda {means[1]:.4f}"
            f"{f'  L_mrm {means[2]:.4f}' if not cfg.source_only and cfg.mrm else ''}"
            f"{f'  L_mic {means[3]:.4f}' if cfg.mic else ''}{f'  L_fd {means[4]:.4f}' if cfg.fd_weight else ''}"
            f"  weight {means[5]:.3f}  {rate}  ETA {format_eta((cfg.iters - done) / speed)}")


def parse_args(argv=None):
    """The run's settings: the command line over the task, the architecture and RECIPES."""
    return parse_config(RECIPES, argv, __doc__)


def main(argv=None):
    threads = torch.get_num_threads()  # train() sets the run's; a caller in this process gets its own back
    try:
        cfg = parse_args(argv)
        if cfg.device.startswith("cuda:"):  # the current device: where CUDA streams and graphs are made
            torch.cuda.set_device(cfg.device)
        if cfg.print_config:
            print(config_json(cfg), end="")
        elif cfg.count_flops:
            print_flops(cfg)
        elif cfg.check_data:
            check_data(cfg)
        elif cfg.bench:
            bench(cfg, train_step, begin_step, device_step)
        elif cfg.bench_data:
            bench_data(cfg, RECIPES)
        elif cfg.estimate_memory:
            estimate_memory(cfg, train_step)
        else:
            with StopSignals() as signals:
                train(cfg, signals)
    except (ConfigError, DataError) as error:
        print(f"error: {rank_prefix()}{error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system refused (a full disk, a folder that cannot be written)
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {rank_prefix()}{where}{error.strerror or one_line(error)}", file=sys.stderr)
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
        if "can't allocate memory" in str(error):  # torch's CPU allocator
            print(f"error: out of host memory ({one_line(error)[-120:]}): reduce --batch-size, --crop or the "
                  f"Rebuilder (--rebuilder-dim, --rebuilder-grid)", file=sys.stderr)
            return 4
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
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
