"""Writing files and folders so that an interruption never leaves a half-written one.

- :func:`staged_folder`: a whole new folder (a raw dataset) is written into a hidden temporary
  sibling and renamed into place at the end; a run killed on the way is cleaned up by the next one.
- :func:`pid_alive`: whether the process that owns a staging folder or a lock still runs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists (used to tell a live writer's staging folder from a dead one's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _recover_interrupted(target: Path) -> None:
    """Clean up after a killed :func:`staged_folder` run of ``target``.

    A staging folder whose process is gone is removed. A ``.old`` folder (the previous content,
    moved aside for an ``overwrite``) is moved back if the target is missing - the kill came
    between the two renames - and removed if the target exists (the new folder was complete).
    """
    parent = target.parent
    if not parent.is_dir():
        return
    tmp_prefix, old_prefix = f".{target.name}.tmp-", f".{target.name}.old-"
    olds = []
    for p in sorted(parent.iterdir()):
        if p.name.startswith(tmp_prefix) and p.is_dir():
            pid = p.name[len(tmp_prefix):].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(old_prefix) and p.is_dir():
            pid = p.name[len(old_prefix):].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                olds.append(p)
    for old in olds:
        if not target.exists():
            os.rename(old, target)
            warnings.warn(f"restored {target} from {old.name}, left by an interrupted overwrite", stacklevel=3)
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden temporary sibling of ``target``; on success it becomes ``target``.

    Raises :class:`FileExistsError` when ``target`` exists and ``overwrite`` is false. On any
    exception (including KeyboardInterrupt) the temporary folder is removed and ``target`` is left as
    it was. With ``overwrite`` the old folder is only removed after the new one is complete. After a
    hard kill (SIGKILL, power loss) the next call for the same target removes the stale temporary
    folder and, if the kill came between moving the old folder aside and moving the new one in,
    restores the old one first.
    """
    target = Path(target)
    _recover_interrupted(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; refusing to overwrite it (use overwrite=True / "
                              f"--overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} appeared while writing; refusing to overwrite it")
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
