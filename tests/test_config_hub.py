"""Every shipped YAML parses with the command that is meant to run it, so a user's first run cannot fail on it."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import litgpt
import litgpt.__main__
import pytest
import yaml
from conftest import TINY, WORDS, in_process

from benchmarks.end_to_end import set_key
from benchmarks.random_checkpoint import SPECIAL, write_checkpoint
from litgpt_skip2lora.configs import shipped_configs

REPO = Path(__file__).parent.parent
HUB = REPO / "config_hub" / "finetune"
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


def test_every_shipped_yaml_has_a_short_name() -> None:
    assert {f"{p.parent.name}/{p.stem}" for p in YAMLS} == set(shipped_configs())


def test_the_command_lines_values_win_over_the_yamls(capsys, tmp_path) -> None:
    """The positional checkpoint folder typed before ``--config``, and a flag typed before it, are what run."""
    run = lambda: in_process(  # noqa: E731
        "finetune",
        str(tmp_path),
        "--train.epochs",
        "7",
        "--config",
        "SmolLM2-135M-Instruct/skip2lora_tail",
        "--print_config",
    )
    printed = yaml.safe_load(printed_config(run, capsys))
    assert (printed["checkpoint_dir"], printed["train"]["epochs"]) == (str(tmp_path), 7)
    assert printed["skip2lora_output_layer"] == "block.26"  # the rest is the YAML's


def test_an_unknown_config_is_refused_in_one_line_listing_the_shipped_ones(capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        in_process("finetune", "--config", "no/such.yaml")
    assert str(refused.value).count("\n") == 0
    assert str(refused.value).startswith("error: --config no/such.yaml: no such file")
    assert "SmolLM2-135M-Instruct/skip2lora_tail" in str(refused.value)


def test_a_non_editable_install_finds_its_configs_from_anywhere(tmp_path) -> None:
    """A wheel built from this repository, unpacked alone on the path, run from an empty folder: the README's
    ``--config config_hub/...`` and the short name both find the YAML shipped inside it."""
    repo, source = HUB.parents[1], tmp_path / "source"  # a copy: building writes build/ into the source
    package = shutil.ignore_patterns("__pycache__")
    shutil.copytree(repo / "litgpt_skip2lora", source / "litgpt_skip2lora", ignore=package)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source)
    wheel_dir, site, cwd = tmp_path / "wheel", tmp_path / "site", tmp_path / "cwd"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir)]
    subprocess.run([*build, str(source)], check=True, capture_output=True)
    (wheel,) = wheel_dir.glob("*.whl")
    zipfile.ZipFile(wheel).extractall(site)
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    for name in ("config_hub/finetune/SmolLM2-135M-Instruct/skip2lora_tail.yaml", "SmolLM2-135M-Instruct/skip2lora"):
        command = [sys.executable, "-m", "litgpt_skip2lora", "finetune", "--config", name, "--print_config"]
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "skip2lora_enabled: true" in done.stdout
    shipped = subprocess.run(
        [sys.executable, "-c", "import litgpt_skip2lora.configs as c; print(c.SHIPPED)"],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        check=True,
    )
    assert Path(shipped.stdout.strip()).is_relative_to(site)


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct/lora_baseline", "SmolLM2-135M-Instruct/skip2lora_tail"])
def test_more_devices_than_the_yamls_batch_splits_over_is_one_line(name: str, tmp_path, monkeypatch) -> None:
    """Global batch 8 over 2 devices of micro-batches of 8: refused before any process starts, LoRA's YAML too."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        in_process("finetune", "--config", name, "--devices", "2")
    assert refused.value.code == (
        "error: --train.global_batch_size 8 does not split into micro-batches of 8 over 2 devices: use a global"
        " batch size that is a multiple of 16, or --train.micro_batch_size 4."
    )


RECIPES = sorted([*HUB.glob("*/skip2lora_labels.yaml"), *HUB.glob("*/skip2lora_text.yaml")])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_recipe_runs_on_a_users_json_data(recipe: Path, tmp_path, alpaca_writer, monkeypatch) -> None:
    """The recipe as a user runs it, on a random model deep enough for its tail: their data and checkpoint on the
    command line, nothing else to tune; final/ holds the recipe's tail, trained on their data."""
    import litgpt

    config = litgpt.Config(**{**TINY, "n_layer": 32}, vocab_size=len(SPECIAL) + len(WORDS))
    checkpoint = write_checkpoint(tmp_path / "checkpoint", config, WORDS)
    data = alpaca_writer(tmp_path / "data.json", 24)
    monkeypatch.chdir(tmp_path)
    in_process(
        "finetune", str(checkpoint), "--config", f"{recipe.parent.name}/{recipe.stem}",
        "--data", "JSON", "--data.json_path", str(data), "--data.val_split_fraction", "0.25", "--precision", "32-true",
        "--train.epochs", "1", "--eval.max_new_tokens", "2", "--out_dir", str(tmp_path / "out"),
    )  # fmt: skip
    final = tmp_path / "out" / "final"
    saved = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    assert saved["skip2lora_output_layer"] == yaml.safe_load(recipe.read_text())["skip2lora_output_layer"]
    assert saved["data"]["init_args"]["json_path"] == str(data) and (final / "lit_model.pth").is_file()


@pytest.mark.parametrize(
    ("recipe", "frontier", "point"), [("labels", "supersense", "tail12"), ("text", "definitions", "tail20-lr0.001")]
)
def test_a_recipe_is_the_frontier_point_it_cites(recipe: str, frontier: str, point: str) -> None:
    """SmolLM2-135M-Instruct's recipe is the tail YAML with the frontier's settings and the point's options, as the
    frontier measured it (its out_dir aside)."""
    spec = yaml.safe_load((REPO / "benchmarks" / "frontier" / f"{frontier}.yaml").read_text())
    (options,) = [p.get("options", []) for p in spec["points"] if p["name"] == point]
    measured = yaml.safe_load((HUB / "SmolLM2-135M-Instruct" / "skip2lora_tail.yaml").read_text())
    sets = [s for s in spec["end_to_end"] if s != "--set"]
    flags = [
        (flag.removeprefix("--").replace("optimizer.", "optimizer.init_args."), v)
        for flag, v in zip(options[::2], options[1::2])
    ]
    for dotted, value in [*(s.split("=") for s in sets), ("train.epochs", spec["epochs"]), *flags]:
        set_key(measured, dotted, yaml.safe_load(value) if isinstance(value, str) else value)
    shipped = yaml.safe_load((HUB / "SmolLM2-135M-Instruct" / f"skip2lora_{recipe}.yaml").read_text())
    assert {**shipped, "out_dir": None} == {**measured, "out_dir": None}
