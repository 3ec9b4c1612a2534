"""--bench, --bench-data, --count-flops, --estimate-memory and the profiler plumbing."""
import math
import re

import pytest
import torch

import train_dacs_mrm as T
from support.networks import build_nets
from support.speed import CudaGraphStep, LiveBytes, busy_time, count_flops, device_name, profile_steps, step_memory

from helpers import MIT_B5_PARAMS, fake_batch


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


@pytest.mark.slow
def test_count_flops_counts_what_the_method_flags_make_the_step_compute(capsys):
    def line(*flags):
        assert T.main(["--task", "gta2cs", "--arch", "dlv2", "--count-flops", *flags]) == 0
        return capsys.readouterr().out.splitlines()[-1]

    rebuild, masking = count_flops("dlv2"), count_flops("dlv2", mode="mask-only")
    pixel, teacher = count_flops("dlv2", objective="pixel"), count_flops("dlv2", objective="feature-teacher")
    assert masking["rebuilder_params"] == 0 and 0 < masking["extra_gmac"] < rebuild["extra_gmac"]
    assert pixel["rebuilder_params"] > rebuild["rebuilder_params"] and pixel["extra_gmac"] < rebuild["extra_gmac"]
    assert teacher["extra_gmac"] > rebuild["model_gmac"]  # the teacher's encoder pass
    off, mic = count_flops("dlv2", mrm=False), count_flops("dlv2", mic=True)
    assert off["extra_gmac"] == off["rebuilder_params"] == off["mic_gmac"] == 0
    assert mic["mic_gmac"] == mic["model_gmac"] and mic["extra_gmac"] == rebuild["extra_gmac"]
    assert line().endswith(f"MRM's decoder(rebuilder(f)) adds {rebuild['extra_gmac']:.2f} GMAC "
                           f"({rebuild['ratio']:.3f}x)")
    assert line("--no-mrm").endswith("; MRM is off (--no-mrm)")
    assert line("--source-only").endswith("; MRM is off (--source-only)")
    assert f"MRM's decoder(masked f) adds {masking['extra_gmac']:.2f} GMAC" in line("--mrm-mode", "mask-only")
    assert f"--mrm-objective pixel adds {pixel['extra_gmac']:.2f} GMAC" in line("--mrm-objective", "pixel")
    assert line("--mic").endswith(f"; MIC's decoder(encoder(masked x)) adds {mic['mic_gmac']:.2f} GMAC")
    both = 2 * rebuild["extra_gmac"]
    assert f"on both domains adds {both:.2f} GMAC ({1 + both / rebuild['model_gmac']:.3f}x)" in line("--mrm-domain", "both")
    fd = count_flops("dlv2", fd=True)["fd_gmac"]
    assert 0 < fd < rebuild["model_gmac"]  # the encoder alone
    assert line("--fd-weight", "0.005").endswith(f"; the feature distance's frozen ImageNet encoder adds {fd:.2f} GMAC")
    assert T.main(["--task", "toy", "--count-flops"]) == 0 and "at 64x128:" in capsys.readouterr().out


@pytest.mark.slow
def test_the_memory_estimate_of_fp16_is_that_of_bf16(capsys):
    args = ["--task", "toy", "--batch-size", "1", "--crop", "32"]
    fp16 = step_memory(T.parse_args(args + ["--amp", "fp16"]), T.train_step)
    assert fp16 == step_memory(T.parse_args(args + ["--amp", "bf16"]), T.train_step)
    assert T.main(args + ["--amp", "fp16", "--estimate-memory"]) == 0
    assert "fp16 (as bf16: the same sizes)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("arch,reference", [("dlv2", True), ("mitb5", False)])
def test_bench_runs_on_cpu_with_the_tiny_model(capsys, monkeypatch, arch, reference):
    """The variants run interleaved after their warm-ups: the MRM and no-MRM steps alternate, 2 rounds. What is
    tested is the order of the steps and the report, not the speed: batches of 1 and a shorter warm-up (the graph
    step's warm-up + 2 steps; on the CPU no graph is captured)."""
    calls = []
    real_step = T.device_step
    monkeypatch.setattr(T, "device_step", lambda cfg, *args: calls.append(cfg.mrm) or real_step(cfg, *args))
    monkeypatch.setattr(CudaGraphStep, "warmup_steps", 1)
    results = T.main(["--arch", arch, "--bench", "2", "--batch-size", "1", "--device", "cpu", "--amp", "bf16"])
    assert results == 0  # --task gta2cs
    out = capsys.readouterr().out
    tiny = "dlv2-tiny" if arch == "dlv2" else "mit-tiny"
    assert f"bench on {device_name('cpu')}" in out and f": {tiny} (" in out and "2 interleaved rounds" in out
    names = ["DACS+MRM (eager)", "DACS (eager)", "DACS+MRM fp32 (eager)"]
    if arch == "mitb5":
        names += ["DACS+MRM (eager, --aspp-depthwise nchw)", "DACS+MRM (eager, --aspp-depthwise space-to-batch)"]
    for name in names:
        assert re.search(rf"  {re.escape(name)}: [0-9.]+ ms/iteration \(median\), [0-9.]+ images/s", out), name
    assert "MRM step-time overhead " in out and "x as fast as DACS+MRM fp32 (eager)" in out
    assert ("fp32 per-image reference" in out) == reference
    warmup = CudaGraphStep.warmup_steps + 2
    round_of_steps = [True, False, True] + ([True, True] if arch == "mitb5" else [])  # device_step's cfg.mrm
    assert calls[-2 * len(round_of_steps):] == round_of_steps * 2 and calls[:warmup] == [True] * warmup


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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--task", "gta2cs", "--arch", "dlv2-tiny", "--crop", "32"],
                                  ["--task", "gta2cs", "--arch", "mit-tiny", "--crop", "32", "--amp", "bf16", "--no-pl-crop"],
                                  ["--task", "gta2cs", "--recipe", "hrda", "--arch", "mit-tiny", "--crop", "64",
                                   "--detail-crop", "32", "--mic", "--checkpoint-blocks"]])
def test_memory_estimate_on_fake_tensors_agrees_with_a_real_cpu_step(args):
    """--estimate-memory's two steps on fake tensors hold within 1% of the bytes the same steps' real CPU tensors
    hold; MRM adds to it. Batches of 1 and the smallest crops (HRDA's MiT needs 64 with a 32 window): the time goes
    to the fake tensors' dispatch, per operation whatever the sizes; the real steps are what the sizes shorten."""
    args = args + ["--batch-size", "1", "--pretrained", "none"]
    cfg = T.parse_args(args)
    (fake, networks), (real, real_networks) = (step_memory(cfg, T.train_step, fake=True),
                                               step_memory(cfg, T.train_step, fake=False))
    assert networks == real_networks > 0 and fake > 2 * networks
    assert abs(fake - real) < 0.01 * real
    without = step_memory(T.parse_args(args + ["--no-mrm"]), T.train_step)[0]
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
