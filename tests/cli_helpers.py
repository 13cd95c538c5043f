"""Running ``mambascope`` in-process from a test, and reading its one error line (docs/design.md §13)."""

from __future__ import annotations

from mambascope.cli import main

ERROR = ("mambascope: error",)


def run(capsys, *argv) -> tuple[int, str, str]:
    """``main(argv)`` (every argument as a string): its exit code, stdout and stderr."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str, *needles: str, prefixes: tuple[str, ...] = ERROR) -> str:
    """The single line of ``err`` starting with one of ``prefixes``, checked to name each of ``needles``."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith(prefixes)]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
