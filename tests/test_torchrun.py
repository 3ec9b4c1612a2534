"""Several processes (torchrun, gloo): ranks stay identical, faults in one rank stop every rank."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import support.data
import train_dacs_mrm as T
from support.base import ConfigError
from support.data import TOY_SIZES
from support.runs import init_distributed

from helpers import REPO, assert_states_equal, state_of


# ---------------------------------------------------------------- several processes (torchrun, gloo)

# Started by torchrun in a test: toy runs with 4 validation scenes; optional patches by environment variable.
TORCHRUN_SCRIPT = """
import os, sys
import numpy as np
import torch
import torch.distributed as dist
sys.path.insert(0, os.environ["REPO"])
import support.data
import train_dacs_mrm as T

support.data.TOY_SIZES.update(val=4)
if os.environ.get("CONSTANT_SCENES"):  # every scene the same one-class image: batches equal across ranks
    scene = (np.full((32, 64, 3), 90, np.uint8), np.zeros((32, 64), np.uint8))
    support.data.make_toy_scene = lambda rng, style, size=None: scene
if os.environ.get("CHECK_RANKS"):  # after every step, the ranks' students and teachers must be bit-identical
    real_step = T.train_step

    def checked_step(cfg, nets, batch, iteration):
        losses = real_step(cfg, nets, batch, iteration)
        for module in (nets.model, nets.teacher):
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(copies, flat)
            assert all(torch.equal(copies[0], c) for c in copies), f"ranks differ after iteration {iteration}"
        return losses

    T.train_step = checked_step
sys.exit(T.main(sys.argv[1:]))
"""


def torchrun(tmp_path, args, env=None, wait=True):
    script = tmp_path / "run_toy.py"
    script.write_text(TORCHRUN_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               *args]
    environment = dict(os.environ, REPO=REPO, OMP_NUM_THREADS="1", **(env or {}))
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True, text=True)
    if not wait:
        return process
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


TORCHRUN_TOY = ["--task", "toy", "--device", "cpu", "--batch-size", "2", "--workers", "0", "--log-every", "1",
                "--checkpoint-every", "1", "--val-every", "1000", "--rebuilder-dim", "32", "--rebuilder-heads", "4",
                "--rebuilder-grid", "4"]


@pytest.mark.slow
def test_torchrun_ranks_stay_identical_and_rank_0_alone_writes(tmp_path):
    work = str(tmp_path / "run")
    code, out, err = torchrun(tmp_path, TORCHRUN_TOY + ["--iters", "4", "--work-dir", work], {"CHECK_RANKS": "1"})
    assert code == 0, err[-3000:]
    assert out.count("toy: dlv2-tiny (toy recipe), DACS + MRM") == 1 and "2 processes" in out
    assert out.count("[4/4]") == 1 and out.count("mIoU over 7 classes") == 1  # one rank prints, validates
    assert sorted(os.listdir(work)) == ["checkpoint.pth", "config.json", "curves.png", "log.jsonl", "model.pth"]
    records = [json.loads(line) for line in open(os.path.join(work, "log.jsonl"))]
    assert [r["iteration"] for r in records if "loss_sup" in r] == [1, 2, 3, 4]
    state = state_of(work)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank its own random stream
    # a different number of processes cannot continue this run: each rank's data and random state depend on it
    assert T.main(TORCHRUN_TOY + ["--iters", "6", "--work-dir", work, "--resume"]) == 2


@pytest.mark.slow
def test_a_nan_stops_every_process_with_one_message_and_keeps_the_checkpoint(tmp_path):
    work = str(tmp_path / "run")
    code, _, err = torchrun(tmp_path, TORCHRUN_TOY + ["--iters", "6", "--lr", "1e12", "--work-dir", work])
    assert code != 0 and err.count("error: non-finite loss") == 1, err[-3000:]
    iteration = state_of(work)["iteration"]
    assert 0 < iteration < 6 and f"and {iteration + 1}:" in err  # the NaN step was not checkpointed


@pytest.mark.slow
def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(tmp_path, monkeypatch):
    """Every scene the same one-class image (ClassMix then pastes all of it, BatchNorm sees the same statistics
    at any batch size, no batch-coupled layer): DDP's averaged gradients equal one process's on twice the batch.
    SGD, not the toy's AdamW, whose per-element normalisation turns float noise in near-zero gradients into
    whole steps."""
    common = ["--no-mrm", "--iters", "3", "--jitter-p", "0", "--blur-p", "0", "--log-every", "3", "--optimizer", "sgd",
              "--lr", "0.003"]
    code, _, err = torchrun(tmp_path, TORCHRUN_TOY + common + ["--batch-size", "1", "--work-dir", str(tmp_path / "two")],
                            {"CONSTANT_SCENES": "1"})
    assert code == 0, err[-3000:]
    scene = (np.full((32, 64, 3), 90, np.uint8), np.zeros((32, 64), np.uint8))
    monkeypatch.setattr(support.data, "make_toy_scene", lambda rng, style, size=None: scene)
    monkeypatch.setitem(TOY_SIZES, "val", 4)
    assert T.main(TORCHRUN_TOY + common + ["--batch-size", "2", "--work-dir", str(tmp_path / "one")]) == 0
    two, one = state_of(str(tmp_path / "two")), state_of(str(tmp_path / "one"))
    for part in ("model", "teacher"):
        for key in one[part]:
            if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):  # n/(n-1) depends on n
                torch.testing.assert_close(two[part][key], one[part][key], rtol=1e-4, atol=1e-6, msg=key)
    assert not torch.equal(two["model"]["decoder.conv2d_list.0.weight"], two["teacher"]["decoder.conv2d_list.0.weight"])


def signal_rank_1_after_two_records(process, work_dir, signum):
    """Once log.jsonl holds three lines, send signum to the rank-1 worker of a torchrun process."""
    log = os.path.join(work_dir, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and (not os.path.exists(log) or sum(1 for _ in open(log)) < 3):
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    rank_1 = next(pid for pid in workers if b"RANK=1" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"))
    os.kill(int(rank_1), signum)


@pytest.mark.slow
def test_killed_rank_stops_the_run_and_resume_ends_where_a_straight_run_ends(tmp_path):
    """SIGKILL one of two processes: rank 0 says so in one line and the run stops; the last checkpoint
    loads, and --resume under two processes ends bit-identical to an uninterrupted two-process run."""
    args = TORCHRUN_TOY + ["--iters", "12"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    code, _, err = torchrun(tmp_path, args + ["--work-dir", straight])
    assert code == 0, err[-3000:]
    process = torchrun(tmp_path, args + ["--work-dir", killed], wait=False)
    signal_rank_1_after_two_records(process, killed, signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "error: another process of this run stopped" in err and "continue with --resume" in err
    assert 0 < state_of(killed)["iteration"] < 12
    code, _, err = torchrun(tmp_path, args + ["--work-dir", killed, "--resume"])
    assert code == 0, err[-3000:]
    a, b = state_of(straight), state_of(killed)
    for part in ("model", "teacher", "rebuilder"):
        assert_states_equal(a[part], b[part])


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_rank_at_the_same_iteration_with_a_checkpoint(tmp_path):
    """A cluster's SIGTERM reaching one of two processes: both finish the same iteration, one checkpoint holds
    both ranks' random states, rank 0 says so in one line; --resume ends bit-identical to a straight run."""
    args = TORCHRUN_TOY + ["--iters", "12", "--checkpoint-every", "100"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    process = torchrun(tmp_path, args + ["--work-dir", stopped], wait=False)
    signal_rank_1_after_two_records(process, stopped, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    state = state_of(stopped)
    assert f"interrupted at iteration {state['iteration']}: checkpoint written; continue with --resume" in err, err
    assert 3 <= state["iteration"] < 12 and len(state["rng"]) == 2
    code, _, err = torchrun(tmp_path, args + ["--work-dir", stopped, "--resume"])
    assert code == 0, err[-3000:]
    code, _, err = torchrun(tmp_path, args + ["--work-dir", straight])
    assert code == 0, err[-3000:]
    a, b = state_of(straight), state_of(stopped)
    for part in ("model", "teacher", "rebuilder"):
        assert_states_equal(a[part], b[part])


# ---------------------------------------------------------------- torchrun's variables without torchrun

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE",
                      "MRM_RENDEZVOUS_TIMEOUT")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_hand(command, env):
    """Popen of command as one process of a group, started without torchrun, with exactly these variables."""
    environment = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    environment.update(OMP_NUM_THREADS="1", REPO=REPO, **env)
    return subprocess.Popen(command, cwd=REPO, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


PORT = "{port}"  # replaced by a free port
ALONE = dict(WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT)


@pytest.mark.slow
@pytest.mark.parametrize("env,words", [
    (dict(ALONE, RANK="0"), "torchrun: rank 0 waited 3s for 1 other process(es) at 127.0.0.1:{port}; start all 2"),
    (dict(ALONE, RANK="1"), "torchrun: rank 1 waited 3s for rank 0 at 127.0.0.1:{port} (Connection refused)"),
    (dict(WORLD_SIZE="2"), "RANK is not set, expected a whole number from 0 to 1 (WORLD_SIZE=2); torchrun sets"),
    (dict(WORLD_SIZE="abc"), "WORLD_SIZE='abc', expected a whole number of at least 1"),
    (dict(ALONE, RANK="2"), "RANK='2', expected a whole number from 0 to 1"),
    (dict(WORLD_SIZE="2", RANK="0"), "MASTER_ADDR is not set"),
    (dict(ALONE, RANK="0", MASTER_PORT="http"), "MASTER_PORT='http', expected a whole number from 1 to 65535"),
    (dict(ALONE, RANK="0", MRM_RENDEZVOUS_TIMEOUT="soon"), "MRM_RENDEZVOUS_TIMEOUT='soon', expected seconds > 0")],
    ids=["rank-0-alone", "rank-1-alone", "no-rank", "world-size-abc", "rank-too-large", "no-master-addr",
         "bad-master-port", "bad-rendezvous-timeout"])
def test_torchrun_variables_that_cannot_form_a_group_fail_in_one_line_within_seconds(tmp_path, env, words):
    port = str(free_port())
    env = {"MRM_RENDEZVOUS_TIMEOUT": "3", **{k: v.replace(PORT, port) for k, v in env.items()}}
    work = str(tmp_path / "run")
    process = by_hand([sys.executable, "train_dacs_mrm.py", *TORCHRUN_TOY, "--iters", "1", "--work-dir", work], env)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()  # a hang must not outlive the test
    assert process.returncode == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and words.replace(PORT, port) in err, err
    assert not os.path.exists(work)


# One process of a by-hand group: it joins once told to on stdin (imports are slower than the short rendezvous
# timeout), and rank 0 pauses before the first collective for longer than that timeout.
GROUP_SCRIPT = """
import os, sys, time
from types import SimpleNamespace
sys.path.insert(0, os.environ["REPO"])
import torch
import torch.distributed as dist
from support.runs import init_distributed
print("ready", flush=True)
sys.stdin.readline()
rank, world = init_distributed(SimpleNamespace(device="cpu"))
time.sleep(float(os.environ["PAUSE"]) if rank == 0 else 0)
total = torch.ones(1)
dist.all_reduce(total)
print(int(total.item()))
dist.barrier()  # then leave together: the group's threads must not outlive the interpreter
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_the_rendezvous_timeout_bounds_waiting_for_the_others_not_the_collectives():
    env = dict(ALONE, MASTER_PORT=str(free_port()), MRM_RENDEZVOUS_TIMEOUT="2", PAUSE="5")
    processes = [by_hand([sys.executable, "-c", GROUP_SCRIPT], dict(env, RANK="0"))]
    try:
        out, err = processes[0].communicate("go\n", timeout=60)
        assert processes[0].returncode != 0 and "ConfigError: torchrun: rank 0 waited 2s for 1 other" in err, err
        # rank 1 first, waiting for rank 0; then rank 0 pauses 5 s while rank 1 waits in the all-reduce
        processes = [by_hand([sys.executable, "-c", GROUP_SCRIPT], dict(env, RANK=rank, LOCAL_RANK=rank))
                     for rank in ("1", "0")]
        assert [process.stdout.readline() for process in processes] == ["ready\n"] * 2
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        for process in processes:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0 and out == "2\n", err[-3000:]
    finally:
        for process in processes:
            process.kill()


def test_local_rank_beyond_the_visible_gpus_is_one_config_error(monkeypatch):
    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK='2', expected a whole number from 0 to 1 \(2 GPU\(s\) visible"):
        init_distributed(SimpleNamespace(device="cuda"))
