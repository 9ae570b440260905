"""Hugging Face hub ids as inputs: `org/name`, `org/name@revision`, resolved through huggingface_hub.

A path that exists on disk always wins. Anything else that is a valid repo id is a snapshot of the hub
cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), downloaded first when online;
with `HF_HUB_OFFLINE=1` only the cache is read. A pinned revision (a branch, a tag or a commit) resolves to
that snapshot or fails naming it: never to another snapshot. Torch-free; huggingface_hub is imported on use.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import CheckpointError

# weights of other frameworks and formats polytool never reads: not downloaded
SKIPPED_FILES = ["*.bin", "*.h5", "*.msgpack", "*.ckpt*", "*.onnx", "*.onnx_data", "*.ot", "*.pth", "*.pt",
                 "*.gguf", "*.mlmodel", "*.tflite"]
TRUE = {"1", "ON", "YES", "TRUE"}


def hub_cache() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub resolves it, read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, ON, YES, TRUE), read now rather than at its import."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE


def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); an explicit `revision` must agree with one in the name."""
    repo, at, pinned = name.rpartition("@") if "@" in name else (name, "", "")
    if not at or not repo:
        return name, revision
    if revision is not None and revision != pinned:
        raise CheckpointError(f"{name!r} pins revision {pinned!r} but --revision says {revision!r}: give one")
    return repo, pinned


def is_repo_id(name: str) -> bool:
    """A syntactically valid hub repo id (`name` or `org/name`), not a path that looks like one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith((".", "/", "~")) or os.sep != "/" and os.sep in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def local_or_hub(name: str | Path, revision: str | None = None, what: str = "base model directory",
                 hint: str = "", download: bool = True) -> Path:
    """An existing local directory, else the hub snapshot of repo id `name` (at `revision`: `name@rev` works
    too; `download=False`: the cache only). Raises CheckpointError naming the path, the repo or the revision that is not there."""
    text = str(name)
    path = Path(text).expanduser()
    if _exists(path):
        return path
    repo, revision = split_revision(text, revision)
    if not is_repo_id(repo):
        raise CheckpointError(f"no such {what}{hint}", path)
    return snapshot(repo, revision, what, hint, download)


def input_path(path: str | Path, revision: str | None = None, what: str = "adapter directory") -> Path:
    """An input the user named: `path` if it exists (or is no repo id: the caller's own checks say what is
    wrong); else the hub snapshot of repo id `path` (`org/name[@rev]`)."""
    text = str(path)
    local = Path(text).expanduser()
    try:
        exists = local.exists()
    except (OSError, ValueError):  # a name too long for the file system: the caller says so
        return local
    if exists or not is_repo_id(split_revision(text, revision)[0]):
        if revision is not None:
            raise CheckpointError(f"--revision {revision} applies to a Hugging Face hub id, not a local path", local)
        return local
    return local_or_hub(text, revision, what)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name no file system takes (too long, a NUL byte)
        return False


def snapshot(repo: str, revision: str | None, what: str, hint: str = "", download: bool = True) -> Path:
    """The snapshot directory of `repo` at `revision` (default main), downloaded unless offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
                                        HfHubHTTPError)
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if quiet:  # progress bars on a terminal only
        disable_progress_bars()
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=hub_cache(), local_files_only=offline() or not download,
                                      ignore_patterns=SKIPPED_FILES))
    except RevisionNotFoundError:
        raise CheckpointError(f"revision {revision!r} of {repo!r} does not exist on the Hugging Face hub") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo!r} is neither a local {what} nor a repository on the Hugging Face hub "
                              "(or it is private: log in with `hf auth login`)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise _not_cached(repo, revision, what, exc, hint, download) from None
    finally:
        if quiet:
            enable_progress_bars()


def _not_cached(repo: str, revision: str | None, what: str, exc: Exception, hint: str,
                download: bool) -> CheckpointError:
    folder = hub_cache() / ("models--" + repo.replace("/", "--"))
    why = ("HF_HUB_OFFLINE is set" if offline() else "nothing is downloaded for an optional check" if not download
           else f"the hub could not be reached ({type(exc).__name__})")
    if (folder / "snapshots").is_dir():
        held = sorted(p.name for p in (folder / "snapshots").iterdir())
        refs = sorted(p.name for p in (folder / "refs").iterdir()) if (folder / "refs").is_dir() else []
        return CheckpointError(f"revision {revision or 'main'!r} of {repo!r} is not in the Hugging Face cache "
                               f"({hub_cache()} holds refs: {', '.join(refs) or 'none'}; snapshots: "
                               f"{', '.join(held) or 'none'}), and {why}{hint}")
    return CheckpointError(f"{what.removesuffix(' directory')} {repo!r} is neither a local directory nor in the "
                           f"Hugging Face cache ({hub_cache()}), and {why}{hint}")
