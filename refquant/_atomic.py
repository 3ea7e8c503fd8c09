"""Atomic file replacement: write a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from glob import escape as glob_escape
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` (say ENOSPC from a write, which names no file) saying which output it was writing."""
    root = e.__cause__ if isinstance(e.__cause__, OSError) else e
    return OSError(root.errno, f"{root.strerror or root} (writing {path})")


def remove_stale(path) -> list[Path]:
    """Remove the temporary files that killed writers of ``path`` left behind: ``.NAME.PID.*.tmp``
    beside it whose process no longer runs (a live writer's file is left alone). Returns them."""
    path = Path(path)
    gone = []
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                gone.append(tmp)
    return gone


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temporary file in ``path``'s directory; on success it replaces ``path``.

    The temporary file's name carries the writer's process id, so the temporary files of
    writers that were killed before the rename are recognised and removed by the next write
    of the same path (``remove_stale``). The file gets the permissions an ordinary ``open`` would give (``0o666`` minus the
    umask), is flushed and fsynced before the rename, and the directory is fsynced after
    it. On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:   # e.g. a full disk: say which file
            raise _naming(e, path) from e
        raise
    _fsync_dir(path.parent)   # make the rename itself durable


def _fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename into it), where the platform allows it."""
    with contextlib.suppress(OSError):
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def recover_directory(path) -> None:
    """Finish or roll back what a killed ``atomic_directory`` writer of ``path`` left: its old
    directory moved aside (``.NAME.old``) is put back if nothing replaced it, else removed;
    unfinished new directories (``.NAME.PID.new``) of dead writers are removed."""
    import shutil

    path = Path(path)
    old = path.parent / f".{path.name}.old"
    if old.exists():
        if path.exists():        # killed after the new one was renamed in: finish
            shutil.rmtree(old, ignore_errors=True)
        else:                    # killed between the two renames: roll back
            os.rename(old, path)
    for new in path.parent.glob(f".{glob_escape(path.name)}.*.new"):
        pid = new.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(new, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path, *, force: bool = False):
    """Build a directory in a temporary sibling (yielded) and make it appear as ``path`` in
    one step: after a kill at any point, ``path`` is entirely the old directory or entirely
    the new one, and the next call recovers (``recover_directory``).

    An existing ``path`` that is not empty is refused unless ``force``: the old directory is
    then renamed aside, the new one renamed in, and the old one removed (a rename cannot
    replace a non-empty directory). On an exception the new directory is removed and
    ``path`` is left as it was."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not force:
        raise FileExistsError(f"{path} exists and is not empty: choose a new directory, or pass --force "
                              "(force=True) to replace it")
    new = path.parent / f".{path.name}.{os.getpid()}.new"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    try:
        yield new
        _fsync_dir(new)
        if path.exists():
            old = path.parent / f".{path.name}.old"
            os.rename(path, old)
            os.rename(new, path)
            _fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)   # the new one is in place; recover_directory finishes this
        else:
            os.rename(new, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(new, ignore_errors=True)
        if isinstance(e, OSError):   # name the output the user asked for, not the temporary one
            raise _naming(e, path) from e
        raise
