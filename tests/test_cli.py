"""``python -m pipeline``: usage, unknown commands, every listed command's own --help."""
from __future__ import annotations

import importlib
import subprocess

import pytest

from pipeline.cli import COMMANDS, main


def _run(venv_bin, *args, cwd):
    return subprocess.run([str(venv_bin / "python"), "-m", "pipeline", *args],
                          capture_output=True, text=True, cwd=cwd)


def test_no_arguments_prints_usage(venv_bin, tmp_path):
    proc = _run(venv_bin, cwd=tmp_path)
    assert proc.returncode != 0  # nothing was done
    assert "usage: python -m pipeline <command>" in proc.stdout
    for name in COMMANDS:
        assert name in proc.stdout, f"command {name!r} missing from usage"


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_exits_2(venv_bin, tmp_path):
    proc = _run(venv_bin, "trian", cwd=tmp_path)
    assert proc.returncode == 2
    assert "trian" in proc.stderr
    assert "train" in proc.stderr, "the error should list the valid commands"


def test_bad_options_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["synthetic", "--out", "x"])  # --Lh and --params missing
    assert info.value.code == 2
    assert "--Lh" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_parser(name, capsys):
    """Each listed command's module exists and builds its parser (what --help shows)."""
    module = importlib.import_module(COMMANDS[name][0])
    assert callable(module.add_arguments) and callable(module.main)
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert f"python -m pipeline {name}" in capsys.readouterr().out
