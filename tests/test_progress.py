"""run_logged: the whole output goes to the log, nnU-Net's epoch lines drive the progress bar, exit codes pass through."""
from __future__ import annotations

import os
import sys

from nnunet_mixsup.progress import EPOCH_LINE, run_logged


def test_epoch_lines_of_nnunet_are_recognised():
    assert EPOCH_LINE.search("2026-12-03 19:11:43.118429: Epoch 12\n").group(1) == "12"
    assert EPOCH_LINE.search("2026-12-03 19:11:43.118429: Epoch time: 4.1 s") is None
    assert EPOCH_LINE.search("Epoch 3 of something") is None


def test_output_goes_to_the_log_and_the_bar_to_stderr(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("earlier\n")
    script = "import sys\nfor e in range(3):\n    print(f'2026-12-03 19:00:0{e}.0: Epoch {e}', flush=True)\n" \
             "print('to stderr', file=sys.stderr)\n"
    code = run_logged([sys.executable, "-c", script], os.environ, log, desc="training x", total_epochs=3)
    assert code == 0
    text = log.read_text()
    assert text.startswith("earlier\n") and "Epoch 2" in text and "to stderr" in text
    err = capsys.readouterr().err
    assert "training x" in err and "2/3" in err  # the bar counts finished epochs


def test_exit_code_is_returned_and_no_bar_without_desc(tmp_path, capsys):
    code = run_logged([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], os.environ, tmp_path / "l.log")
    assert code == 3 and "boom" in (tmp_path / "l.log").read_text()
    assert capsys.readouterr().err == ""
