"""Shared pieces of the tests in tests/: the repository on sys.path, the slow marker, and the fixtures that many
tests set up alike (fake datasets, the small toy validation set, running a command, the one-line error check)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import pytest  # noqa: E402
import torch  # noqa: E402

import train_dacs_mrm  # noqa: E402
from support.data import TOY_SIZES, write_fake_dataset  # noqa: E402

from helpers import snapshot  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds (real processes, whole runs); -m 'not slow' skips it")


@pytest.fixture
def small_toy(monkeypatch):
    """The toy task validates on 4 scenes instead of its usual number."""
    monkeypatch.setitem(TOY_SIZES, "val", 4)


@pytest.fixture
def fake_data(tmp_path):
    """fake_data(gta=(3, (64, 48)), cityscapes=(2, (64, 32))): writes those datasets (count, (width, height)) in
    their real layouts under tmp_path/data and returns that folder; called again, it adds or rewrites datasets."""
    root = str(tmp_path / "data")

    def write(**datasets):
        for dataset, (count, size) in datasets.items():
            write_fake_dataset(root, dataset, count, size)
        return root
    return write


@pytest.fixture
def run_main(capsys):
    """run_main(args) runs train_dacs_mrm.main(args), run_main(args, eval.main) another main: (exit code, stdout,
    stderr), the output being what was written since the last read."""
    def run(args, main=train_dacs_mrm.main):
        code = main(args)
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


@pytest.fixture
def one_error_line(capsys):
    """The one-line error check: stderr since the last read is one line, without a traceback, holding `words`;
    returns it. With `main`, it first runs main(args), which must exit with 2; with `untouched`, nothing under
    that folder may change. `start` is how the line begins ("error: " for refusals; None: not checked)."""
    def check(words="", main=None, args=(), untouched=None, start=None):
        before = snapshot(untouched) if untouched is not None else None
        if main is not None:
            assert main(list(args)) == 2, args
            start = "error: " if start is None else start
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and words in err, err
        assert start is None or err.startswith(start), err
        if before is not None:
            assert snapshot(untouched) == before, args
        return err
    return check
