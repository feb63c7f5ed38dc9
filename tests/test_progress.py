"""Progress: a live rich display on a terminal (a bar for counted steps), plain lines elsewhere, none with -q."""

from __future__ import annotations

import io

from model_opt_cli.progress import progress_display


def test_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    with progress_display(stream, quiet=False) as show:
        show("loading model.pth")
        show("[3/20] svd:svd -> metric 0.99")
    assert stream.getvalue() == "model-opt: loading model.pth\nmodel-opt: [3/20] svd:svd -> metric 0.99\n"


def test_a_live_bar_on_a_terminal_and_nothing_when_quiet() -> None:
    stream = io.StringIO()
    with progress_display(stream, quiet=False, terminal=True) as show:
        show("NNCF int8 calibration on 4 batches")
        show("[3/20] svd:svd -> metric 0.99")
    text = stream.getvalue()
    assert "\x1b[" in text  # drawn with terminal controls
    assert "model-opt: NNCF int8 calibration on 4 batches" in text and "model-opt: [3/20] svd:svd" in text
    assert "3/20" in text.split("model-opt: [3/20]", 1)[1]  # the bar counts the trials
    quiet = io.StringIO()
    with progress_display(quiet, quiet=True) as show:
        show("loading")
    assert quiet.getvalue() == ""
