"""The `lmforge` dispatcher: stage list, --version, unknown stages, `python -m lmforge`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge import __version__
from lmforge.cli import STAGES, main


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_help_lists_stages(argv, capsys):
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: lmforge <stage>")
    assert "stages:" in out
    for name, (_, summary) in STAGES.items():
        assert any(line.split() and line.split()[0] == name and summary in line for line in out.splitlines()), name
    assert "tokenizer" in STAGES
    assert err == ""


def test_version(capsys):
    assert main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out == f"lmforge {__version__}\n"
    assert err == ""


def test_unknown_stage_is_a_clean_error(capsys):
    assert main(["bogus-stage", "--flag"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == "lmforge: error: unknown stage 'bogus-stage'"
    assert sum("error" in line for line in lines) == 1  # one error line, then the usage as a hint
    assert "Traceback" not in err


def test_stage_help_is_forwarded(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "--help"])
    assert exc.value.code == 0
    assert "lmforge tokenizer" in capsys.readouterr().out


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: lmforge <stage>")
    assert "tokenizer" in r.stdout
    assert "Traceback" not in r.stderr


def test_python_dash_m_unknown_stage_exit_code():
    r = subprocess.run([sys.executable, "-m", "lmforge", "nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == "lmforge: error: unknown stage 'nope'"
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
