"""Output directories that never lose a result (docs/design.md §13).

A run never writes into its destination ``DIR``.  It holds a lock beside it (``.DIR.lock``, ``lock_path``),
builds the new output in a staging folder beside it (``.DIR.partial-PID-XXXXXXXX``, a name no folder had:
the same file system, so renames are atomic) and swaps it in only when it is complete:

    DIR -> .DIR.old-PID,   .DIR.partial-PID-XXXXXXXX -> DIR,   remove .DIR.old-PID

A run killed at any point leaves ``DIR`` as it was, or (killed between the two renames) ``.DIR.old-PID``,
which the next run on ``DIR`` puts back.  Every output carries a marker file, ``.mambascope``, so that
``--overwrite`` replaces only what mambascope wrote.  Safe places are never replaced: ``/``, the home
directory, the working directory and its parents.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MARKER = ".mambascope"

Notice = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"mambascope: {message}", file=sys.stderr)


class OutputBusyError(FileExistsError):
    """Another live process holds the lock of this output directory."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry needs its own fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace ``path`` with ``text`` (str: UTF-8; bytes as they are): temp file, fsync, rename; a reader never
    sees a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    binary = isinstance(text, bytes)
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to their usual handlers.

    Python handlers, not a signal mask: in a process with other threads (torch's), a masked signal is simply
    taken by another thread, and Python still runs its handler in the main thread at once.  An ignored signal
    (SIG_IGN, e.g. SIGINT inherited ignored by a background job) is left ignored: holding it would deliver it
    to nothing and could hide a SIGTERM received after it (docs/design.md §13).
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread can set handlers
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite the small file ``path`` with ``data`` where it is, for a full disk, on which the temp file
    of ``write_atomic`` cannot be made but the blocks of an existing file can be written again (not atomic:
    only for the marker, whose old text is then wrong anyway)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_unsafe(path: Path, flag: str) -> None:
    """``/``, ``$HOME``, the working directory and its parents are never an output to replace."""
    cwd = Path.cwd().resolve()
    unsafe = {Path("/"): "the root directory", Path.home().resolve(): "your home directory",
              cwd: "the working directory", **{p: "a parent of the working directory" for p in cwd.parents}}
    if path in unsafe:
        raise ValueError(f"{flag} {path} is {unsafe[path]}, which mambascope never replaces; "
                         "name a new directory, e.g. mambascope-out")


def lock_path(directory: str | Path) -> Path:
    """The lock file of an output directory: ``.DIR.lock`` beside the directory ``DIR`` names, every symbolic
    link resolved, so that every path to one directory (a link, the target) takes the same lock."""
    real = Path(os.path.realpath(Path(directory).expanduser()))
    return real.parent / f".{real.name}.lock"


class OutputLock:
    """An exclusive ``flock`` on ``lock_path(DIR)``, the one lock of the output ``DIR`` (runs and ``report``).

    The kernel drops the lock when its process dies (SIGKILL included), so a crashed run never blocks the
    next one; the file names the holder so that a refused run can say who holds it.
    """

    def __init__(self, path: Path, flag: str = "--out"):
        self.path = lock_path(path)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputBusyError(f"{flag} {path} is in use by another mambascope run ({holder}); wait for it "
                                      "to finish or choose another directory") from None
            # A holder that released and unlinked between our open and our flock leaves us a dead inode.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _readable_os_error(exc: OSError, what: str) -> OSError | ValueError:
    """An OSError of the file system as one line about ``what``; our own messages (no errno) pass as they are."""
    if exc.errno is None:
        return exc
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionError(f"cannot write {what}: {reason}; choose a directory you can write to")
    return ValueError(f"cannot write {what}: {reason}")


def _has_finished_work(staging: Path) -> bool:
    """Whether a staging folder holds something worth keeping: finished stages (results.json) or a
    training checkpoint (training.json, written with the model at each evaluation of ``train-tiny --task``)."""
    return any((staging / name).is_file() for name in ("results.json", "training.json"))


def marker(path: Path) -> dict[str, Any] | None:
    """The marker of a mambascope output directory, or None if ``path`` is not one."""
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "mambascope" else None


class OutputDir:
    """A destination directory claimed for one run.

    ``staging`` is where the run writes; ``commit()`` swaps it in; ``abandon()`` (interrupt, failure) keeps
    what finished without ever replacing an existing output.  Use as a context manager: the lock is released
    and an unfinished staging folder abandoned on exit.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, kind: str = "analysis", flag: str = "--out",
                 notice: Notice = _stderr):
        self.path = Path(os.path.abspath(Path(path).expanduser()))
        self.kind, self.flag, self.notice = kind, flag, notice
        try:
            _refuse_unsafe(self.path.resolve(), flag)
            if self.path.exists() and not self.path.is_dir():
                raise FileExistsError(f"{flag} {path} is a file, not a directory; choose a directory")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _readable_os_error(exc, f"{flag} {path}") from None
        try:
            self.lock = OutputLock(self.path, flag)
        except OSError as exc:
            if isinstance(exc, OutputBusyError):
                raise
            raise _readable_os_error(exc, f"{flag} {path}") from None
        try:
            self._recover()
            self._check_replaceable(overwrite)
            self.staging = self._new_staging()
            self._write_marker("running")  # also the probe that the run can write here at all
        except OSError as exc:
            self.lock.release()
            raise _readable_os_error(exc, f"{flag} {path}") from None
        except BaseException:
            self.lock.release()
            raise
        self.committed = self.abandoned = False

    # -- claiming ---------------------------------------------------------------------------------------
    def _siblings(self, tag: str) -> list[Path]:
        return sorted(self.path.parent.glob(f".{glob.escape(self.path.name)}.{tag}-*"))

    def _recover(self) -> None:
        """Put back or clear what killed runs left (we hold the lock: nothing else is running here)."""
        for old in self._siblings("old"):
            if not self.path.exists():
                os.rename(old, self.path)
                self.notice(f"restored {self.path} from {old.name}, left by a run killed while swapping it in")
            else:
                shutil.rmtree(old, ignore_errors=True)
                self.notice(f"removed {old}, the previous output of a run killed after its swap")
        for part in self._siblings("partial"):
            if _has_finished_work(part):
                self.notice(f"{part} holds the finished stages or last checkpoint of an interrupted run; kept, "
                            "delete it when you no longer need it")
            else:
                shutil.rmtree(part, ignore_errors=True)
                self.notice(f"removed {part}, the staging folder of a crashed run with no finished stage")

    def _new_staging(self) -> Path:
        """A folder of a name no folder had, made here: never an existing one emptied, since PIDs repeat (PID 1
        in every container) and a kept staging folder of an earlier run is the user's until they delete it.
        (``mkdir``, not ``mkdtemp``: the output keeps the umask's permissions, not 0700.)"""
        while True:
            staging = self.path.parent / f".{self.path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                staging.mkdir()
                return staging
            except FileExistsError:
                continue

    def _check_replaceable(self, overwrite: bool) -> None:
        if not self.path.exists() or not any(self.path.iterdir()):
            return
        if not overwrite:
            raise FileExistsError(f"output directory {self.path} exists; pass --overwrite to replace it (the old "
                                  "one stays until the new one is complete)")
        if marker(self.path) is None:
            raise ValueError(f"--overwrite refuses {self.path}: it is not a mambascope output (no {MARKER} "
                             "marker); remove it yourself or choose another directory")

    def _write_marker(self, status: str) -> None:
        self.staging.mkdir(parents=True, exist_ok=True)
        info = {"tool": "mambascope", "kind": self.kind, "status": status, "pid": os.getpid(),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            write_atomic(self.staging / MARKER, json.dumps(info))
        except OSError as exc:
            if exc.errno not in DISK_FULL or not (self.staging / MARKER).is_file():
                raise
            rewrite_in_place(self.staging / MARKER, json.dumps(info).encode())

    # -- writing ----------------------------------------------------------------------------------------
    @property
    def figures(self) -> Path:
        (self.staging / "figures").mkdir(exist_ok=True)
        return self.staging / "figures"

    def file(self, name: str) -> Path:
        return self.staging / name

    # -- finishing --------------------------------------------------------------------------------------
    def commit(self, status: str = "complete") -> Path:
        """Swap the staging folder in as ``path``; the previous output is removed only afterwards."""
        self._write_marker(status)
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}" if self.path.exists() else None
        with signals_deferred():  # Ctrl-C waits for the swap to finish; SIGKILL is what _recover is for
            if old is not None:
                os.rename(self.path, old)
            os.rename(self.staging, self.path)
            self.committed = True
            fsync_dir(self.path.parent)
            if old is not None:
                try:
                    shutil.rmtree(old)
                except OSError as exc:
                    self.notice(f"the new output is complete; the previous one was moved to {old} and could not "
                                f"be removed ({exc.strerror or exc}): delete it by hand")
        return self.path

    def abandon(self, status: str = "incomplete") -> Path | None:
        """After an interrupt (``status`` incomplete) or a failure (failed): where the finished stages are now,
        or None if nothing finished.

        With no earlier output they become ``path`` (marked ``status``); an existing output is never
        replaced by an unfinished one, so they stay in the staging folder.
        """
        if self.committed:
            return self.path
        self.abandoned = True
        if not _has_finished_work(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)
            return None
        if self.path.exists() and any(self.path.iterdir()):
            self._write_marker(status)
            return self.staging
        return self.commit(status)

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        try:
            if not self.committed and not self.abandoned:  # an abandon() of the caller's stands
                self.abandon("failed" if kind is not None and not issubclass(kind, KeyboardInterrupt)
                             else "incomplete")
        finally:
            self.close()


# -- report DIR: figures/ and report.html re-rendered in place ----------------------------------------------
def check_figures_folder(directory: Path) -> None:
    """``report DIR`` replaces ``DIR/figures``: refuse when it is not a folder of mambascope's figures (a file,
    a link, or a folder holding anything but PNG files), which the user must move away themselves."""
    figures = directory / "figures"
    if not figures.exists() and not figures.is_symlink():
        return
    if figures.is_symlink() or not figures.is_dir():
        raise FileExistsError(f"report: {figures} is not mambascope's figures folder (a file or link named "
                              "figures); move it away, since the report writes its figures there")
    other = next((p for p in sorted(figures.iterdir()) if p.suffix != ".png" or not p.is_file()), None)
    if other is not None:
        raise FileExistsError(f"report: {figures} holds {other.name}, which is not a figure of mambascope; move "
                              "it away, since the report replaces the figures folder")


def recover_report(directory: Path, notice: Notice = _stderr) -> None:
    """Before ``report DIR`` renders, holding DIR's lock: put back the figures of a report killed between its
    two renames (``.figures-old-PID``: ``figures/`` is then missing), or remove them after its swap, and the
    scratch folders (``.report-*``) of killed reports."""
    figures = directory / "figures"
    for old in sorted(directory.glob(".figures-old-*")):
        if not figures.exists():
            os.rename(old, figures)
            notice(f"restored {figures} from {old.name}, left by a report killed while swapping it in")
        else:
            shutil.rmtree(old)
            notice(f"removed {old}, the previous figures of a report killed after its swap")
    for scratch in sorted(directory.glob(".report-*")):
        if scratch.is_dir() and not scratch.is_symlink():
            shutil.rmtree(scratch)
            notice(f"removed {scratch}, the scratch folder of a killed report")


def swap_in_report(directory: Path, scratch: Path) -> None:
    """Move ``scratch``'s ``figures/``, ``report.html`` (and ``features.html``) into ``directory``: figures ->
    .figures-old-PID, scratch/figures -> figures, the pages replaced, then the old figures removed
    (``recover_report`` finishes a swap that a kill interrupted)."""
    figures, old = directory / "figures", directory / f".figures-old-{os.getpid()}"
    with signals_deferred():  # Ctrl-C waits for the swap to finish
        if figures.exists():
            os.rename(figures, old)
        os.rename(scratch / "figures", figures)
        if (scratch / "features.html").exists():  # census --dictionary: the feature pages beside the report
            os.replace(scratch / "features.html", directory / "features.html")
        os.replace(scratch / "report.html", directory / "report.html")
        fsync_dir(directory)
    if old.exists():
        shutil.rmtree(old)
