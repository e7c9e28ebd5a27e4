"""Progress bars: off a terminal each redraw is one plain line, and the last line is the final state."""

import time

from multitask.progress import Progress


def test_off_a_terminal_the_bar_prints_plain_lines_and_its_final_state(capsys):
    bar = Progress(100, "work", unit="steps", log_every=0.01)
    for i in range(5):
        time.sleep(0.02)
        bar.update(10, postfix=f"loss {i}")
    bar.n = 97  # a caller may set the count directly (the recorder does at the end of a build)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().split("\n")
    assert len(lines) >= 3  # periodic lines, not one redrawn line
    assert all(line.startswith("work:") for line in lines)
    assert "97/100" in lines[-1] and "loss 4" in lines[-1]
    assert "steps/s" in lines[-1]


def test_a_disabled_bar_prints_nothing(capsys):
    bar = Progress(10, "quiet", enabled=False)
    bar.update(10)
    bar.close()
    assert capsys.readouterr().err == ""
