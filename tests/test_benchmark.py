"""The benchmark script end to end on a tiny model: every configuration measured, ratios consistent, none judged."""

import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import depth_features, dropout, lanes, shared_masks, step
from litgpt_skip2lora.adapters import Reads
from litgpt_skip2lora.model import GPT, Config

SCRIPT = Path(__file__).parents[1] / "benchmark_skip2lora.py"
EXPECTED = [
    "lora",
    "skip2-2",
    "skip2-2-cached",
    "skip2-2-disk",
    "skip2-2-disk-cold",
    "skip2-2-cached-plain-head",
    "skip2-4-cached-quarter",
    "lora-same-params",
]
ENVIRONMENT = "date python torch litgpt device device_name threads precision batch_size seq_len rank".split()


ARGS = ["--model", "pythia-14m", "--n-layer", "2", "--device", "cpu", "--blocks", "2", "--batch-size", "2"]
ARGS += ["--seq-len", "16", "--repeats", "1", "--warmup", "0"]
RUN = ["lora", "skip2-2-cached", "skip2-2-disk-cold"]  # a process each: the baseline, the RAM and the disk cache


def test_the_benchmark_plans_every_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["benchmark_skip2lora.py", *ARGS])
    specs = step.configurations(step.parse_args())
    assert list(specs) == EXPECTED
    assert specs["skip2-4-cached-quarter"].labelled == 0.25
    assert specs["skip2-2-cached-plain-head"].factored_head is False
    assert specs["skip2-2"].placement is None and specs["skip2-2-disk-cold"].cold


def test_benchmark_measures_the_configurations_it_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    """The benchmark in this process; each configuration in a process of its own, as it measures them."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *ARGS, "--configs", ",".join(RUN), "--out", str(tmp_path)])
    step.main()
    stdout = capsys.readouterr().out
    assert "overridden to n_layer=2" in stdout
    (path,) = tmp_path.glob("benchmark-*.json")
    report = json.loads(path.read_text())

    assert all(report["environment"][key] is not None for key in ENVIRONMENT)
    results = report["configurations"]
    assert list(results) == RUN
    base = results["lora"]
    for name, result in results.items():
        assert name in stdout
        for figure, times in result["times_ms"].items():
            assert len(times) == 1 and times[0] > 0
            assert result["median_ms"][figure] == times[0]
            assert result["ratio_to_lora"][figure] == pytest.approx(times[0] / base["median_ms"][figure])
        assert result["peak_memory_mib"] > 0
        assert result["ratio_to_lora"]["peak_memory"] == pytest.approx(
            result["peak_memory_mib"] / base["peak_memory_mib"]
        )
        assert 0 < result["trainable_params"] < result["total_params"]
    assert results["skip2-2-cached"]["placement"] == "memory" and results["lora"]["placement"] is None
    assert results["skip2-2-disk-cold"]["placement"] == "disk" and results["skip2-2-disk-cold"]["cold"]
    # a sample of 16 tokens keeps its 15 supervised rows: two taps (blocks 0 and 1) and the stream of pythia-14m's
    # 128 float32 channels each, and 15 int64 targets stored in 128 bytes (each tensor padded to 64 bytes)
    assert results["skip2-2-cached"]["cache_bytes_per_token"] == ((2 + 1) * 15 * 128 * 4 + 128) / 16
    assert results["lora"]["cache_bytes_per_token"] is None
    assert list(tmp_path.iterdir()) == [path]  # the disk configurations' caches are cleaned up


def test_the_dropout_benchmark_times_both_variants_alike(tmp_path: Path) -> None:
    args = dropout.parse_args(["--model", "pythia-14m", "--n-layer", "5", "--tokens", "8", "--batch", "2"])
    args.warmup, args.steps, args.rounds, args.out = 1, 2, 2, tmp_path
    result = json.loads(dropout.main(args).read_text())
    assert result["n_layer"] == 5 and result["dropout_layers"] == 4 * 4  # qkv, proj, fc, proj in blocks 1-4
    assert {name: len(s) for name, s in result["step_s"].items()} == dict.fromkeys(dropout.VARIANTS, 4)
    medians = result["median_step_s"]
    assert result["ratio"] == medians["litgpt_skip2lora Dropout"] / medians["torch.nn.Dropout"]


def test_the_lanes_benchmark_times_one_lane_against_one_a_thread(tmp_path: Path) -> None:
    args = lanes.parse_args(["--model", "pythia-14m", "--n-layer", "3", "--tokens", "8", "--batch", "2"])
    args.warmup, args.steps, args.rounds, args.out, args.configurations = 1, 2, 2, tmp_path, 3
    result = json.loads(lanes.main(args).read_text())
    assert result["lanes"] == {"one lane": 1, "one lane a thread": min(3, torch.get_num_threads())}
    assert {name: len(s) for name, s in result["step_s"].items()} == {"one lane": 4, "one lane a thread": 4}
    medians = result["median_step_s"]
    assert result["ratio"] == medians["one lane a thread"] / medians["one lane"]


def test_the_shared_masks_benchmark_times_a_sweep_of_one_seed_against_a_seed_each(tmp_path: Path) -> None:
    args = shared_masks.parse_args(["--model", "pythia-14m", "--n-layer", "3", "--tokens", "8", "--batch", "2"])
    args.warmup, args.steps, args.rounds, args.out, args.configurations = 1, 2, 2, tmp_path, 3
    result = json.loads(shared_masks.main(args).read_text())
    assert result["lanes"] == dict.fromkeys(["a seed each", "one seed"], min(3, torch.get_num_threads()))
    assert {name: len(s) for name, s in result["step_s"].items()} == {"a seed each": 4, "one seed": 4}
    medians = result["median_step_s"]
    assert result["ratio"] == medians["one seed"] / medians["a seed each"]


def test_the_depth_features_benchmark_times_both_ways_of_feeding_a_later_place(tmp_path: Path) -> None:
    """Both ways give a later place the same stream: the cached tap is what the frozen blocks compute."""
    argv = ["--model", "pythia-14m", "--n-layer", "30", "--tokens", "8", "--batch", "2", "--steps", "2"]
    args = depth_features.parse_args([*argv, "--rounds", "1", "--warmup", "0", "--out", str(tmp_path)])
    result = json.loads(depth_features.main(args).read_text())
    assert {name: len(s) for name, s in result["step_s"].items()} == {
        "stream kept as a cached tap": 2,
        "frozen blocks run each batch": 2,
    }
    places = dict(lora_r=4, skip2lora_block_indices=[0], skip2lora_output_layer="block.18")
    model = GPT(Config.from_name("pythia-14m", n_layer=30, skip2lora_enabled=True, **places)).eval()
    with torch.no_grad():
        features = model.backbone(torch.randint(0, 64, (2, 8)), Reads((0, 22), 18))
        later = depth_features.frozen_blocks(model, features, 18, 22)
    assert torch.equal(features.of(Reads((0,), 22)).stream, later)
