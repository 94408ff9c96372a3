"""The node agent package installs and its CLI answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pifarm_agent import __version__
from pifarm_agent.cli import main


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"pifarm-agent {__version__}"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "pifarm-agent"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"pifarm-agent {__version__}"
