"""benchmarks/end_to_end.py on a tiny random model: one short run of each method, its rows and their ratios."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import end_to_end

REPO = Path(__file__).parents[1]


def test_end_to_end_benchmark_times_whole_runs(tmp_path: Path) -> None:
    """LoRA at a learning rate given on the command line, a solo Skip2-LoRA run and its sweep of two
    configurations, halved at the first validation."""
    args = ["--random-model", "pythia-14m", "--n-layer", "2", "--vocab", "64", "--samples", "40", "--tokens", "6"]
    args += ["--epochs", "2", "--lora-runs", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    args += ["--set", "train.lr_warmup_steps=1", "--set", "eval.max_new_tokens=2", "--methods", "lora", "faithful"]
    args += ["--lora-lrs", "0.003", "--sweep", "lr=[0.001,0.003]", "--keep", "0.5", "--set", "faithful:eval.interval=1"]
    path = end_to_end.main(args)  # in this process; each run is a process of its own
    assert path.with_suffix(".png").is_file()
    rows = json.loads(path.read_text())
    assert [r["method"] for r in rows] == ["lora", "faithful", "faithful-sweep"]
    assert rows[0]["lr"]["init_args"]["lr"] == 0.003
    for row in rows:
        assert row["epochs"] == 2 and row["samples"] == 38  # 40 samples, 2 (5%) for validation
        assert 0 < row["epoch1_s"] < row["train_s"] < row["wall_s"] <= row["exit_s"]
        assert row["wall_vs_lora"] == pytest.approx(row["wall_s"] / rows[0]["wall_s"], abs=1e-4)
    for row in rows[1:]:  # Skip2-LoRA's own breakdown: exclusive phases that add up to the total
        phases = {k: v for k, v in row["breakdown"].items() if k != "total"}
        assert sum(phases.values()) == pytest.approx(row["breakdown"]["total"], abs=0.01)
        assert row["train_s"] == pytest.approx(phases["epoch_1"] + phases["later_epochs"], abs=0.002)
    sweep = rows[2]
    assert sweep["configurations"] == 2 and sweep["chosen"] in ("lr=0.001", "lr=0.003") and sweep["keep"] == 0.5
    steps = {c["name"]: c["steps"] for c in sweep["sweep"]}
    assert sorted(steps.values())[0] == 1 and steps[sweep["chosen"]] > 1  # one dropped after step 1
    assert sweep["wall_vs_solo"] == pytest.approx(sweep["wall_s"] / rows[1]["wall_s"], abs=1e-4)
    assert sweep["wall_vs_solo_runs"] == pytest.approx(sweep["wall_vs_solo"] / 2, abs=1e-4)
    assert sweep["val_loss"] == min(c["val_loss"] for c in sweep["sweep"])
    assert sweep["lora_grid_wall_s"] == pytest.approx(rows[0]["wall_s"], abs=0.06)
    assert sweep["lora_grid_best_val_loss"] == rows[0]["val_loss"]


@pytest.mark.parametrize("script", ["benchmarks/gpu/setup.sh", "benchmarks/gpu/end_to_end.sh"])
def test_gpu_scripts_parse_and_name_what_exists(script: str) -> None:
    """The GPU parts need a GPU; here each script must parse, and every repository file it names must exist."""
    assert subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True).returncode == 0
    text = (REPO / script).read_text()
    named = re.findall(r"(?:benchmarks|litgpt_skip2lora)[\w/.]*\.(?:sh|py)", text)
    named += [
        m.replace(".", "/") + ".py" for m in re.findall(r"python3 -m ((?:benchmarks|litgpt_skip2lora)\.\w+)", text)
    ]
    assert all((REPO / path).is_file() for path in named), named
