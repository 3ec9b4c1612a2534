"""Speed machinery: the training step as one CUDA graph (opt-in), DACS's per-image reference step and the
benchmarks (--bench, --bench-data), the memory estimate on fake tensors (--estimate-memory) and the FLOP count
(--count-flops)."""
import contextlib
import math
import platform
import random
import tempfile
import time
import warnings
import weakref
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mrm import mrm_loss, segmentation_ce
from support.augment import color_jitter, gaussian_blur
from support.base import ConfigError, one_line
from support.cli import DEFAULTS
from support.data import (BATCH_KEYS, Domain, TrainBatches, make_loader, pseudo_margins, random_crop, rcs_statistics,
                          step_inputs, to_device, write_fake_dataset)
from support.hrda import draw_mrm_mask, last_level, rebuilt_features
from support.models import DEPTHWISE_FORMS
from support.toy import TOY_SCENE
from support.networks import (aspp_dilations, build_model, build_nets, build_rebuilder, hrda_views, set_learning_rates,
                              why_eager)


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
    """train_step as one CUDA graph: device_step is captured once and replayed every iteration, one launch instead of
    thousands, which takes the host off the critical path (shapes are static: crop and batch). Before each replay
    the host writes the batch into the graph's input buffers and, through begin_step, the learning rates and EMA
    weight into device tensors; random numbers come from the CUDA generator, which advances at each replay; the
    debug tensors it returns are the graph's own, rewritten by each replay. The first `warmup` iterations run
    eagerly on a side stream, as CUDA graph capture asks (optimizer states, cuDNN's algorithm search), and the next
    one is captured and replayed. Without a GPU (capture=False, the default there) the same calls run the step from
    the same buffers, so that the CPU tests check every piece but the capture itself. A capture that fails stops the
    run with one line: the CUDA generator may be left in capture mode, so continuing eagerly in this process is not
    safe."""

    warmup_steps = 3

    def __init__(self, nets, begin_step, device_step, warmup=warmup_steps, capture=None):
        capture = nets.device.type == "cuda" if capture is None else capture
        self.warmup, self.capture, self.steps, self.replay = warmup, capture, 0, None
        self.begin_step, self.device_step = begin_step, device_step
        device_scalars(nets)

    def __call__(self, cfg, nets, batch, iteration):
        self.begin_step(cfg, nets, iteration)
        if self.replay is not None:
            for buffer, key in zip(self.inputs, BATCH_KEYS):
                if buffer.shape != batch[key].shape:
                    raise ValueError(f"CUDA graph step: {key} {tuple(batch[key].shape)}, captured with "
                                     f"{tuple(buffer.shape)}: every batch must have the same shape")
                buffer.copy_(batch[key], non_blocking=True)
            self.replay()
            return self.losses.clone(), self.seen
        self.steps += 1
        self.inputs = to_device(batch, nets)
        if self.steps <= self.warmup:
            with self.side_stream(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
                return self.device_step(cfg, nets, *self.inputs)
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            try:  # thread_local: the loader's pin-memory thread may allocate meanwhile
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.losses, self.seen = self.device_step(cfg, nets, *self.inputs)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:
                raise CaptureFailed(f"the step could not be captured as one CUDA graph ({one_line(error)[:200]}); "
                                    f"run without --cuda-graph (and --resume, from the last checkpoint)") from error
            self.replay = graph.replay
        else:
            def replay():
                self.losses, self.seen = self.device_step(cfg, nets, *self.inputs)
            self.replay = replay
        self.replay()
        return self.losses.clone(), self.seen

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
    """The same iteration written as DACS's official code does it, for --bench to compare against: fp32, per-image
    Python loops (ClassMix from torch.unique + np.random.choice, pseudo-label weight read back with .item(),
    augmentation decided by Python's random), one backward of the summed loss, EMA by a parameter loop."""
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


def bench(cfg, train_step, begin_step, device_step):
    """--bench N: training steps on random batches shaped like gta2cs (1280x720 source, 1024x512 target, times
    --resolution, cropped), data loading excluded. Every variant warms up (and, on CUDA, captures its graph) first;
    then N rounds time one step of each in turn (A, B, C, A, B, C ...), so that their ratios share the machine's
    state, and each reports its median. Variants: the step as configured (DACS+MRM), without MRM, eager instead of
    one CUDA graph, fp32 instead of --amp, the other --aspp-depthwise forms (DAFormer and DeepLabV3+ heads), and
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
    cuda = cfg.device.startswith("cuda")
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
        step = (reference_step if overrides.get("reference") else
                CudaGraphStep(nets, begin_step, device_step) if nets.graph else train_step)
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

    iters = cfg.iters
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
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
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
    B, (h, w) = cfg.batch_size, (cfg.crop, cfg.crop) if cfg.crop else TOY_SCENE
    batch = dict(source_image=torch.randint(0, 256, (B, 3, h, w), dtype=torch.uint8),
                 source_label=torch.randint(0, cfg.num_classes, (B, h, w), dtype=torch.uint8),
                 target_image=torch.randint(0, 256, (B, 3, h, w), dtype=torch.uint8))
    if pseudo_margins(cfg):
        batch["target_valid"] = torch.ones(B, h, w, dtype=torch.uint8)
    return batch


def step_memory(cfg, train_step, fake=True):
    """(peak, after the networks are built) bytes of live tensors over two training steps (the second one with
    the optimizer states the first created). The networks are real CPU tensors with random weights; with fake,
    the steps run on fake tensors (shapes and dtypes only: no memory, no arithmetic; the weights stay as built)."""
    # fp16's loss scaler reads its gradients' values, which fake tensors lack; bf16's tensors have the same sizes
    cfg = SimpleNamespace(**{**vars(cfg), "device": "cpu", "pretrained": "none", "compile": False, "cuda_graph": False,
                             "amp": "bf16" if cfg.amp == "fp16" else cfg.amp})
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


def estimate_memory(cfg, train_step):
    start = time.perf_counter()
    peak, networks = step_memory(cfg, train_step)
    gib = 2 ** 30
    print(f"{cfg.task}: {cfg.arch} ({cfg.recipe} recipe), {'DACS' if not cfg.source_only else 'source only'}"
          f"{' + MRM' if cfg.mrm and not cfg.source_only else ''}{' + MIC' if cfg.mic else ''}, batch "
          f"{cfg.batch_size}+{cfg.batch_size}, {f'{cfg.crop}x{cfg.crop} crops' if cfg.crop else 'whole images'}"
          f"{f', {cfg.detail_crop} detail window' if cfg.detail_crop else ''}, "
          f"{'fp32' if cfg.amp == 'off' else cfg.amp}{' (as bf16: the same sizes)' * (cfg.amp == 'fp16')}"
          f"{', --checkpoint-blocks' if cfg.checkpoint_blocks else ''}:\n"
          f"  peak of live tensors in a training step {peak / gib:.2f} GiB (networks, teacher and Rebuilder "
          f"{networks / gib:.2f} GiB, then gradients, optimizer states and activations); a GPU adds its CUDA "
          f"context and the caching allocator's rounding ({time.perf_counter() - start:.0f} s on fake tensors)",
          flush=True)
    return peak


def bench_data(cfg, recipes):
    """--bench-data N: for each recipe of the paper's tasks, the decode + resize + crop (+ rare class sampling)
    speed of one loader worker on GTA-sized PNGs (1914x1052) written to a temporary folder, and the workers a
    45 ms and a 100 ms step need; then the training DataLoader of this run's recipe with --workers workers."""
    with tempfile.TemporaryDirectory() as root:
        write_fake_dataset(root, "gta", 4, (1914, 1052), seed=cfg.seed)
        write_fake_dataset(root, "cityscapes", 2, (2048, 1024), seed=cfg.seed)
        rates, loaders = {}, {}
        names = dict.fromkeys(("dacs", "daformer", "hrda", cfg.recipe))
        defaults = {key: DEFAULTS[key] for name in names for key in recipes[name] if key in DEFAULTS}
        for name in names:
            run = SimpleNamespace(**{**vars(cfg), **defaults, **recipes[name], "recipe": name, "source": "gta",
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


def count_flops(arch="dlv2", size=(512, 512), num_classes=19, rebuilder_kw=None, dilations=(6, 12), decoder="",
                mode="rebuild", hrda=None, objective="cls", mrm=True, mic=False, fd=False):
    """Forward multiply-accumulates of D(E(x)) for one image and of the forwards the step adds beside it, counted
    by torch.utils.flop_counter on the meta device (shapes only: instant, no memory). MRM's (mrm): mode rebuild
    D(R(f)), mask-only D(M(f)), input a second D(E(x)) of the masked image; an objective other than cls R(f) without
    the decoder, and the pixel head (pixel) or the teacher's encoder (feature-teacher). MIC's (mic): the student's
    D(E(x)) of its masked image. DAFormer's feature distance (fd): the frozen ImageNet encoder's E(x). hrda:
    HRDA's training forward (both views, one window)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model, _ = build_model(arch, num_classes, aspp_dilations=dilations, decoder=decoder, hrda=hrda)
        model.eval()  # the same FLOPs; BatchNorm of DeepLabV3+'s image pooling refuses one image in train mode
        options = SimpleNamespace(mrm_mode=mode, mrm_objective=objective, **rebuilder_flags(**(rebuilder_kw or {})))
        rebuilder, pixel_head = build_rebuilder(options, model.encoder) if mrm else (None, None)
        x = torch.empty(1, 3, *size)
        with FlopCounterMode(display=False) as base:
            features = model.encoder(x)
            model.decoder(features)
        with FlopCounterMode(display=False) as extra:
            if rebuilder is None:
                pass
            elif mode == "input":
                model.decoder(model.encoder(x))
            elif objective == "cls":
                model.decoder(rebuilt_features(rebuilder, features, draw_mrm_mask(rebuilder, features, x)))
            else:
                rebuilt = rebuilder(features, rebuilder.random_mask(1))
                if pixel_head is not None:
                    pixel_head(F.adaptive_avg_pool2d(last_level(rebuilt), rebuilder.grid_size))
                if objective == "feature-teacher":
                    model.encoder(x)
        with FlopCounterMode(display=False) as masked_image:
            if mic:
                model.decoder(model.encoder(x))
        with FlopCounterMode(display=False) as imagenet:
            if fd:
                model.encoder(x)
    trainable = sum(p.numel() for m in (rebuilder, pixel_head) if m is not None for p in m.parameters())
    return dict(model_gmac=base.get_total_flops() / 2e9, extra_gmac=extra.get_total_flops() / 2e9,
                mic_gmac=masked_image.get_total_flops() / 2e9, fd_gmac=imagenet.get_total_flops() / 2e9,
                rebuilder_params=trainable,
                ratio=1 + extra.get_total_flops() / base.get_total_flops(),
                encoder_params=sum(p.numel() for p in model.encoder.parameters()),
                decoder_params=sum(p.numel() for p in model.decoder.parameters()))


def rebuilder_flags(embed_dim=512, depth=2, num_heads=16, grid_size=16, mask_ratio=0.4):
    """count_flops's Rebuilder keywords as the run's flags (build_rebuilder reads those)."""
    return dict(rebuilder_dim=embed_dim, rebuilder_depth=depth, rebuilder_heads=num_heads, rebuilder_grid=grid_size,
                mask_ratio=mask_ratio)


def print_flops(cfg):
    """count_flops of the run's setting, at its crop (toy scenes: whole)."""
    height, width = (cfg.crop, cfg.crop) if cfg.crop else TOY_SCENE
    kw = dict(embed_dim=cfg.rebuilder_dim, depth=cfg.rebuilder_depth, num_heads=cfg.rebuilder_heads,
              grid_size=cfg.rebuilder_grid, mask_ratio=cfg.mask_ratio)
    mrm = cfg.mrm and not cfg.source_only
    r = count_flops(cfg.arch, (height, width), cfg.num_classes, kw, aspp_dilations(cfg), cfg.decoder, cfg.mrm_mode,
                    hrda_views(cfg), cfg.mrm_objective, mrm, cfg.mic, cfg.fd_weight > 0)
    views = f" (HRDA: context {cfg.context_scale}, a {cfg.detail_crop} detail window)" if cfg.detail_crop else ""
    extra = {"input": "decoder(encoder(masked x))", "mask-only": "decoder(masked f)"}.get(
        cfg.mrm_mode, "decoder(rebuilder(f))" if cfg.mrm_objective == "cls" else
        f"rebuilder(f) for --mrm-objective {cfg.mrm_objective}")
    both = mrm and cfg.mrm_domain == "both"  # on the source's features and the mixed target's
    gmac = r["extra_gmac"] * (2 if both else 1)
    added = (f"MRM's {extra}{' on both domains' if both else ''} adds {gmac:.2f} GMAC "
             f"({1 + gmac / r['model_gmac']:.3f}x)" if mrm else
             "MRM is off" + (" (--source-only)" if cfg.source_only else " (--no-mrm)"))
    if cfg.mic:
        added += f"; MIC's decoder(encoder(masked x)) adds {r['mic_gmac']:.2f} GMAC"
    if cfg.fd_weight > 0:
        added += f"; the feature distance's frozen ImageNet encoder adds {r['fd_gmac']:.2f} GMAC"
    print(f"{cfg.arch} + {cfg.decoder}{views}: encoder {r['encoder_params']:,} + decoder {r['decoder_params']:,} "
          f"parameters; {'Rebuilder' if mrm else 'no Rebuilder:'} {r['rebuilder_params']:,} trainable parameters\n"
          f"at {height}x{width}: encoder+decoder {r['model_gmac']:.2f} GMAC; {added}")
