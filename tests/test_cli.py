import subprocess
import sys
from pathlib import Path

import pytest

from node.cli import build_parser

COMMANDS = [
    "start", "id", "peers", "status", "find", "doctor", "run-local", "submit", "jobs", "job", "logs", "cancel",
    "market", "ledger", "reputation", "rate", "dashboard",
]  # fmt: skip
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("program", [[str(BIN / "node")], [str(BIN / "coop")], [sys.executable, "-m", "node"]])
def test_help_lists_every_command(program):
    result = subprocess.run([*program, "--help"], capture_output=True, text=True, check=True, timeout=60)
    for command in COMMANDS:
        assert f"\n    {command}" in result.stdout, command


def test_every_command_has_help():
    parser = build_parser()
    for command in COMMANDS:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([command, "--help"])
        assert info.value.code == 0


def test_the_dashboard_command_without_a_node_explains(tmp_path, capsys):
    from node.cli import main

    assert main(["dashboard", "--data-dir", str(tmp_path)]) == 1
    assert "no running node found" in capsys.readouterr().err


def test_client_commands_without_a_node_explain(tmp_path, capsys):
    from node.cli import main

    assert main(["peers", "--data-dir", str(tmp_path)]) == 1
    assert "no running node found" in capsys.readouterr().err
