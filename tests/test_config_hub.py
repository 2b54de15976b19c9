"""Every shipped YAML parses with the command that is meant to run it, so a user's first run cannot fail on it."""

from pathlib import Path

import litgpt.__main__
import pytest
from conftest import in_process

HUB = Path(__file__).parent.parent / "config_hub" / "finetune"
YAMLS = sorted(HUB.glob("*/*.yaml"))


def printed_config(run, capsys: pytest.CaptureFixture) -> str:
    """What ``--print_config`` prints, in this process: it exits 0 once printed."""
    with pytest.raises(SystemExit) as printed:
        run()
    assert printed.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("yaml_file", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_parses_with_finetune(yaml_file: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(HUB.parent.parent)
    printed = printed_config(lambda: in_process("finetune", "--config", str(yaml_file), "--print_config"), capsys)
    assert ("skip2lora_enabled: true" in printed) == yaml_file.name.startswith("skip2lora")


@pytest.mark.parametrize("yaml_file", [p for p in YAMLS if p.name == "lora_baseline.yaml"], ids=lambda p: p.parent.name)
def test_baseline_parses_with_litgpt_itself(yaml_file: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(HUB.parent.parent)
    monkeypatch.setattr("sys.argv", ["litgpt", "finetune_lora", "--config", str(yaml_file), "--print_config"])
    assert "lora_query: true" in printed_config(litgpt.__main__.main, capsys)
