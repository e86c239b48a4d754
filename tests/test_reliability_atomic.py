"""Interrupted ``prepare`` and ``simulate``: the dataset is left as it was (or, after a hard kill during
prepare's short commit, in a state the next run completes), and a rerun succeeds with the same result.

Faults: an exception (KeyboardInterrupt / OSError) raised by the writer after N files, and SIGKILL of a
subprocess after N files (monkeypatched writer calling ``os.kill(os.getpid(), SIGKILL)``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import SimpleITK as sitk

from nnunet_mixsup import prepare as prep
from nnunet_mixsup.lab.synthetic import make_synthetic_dataset
from nnunet_mixsup.prepare import GENERATED_RECORD, prepare_dataset

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")


def tree_digest(folder: Path, skip_record_stamps: bool = False) -> dict[str, str]:
    """sha256 of every file; optionally the generated-files record without its file stamps (they hold inodes)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if skip_record_stamps and p.name == GENERATED_RECORD:
            rec = json.loads(data)
            rec.pop("verified", None)
            data = json.dumps(rec, sort_keys=True).encode()
        out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def hidden_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


@pytest.fixture()
def ds(fresh_dirs) -> Path:
    return make_synthetic_dataset(fresh_dirs["nnUNet_raw"], 965, counts={"mask": 2, "box": 1, "tags": 1, "none": 1},
                                  n_test=0, seed=6)


@pytest.fixture()
def reference(ds, tmp_path) -> dict[str, str]:
    """The result of an uninterrupted prepare on a copy of the dataset."""
    copy = tmp_path / "reference" / ds.name
    shutil.copytree(ds, copy)
    prepare_dataset(copy, show_progress=False)
    return tree_digest(copy, skip_record_stamps=True)


def change_manifest(folder: Path) -> None:
    """New weak labels for the three weak cases (so a second prepare replaces every generated map)."""
    sup = json.loads((folder / "supervision.json").read_text())
    sup["cases"]["case_002"] = {"type": "box", "boxes": [{"label": 1, "min": [1, 2, 3], "max": [9, 10, 11]}]}
    sup["cases"]["case_003"] = {"type": "tags", "present": []}
    sup["cases"]["case_004"] = {"type": "tags", "present": [2]}
    (folder / "supervision.json").write_text(json.dumps(sup))


def fail_at(n: int, real, exc: BaseException):
    """A stand-in for ``real`` that raises ``exc`` at its n-th call (only then)."""
    calls = []

    def wrapper(*a, **k):
        calls.append(a)
        if len(calls) == n:
            raise exc
        return real(*a, **k)

    wrapper.calls = calls
    return wrapper


# ---------------------------------------------------------------------------------- prepare, exceptions
@pytest.mark.parametrize("n", [1, 2, 3])
def test_prepare_interrupted_while_rendering(ds, reference, monkeypatch, n):
    before = tree_digest(ds)
    monkeypatch.setattr(prep.sitk, "WriteImage", fail_at(n, sitk.WriteImage, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(ds, show_progress=False)
    assert tree_digest(ds) == before and hidden_siblings(ds) == []
    monkeypatch.undo()
    prepare_dataset(ds, show_progress=False)
    assert tree_digest(ds, skip_record_stamps=True) == reference


def clean_result(folder: Path, tmp_path: Path) -> dict[str, str]:
    """What an uninterrupted prepare makes of the dataset in its current state (run on a copy)."""
    copy = tmp_path / "expected" / folder.name
    shutil.rmtree(copy.parent, ignore_errors=True)
    shutil.copytree(folder, copy)
    prepare_dataset(copy, show_progress=False)
    return tree_digest(copy, skip_record_stamps=True)


@pytest.mark.parametrize("second_run", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_prepare_interrupted_during_commit_rolls_back(ds, tmp_path, monkeypatch, n, second_run):
    """os.replace fails at its n-th call (record, each label map, final record, dataset.json backup, dataset.json)."""
    if second_run:  # a prepared dataset whose manifest changed: the old generated maps must come back
        prepare_dataset(ds, show_progress=False)
        change_manifest(ds)
    expected = clean_result(ds, tmp_path)
    before = tree_digest(ds)
    wrapper = fail_at(n, os.replace, OSError("disk full (simulated)"))
    monkeypatch.setattr(prep.os, "replace", wrapper)
    try:
        prepare_dataset(ds, show_progress=False)
    except OSError as e:
        assert "simulated" in str(e)
        assert hidden_siblings(ds) == []
        if Path(wrapper.calls[-1][1]).is_relative_to(ds):
            assert tree_digest(ds) == before, "an interrupted commit was not rolled back"
        else:  # the sidecar in nnUNet_preprocessed, written after the (complete) commit
            assert tree_digest(ds, skip_record_stamps=True) == expected
        monkeypatch.undo()
        prepare_dataset(ds, show_progress=False)
    else:
        assert len(wrapper.calls) < n, "the fault was injected but nothing failed"
        monkeypatch.undo()
    assert tree_digest(ds, skip_record_stamps=True) == expected


# ---------------------------------------------------------------------------------- prepare, SIGKILL
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import SimpleITK as sitk
    from nnunet_mixsup import prepare as prep

    target, n = sys.argv[1], int(sys.argv[2])
    calls = []

    def killer(real):
        def wrapper(*a, **k):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        return wrapper

    if target == "render":
        prep.sitk.WriteImage = killer(sitk.WriteImage)
    else:
        prep.os.replace = killer(os.replace)
    prep.prepare_dataset(Path(sys.argv[3]), show_progress=False)
    print("finished without being killed")
""")


def run_killed(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    f = tmp_path / "kill_script.py"
    f.write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(f), *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


@pytest.mark.parametrize("where,n,second_run", [("render", 2, False), ("commit", 2, False), ("commit", 4, False),
                                                ("commit", 6, False), ("commit", 3, True)])
def test_prepare_killed_then_rerun_completes(ds, tmp_path, where, n, second_run):
    if second_run:
        prepare_dataset(ds, show_progress=False)
        change_manifest(ds)
    expected = clean_result(ds, tmp_path)
    before = tree_digest(ds)
    proc = run_killed(tmp_path, KILL_SCRIPT, where, str(n), str(ds))
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    if where == "render":
        assert tree_digest(ds) == before, "a kill while rendering changed the dataset"
        assert hidden_siblings(ds), "expected the killed run's staging folder"
    prepare_dataset(ds, show_progress=False)  # the rerun recognises the half-finished commit
    assert hidden_siblings(ds) == [], "stale staging folder not removed"
    assert tree_digest(ds, skip_record_stamps=True) == expected
    assert prepare_dataset(ds, show_progress=False).written == []


# ---------------------------------------------------------------------------------- simulate
SIM_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from nnunet_mixsup import fileio
    from nnunet_mixsup.lab import simulate as sim

    where, n = sys.argv[1], int(sys.argv[2])
    calls = []

    def killer(real):
        def wrapper(*a, **k):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        return wrapper

    if where == "case":
        sim._case_entry = killer(sim._case_entry)
    else:  # the renames of fileio.staged_folder: target -> .old, then tmp -> target
        fileio.os.rename = killer(os.rename)
    sim.simulate_dataset(500, 501, masks=0.3, boxes=0.4, tags=0.2, seed=int(sys.argv[3]), box_jitter_mm=1.0,
                         overwrite=True, show_progress=False)
    print("finished without being killed")
""")


@pytest.fixture()
def src(fresh_dirs) -> Path:
    from test_simulate import make_source

    return make_source(fresh_dirs["nnUNet_raw"], n=10)


def test_simulate_killed_midway_leaves_no_target_and_rerun_matches(src, tmp_path):
    from nnunet_mixsup.lab.simulate import simulate_dataset

    raw = src.parent
    kw = {"masks": 0.3, "boxes": 0.4, "tags": 0.2, "seed": 1, "box_jitter_mm": 1.0, "show_progress": False}
    clean = tree_digest(simulate_dataset(500, 501, **kw))
    shutil.rmtree(raw / "Dataset501_SrcMixSup")
    proc = run_killed(tmp_path, SIM_KILL_SCRIPT, "case", "5", "1")
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    names = sorted(p.name for p in raw.iterdir())
    assert "Dataset501_SrcMixSup" not in names and any(n.startswith(".Dataset501_SrcMixSup.tmp-") for n in names)
    target = simulate_dataset(500, 501, **kw)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset500_Src", "Dataset501_SrcMixSup"], "stale temp left"
    assert tree_digest(target) == clean


def test_simulate_killed_between_the_overwrite_renames_restores_the_old_dataset(src, tmp_path):
    from nnunet_mixsup.lab.simulate import simulate_dataset

    raw = src.parent
    kw = {"masks": 0.3, "boxes": 0.4, "tags": 0.2, "box_jitter_mm": 1.0, "show_progress": False}
    old = tree_digest(simulate_dataset(500, 501, seed=1, **kw))
    proc = run_killed(tmp_path, SIM_KILL_SCRIPT, "rename", "2", "7")  # killed after target -> .old
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not (raw / "Dataset501_SrcMixSup").exists()
    with pytest.warns(UserWarning, match="restored"), pytest.raises(FileExistsError):
        simulate_dataset(500, 501, seed=7, **kw)  # not overwrite: the old dataset is back, untouched
    assert tree_digest(raw / "Dataset501_SrcMixSup") == old
    new = simulate_dataset(500, 501, seed=7, overwrite=True, **kw)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset500_Src", "Dataset501_SrcMixSup"]
    assert tree_digest(new) != old


def test_simulate_exception_after_n_files_leaves_nothing(src, fresh_dirs, monkeypatch):
    from nnunet_mixsup.lab import simulate as sim

    raw = src.parent
    for n in (1, 4, 10):
        with monkeypatch.context() as m:
            m.setattr(sim.shutil, "copy2", fail_at(n, shutil.copy2, KeyboardInterrupt()))
            with pytest.raises(KeyboardInterrupt):
                sim.simulate_dataset(500, 501, masks=0.3, boxes=0.4, tags=0.2, show_progress=False)
        assert sorted(p.name for p in raw.iterdir()) == ["Dataset500_Src"]
