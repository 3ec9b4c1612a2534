"""A run's files and processes: checkpoints (written atomically, loaded strictly, resumed only as the same
experiment), the exported model, the work dir's rules and lock, SIGINT/SIGTERM, and torchrun's process group."""
import contextlib
import json
import os
import platform
import random
import re
import signal
import socket
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from support.base import ConfigError, DataError, atomic_write, one_line
from support.cli import FLAG_KEYS, RESUME_MAY_CHANGE
from support.data import CITYSCAPES_ID_TO_TRAIN, DATASETS, TASKS
from support.models import Normalize, load_tensors, strict_load


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
    state = dict(iteration=iteration, config=vars(cfg), arch=nets.arch_record, model=nets.model.state_dict(),
                 teacher=nets.teacher.state_dict() if nets.teacher is not None else None,
                 rebuilder=nets.rebuilder.state_dict() if nets.rebuilder is not None else None,
                 pixel_head=nets.pixel_head.state_dict() if nets.pixel_head is not None else None,
                 optimizers=[optimizer.state_dict() for optimizer in nets.optimizers], scaler=nets.scaler.state_dict(),
                 world_size=nets.world, rng=rngs, inference=inference_record(cfg.task, nets.arch_record, nets.model))
    atomic_write(os.path.join(cfg.work_dir, "checkpoint.pth"), lambda f: torch.save(state, f))


# a target dataset's label id -> train id table, for the label ids its benchmark expects
LABEL_ID_TABLES = {"cityscapes": CITYSCAPES_ID_TO_TRAIN}


def inference_record(task, arch_record, model):
    """state["inference"] of a model file, what predicting needs beyond state["arch"] (which builds the network)
    and the weights, in plain containers: the task, its target dataset, the class names and RGB palette in
    train-id order, the target dataset's label id of each train id (what a benchmark server expects; None: its
    labels are train ids), size (w, h): what the target images were resized to in training (fit keeping the aspect
    ratio, mmseg), None: used as drawn, the align_corners of resizing the logits, the normalisation the model
    applies itself to its RGB [0, 1] input (caffe: to BGR 0-255 first), and HRDA's views (None: single scale)."""
    spec = TASKS[task]
    target, num_classes = spec["target"], len(spec["class_names"])
    size = None
    if target in DATASETS:
        size = tuple(int(side * arch_record.get("resolution", 1)) for side in DATASETS[target]["size"])
    table = LABEL_ID_TABLES.get(target)
    label_ids = None if table is None else [int(np.flatnonzero(table == t)[0]) for t in range(num_classes)]
    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    normalize = None if norm is None else dict(kind=norm.kind, mean=norm.mean.flatten().tolist(),
                                               std=norm.std.flatten().tolist())
    return dict(task=task, target=target, class_names=list(spec["class_names"]),
                palette=np.asarray(spec["palette"]).tolist(), label_ids=label_ids, size=size,
                align_corners=bool(arch_record["align_corners"]), normalize=normalize,
                hrda=dict(arch_record["hrda"]) if arch_record.get("hrda") else None)


def load_checkpoint(path):
    """Checkpoints are untrusted input: tensors and plain containers only (weights_only)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such checkpoint")
    try:
        return load_tensors(path)
    except ValueError as error:
        raise DataError(str(error)) from None


def load_model_state(model, state, path):
    """A checkpoint's segmentation model, strictly; a misfit (another architecture or class count) is a DataError."""
    try:
        strict_load(model, state, path, "this model (another architecture or number of classes?)")
    except ValueError as error:
        raise DataError(str(error)) from None


def resume(cfg, nets, state=None):
    """Restore nets and the random state from the work dir's checkpoint (read_resume_checkpoint's `state`);
    returns its iteration. A checkpoint that does not fit (an entry missing, a tensor or an optimizer state of
    another shape) is one DataError line."""
    path = os.path.join(cfg.work_dir, "checkpoint.pth")
    state = read_resume_checkpoint(cfg) if state is None else state
    if state["arch"] != nets.arch_record:
        raise DataError(f"{path}: checkpoint is {state['arch']}, this run builds {nets.arch_record}")
    if len(state["optimizers"]) != len(nets.optimizers):
        raise DataError(f"{path}: checkpoint holds {len(state['optimizers'])} optimizer(s), this run builds "
                        f"{len(nets.optimizers)} (another --optimizer or --no-mrm?)")
    if state["world_size"] != nets.world:
        raise DataError(f"{path}: written by {state['world_size']} process(es), this run has {nets.world}: each "
                        f"process's data and random state depend on its rank, so resume with as many processes")
    load_model_state(nets.model, state["model"], path)
    try:
        for name in ("teacher", "rebuilder", "pixel_head"):
            if getattr(nets, name) is not None:
                getattr(nets, name).load_state_dict(state[name])
        for optimizer, optimizer_state in zip(nets.optimizers, state["optimizers"]):
            optimizer.load_state_dict(optimizer_state)
            for group in optimizer.param_groups:  # a CUDA graph's device-tensor lr comes back as a plain number
                group["lr"] = float(group["lr"])
                if any(value.shape != p.shape for p in group["params"]
                       for value in optimizer.state[p].values() if torch.is_tensor(value) and value.dim()):
                    raise ValueError("an optimizer state of another shape than its parameter")
        nets.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][nets.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if nets.device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise DataError(f"{path}: damaged, or written by another version of this program ({one_line(error)[:200]}); "
                        f"start over with --overwrite or another --work-dir") from None
    return state["iteration"]


def export_model(path, model, arch_record, num_classes, task=None, inference=None):
    """Inference-only file: the segmentation model and how to build it, and (given the task, or the record itself)
    what predicting needs (inference_record); no Rebuilder, no optimiser."""
    state = dict(arch=arch_record, num_classes=num_classes, model=model.state_dict())
    if inference is None and task is not None:
        inference = inference_record(task, arch_record, model)
    if inference is not None:
        state["inference"] = inference
    atomic_write(path, lambda f: torch.save(state, f))


# What a run writes in its work dir: these files, debug/iteration_NNNNNN.png and, while it lives, .lock; each
# written by atomic_write through NAME.tmpPID
RUN_FILES = ("checkpoint.pth", "config.json", "log.jsonl", "model.pth", "curves.png", "debug")
FILE_NAMES = "|".join(re.escape(name) for name in RUN_FILES[:-1])
INTERRUPTED_WRITE = re.compile(rf"({FILE_NAMES})\.tmp\d+")
RUN_WRITES = re.compile(rf"({FILE_NAMES}|\.lock)(\.tmp\d+)?")
DEBUG_GRID = re.compile(r"iteration_\d{6}\.png(\.tmp\d+)?")


CHECKPOINT_KEYS = {"iteration", "config", "arch", "model", "optimizers", "scaler", "rng", "world_size"}


def check_work_dir(cfg):
    """Refuse, before writing anything, a work dir that cannot hold this run: a file, under a file, not
    writable, or holding another run (unless --resume, or --overwrite where the folder holds that run alone)."""
    path = cfg.work_dir
    parent = path
    while parent and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--work-dir {path}: is a file, not a folder")
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"--work-dir {path}: {parent} is a file, not a folder")
    writable = os.access(parent or ".", os.W_OK | os.X_OK)
    if not writable or (os.path.realpath(parent or ".") + "/").startswith(UNUSABLE):
        raise ConfigError(f"--work-dir {path}: {parent or '.'} is not writable")
    held = [name for name in RUN_FILES if os.path.lexists(os.path.join(path, name))]
    if held and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"--work-dir {path} holds a run ({', '.join(held)}): pass --resume to continue it, "
                          f"--overwrite to start it over, or another --work-dir")
    if held and cfg.overwrite:
        if not is_run_config(os.path.join(path, "config.json")):
            raise ConfigError(f"--work-dir {path}: holds {', '.join(held)} but no config.json of train_dacs_mrm.py: "
                              f"not a run of this program, so --overwrite removes nothing there; choose another "
                              f"--work-dir")
        foreign = foreign_files(path)
        if foreign:
            raise ConfigError(f"--work-dir {path}: holds files a run does not write ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); --overwrite starts over only in a folder that "
                              f"holds the run alone: move them, or choose another --work-dir")


# folders where nothing can be written, whatever os.access says (it is true for root)
UNUSABLE = ("/proc/", "/sys/", "/dev/")


def is_run_config(path):
    """Whether path is a config.json that train_dacs_mrm.py wrote: its flags as one JSON object."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"task", "arch", "recipe", "iters", "seed", "work_dir"} <= config.keys()


def foreign_files(work_dir):
    """The entries of a run's work dir that the run did not write (what --overwrite must not remove)."""
    def written(folder, name, pattern):
        path = os.path.join(folder, name)
        return pattern.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path)

    foreign = []
    for name in sorted(os.listdir(work_dir)):
        path = os.path.join(work_dir, name)
        if name == "debug" and os.path.isdir(path) and not os.path.islink(path):
            foreign += [os.path.join("debug", n) for n in sorted(os.listdir(path)) if not written(path, n, DEBUG_GRID)]
        elif not written(work_dir, name, RUN_WRITES):
            foreign.append(name)
    return foreign


def read_resume_checkpoint(cfg):
    """The work dir's checkpoint, after checking that it is a training checkpoint of the same experiment."""
    path = os.path.join(cfg.work_dir, "checkpoint.pth")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise DataError(f"{path}: not a training checkpoint of train_dacs_mrm.py (an export or another file?); "
                        f"--resume continues from the checkpoint.pth a run wrote")
    saved, now = state["config"], vars(cfg)
    if type(state["iteration"]) is not int or state["iteration"] < 0 or not isinstance(saved, dict):
        raise DataError(f"{path}: damaged, or written by another version of this program (iteration "
                        f"{state['iteration']!r}); start over with --overwrite or another --work-dir")
    differences = [f"--{key.replace('_', '-')} {saved[key]} (now {now[key]})" for key in FLAG_KEYS
                   if key not in RESUME_MAY_CHANGE and key in saved and saved[key] != now[key]]
    if differences:
        raise ConfigError(f"{path}: checkpoint is of another experiment, run with " + ", ".join(differences) +
                          ": resume with the same settings, or start a new --work-dir")
    if state["iteration"] > cfg.iters:
        raise ConfigError(f"{path} is at iteration {state['iteration']}, past --iters {cfg.iters}")
    return state


def finished(cfg, state):
    """Whether the checkpoint is the run's last iteration and the log holds that iteration's validation: a resume
    then has nothing left to do."""
    if state["iteration"] != cfg.iters:
        return False
    try:
        with open(os.path.join(cfg.work_dir, "log.jsonl")) as log:
            lines = log.readlines()
    except OSError:
        return False
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if isinstance(record, dict) and record.get("iteration") == cfg.iters and "val_miou" in record:
            return True
    return False


def resume_changes(cfg, state):
    """The settings a resumed run changes, for its header."""
    saved, now = state["config"], vars(cfg)
    return [f"--{key.replace('_', '-')} {saved[key]} -> {now[key]}" for key in RESUME_MAY_CHANGE
            if key in saved and key not in ("resume", "overwrite") and saved[key] != now[key]]


class WorkDirLock:
    """work_dir/.lock, holding this process's pid and host while the run lives. A second run in the same dir
    stops in one line; a lock left by a process that died is taken over (saying so); anything else named .lock
    is left alone and named."""

    def __init__(self, work_dir, say=print):
        self.path, self.say = os.path.join(work_dir, ".lock"), say

    def __enter__(self):
        try:
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
                        raise DataError(f"{os.path.dirname(self.path)}: in use by another run (process {pid} on "
                                        f"{host}); remove {self.path} if that run is gone")
                    self.say(f"taking over the lock of process {pid}, which is gone", flush=True)
                    os.remove(self.path)
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()} {platform.node()}")
                return self
        except OSError as error:  # a full disk, a folder that cannot be written
            raise DataError(f"{self.path}: cannot write the run's lock ({error.strerror or one_line(error)})") from None
        raise DataError(f"{self.path}: cannot take the lock")

    def owner(self):
        """(pid, host) of the lock, None when it is gone; a .lock this program did not write is a DataError."""
        if not os.path.lexists(self.path):
            return None
        if os.path.islink(self.path) or not os.path.isfile(self.path):
            raise DataError(f"{self.path}: not a lock file (a folder or a link); remove it if no run uses "
                            f"{os.path.dirname(self.path)}")
        try:
            with open(self.path, "rb") as f:
                pid, host = f.read(300).decode().split(" ", 1)
            if not (pid.isascii() and pid.isdigit() and 0 < int(pid) <= 2 ** 22 and host.isprintable()):
                raise ValueError
            return int(pid), host
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"{self.path}: not a lock of this program (expected 'PID HOST'); remove it if no run "
                            f"uses {os.path.dirname(self.path)}") from None

    def __exit__(self, *exc):
        with contextlib.suppress(DataError, OSError):
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
        path = os.path.join(cfg.work_dir, name)
        if INTERRUPTED_WRITE.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
    if state is None:  # --overwrite; check_work_dir found the run's files alone in the folder
        removed = [name for name in RUN_FILES if os.path.lexists(os.path.join(cfg.work_dir, name))]
        for name in removed:
            path = os.path.join(cfg.work_dir, name)
            if name == "debug":
                for grid in os.listdir(path):
                    if DEBUG_GRID.fullmatch(grid):
                        os.remove(os.path.join(path, grid))
                os.rmdir(path)
            else:
                os.remove(path)
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


class RunLog:
    """work_dir/log.jsonl, one JSON record a line, appended and flushed at once (a crash loses at most the line
    being written); a write that fails (a full disk) is one DataError line."""

    def __init__(self, work_dir):
        self.path = os.path.join(work_dir, "log.jsonl")
        self.file = self.guarded(open, self.path, "a")

    def guarded(self, call, *args):
        try:
            return call(*args)
        except OSError as error:
            raise DataError(f"{self.path}: could not append to the run's log ({error.strerror or one_line(error)}); "
                            f"free space, then continue from the last checkpoint with --resume") from None

    def append(self, record):
        self.guarded(self.file.write, json.dumps(record) + "\n")
        self.guarded(self.file.flush)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.file.close()


class Interrupted(Exception):
    def __init__(self, signum, iteration=None):
        self.signum, self.iteration = signum, iteration
        super().__init__(f"interrupted at iteration {iteration}: checkpoint written; continue with --resume"
                         if iteration is not None else
                         "interrupted while starting, before its first iteration: nothing new to continue from; "
                         "run the command again")


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal) during a run. Between iterations a signal asks the loop to
    stop after the current one, with a checkpoint (a second SIGINT stops at once: KeyboardInterrupt); before the
    first iteration and after the last checkpoint (the final export and validation) it stops at once."""

    def __init__(self):
        self.signum, self.checkpointed, self.deferred = 0, None, False

    def handle(self, signum, frame):
        if not self.deferred:
            raise Interrupted(signum, self.checkpointed)
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def defer(self):
        """From the first iteration on: a signal waits for the end of the iteration."""
        self.deferred = True

    def at_once(self, iteration):
        """After the checkpoint of `iteration`: a signal stops at once, saying it is there."""
        self.deferred, self.checkpointed = False, iteration
        if self.signum:  # it came after the last look at it
            raise Interrupted(self.signum, iteration)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
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


def lost_a_process(error):
    """Whether `error` is how a collective fails when another process of the run died (NCCL: DistError;
    gloo: a RuntimeError from its transport). torchrun's SIGTERM is one of the run's stop signals (StopSignals)."""
    return dist.is_initialized() and (isinstance(error, dist.DistError) or "gloo" in str(error))


TORCHRUN_SETS = ("torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process it starts: "
                 "start the run with torchrun, or unset WORLD_SIZE for one process")
RENDEZVOUS_SECONDS = 300  # how long the processes wait for each other to start; MRM_RENDEZVOUS_TIMEOUT overrides it
# long enough for rank 0's validation and checkpoint, during which the others wait in a collective
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def torchrun_int(name, low, high=None, note=""):
    """The whole number in environment variable `name`, low <= it < high, or one ConfigError line."""
    value = os.environ.get(name)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < low or (high is not None and number >= high):
        shown = f"{name}={value!r}" if value is not None else f"{name} is not set"
        bound = f"from {low} to {high - 1}" if high is not None else f"of at least {low}"
        raise ConfigError(f"torchrun: {shown}, expected a whole number {bound}{note}; {TORCHRUN_SETS}")
    return number


def rendezvous_seconds():
    value = os.environ.get("MRM_RENDEZVOUS_TIMEOUT", str(RENDEZVOUS_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"MRM_RENDEZVOUS_TIMEOUT={value!r}, expected seconds > 0: how long each process of a "
                          f"torchrun run waits for the others to start")
    return seconds


def wait_for_port(address, port, deadline):
    """None once address:port accepts a connection, else why the last try before `deadline` failed. Polled from
    Python: the store's own client logs every failed try on stderr."""
    while True:
        try:
            socket.create_connection((address, port), timeout=min(5, max(0.1, deadline - time.monotonic()))).close()
            return None
        except OSError as error:
            if time.monotonic() >= deadline:
                return error.strerror or str(error)
        time.sleep(0.5)


def rendezvous(rank, world, address, port, seconds):
    """The group's TCPStore, formed within `seconds` or one ConfigError line. Rank 0 hosts it and waits for the
    others, unless torchrun's agent already hosts it (as torch's env:// rendezvous decides)."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    others = f"{world - 1} other process(es)" if rank == 0 else "rank 0"
    waited = f"torchrun: rank {rank} waited {seconds:g}s for {others} at {address}:{port}"
    advice = (f"start all {world} processes (torchrun --nproc-per-node {world} on one node) or unset WORLD_SIZE; "
              f"MRM_RENDEZVOUS_TIMEOUT sets the wait in seconds")
    deadline = time.monotonic() + seconds
    if rank != 0 or agent_hosts:
        why = wait_for_port(address, port, deadline)
        if why is not None:
            raise ConfigError(f"{waited} ({why}); {advice}")
    try:
        return dist.TCPStore(address, port, world, is_master=rank == 0 and not agent_hosts, multi_tenant=True,
                             timeout=timedelta(seconds=max(1.0, deadline - time.monotonic())))
    except dist.DistStoreError:  # rank 0's wait for the others timed out
        raise ConfigError(f"{waited}; {advice}") from None
    except dist.DistError as error:
        raise ConfigError(f"torchrun: rank {rank} could not set up the process group's store at {address}:{port} "
                          f"({one_line(error)})") from None


def init_distributed(cfg):
    """(rank, world size) of this process; (0, 1) when not started by torchrun. torchrun's variables are checked
    first and forming the group is bounded, so that a process that never starts is one error line, not a hang;
    the collectives afterwards keep the long COLLECTIVE_TIMEOUT."""
    world = torchrun_int("WORLD_SIZE", 1) if "WORLD_SIZE" in os.environ else 1
    if world == 1:
        return 0, 1
    rank = torchrun_int("RANK", 0, world, f" (WORLD_SIZE={world})")
    address = os.environ.get("MASTER_ADDR")
    if not address:
        raise ConfigError(f"torchrun: MASTER_ADDR is not set, expected the host of rank 0; {TORCHRUN_SETS}")
    port = torchrun_int("MASTER_PORT", 1, 65536)
    seconds = rendezvous_seconds()
    if cfg.device == "cuda":
        gpus = torch.cuda.device_count()
        torch.cuda.set_device(torchrun_int("LOCAL_RANK", 0, gpus, f" ({gpus} GPU(s) visible to this process)"))
    store = rendezvous(rank, world, address, port, seconds)
    store.set_timeout(COLLECTIVE_TIMEOUT)
    dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", store=dist.PrefixStore("default_pg", store),
                            rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return rank, world


def rank_prefix():
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"[rank {rank}] "


def config_json(cfg):
    return json.dumps(vars(cfg), indent=1, sort_keys=True) + "\n"
