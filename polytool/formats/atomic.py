"""Outputs written atomically, directories and single files alike: checked before anything is written,
built in a temporary directory (or file) beside the target and renamed into place at the end, so a crash
never leaves a complete-looking output.

An existing output is replaced only with --force, only when polytool wrote it (its safetensors or GGUF
files carry polytool's provenance; an empty directory or a symbolic link counts too), and never one that
holds or lies inside an input. Without --force the final rename never replaces anything: where another run
created the output meanwhile, this one fails in one line and leaves it alone."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator

from ..errors import OutputExistsError, PolytoolError


def check_not_input(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is, holds or lies inside an input (links followed)."""
    out = Path(out)
    try:
        resolved = out.resolve()
        for inp in inputs:
            src = Path(inp).resolve()
            if resolved == src or src in resolved.parents or resolved in src.parents:
                raise PolytoolError(f"output {out} overlaps the input {inp}: inputs are never written")
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop, no permission, ...
        raise PolytoolError(f"invalid output path ({getattr(exc, 'strerror', None) or exc})", out) from None


def check_output(out: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an output that exists (unless `force`, and then unless polytool wrote it), that is, holds or
    lies inside an input, or whose nearest existing parent is not a directory."""
    out = Path(out)
    check_not_input(out, inputs)
    try:
        parent = next(p for p in out.absolute().parents if p.exists() or p.is_symlink())
        if not parent.is_dir():
            raise PolytoolError(f"cannot create the output: {parent} is not a directory", out)
        exists = out.exists() or out.is_symlink()
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop, no permission, ...
        raise PolytoolError(f"invalid output path ({getattr(exc, 'strerror', None) or exc})", out) from None
    if exists and not force:
        raise OutputExistsError("already exists; pass --force to replace it", out)
    if exists and not written_by_polytool(out):
        raise PolytoolError("exists and is not an output polytool wrote (none of its files carries polytool's "
                            "provenance): --force replaces only polytool's outputs; remove it yourself or write "
                            "elsewhere", out)


MARK = b"polytool.version"  # the provenance key every safetensors and GGUF file polytool writes carries
HEADER_BYTES = 1 << 20  # where a GGUF file keeps its key-values, and a safetensors header its metadata


def _has_mark(file: Path) -> bool:
    """The file's first megabyte (a safetensors header, GGUF key-values) names polytool's provenance key."""
    try:
        with open(file, "rb") as fh:
            return MARK in fh.read(HEADER_BYTES)
    except OSError:
        return False


def written_by_polytool(out: Path) -> bool:
    """Whether --force may replace `out`: a link (only the link goes), an empty directory, or an output whose
    weights files (top level, or one level down for `--task all`) carry polytool's provenance."""
    if out.is_symlink():
        return True
    if out.is_file():
        return _has_mark(out)
    try:
        entries = list(out.iterdir())
    except OSError:
        return False
    files = [p for p in entries if p.is_file()] + [p for d in entries if d.is_dir() for p in d.iterdir()]
    weights = [p for p in files if p.suffix in (".safetensors", ".gguf")]
    return not entries or any(_has_mark(p) for p in weights)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (the data reaches the disk before the rename)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---- atomic output directories ----------------------------------------------------------------
TMP_TAG, OLD_TAG = "polytool-tmp", "polytool-old"
NAME_MAX = 255  # bytes in one file name (Linux, macOS)


def _sibling(out: Path, tag: str, pid: int) -> Path:
    """`.OUT.<tag>-<pid>` beside `out`, OUT shortened to fit a file name: the work and backup directories."""
    stem = out.name
    while len(os.fsencode(f".{stem}.{tag}-{pid}")) > NAME_MAX:
        stem = stem[:-1]
    return out.parent / f".{stem}.{tag}-{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clear_leftovers(out: Path) -> None:
    """Remove what a killed run left beside `out` (its pid is gone): a temporary directory always, a
    backup of the previous output only once `out` exists again (otherwise it is the only copy: kept)."""
    for entry in out.parent.iterdir():
        match = re.fullmatch(rf"\.(.*)\.({TMP_TAG}|{OLD_TAG})-(\d+)", entry.name)
        if not match or entry != _sibling(out, match[2], int(match[3])) or _alive(int(match[3])):
            continue
        if match[2] == TMP_TAG or out.exists():
            _remove(entry)


def _write_error(out: Path, exc: OSError) -> PolytoolError:
    where = f" ({exc.filename})" if exc.filename else ""
    return PolytoolError(f"failed while writing the output: {exc.strerror or exc}{where}", out)


def atomic_output_dir(out: str | Path, force: bool = False) -> ContextManager[Path]:
    """Yield a fresh temporary directory beside `out`; on success fsync it and rename it to `out`.

    An existing `out` is replaced (with `force`) only after the new one is complete; on any
    error the temporary directory is removed and `out` is left as it was. Leftovers of killed
    runs are removed first. An OSError (disk full, file too large, ...) becomes a PolytoolError.
    """
    return _atomic(Path(out), force, _commit_dir, make_dir=True)


def atomic_output_file(out: str | Path, force: bool = False) -> ContextManager[Path]:
    """Yield a temporary file path beside `out`; on success fsync it and rename it over `out`: the
    single-file form of `atomic_output_dir`, with the same checks, temporary name and errors."""
    return _atomic(Path(out), force, _commit_file, make_dir=False)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists (even an empty directory, which a
    plain rename would replace): renameat2(RENAME_NOREPLACE) where the system has it."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without the flag
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _appeared(out: Path) -> OutputExistsError:
    return OutputExistsError("appeared while this run wrote it (another run?): left as it is, nothing written; "
                             "pass --force to replace it", out)


def _commit_dir(tmp: Path, out: Path, force: bool) -> None:
    fsync_tree(tmp)
    if not force:
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            raise _appeared(out) from None
    elif out.exists() or out.is_symlink():
        old = _sibling(out, OLD_TAG, os.getpid())
        _remove(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)  # put the previous output back
            raise
        _remove(old)
    else:
        os.rename(tmp, out)


def _commit_file(tmp: Path, out: Path, force: bool) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if force:
        os.replace(tmp, out)
        return
    try:
        _rename_noreplace(tmp, out)
    except FileExistsError:
        raise _appeared(out) from None


@contextmanager
def _atomic(out: Path, force: bool, commit: Callable[[Path, Path, bool], None], make_dir: bool) -> Iterator[Path]:
    check_output(out, force)
    tmp = _sibling(out, TMP_TAG, os.getpid())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(out)
        _remove(tmp)
        if make_dir:
            tmp.mkdir()
    except OSError as exc:
        raise _write_error(out, exc) from None
    try:
        yield tmp
        commit(tmp, out, force)
        _fsync_dir(out.parent)
    except BaseException as exc:
        try:
            _remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _write_error(out, exc) from None
        raise
