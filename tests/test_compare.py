"""compare end to end on the tiny checkpoint: real subprocesses, real CSVs, real plots."""

import json
import math
from pathlib import Path

import pytest
import yaml

from benchmarks.compare import compare

HUB = Path(__file__).parent.parent / "config_hub" / "finetune" / "SmolLM2-135M-Instruct"
VARIANTS = {
    "lora": {"command": "finetune_lora", "config": str(HUB / "lora_baseline.yaml"), "args": ["--precision", "32-true"]},
    "skip2lora": {
        "command": "finetune_skip2lora",
        "config": str(HUB / "skip2lora.yaml"),
        "args": ["--skip2lora_block_indices", "[0,2]"],
    },
    "bad": {
        "command": "finetune_skip2lora",
        "config": str(HUB / "skip2lora.yaml"),
        "args": ["--cache.placement", "nowhere"],
        "description": "fails while parsing its arguments",
    },
}
GOOD = ["lora", "skip2lora"]


@pytest.fixture(scope="module")
def compared(tiny_checkpoint: Path, alpaca_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One comparison for the whole module: three fresh processes are most of this file's time."""
    tmp = tmp_path_factory.mktemp("compare")
    variants = tmp / "variants.yaml"
    variants.write_text(yaml.safe_dump({"common_args": ["--train.epochs", "2"], "variants": VARIANTS}, sort_keys=False))
    extra = [str(tiny_checkpoint), "--data", "JSON", "--data.json_path", str(alpaca_file)]
    extra += "--data.val_split_fraction 0.25 --train.micro_batch_size 6 --train.global_batch_size 6".split()
    extra += "--train.lr_warmup_steps 1 --train.save_interval null --eval.interval 3 --eval.max_new_tokens 2".split()
    return compare(variants, tmp / "out", extra_args=extra), variants, tmp / "out"


def test_every_variant_has_measured_figures(compared: tuple[dict, Path, Path]) -> None:
    results, _, out = compared
    runs = results["runs"]
    assert list(runs) == [*GOOD, "bad"] and results["baseline"] == "lora"
    for name in GOOD:
        run = runs[name]
        assert run["status"] == "ok" and run["returncode"] == 0, run["log_tail"]
        assert math.isfinite(run["final_val_loss"])
        assert run["final_val_ppl"] == pytest.approx(math.exp(run["final_val_loss"]))
        assert math.isfinite(run["initial_val_loss"]) and run["val_curve"][0]["step"] == 0
        assert run["peak_rss_mib"] > 0 and run["wall_time_s"] > run["train_time_s"] > 0 and run["trainable_params"] > 0
        assert len(run["epoch_train_time_s"]) == 2
        assert sum(run["epoch_train_time_s"]) == pytest.approx(run["train_time_s"])
        assert run["iterations"] == run["iterations_logged"]
        assert run["val_curve"][-1]["train_time_s"] == pytest.approx(run["train_time_s"])
        assert (out / name / "run.log").stat().st_size > 0
        assert (run["cache_mib"] is None) == (name == "lora") and (run["cache_mib"] or 1) > 0
    assert json.loads((out / "comparison_results.json").read_text()) == results
    assert results["environment"]["torch_num_threads"] >= 1
    assert "tiny-llama on JSON" in results["title"]


def test_ratios_follow_the_raw_figures(compared: tuple[dict, Path, Path]) -> None:
    runs = compared[0]["runs"]
    base = runs["lora"]
    assert base["train_time_ratio"] == base["peak_rss_ratio"] == 1.0 and base["val_loss_diff"] == 0.0
    for name in GOOD:
        run = runs[name]
        assert run["train_time_ratio"] == pytest.approx(run["train_time_s"] / base["train_time_s"])
        assert run["wall_time_ratio"] == pytest.approx(run["wall_time_s"] / base["wall_time_s"])
        assert run["peak_rss_ratio"] == pytest.approx(run["peak_rss_mib"] / base["peak_rss_mib"])
        assert run["val_loss_diff"] == pytest.approx(run["final_val_loss"] - base["final_val_loss"])


def test_a_failed_variant_is_recorded(compared: tuple[dict, Path, Path]) -> None:
    bad = compared[0]["runs"]["bad"]
    assert bad["returncode"] != 0 and bad["status"] == f"failed (exit code {bad['returncode']})"
    assert "cache.placement" in bad["log_tail"]
    assert bad["val_loss_diff"] is None and bad["train_time_ratio"] is None and bad["peak_rss_ratio"] is None


def test_plots_are_written(compared: tuple[dict, Path, Path]) -> None:
    out = compared[2]
    for png in ("val_loss_vs_step.png", "val_loss_vs_time.png", "time_and_memory.png"):
        assert (out / png).stat().st_size > 1000


def test_existing_results_are_kept(compared: tuple[dict, Path, Path]) -> None:
    results, variants, out = compared
    mtimes = {name: (out / name / "result.json").stat().st_mtime_ns for name in results["runs"]}
    again = compare(variants, out, only=["lora", "skip2lora"], extra_args=results["common_args"][2:])  # same args
    assert {name: (out / name / "result.json").stat().st_mtime_ns for name in again["runs"]} == {
        name: mtimes[name] for name in ("lora", "skip2lora")
    }
    assert again["runs"]["skip2lora"]["final_val_loss"] == results["runs"]["skip2lora"]["final_val_loss"]
