"""Running nnU-Net's command-line tools as subprocesses: whole output to a log, progress on the console.

The demo and the benchmark run stock ``nnUNetv2_train`` for minutes per run. Their output (a
few hundred lines per run) goes to a log file; the console shows a progress bar over nnU-Net's
epochs instead, read from the ``<timestamp>: Epoch N`` lines nnU-Net prints at the start of every
epoch (a resumed run starts the bar where it left off).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

EPOCH_LINE = re.compile(r": Epoch (\d+)\s*$")


def console_script(name: str) -> str:
    """The console script ``name`` (an nnU-Net command) installed beside this Python, else ``name`` for PATH.

    Running the one beside ``sys.executable`` uses the nnU-Net of this environment even when the
    environment is not activated.
    """
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def run_logged(cmd: Sequence[str], env: Mapping[str, str], log: Path, desc: str | None = None,
               total_epochs: int | None = None, cpus: Sequence[int] | None = None) -> int:
    """Run ``cmd``; append its stdout and stderr to ``log``; return its exit code.

    Args:
        cmd: the command and its arguments.
        env: the environment of the command.
        log: the log file (appended to; its folder must exist).
        desc: label of an epoch progress bar on stderr; no bar when None.
        total_epochs: the bar's length (nnU-Net's ``num_epochs``), if known.
        cpus: pin the command (and the processes it starts later) to these cores (Linux); None: no pinning.
    """
    with open(log, "a", encoding="utf-8") as f, \
            tqdm(total=total_epochs, desc=desc, unit="epoch", disable=desc is None, file=sys.stderr,
                 leave=False, dynamic_ncols=True) as bar:
        proc = subprocess.Popen([str(c) for c in cmd], env=dict(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
        assert proc.stdout is not None
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(proc.pid, set(cpus))  # before it imports torch or starts any worker
        for line in proc.stdout:
            f.write(line)
            m = EPOCH_LINE.search(line)
            if m:
                bar.n = int(m.group(1))  # epochs finished before this one
                bar.refresh()
        return proc.wait()
