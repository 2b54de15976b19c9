"""Tiny, offline fixtures: a random-weight Llama-style checkpoint with a WordLevel tokenizer, and Alpaca data."""

import json
import random
import sys
from pathlib import Path

import litgpt
import pandas as pd
import pytest
import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import JSON

from benchmarks.random_checkpoint import SPECIAL, model_config
from benchmarks.random_checkpoint import write_checkpoint as write_random_checkpoint
from benchmarks.runs import logged_metrics
from litgpt_skip2lora.__main__ import main
from litgpt_skip2lora.finetune import setup

WORDS = (
    "the a cat dog sat ran on under mat log red blue big small what is colour of animal where did it go "
    "answer question below instruction response write that appropriately completes request describes task "
    "input provides further context an with paired . : # , ?"
).split()
TINY = dict(
    name="tiny-llama",
    block_size=128,
    n_layer=4,
    n_head=4,
    n_query_groups=2,
    n_embd=32,
    intermediate_size=64,
    bias=False,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    rotary_percentage=1.0,
    parallel_residual=False,
    padding_multiple=64,
)


def write_checkpoint(directory: Path, seed: int = 0, config_name: str | None = None) -> Path:
    """A random-weight checkpoint in ``WORDS``, with ``TINY``'s blocks or those of the LitGPT config ``config_name``."""
    vocab = len(SPECIAL) + len(WORDS)
    config = litgpt.Config(**TINY, vocab_size=vocab) if config_name is None else model_config(config_name, vocab)
    return write_random_checkpoint(directory, config, WORDS, seed=seed)


def write_alpaca(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    colours, animals = ["red", "blue"], ["cat", "dog"]
    records = [
        {
            "instruction": f"what is the colour of the {rng.choice(animals)} ?",
            "input": "" if i % 2 else f"the {rng.choice(animals)} sat on the mat",
            "output": " ".join(rng.choice(colours + ["big", "small"]) for _ in range(1 + i % 5)),
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-llama")


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("data") / "alpaca.json", 24)


@pytest.fixture(scope="session")
def alpaca_writer():
    """``write_alpaca`` itself, for tests that need data of another size."""
    return write_alpaca


@pytest.fixture(scope="session")
def checkpoint_writer():
    """``write_checkpoint`` itself, for tests that need a checkpoint of another shape."""
    return write_checkpoint


def in_process(*args: str) -> None:
    """``litgpt-skip2lora ARGS`` in this process, as the command line runs it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["litgpt-skip2lora", *args])
        main()


def run(checkpoint: Path, data_file: Path, out_dir: Path, epochs: int = 3, **kwargs) -> pd.DataFrame:
    """One fine-tune in this process; returns the per-iteration rows of its metrics.csv."""
    args = dict(
        precision="32-true",
        skip2lora_block_indices=[0, 2],
        lora_r=4,
        lora_alpha=8,
        seed=7,
        data=JSON(json_path=data_file, val_split_fraction=0.25, num_workers=0),
        train=TrainArgs(epochs=epochs, micro_batch_size=4, global_batch_size=4, lr_warmup_steps=1, save_interval=None),
        eval=EvalArgs(interval=1000, max_new_tokens=3),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}},
    )
    args.update(kwargs)
    with pytest.MonkeyPatch.context() as patch:  # LitGPT's save_hyperparameters re-parses the command line
        patch.setattr(sys, "argv", ["litgpt-skip2lora", "finetune_skip2lora", str(checkpoint)])
        setup(checkpoint, out_dir=out_dir, **args)
    metrics = logged_metrics(out_dir)
    return metrics.dropna(subset=["iter"]).reset_index(drop=True)


def losses(metrics: pd.DataFrame) -> torch.Tensor:
    """Per-iteration training losses, at float32 tolerance (the loss is computed in float32)."""
    return torch.tensor(metrics["loss"].values, dtype=torch.float32)


def trained(state: dict, name: str = "run") -> dict[str, torch.Tensor]:
    """A step checkpoint's trained parameters of configuration ``name``, by their names in the model."""
    configuration = state["sweep"]["configurations"][name]
    return {**{f"skip2lora.{k}": v for k, v in configuration["adapters"].items()}, **configuration["lora"]}
