"""Writing files and folders so that an interruption never leaves a half-written one, and rounding.

- :func:`atomic_write_text`, :func:`atomic_write_json`, :func:`atomic_write_bytes`,
  :func:`atomic_write_csv`: a file is written to a temporary name in its own folder and renamed
  over the target (``os.replace``), so a reader sees the old or the new content, never a part.
- :func:`staged_folder`: a whole new folder (a raw dataset) is written into a hidden temporary
  sibling and renamed into place at the end; a run killed on the way is cleaned up by the next one.
- :func:`link_or_copy`: a file in a second place without a second copy where the file system allows.
- :func:`pid_alive`: whether the process that owns a staging folder or a lock still runs.
- :func:`round_half_up`: the rounding every fraction-to-case-count conversion uses (Python's
  ``round`` rounds halves to even, which would make ``0.5 * 5`` cases 2 in one place and 3 in another).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def _write_replacing(path: Path, data: str | bytes, newline: str | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``; no temporary file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if isinstance(data, bytes):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    _write_replacing(Path(path), data)


def atomic_write_text(path: Path, text: str, newline: str | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``newline`` as for :func:`open` (``""``: no translation)."""
    _write_replacing(Path(path), text, newline)


def json_text(obj: Any) -> str:
    """``obj`` as this package writes every JSON file: indented by 2, in the given key order, newline at the end."""
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON (:func:`json_text`) to ``path`` atomically."""
    atomic_write_text(path, json_text(obj))


def _csv_cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else format(float(value), ".10g")
    return str(value)


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """CSV text of ``rows`` (the header is just the first row): floats with 10 significant digits, NaN as ``nan``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow([_csv_cell(v) for v in row])
    return buf.getvalue()


def atomic_write_csv(path: Path, rows: Iterable[Sequence[Any]]) -> None:
    """Write ``rows`` as CSV (:func:`csv_text`) to ``path`` atomically."""
    atomic_write_text(path, csv_text(rows), newline="")


def round_half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up.

    A tolerance of 1e-9 absorbs float error in products such as ``45 * 0.7`` (31.499999999999996),
    which is meant as 31.5 and gives 32.
    """
    return math.floor(x + 0.5 + 1e-9)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no second copy on disk); copy it (with metadata) where linking fails."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
