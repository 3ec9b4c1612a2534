"""Plain helpers shared by the test files in tests/ (imported as `from helpers import ...`)."""
import hashlib
import json
import os

import torch

from support.data import write_fake_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the parent of tests/

DLV2_TINY = dict(layers=(1, 1, 1, 1), width=8)
MIT_B5_PARAMS = 81_443_008

# ---------------------------------------------------------------- the training step

def fake_batch(size=32, source_label=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 5, (2, size, size), generator=generator, dtype=torch.uint8) if source_label is None \
        else source_label
    return dict(source_image=torch.randint(0, 256, (2, 3, size, size), generator=generator, dtype=torch.uint8),
                source_label=label,
                target_image=torch.randint(0, 256, (2, 3, size, size), generator=generator, dtype=torch.uint8))


# The DACS recipe (SlotSGD beside the Rebuilder's AdamW, EMA after the step) and DAFormer's (AdamW, EMA before
# the next step, MIC and the feature distance on); short schedules, so that every iteration has its own lr.
GRAPH_CASES = [["--task", "gta2cs", "--arch", "dlv2-tiny", "--iters", "8"],
               ["--task", "gta2cs", "--arch", "mit-tiny", "--mic", "--iters", "8", "--warmup-iters", "2"]]


# ---------------------------------------------------------------- training runs (tiny, CPU)

TOY_FAST = ["--task", "toy", "--batch-size", "2", "--log-every", "2", "--checkpoint-every", "2", "--workers", "0"]


def state_of(work_dir):
    return torch.load(os.path.join(work_dir, "checkpoint.pth"), weights_only=True)


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_checkpoints_equal(a, b):
    """Model, teacher, Rebuilder and every optimizer state bit-identical."""
    for part in ("model", "teacher", "rebuilder"):
        assert_states_equal(a[part], b[part])
    for optimizer_a, optimizer_b in zip(a["optimizers"], b["optimizers"], strict=True):
        for key, state in optimizer_a["state"].items():
            assert_states_equal(state, optimizer_b["state"][key])


def tiny_dacs_run(tmp_path, iters, checkpoint_every):
    """Arguments of a DACS-recipe run (dlv2-tiny, SlotSGD + the Rebuilder's AdamW) on a fake GTA/Cityscapes."""
    root = str(tmp_path / "data")
    write_fake_dataset(root, "gta", 3, (64, 48))
    write_fake_dataset(root, "cityscapes", 2, (64, 32))
    return ["--task", "gta2cs", "--data-root", root, "--arch", "dlv2-tiny", "--crop", "32", "--iters", str(iters),
            "--rebuilder-dim", "32", "--rebuilder-heads", "4", "--rebuilder-grid", "4", "--workers", "0",
            "--checkpoint-every", str(checkpoint_every), "--log-every", "1", "--val-every", "100"]


# ---------------------------------------------------------------- folders, run logs

def snapshot(folder):
    """Every folder and every file's bytes (hashed) under folder."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            found[os.path.join(dirpath, name)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            found[path] = (os.readlink(path) if os.path.islink(path) else
                           hashlib.sha256(open(path, "rb").read()).hexdigest())
    return found


def write_run(folder, records, **config):
    os.makedirs(folder)
    base = dict(task="gta2cs", arch="dlv2", recipe="dacs", mrm=True, mic=False, source_only=False, seed=0,
                workers=4, log_every=50, val_every=2000, device="cuda", data_root="data", work_dir=str(folder))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**base, **config}, f)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


def loss_record(iteration, scale=1.0):
    return dict(iteration=iteration, loss_sup=scale / iteration, loss_uda=0.5 * scale, loss_mrm=0.3, loss_mic=0.0,
                loss_fd=0.0, pseudo_weight=iteration / 4000, lr=2.5e-4 * (1 - iteration / 5000), it_per_s=2.0, time=0.0)
