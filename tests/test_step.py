"""The training step: the per-image reference, the device step and the step as one CUDA graph."""
import collections
import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import support.networks
import train_dacs_mrm as T
from support.data import to_device
from support.networks import build_nets, why_eager
from support.runs import resume, save_checkpoint
from support.speed import CudaGraphStep, device_scalars, reference_step

from helpers import GRAPH_CASES, fake_batch, tiny_dacs_run


# ---------------------------------------------------------------- the per-image reference

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


# ---------------------------------------------------------------- the step as one CUDA graph

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


@pytest.mark.slow
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


def test_a_failed_capture_stops_with_one_line_and_other_shapes_are_refused(tmp_path, monkeypatch, one_error_line):
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
    err = one_error_line()
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
    for key, value, why in (("amp", "fp16", "fp16"), ("compile", True, "--compile"),
                            ("cuda_graph", False, "without --cuda-graph")):
        assert why_eager(SimpleNamespace(**{**vars(on_gpu), key: value}), 1).startswith(why)
    recomputing = {**vars(on_gpu), "checkpoint_blocks": True}
    assert why_eager(SimpleNamespace(**recomputing), 1) == ""  # a ResNet recomputes nothing
    assert why_eager(SimpleNamespace(**{**recomputing, "arch": "mit-tiny"}), 1).startswith("--checkpoint-blocks")


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
