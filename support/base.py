"""The errors both scripts report as one line, and the small helpers every part uses: one-line messages,
ETA text, atomic file writes, and the scripts' signal handlers while they start. No torch: the scripts import it
first."""
import contextlib
import os
import shutil
import signal
import sys


class ConfigError(Exception):
    """A bad flag or combination of flags; main() prints it as one line and exits 2."""


class DataError(Exception):
    """A dataset, weights or checkpoint problem; the message is one line naming the path and what was expected."""


class CorruptFile(DataError):
    def __init__(self, path, reason='unreadable'):
        self.path = path
        reason = ' '.join(str(reason).split())  # the message must stay on one line
        kind = 'JPEG' if str(path).lower().endswith(('.jpg', '.jpeg')) else 'PNG'
        super().__init__(f'{path}: corrupt or unreadable file, expected a valid {kind} ({reason})')


class NonFiniteLoss(RuntimeError):
    pass


def format_eta(seconds):
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def one_line(error):
    """An exception as one short line (PyTorch's load errors span many)."""
    return ' '.join(f'{type(error).__name__}: {error}'.split())[:300]


def atomic_write(path, write):
    """Write to a temporary file, fsync, rename: a crash at any moment leaves the old file or the new, and an
    exception (a signal's included) removes the temporary file. A write that fails (a full disk, an I/O error) is
    one DataError line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(error, (OSError, RuntimeError)):  # torch.save reports a failed write as a RuntimeError
            raise
        reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)[:160]
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 30:.2f} GiB free there"
        raise DataError(f"{path}: could not write it ({reason}); the previous {os.path.basename(path)}, if any, "
                        f"is intact") from None


def stop_quietly_until_main():
    """SIGINT, SIGTERM and SIGHUP end the program with one line until main installs its own handlers: a script
    calls this before it imports torch, which takes seconds."""
    def stop(signum, frame):
        print(f"stopped by {signal.Signals(signum).name} while starting: nothing was written", file=sys.stderr)
        sys.exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)

