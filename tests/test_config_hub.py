"""Every shipped YAML parses with the command that is meant to run it, so a user's first run cannot fail on it."""

import subprocess
import sys
from pathlib import Path

import pytest

HUB = Path(__file__).parent.parent / "config_hub" / "finetune"
YAMLS = sorted(HUB.glob("*/*.yaml"))


def print_config(module: str, command: str, yaml_file: Path) -> str:
    argv = [sys.executable, "-m", module, command, "--config", str(yaml_file), "--print_config"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=HUB.parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("yaml_file", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_parses_with_finetune(yaml_file: Path) -> None:
    printed = print_config("litgpt_skip2lora", "finetune", yaml_file)
    assert ("skip2lora_enabled: true" in printed) == yaml_file.name.startswith("skip2lora")


@pytest.mark.parametrize("yaml_file", [p for p in YAMLS if p.name == "lora_baseline.yaml"], ids=lambda p: p.parent.name)
def test_baseline_parses_with_litgpt_itself(yaml_file: Path) -> None:
    assert "lora_query: true" in print_config("litgpt", "finetune_lora", yaml_file)
