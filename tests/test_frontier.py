"""benchmarks/frontier.py on a tiny random model: each point a whole run, timed and scored on the held-out items."""

import json
from pathlib import Path

import pytest
import yaml

from benchmarks import frontier


def test_the_frontier_times_and_scores_each_point(tmp_path: Path) -> None:
    spec = {
        "task": "tiny",
        "score": "exact_match",
        "epochs": 1,
        "end_to_end": ["--random-model", "pythia-14m", "--n-layer", "2", "--vocab", "64", "--samples", "40"]
        + ["--tokens", "6", "--set", "train.lr_warmup_steps=1", "--set", "eval.max_new_tokens=2"],
        "points": [
            {"name": "lora", "method": "lora", "options": ["--optimizer.lr", "0.003"]},
            {
                "name": "faithful-sweep",
                "method": "faithful",
                "epochs": 2,
                "options": ["--sweep.seed", "[1,2]"],
                "score_each": True,
            },
        ],
    }
    points = tmp_path / "points.yaml"
    points.write_text(yaml.safe_dump(spec))
    path = frontier.main([str(points), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    rows = json.loads(path.read_text())
    assert path.with_suffix(".png").is_file()
    assert [(r["name"], r["epochs"]) for r in rows] == [("lora", 1), ("faithful-sweep", 2)]
    for row in rows:
        assert row["count"] == 2 and 0 <= row["exact_match"] <= 2  # 40 samples, 5% held out
        answers = json.loads((tmp_path / "out" / row["answers"]).read_text())
        assert answers["exact_match"] == row["exact_match"] and len(answers["items"]) == 2
        assert row["wall_vs_lora"] == pytest.approx(row["wall_s"] / rows[0]["wall_s"], abs=1e-4)
    assert rows[1]["configurations"] == 2 and rows[1]["chosen"] in ("seed=1", "seed=2")
    for c in rows[1]["sweep"]:  # each configuration exported and scored; the chosen one as final/ was
        assert c["count"] == 2 and (tmp_path / "work" / "faithful-sweep" / f"final-{c['name']}").is_dir()
    (chosen,) = [c for c in rows[1]["sweep"] if c["name"] == rows[1]["chosen"]]
    assert chosen["exact_match"] == rows[1]["exact_match"]
