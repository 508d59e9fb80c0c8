"""The README's promises stay true: its two opening commands are the ones CI and the quick start
use, and every skip reason and command-line option is documented."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from convfuse import Reason
from convfuse.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _code_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_exactly_two_commands() -> None:
    before_contents = README.split("## Contents")[0]
    blocks = _code_blocks(before_contents)
    assert len(blocks) == 2
    assert all(len(block.splitlines()) == 1 for block in blocks)
    install_and_run, install_and_test = blocks
    assert install_and_run.startswith("pip install . && convfuse ")
    assert install_and_test == 'pip install -e ".[test]" && pytest'


def test_ci_runs_the_readmes_test_command() -> None:
    test_command = _code_blocks(README)[1]
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == test_command
    assert all(c.startswith(("set ", "cd ")) for c in commands[:-1])  # nothing else of substance


def test_quick_start_command_works(tmp_path, monkeypatch) -> None:
    """The first command's convfuse part, as a new user runs it (the install is CI's job)."""
    monkeypatch.chdir(tmp_path)
    run_part = _code_blocks(README)[0].split(" && ", 1)[1]
    args = shlex.split(run_part)[1:]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    output = args[args.index("-o") + 1]
    assert (tmp_path / output).is_file()
    assert result.output.strip().splitlines()[-1].startswith("convfuse: fused 20 of 20 BatchNorm layers, verified")


def test_every_skip_reason_is_documented() -> None:
    reasons = [v for k, v in vars(Reason).items() if k.isupper()]
    missing = [r for r in reasons if f"| {r} |" not in README]
    assert not missing


def test_every_option_is_documented() -> None:
    help_text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    options = set(re.findall(r"(--[a-z][a-z-]+)", help_text))
    missing = sorted(o for o in options if f"`{o}" not in README and f", {o}" not in README)
    assert not missing
