"""argus.present.phases: what a long command is doing, on stderr."""

from __future__ import annotations

import io

import pytest

from argus.present.phases import Phases

pytestmark = pytest.mark.unit


def test_plain_lines_one_per_phase_and_live_counts_throttled():
    out, now = io.StringIO(), [0.0]
    p = Phases(out, every_s=30.0, clock=lambda: now[0])
    p.say("compiling the BPF programs")
    for t in range(0, 70, 1):  # a live count every second for 70 s: 3 lines (0, 30, 60 s)
        now[0] = float(t)
        p.tick(f"traced so far: {t} s")
    p.say("writing the recording")
    p.echo("argus: a line that stays")
    p.close()
    assert out.getvalue().splitlines() == [
        "argus: compiling the BPF programs",
        "argus: traced so far: 0 s",
        "argus: traced so far: 30 s",
        "argus: traced so far: 60 s",
        "argus: writing the recording",
        "argus: a line that stays",
    ]


def test_a_terminal_gets_a_spinner_not_lines():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = Phases(out)
    p.say("compiling")
    p.tick("traced so far: 1 rank(s)")
    p.echo("argus: tracing 1 rank")
    p.close()
    text = out.getvalue()
    assert "argus: tracing 1 rank" in text  # the lines that stay are printed
    assert "argus: compiling\n" not in text  # the phases were the spinner's, not lines


def test_spinner_only_phases_print_nothing_into_a_pipe():
    out = io.StringIO()  # not a terminal: `argus report --json | jq` keeps a quiet stderr
    p = Phases(out, plain=False)
    p.say("reading and diagnosing 1 directory")
    p.tick("still")
    p.close()
    assert out.getvalue() == ""
