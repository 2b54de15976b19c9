"""benchmarks/frontier.py on a tiny random model: each point a whole run, timed and scored on the held-out items."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run

import litgpt_skip2lora.finetune
from benchmarks import frontier, full_tail


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


def test_a_full_tail_trains_every_weight_of_its_blocks_and_nothing_before(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``benchmarks.full_tail``: blocks 2 and 3 of the 4 change in every weight, blocks 0 and 1 and the embeddings
    and head stay the checkpoint's, and the adapters train."""
    monkeypatch.setattr(litgpt_skip2lora.finetune, "mark_trainable", full_tail.mark_tail_trainable)
    run(tiny_checkpoint, alpaca_file, tmp_path, epochs=1, skip2lora_output_layer="block.2")
    base = torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True)
    final = torch.load(tmp_path / "final" / "lit_model.pth", weights_only=True)
    final = {k.replace(".linear.", "."): v for k, v in final.items()}  # LoRA layers keep the weight in .linear
    changed = {k for k in final if k not in base or not torch.equal(base[k], final[k])}
    tail = {k for k in base if k.startswith(("transformer.h.2.", "transformer.h.3."))}
    assert changed == tail | {"skip2lora.A", "skip2lora.B"}
