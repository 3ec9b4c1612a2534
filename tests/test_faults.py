"""Hardening: bad input, signals, kill -9, full disks, a run is never lost or silently wrong, loader workers."""
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import train_dacs_mrm as T
from eval import main as eval_main
from support.data import TOY_SIZES, find_pairs
from support.models import ResNetDilated

from helpers import DLV2_TINY, REPO, TOY_FAST, assert_checkpoints_equal, assert_states_equal, state_of


# ---------------------------------------------------------------- hardening: bad input and faults

def test_missing_data_folder_is_one_line_exit_2(tmp_path, one_error_line):
    one_error_line("gta", T.main, ["--task", "gta2cs", "--data-root", str(tmp_path), "--check-data"])


def test_check_data_prints_counts(fake_data, run_main):
    root = fake_data(gta=(3, (32, 16)), cityscapes=(2, (32, 16)))
    code, out, _ = run_main(["--task", "gta2cs", "--data-root", root, "--check-data"])
    assert code == 0 and "gta train: 3 image/label pairs" in out and "cityscapes val: 2 image/label pairs" in out


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("max_skips,code", [(50, 0), (0, 2)])
def test_corrupt_image_is_named_and_skipped_at_most_k_times(tmp_path, fake_data, run_main, max_skips, code):
    root = fake_data(gta=(2, (64, 48)), cityscapes=(1, (64, 32)))
    truncate(os.path.join(root, "gta", "images", "00001.png"))
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--iters", "3", "--crop", "32",
            "--workers", "0", "--work-dir", str(tmp_path / "run"), "--max-skips", str(max_skips)]
    exit_code, out, err = run_main(args)
    assert exit_code == code and "00001.png" in out + err
    if code:
        assert "--max-skips" in err


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


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_exact(tmp_path, fake_data):
    """A real SIGKILL, twice, at a random moment while a subprocess checkpoints every iteration
    (so a kill may land inside a checkpoint write); each resume continues from a loadable
    checkpoint, and the weights equal an uninterrupted run's at the same iteration."""
    root = fake_data(gta=(4, (64, 48)), cityscapes=(2, (64, 32)))
    # A schedule of 10^6 iterations: the kill, at most 50 ms after the run's second new log line, lands long
    # before its end on any machine, so the run is always killed; the comparison then stops both runs (--stop-after)
    # two iterations after the one the killed run reached.
    iters = 10 ** 6
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--crop", "32", "--iters", str(iters),
            "--rebuilder-dim", "32", "--rebuilder-heads", "4", "--rebuilder-grid", "4",
            "--checkpoint-every", "1", "--log-every", "1", "--workers", "0", "--device", "cpu"]
    killed, rng = str(tmp_path / "killed"), np.random.default_rng(0)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    for attempt in range(2):
        command = [sys.executable, "train_dacs_mrm.py", *args, "--work-dir", killed] + (["--resume"] if attempt else [])
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log = os.path.join(killed, "log.jsonl")
        start_lines = sum(1 for _ in open(log)) if os.path.exists(log) else 0
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline and (
                not os.path.exists(log) or sum(1 for _ in open(log)) < start_lines + 2):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        process.kill()
        process.wait()
        assert process.returncode == -9, process.stderr.read().decode()[-2000:]
        assert 0 < state_of(killed)["iteration"] < iters
    end = state_of(killed)["iteration"] + 2
    straight = str(tmp_path / "straight")
    assert T.main(args + ["--work-dir", straight, "--stop-after", str(end)]) == 0
    assert T.main(args + ["--work-dir", killed, "--resume", "--stop-after", "2"]) == 0
    a, b = state_of(straight), state_of(killed)
    assert a["iteration"] == b["iteration"] == end
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


def test_bad_pretrained_files_and_checkpoints_are_one_line_exit_2(tmp_path, capsys, one_error_line):
    """A truncated, corrupt or non-checkpoint --pretrained file, and an unreadable eval checkpoint:
    one line naming the file (not PyTorch's multi-line advice), exit 2."""
    good = tmp_path / "good.pth"
    torch.save(ResNetDilated(**DLV2_TINY).state_dict(), good)
    truncated, text, listing = tmp_path / "truncated.pth", tmp_path / "notes.pth", tmp_path / "list.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    text.write_text("these are not weights\n")
    torch.save([1, 2, 3], listing)
    for path, arch in ((truncated, "dlv2-tiny"), (text, "dlv2-tiny"), (listing, "dlv2-tiny"), (truncated, "mit-tiny")):
        one_error_line(str(path), T.main, ["--task", "toy", "--arch", arch, "--pretrained", str(path), "--work-dir",
                                           str(tmp_path / "w"), "--iters", "1"])
    assert "not a state dict" in (T.main(["--task", "toy", "--pretrained", str(listing), "--work-dir",
                                          str(tmp_path / "w")]) and capsys.readouterr().err)
    assert str(truncated) in one_error_line("not a readable PyTorch file", eval_main, [str(truncated), "--task", "toy"])
    legacy = tmp_path / "legacy.pth"  # torch warns of its pickle protocol: the warning stays out of the error line
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    one_error_line(str(legacy), T.main, ["--task", "toy", "--arch", "mit-tiny", "--pretrained", str(legacy),
                                         "--work-dir", str(tmp_path / "w"), "--iters", "1"])


class NotATensor:
    pass


def test_untrusted_or_foreign_checkpoints_are_refused_in_one_line(tmp_path, small_toy, capsys, one_error_line):
    pickled = str(tmp_path / "evil.pth")
    torch.save({"model": NotATensor()}, pickled)
    one_error_line("holds more than tensors and plain containers", eval_main, [pickled, "--task", "toy"])
    foreign = str(tmp_path / "foreign.pth")
    torch.save({"weight": torch.zeros(2)}, foreign)
    assert eval_main([foreign, "--task", "toy"]) == 2
    assert "not a checkpoint of train_dacs_mrm.py" in capsys.readouterr().err
    older = str(tmp_path / "older.pth")  # an architecture record from before the decoder and align_corners
    torch.save({"arch": {"arch": "dlv2-tiny", "layers": [1, 1, 1, 1], "width": 16, "style": "caffe",
                         "aspp_dilations": [6, 12]}, "num_classes": 7, "model": {}}, older)
    err = one_error_line("older train_dacs_mrm.py", eval_main, [older, "--task", "toy"])
    assert "['align_corners', 'decoder']" in err
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "2", "--stop-after", "1", "--work-dir", work]) == 0
    err = one_error_line("checkpoint is", T.main, TOY_FAST + ["--iters", "2", "--resume", "--arch", "mit-tiny",
                                                               "--work-dir", work])
    assert "mit-tiny" in err


# ---------------------------------------------------------------- a run is never lost or silently wrong

def digest(folder):
    """{file name: sha256} of every file under folder."""
    return {os.path.relpath(os.path.join(d, n), folder): hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _, names in os.walk(folder) for n in names}


def test_a_work_dir_belongs_to_one_run(tmp_path, small_toy, capsys, monkeypatch, one_error_line):
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", work]) == 0
    before = digest(work)
    capsys.readouterr()
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", work]) == 2  # the same command again, no --resume
    assert "holds a run" in one_error_line() and digest(work) == before
    assert T.main(TOY_FAST + ["--iters", "2", "--resume", "--arch", "mit-tiny", "--work-dir", work]) == 2
    one_error_line()
    assert digest(work) == before  # config.json included: nothing written before the checks pass
    # a second run while the first lives: the lock of a live process (this one) refuses it
    lock = os.path.join(work, ".lock")
    open(lock, "w").write(f"{os.getpid()} {platform.node()}")
    assert T.main(TOY_FAST + ["--iters", "2", "--overwrite", "--work-dir", work]) == 2
    assert "in use by another run" in one_error_line() and digest(work) == {**before, ".lock": digest(work)[".lock"]}
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
        assert words in one_error_line()
    monkeypatch.setattr(T.os, "access", lambda path, mode: False)
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", str(tmp_path / "new")]) == 2
    assert "not writable" in one_error_line() and not (tmp_path / "new").exists()


def test_resume_checks_what_it_resumes(tmp_path, small_toy, capsys, one_error_line):
    work = str(tmp_path / "run")
    assert T.main(TOY_FAST + ["--iters", "4", "--stop-after", "2", "--work-dir", work]) == 0
    before = digest(work)
    capsys.readouterr()
    for change, named in ((["--seed", "3"], "--seed 0 (now 3)"), (["--lr", "0.5"], "--lr 0.001 (now 0.5)"),
                          (["--batch-size", "3"], "--batch-size 2 (now 3)"), (["--no-mrm"], "--mrm True (now False)"),
                          (["--iters", "6"], "--iters 4 (now 6)")):
        assert T.main(TOY_FAST + ["--iters", "4", "--resume", "--work-dir", work] + change) == 2
        err = one_error_line()
        assert "another experiment" in err and named in err, err
    assert T.main(TOY_FAST + ["--iters", "1", "--resume", "--work-dir", work]) == 2  # below its iteration 2
    assert "another experiment" in one_error_line()
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
        assert "not a training checkpoint" in one_error_line()


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_iteration_checkpoints_and_resumes_bit_exactly(tmp_path, fake_data, signum, code):
    root = fake_data(gta=(4, (64, 48)), cityscapes=(2, (64, 32)))
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--crop", "32", "--iters", "12",
            "--rebuilder-dim", "32", "--rebuilder-heads", "4", "--rebuilder-grid", "4", "--checkpoint-every", "100",
            "--log-every", "1", "--workers", "1", "--device", "cpu"]
    work = str(tmp_path / "signalled")
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen([sys.executable, "train_dacs_mrm.py", *args, "--work-dir", work],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, small_toy, monkeypatch, one_error_line):
    work = str(tmp_path / "run")
    real_step = T.train_step

    def step_then_two_ctrl_c(*args):
        losses = real_step(*args)
        signal.raise_signal(signal.SIGINT)  # the first asks for a checkpoint after this iteration...
        signal.raise_signal(signal.SIGINT)  # ...the second stops at once
        return losses

    monkeypatch.setattr(T, "train_step", step_then_two_ctrl_c)
    assert T.main(TOY_FAST + ["--iters", "4", "--work-dir", work]) == 130
    assert "interrupted: stopped at once" in one_error_line()
    assert not os.path.exists(os.path.join(work, "checkpoint.pth")) and not os.path.exists(os.path.join(work, ".lock"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_last(tmp_path, small_toy, monkeypatch,
                                                                             capsys, one_error_line):
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
    err = one_error_line()
    assert "checkpoint.pth: could not write it (No space left on device; " in err and "GiB free there" in err
    assert open(os.path.join(work, "checkpoint.pth"), "rb").read() == before
    assert not [name for name in os.listdir(work) if ".tmp" in name]


def test_loader_worker_errors_are_the_same_one_line(tmp_path, fake_data, monkeypatch, one_error_line):
    root = fake_data(gta=(2, (64, 48)), cityscapes=(2, (64, 32)))
    for _, label in find_pairs("gta", root, "train"):
        Image.fromarray(np.full((48, 64), 40, np.uint8)).save(label)  # every source label refused
    args = ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--crop", "32", "--iters", "2",
            "--max-skips", "1"]
    errors = []
    for workers in ("0", "2"):
        assert T.main(args + ["--workers", workers, "--work-dir", str(tmp_path / f"w{workers}")]) == 2
        errors.append(one_error_line())
    assert errors[0] == errors[1] and "corrupt files in a row" in errors[0]
    fake_data(gta=(2, (64, 48)))  # good labels again; now a worker dies
    real_step = T.train_step

    def step_then_kill_the_workers(*a):
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
        return real_step(*a)

    monkeypatch.setattr(T, "train_step", step_then_kill_the_workers)
    assert T.main(args + ["--iters", "20", "--workers", "1", "--work-dir", str(tmp_path / "killed")]) == 5
    assert "a data loader process died" in one_error_line()


@pytest.mark.parametrize("flags,words", [
    (["--workers", "-1"], "--workers -1: must be in [0, inf)"), (["--mask-ratio", "1.5"], "must be in [0, 1]"),
    (["--checkpoint-every", "0"], "[1, inf)"), (["--log-every", "0"], "[1, inf)"),
    (["--rebuilder-grid", "0"], "[1, inf)"), (["--rebuilder-heads", "3"], "multiple of 4"),
    (["--seed", "-1"], "--seed -1: must be in [0, "), (["--max-skips", "-1"], "[0, inf)"), (["--crop", "0", "--crop", "-5"], "[0, inf)"),
    (["--crop", "100000"], "from 32"), (["--crop", "7"], "from 32"), (["--lr", "-1"], "(0, inf)"),
    (["--ema", "2"], "[0, 1)"), (["--pseudo-threshold", "2"], "[0, 1]"), (["--jitter-p", "5"], "[0, 1]"),
    (["--stop-after", "-1"], "[0, inf)"), (["--lr", "nan"], "--lr nan: must be in (0, inf)"),
    (["--task", "gta2cs", "--arch", "dlv2-tiny", "--crop", "0"], "--crop 0 (whole images) is for the toy task"),
    (["--resume", "--overwrite"], "pass one of them"), (["--decode"], "works with --check-data"),
    # out of range for what reads them, though a plain int() takes them
    (["--seed", str(2 ** 63)], "--seed 9223372036854775808: must be in [0, 9223372036854775807]"),
    (["--pseudo-margins", "\u00b2,0,0,0"], "must be four pixel counts"),
    (["--pseudo-margins", "\u0661,0,0,0"], "must be four pixel counts"),
    (["--recipe", "hrda", "--arch", "mit-tiny", "--crop", "64", "--detail-crop", "32", "--context-scale", "0.25"],
     "must be at least 32 pixels"),
    (["--arch", "mit-tiny", "--detail-crop", "16"], "must be at least 32 pixels"),
    (["--bench", "1", "--source-only"], "--source-only has none"),
    (["--count-flops", "--estimate-memory"], "--count-flops and --estimate-memory are modes"),
    (["--print-config", "--check-data"], "--check-data and --print-config are modes"),
    (["--decoder", "deeplabv3plus", "--batch-size", "1"], "needs two or more images per batch"),
    (["--resolution", "2"], "--resolution 2: toy scenes are drawn at one size (128x64)"),
    (["--device", "tpu"], "--device tpu: unknown device, expected cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "unknown device"), (["--device", "cpu:1"], "unknown device"),
    pytest.param(["--device", "cuda:0"], "no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")),
    # settings that leave MRM, MIC or the pseudo-labels nothing to do
    (["--mask-ratio", "0.001"], "masks no cell of the 8x8 grid"), (["--mask-ratio", "1"], "masks every cell"),
    (["--mask-ratio", "0.006", "--rebuilder-grid", "4"], "masks no cell of the 4x4 grid"),
    (["--mrm-weight", "0"], "train with --no-mrm instead"), (["--mic", "--mic-weight", "0"], "without --mic instead"),
    (["--mic", "--mic-mask-ratio", "1"], "--mic-mask-ratio 1.0: must be in [0, 1)"),
    (["--mic", "--mic-block-size", "200"], "MIC's mask would have no block"),
    (["--pl-crop"], "a 64-pixel crop keeps no pseudo-label"),
    (["--crop", "128", "--pl-crop"], "a 128-pixel crop keeps no pseudo-label"),
    (["--pseudo-margins", "30,40,0,0"], "cover the whole 128x64 target image"),
    (["--pseudo-margins", "0,0,64,64"], "cover the whole 128x64 target image"),
    (["--task", "gta2cs", "--arch", "dlv2-tiny", "--recipe", "hrda", "--pseudo-margins", "600,424,0,0"],
     "does not run --arch dlv2-tiny"),
    (["--task", "gta2cs", "--arch", "mit-tiny", "--recipe", "hrda", "--pseudo-margins", "600,424,0,0",
      "--pretrained", "none"], "cover the whole 2048x1024 target image")])
def test_every_bad_flag_is_one_line_before_anything_is_written(tmp_path, one_error_line, flags, words):
    work = tmp_path / "run"
    assert T.main(TOY_FAST + flags + ["--work-dir", str(work)]) == 2
    assert words in one_error_line()
    assert not work.exists()


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


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["corrupt", "bug"])
def test_a_fault_in_validation_workers_neither_hangs_nor_loses_the_iteration(tmp_path, fake_data, fault):
    """Real loader processes (--workers 2 for training and validation): a truncated val image is skipped and named,
    the run ends normally; a bug in a validation worker ends the run at once, its iteration checkpointed first,
    and no worker process outlives it (they ignore SIGTERM, on which multiprocessing's exit handler relies)."""
    root = fake_data(gta=(2, (1280, 720)), cityscapes=(2, (1024, 512)))
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
    process = subprocess.Popen([sys.executable, str(script), REPO, fault, *args],
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


def test_a_signal_at_any_moment_is_one_line_and_loses_nothing(tmp_path, small_toy, monkeypatch, one_error_line):
    """Before the first iteration and after the last checkpoint a signal stops at once; during the loop (a debug grid
    being drawn) it stops after the iteration, checkpointed. SIGHUP (a closed terminal) is SIGTERM's twin."""
    work, args = str(tmp_path / "run"), TOY_FAST + ["--iters", "2", "--debug-every", "1"]

    def signalling(real, signum, when=lambda *a: True):
        def call(*a, **k):
            if when(*a):
                os.kill(os.getpid(), signum)
            return real(*a, **k)
        return call

    monkeypatch.setattr(T, "build_nets", signalling(T.build_nets, signal.SIGTERM))
    assert T.main(args + ["--work-dir", work]) == 143
    assert "interrupted while starting, before its first iteration" in one_error_line()
    monkeypatch.undo()
    monkeypatch.setitem(TOY_SIZES, "val", 4)
    monkeypatch.setattr(T, "write_debug_grid", signalling(T.write_debug_grid, signal.SIGHUP))
    assert T.main(args + ["--work-dir", work]) == 129
    assert one_error_line() == "interrupted at iteration 1: checkpoint written; continue with --resume\n"
    assert state_of(work)["iteration"] == 1 and os.path.exists(os.path.join(work, "debug", "iteration_000001.png"))
    monkeypatch.undo()
    monkeypatch.setitem(TOY_SIZES, "val", 4)
    # the final validation, then the export's write: the last iteration's checkpoint is there, the resume finishes
    monkeypatch.setattr(T, "validate", signalling(T.validate, signal.SIGINT, lambda cfg, nets, val, it, log: it == 2))
    assert T.main(args + ["--work-dir", work, "--resume"]) == 130
    assert one_error_line() == "interrupted at iteration 2: checkpoint written; continue with --resume\n"
    assert state_of(work)["iteration"] == 2 and "val_miou" not in open(os.path.join(work, "log.jsonl")).read()
    monkeypatch.undo()
    monkeypatch.setitem(TOY_SIZES, "val", 4)
    real_save, export = T.torch.save, open(os.path.join(work, "model.pth"), "rb").read()
    monkeypatch.setattr(T.torch, "save", lambda state, f: os.kill(os.getpid(), signal.SIGTERM) or real_save(state, f))
    assert T.main(args + ["--work-dir", work, "--resume"]) == 143
    assert one_error_line() == "interrupted at iteration 2: checkpoint written; continue with --resume\n"
    assert open(os.path.join(work, "model.pth"), "rb").read() == export  # the write it was in left nothing
    assert not [name for name in os.listdir(work) if ".tmp" in name or name == ".lock"]
    monkeypatch.undo()
    monkeypatch.setitem(TOY_SIZES, "val", 4)
    assert T.main(args + ["--work-dir", work, "--resume"]) == 0
    assert os.path.exists(os.path.join(work, "model.pth")) and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


@pytest.mark.parametrize("which,args", [("train", ["--seed", "abc"]), ("train", ["--lr", "\u0660\u066b\u0665"]),
                                        ("train", ["--no-such-flag"]), ("eval", ["--workers", "x"]),
                                        ("eval", ["m.pth", "--workers", "-1"]), ("eval", ["m.pth", "--seed", "-5"])])
def test_a_value_of_the_wrong_type_or_sign_is_one_line(which, args, capsys, one_error_line):
    main = T.main if which == "train" else eval_main
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own refusal
        code = exit_.code
    assert code == 2
    one_error_line(start="error: ")


def test_out_of_host_memory_is_one_line(tmp_path, small_toy, monkeypatch, one_error_line):
    def allocation_fails(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 81920000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(T, "build_nets", allocation_fails)
    assert T.main(TOY_FAST + ["--iters", "2", "--work-dir", str(tmp_path / "run")]) == 4
    assert "out of host memory" in one_error_line(start="error: ")


def catches(pid, signum):
    """Whether the process has a handler of its own for signum (Linux: /proc/PID/status, SigCgt)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
@pytest.mark.parametrize("script,signum", [("train_dacs_mrm.py", signal.SIGTERM), ("eval.py", signal.SIGHUP)])
def test_a_signal_while_the_libraries_load_is_one_line(tmp_path, script, signum):
    process = subprocess.Popen([sys.executable, script, "--task", "toy", "--work-dir", str(tmp_path / "run")],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not catches(process.pid, signum) and time.monotonic() < deadline:  # its first imports, before torch's
        time.sleep(0.01)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum and out == ""
    assert err == f"stopped by {signal.Signals(signum).name} while starting: nothing was written\n"
    assert not (tmp_path / "run").exists()
