"""Files a run or a prediction did not write, and damaged inputs: named and skipped, never removed."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import eval as E
import train_dacs_mrm as T
from mrm import segmentation_ce
from support.data import TOY_SIZES
from support.networks import build_model
from support.runs import RunLog, export_model


def test_start_up_removes_only_its_own_interrupted_writes(tmp_path, monkeypatch):
    monkeypatch.setitem(TOY_SIZES, "val", 4)
    work = tmp_path / "shared"
    work.mkdir()
    for name in ("notes.tmp1", "data.json.tmp22", "checkpoint.pth.tmp123", "log.jsonl.tmp9"):
        (work / name).write_text("x")
    assert T.main(["--task", "toy", "--iters", "1", "--batch-size", "2", "--workers", "0", "--work-dir",
                   str(work)]) == 0
    assert sorted(p for p in os.listdir(work) if ".tmp" in p) == ["data.json.tmp22", "notes.tmp1"]


def test_a_per_image_weight_counts_each_image_and_other_shapes_are_refused():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 4, 5, 6), torch.randint(0, 4, (3, 10, 12))
    per_image = torch.tensor([1.0, 0.0, 0.5])
    expected = segmentation_ce(logits, target, per_image.view(3, 1, 1).expand(3, 10, 12))
    torch.testing.assert_close(segmentation_ce(logits, target, per_image), expected)
    for shape in ((2,), (3, 10), (1, 10, 12), (3, 1, 1)):
        with pytest.raises(ValueError, match=r"one per image \(3,\) or one per pixel \(3, 10, 12\)"):
            segmentation_ce(logits, target, torch.ones(shape))


@pytest.mark.parametrize("workers", [0, 2])
def test_images_skips_corrupt_files_by_name_and_counts_them(tmp_path, capsys, workers):
    model, arch_record = build_model("dlv2-tiny", 7)
    arch_record["align_corners"] = False
    export_model(str(tmp_path / "model.pth"), model, arch_record, 7, task="toy")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.jpg", "d.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(photos / name)
    for name, size in (("b.png", 300), ("d.jpg", 200)):  # a truncated PNG and a truncated JPEG
        with open(photos / name, "r+b") as f:
            f.truncate(size)
    out = tmp_path / "out"
    args = [str(tmp_path / "model.pth"), "--images", str(photos), "--out", str(out), "--workers", str(workers)]
    assert E.main(args) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    assert f"skipped: {photos / 'b.png'}: corrupt or unreadable file, expected a valid PNG" in printed.out
    assert f"skipped: {photos / 'd.jpg'}: corrupt or unreadable file, expected a valid JPEG" in printed.out
    assert "wrote 2 colour and train-id PNGs" in printed.out and "2 corrupt file(s) skipped" in printed.out
    assert sorted(os.listdir(out)) == ["a_color.png", "a_trainid.png", "c_color.png", "c_trainid.png"]


def test_eval_outputs_never_replace_inputs_or_a_runs_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(TOY_SIZES, "val", 4)
    run = str(tmp_path / "run")
    assert T.main(["--task", "toy", "--iters", "1", "--batch-size", "2", "--workers", "0", "--debug-every", "1",
                   "--work-dir", run]) == 0
    grid = open(os.path.join(run, "debug", "iteration_000001.png"), "rb").read()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(photos / "a.png")
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(photos / "a_color.png")  # an output's name
    model = os.path.join(run, "model.pth")
    before = {name: open(os.path.join(run, name), "rb").read() for name in os.listdir(run) if name != "debug"}
    before.update({p.name: p.read_bytes() for p in photos.iterdir()})
    capsys.readouterr()
    for args, words in (
            ([model, "--images", str(photos), "--out", str(photos)], "holds the input"),
            ([model, "--images", str(photos / "a.png"), "--out", str(photos)], "holds the input"),
            ([model, "--images", str(photos), "--out", run], "holds the input"),
            ([model, "--export", os.path.join(run, "checkpoint.pth")], "never replaces it"),
            ([model, "--export", os.path.join(run, "config.json")], "never replaces it"),
            ([model, "--export", str(photos / "a.png")], "never replaces it"),
            (["--plot", run, "--out", os.path.join(run, "log.jsonl")], "draws a PNG"),
            (["--plot", run, "--out", str(tmp_path / "curves.jpg")], "draws a PNG"),
            (["--plot", run, "--out", str(photos / "a.png")], "never replaces it"),  # a PNG, not a plot
            (["--plot", run, "--out", os.path.join(run, "debug", "iteration_000001.png")], "never replaces it")):
        assert E.main(args + ["--overwrite", "--workers", "0"]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (args, err)
    after = {name: open(os.path.join(run, name), "rb").read() for name in os.listdir(run) if name != "debug"}
    after.update({p.name: p.read_bytes() for p in photos.iterdir()})
    assert after == before and open(os.path.join(run, "debug", "iteration_000001.png"), "rb").read() == grid
    # what the commands write themselves may be replaced with --overwrite
    assert E.main(["--plot", run, "--out", os.path.join(run, "curves.png"), "--overwrite"]) == 0
    export = str(tmp_path / "export.pth")
    assert E.main([model, "--export", export]) == 0
    assert E.main([model, "--export", export, "--overwrite"]) == 0


def test_resuming_a_finished_run_does_nothing_and_logs_no_second_validation(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(TOY_SIZES, "val", 4)
    run = str(tmp_path / "run")
    args = ["--task", "toy", "--iters", "2", "--batch-size", "2", "--workers", "0", "--work-dir", run]
    assert T.main(args) == 0
    log = open(os.path.join(run, "log.jsonl")).read()
    capsys.readouterr()
    assert T.main(args + ["--resume"]) == 0
    assert "the run is finished (iteration 2, validated): nothing to resume" in capsys.readouterr().out
    assert open(os.path.join(run, "log.jsonl")).read() == log and log.count("val_miou") == 1
    # killed after its last checkpoint, before the final validation: the resume validates and exports
    os.remove(os.path.join(run, "model.pth"))
    with open(os.path.join(run, "log.jsonl"), "w") as f:
        f.write("".join(line for line in log.splitlines(keepends=True) if "val_miou" not in line))
    assert T.main(args + ["--resume"]) == 0
    assert os.path.exists(os.path.join(run, "model.pth"))
    assert open(os.path.join(run, "log.jsonl")).read().count("val_miou") == 1


def test_the_hrda_recipe_names_only_the_architectures_it_runs(capsys):
    assert T.main(["--task", "gta2cs", "--recipe", "hrda", "--arch", "dlv2-v1c"]) == 2
    assert capsys.readouterr().err == ("error: --recipe hrda does not run --arch dlv2-v1c: it runs mitb5, mitb3, "
                                       "mitb2, mit-tiny\n")


def test_overwrite_starts_over_only_in_a_folder_that_holds_a_run_alone(tmp_path, capsys, monkeypatch, one_error_line):
    monkeypatch.setitem(TOY_SIZES, "val", 4)
    args = ["--task", "toy", "--iters", "1", "--batch-size", "2", "--workers", "0", "--debug-every", "1"]
    run = tmp_path / "run"
    assert T.main(args + ["--work-dir", str(run)]) == 0
    capsys.readouterr()
    cases = {"notes": ("notes.txt", "holds files a run does not write (notes.txt)"),
             "grid": ("debug/mine.png", "(debug/mine.png)"),
             "folder": ("model.pth/keep.txt", "(model.pth)")}
    for case, (name, words) in cases.items():
        work = tmp_path / case
        shutil.copytree(run, work)
        if case == "folder":
            (work / "model.pth").unlink()
        (work / name).parent.mkdir(exist_ok=True)
        (work / name).write_text("mine")
        one_error_line(words, T.main, args + ["--overwrite", "--work-dir", str(work)], untouched=tmp_path)
    # files named as a run's, without the config.json a run writes: not a run, nothing removed
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pth").write_text("someone's")
    (other / "debug").mkdir()
    one_error_line("no config.json of train_dacs_mrm.py", T.main, args + ["--overwrite", "--work-dir", str(other)],
                   untouched=tmp_path)
    (other / "config.json").write_text('{"task": "toy"}')
    one_error_line("no config.json of train_dacs_mrm.py", T.main, args + ["--overwrite", "--work-dir", str(other)],
                   untouched=tmp_path)
    # the run alone: started over, saying what it removed
    assert T.main(args + ["--overwrite", "--work-dir", str(run)]) == 0
    assert "--overwrite: removed checkpoint.pth, config.json, log.jsonl, model.pth, curves.png, debug" in \
        capsys.readouterr().out
    one_error_line("not writable", T.main, args + ["--work-dir", "/proc/mrm-run"])


@pytest.mark.parametrize("lock,words", [("garbage \x00\x01", "not a lock of this program"),
                                        ("x" * 10 ** 6, "not a lock of this program"),
                                        (None, "not a lock file (a folder or a link)")])
def test_a_lock_this_program_did_not_write_is_named_and_kept(tmp_path, lock, words, one_error_line):
    work = tmp_path / "run"
    work.mkdir()
    if lock is None:
        (work / ".lock").mkdir()
    else:
        (work / ".lock").write_text(lock)
    one_error_line(words, T.main, ["--task", "toy", "--iters", "1", "--workers", "0", "--work-dir", str(work)],
                   untouched=tmp_path)


def test_a_full_disk_at_the_lock_and_at_the_log_is_one_line(tmp_path, small_toy, monkeypatch, one_error_line):
    import errno
    args = ["--task", "toy", "--iters", "2", "--batch-size", "2", "--workers", "0", "--log-every", "1"]
    real_open = os.open

    def no_space_for_the_lock(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", no_space_for_the_lock)
    one_error_line(".lock: cannot write the run's lock (No space left on device)", T.main,
                   args + ["--work-dir", str(tmp_path / "a")])
    monkeypatch.setattr(os, "open", real_open)

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(RunLog, "__init__", lambda self, work_dir: setattr(self, "path", "log.jsonl") or
                        setattr(self, "file", FullDisk()))
    err = one_error_line("could not append to the run's log (No space left on device)", T.main,
                         args + ["--work-dir", str(tmp_path / "b")])
    assert "continue from the last checkpoint with --resume" in err


def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, small_toy, capsys, one_error_line):
    args = ["--task", "toy", "--iters", "2", "--stop-after", "1", "--batch-size", "2", "--workers", "0"]
    run = tmp_path / "run"
    assert T.main(args + ["--work-dir", str(run)]) == 0
    capsys.readouterr()
    good = torch.load(run / "checkpoint.pth", weights_only=True)

    def without_teacher(state):
        del state["teacher"]

    def teacher_of_another_shape(state):
        key = next(iter(state["teacher"]))
        state["teacher"][key] = torch.zeros(3)

    def optimizer_state_of_another_shape(state):
        first = next(iter(state["optimizers"][0]["state"].values()))
        first["exp_avg"] = torch.zeros(3)

    def optimizer_of_another_layout(state):
        state["optimizers"][0]["param_groups"] = state["optimizers"][0]["param_groups"][:1]

    def no_random_state(state):
        state["rng"] = []

    def negative_iteration(state):
        state["iteration"] = -5

    def fractional_iteration(state):
        state["iteration"] = 2.5

    for damage in (without_teacher, teacher_of_another_shape, optimizer_state_of_another_shape,
                   optimizer_of_another_layout, no_random_state, negative_iteration, fractional_iteration):
        state = torch.load(run / "checkpoint.pth", weights_only=True)
        damage(state)
        work = tmp_path / damage.__name__
        work.mkdir()
        torch.save(state, work / "checkpoint.pth")
        shutil.copy(run / "log.jsonl", work / "log.jsonl")  # untouched: not cut back to a damaged iteration
        err = one_error_line("checkpoint.pth: damaged, or written by another version of this program", T.main,
                             args + ["--resume", "--work-dir", str(work)], untouched=work)
        assert str(work) in err, damage.__name__
    assert good.keys() == torch.load(run / "checkpoint.pth", weights_only=True).keys()


def test_a_model_file_of_an_architecture_this_version_lacks_is_one_line(tmp_path, one_error_line):
    unknown, damaged = str(tmp_path / "unknown.pth"), str(tmp_path / "damaged.pth")
    torch.save(dict(arch=dict(arch="convnext-x", align_corners=False), num_classes=7, model={}), unknown)
    torch.save(dict(arch=dict(arch="mit-tiny", align_corners=False, hrda=dict(context_scale=0.5)), num_classes=7,
                    model={}), damaged)
    for path, words in ((unknown, "a model of architecture 'convnext-x', which this version does not have"),
                        (damaged, "cannot be built by this version")):
        one_error_line(words, E.main, [path, "--task", "toy", "--export", str(tmp_path / "out.pth")],
                       untouched=tmp_path)
