"""Sweeps on a tiny random-weight checkpoint: every configuration trains as its solo run would, halving drops the
weaker ones, an interrupted sweep resumes exactly, and a sweep typed on the command line leaves what it promises."""

import contextlib
import csv
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import in_process, losses, run, trained
from lightning.fabric.plugins import MixedPrecision
from litgpt.args import EvalArgs, TrainArgs

import litgpt_skip2lora.__main__
import litgpt_skip2lora.execution
import litgpt_skip2lora.finetune
import litgpt_skip2lora.model
import litgpt_skip2lora.sweep_outputs
from benchmarks.runs import logged_metrics
from litgpt_skip2lora.adapters import Features
from litgpt_skip2lora.backbone import Batch
from litgpt_skip2lora.dropout import SharedMasks, root
from litgpt_skip2lora.execution import HEAD_ROWS, factors_head, head_group_size, lane_count
from litgpt_skip2lora.lanes import Lanes, replica
from litgpt_skip2lora.model import GPT, Config, mark_trainable
from litgpt_skip2lora.rows import RowLayout
from litgpt_skip2lora.sweep import (
    Configuration,
    Sweep,
    SweepArgs,
    build_sweep,
    check_fits,
    check_sweep,
    configuration_bytes,
    configuration_configs,
)
from litgpt_skip2lora.training import Trainer, loss_groups

TRAIN = dict(micro_batch_size=4, global_batch_size=4, lr_warmup_steps=1)
ADAPTERS = SweepArgs(lr=[0.01, 0.05], lora_r=[4, 8])
# block 3 trains with q/v LoRA and dropout: each configuration needs its own dropout stream, and the ranks and
# dropout rates swept shape its tail's LoRA layers as they shape its adapters
TAIL = dict(skip2lora_output_layer="block.3", lora_query=True, lora_value=True, lora_dropout=0.2)
TAIL_SWEEP = SweepArgs(lora_r=[8, 2], lora_dropout=[0.2, 0.0])
# tails of 1 and 2 blocks from one cache; the shorter one reads blocks 0, 2 and 3, the longer drops block 3
DEPTH = dict(lora_query=True, lora_value=True, lora_dropout=0.2, skip2lora_block_indices=[0, 2, 3])
DEPTH_SWEEP = SweepArgs(skip2lora_output_layer=["block.3", "block.2"], seed=[7, 8])
BLOCKS_SWEEP = SweepArgs(skip2lora_block_indices=[[0, 2], [1, 3]], lr=[0.01])


def optimizer_at(lr: float) -> dict:
    return {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}


def table(out_dir: Path) -> dict[str, dict]:
    with (out_dir / "sweep.csv").open() as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def saved(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "lit_model.pth.lora", weights_only=True)["model"]


def assert_same_parameters(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Equal at float32 rounding: the configurations' ``W B`` products are one matmul, which may round the last bit
    differently from a matmul of one configuration; and a resumed run recomputes what a memory cache held."""
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-7)


def last_val_loss(out_dir: Path) -> float:
    metrics = logged_metrics(out_dir)
    return float(metrics["val_loss"].dropna().iloc[-1])


@pytest.fixture(scope="module")
def sweeps(tiny_checkpoint: Path, alpaca_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One uninterrupted 2-epoch sweep per variant, with step checkpoints every 3 steps."""
    root = tmp_path_factory.mktemp("sweeps")
    train = TrainArgs(epochs=2, **TRAIN, save_interval=3)
    run(tiny_checkpoint, alpaca_file, root / "adapters", train=train, sweep=ADAPTERS)
    run(tiny_checkpoint, alpaca_file, root / "tail", train=train, sweep=TAIL_SWEEP, **TAIL)
    run(tiny_checkpoint, alpaca_file, root / "depth", train=train, sweep=DEPTH_SWEEP, **DEPTH)
    run(tiny_checkpoint, alpaca_file, root / "blocks", train=train, sweep=BLOCKS_SWEEP)
    return {name: root / name for name in ("adapters", "tail", "depth", "blocks")}


@pytest.mark.parametrize(
    ("variant", "name", "solo"),
    [
        ("adapters", "lr=0.01,lora_r=8", dict(lora_r=8, optimizer=optimizer_at(0.01))),
        ("adapters", "lr=0.05,lora_r=4", {}),
        ("tail", "lora_r=2,lora_dropout=0.2", dict(TAIL, lora_r=2)),
        ("tail", "lora_r=8,lora_dropout=0.0", dict(TAIL, lora_r=8, lora_dropout=0.0)),
        ("depth", "skip2lora_output_layer=block.3,seed=7", dict(DEPTH, skip2lora_output_layer="block.3")),
        (
            "depth",
            "skip2lora_output_layer=block.2,skip2lora_block_indices=0+2,seed=7",
            dict(DEPTH, skip2lora_output_layer="block.2", skip2lora_block_indices=[0, 2]),
        ),
        (
            "blocks",
            "skip2lora_block_indices=1+3,lr=0.01",
            dict(skip2lora_block_indices=[1, 3], optimizer=optimizer_at(0.01)),
        ),
    ],
)
def test_a_configuration_trains_exactly_as_its_solo_run(
    sweeps, tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, variant: str, name: str, solo: dict
) -> None:
    """Tails of several depths, adapters reading other blocks: each trains from the sweep's one cache exactly as
    alone."""
    alone = run(tiny_checkpoint, alpaca_file, tmp_path, train=TrainArgs(epochs=2, **TRAIN), **solo)
    swept = logged_metrics(sweeps[variant]).dropna(subset=["iter"])
    torch.testing.assert_close(losses(alone), torch.tensor(swept[f"loss/{name}"].values, dtype=torch.float32))
    assert float(table(sweeps[variant])[name]["val_loss"]) == pytest.approx(last_val_loss(tmp_path), rel=1e-6)
    assert_same_parameters(saved(sweeps[variant] / "sweep" / name), saved(tmp_path / "final"))


def test_the_sweep_table_final_and_folders(sweeps) -> None:
    rows = table(sweeps["adapters"])
    assert list(rows) == ["lr=0.01,lora_r=4", "lr=0.01,lora_r=8", "lr=0.05,lora_r=4", "lr=0.05,lora_r=8"]
    columns = ["name", "lr", "lora_r", "val_loss", "best_step", "best_val_loss", "steps", "chosen"]
    assert list(next(iter(rows.values()))) == columns
    assert all(r["best_step"] == "10" and r["best_val_loss"] == r["val_loss"] for r in rows.values())  # one validation
    assert [int(r["steps"]) for r in rows.values()] == [10] * 4
    (chosen,) = [name for name, r in rows.items() if r["chosen"] == "1"]
    assert chosen == min(rows, key=lambda name: float(rows[name]["val_loss"]))
    final = sweeps["adapters"] / "final"
    assert all(torch.equal(v, saved(final)[k]) for k, v in saved(sweeps["adapters"] / "sweep" / chosen).items())
    hyperparameters = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    assert "sweep" not in hyperparameters
    assert hyperparameters["optimizer"]["init_args"]["lr"] == float(rows[chosen]["lr"])
    assert hyperparameters["lora_r"] == int(rows[chosen]["lora_r"])
    assert yaml.safe_load((final / "model_config.yaml").read_text())["lora_r"] == int(rows[chosen]["lora_r"])
    assert sorted(p.name for p in (sweeps["adapters"] / "sweep").iterdir()) == sorted(rows)
    assert (sweeps["adapters"] / "sweep.png").stat().st_size > 10_000


def test_each_tail_of_a_depth_sweep_is_a_model_of_its_own(sweeps, tmp_path: Path) -> None:
    """``final/`` and every exported configuration hold exactly their own model's weights: a tail of 1 block has no
    LoRA layer in block 2, its adapters read no block after its output place."""
    rows = table(sweeps["depth"])
    assert list(rows) == [
        "skip2lora_output_layer=block.3,seed=7",
        "skip2lora_output_layer=block.3,seed=8",
        "skip2lora_output_layer=block.2,skip2lora_block_indices=0+2,seed=7",
        "skip2lora_output_layer=block.2,skip2lora_block_indices=0+2,seed=8",
    ]
    for name in rows:
        exported = litgpt_skip2lora.sweep_outputs.export_configuration(sweeps["depth"] / "sweep" / name)
        config = Config.from_file(exported / "model_config.yaml")
        assert config.skip2lora_output_layer == rows[name]["skip2lora_output_layer"]
        assert config.skip2lora_block_indices == ((0, 2) if "block.2" in name else (0, 2, 3))
        hyperparameters = yaml.safe_load((exported / "hyperparameters.yaml").read_text())
        assert hyperparameters["skip2lora_output_layer"] == config.skip2lora_output_layer
        assert hyperparameters["skip2lora_block_indices"] == list(config.skip2lora_block_indices)
        state = torch.load(exported / "lit_model.pth", weights_only=True)
        GPT(config).load_state_dict(state, strict=True)
        lora_blocks = {int(k.split(".")[2]) for k in state if "lora_A" in k}
        assert lora_blocks == ({2, 3} if "block.2" in name else {3})
    final = Config.from_file(sweeps["depth"] / "final" / "model_config.yaml")
    GPT(final).load_state_dict(torch.load(sweeps["depth"] / "final" / "lit_model.pth", weights_only=True), strict=True)


def test_halving_drops_the_weaker_configurations(sweeps, tiny_checkpoint: Path, alpaca_file: Path, tmp_path) -> None:
    """Validating every 2 steps with keep 0.5: 4 configurations, then 2 after step 2, then 1 after step 4. The
    survivor trains on exactly as in the sweep without halving."""
    train, evaluate = TrainArgs(epochs=2, **TRAIN), EvalArgs(interval=2, max_new_tokens=3, max_iters=1)
    run(
        tiny_checkpoint,
        alpaca_file,
        tmp_path,
        train=train,
        eval=evaluate,
        sweep=SweepArgs(**vars(ADAPTERS) | {"keep": 0.5}),
    )
    rows = table(tmp_path)
    assert sorted(int(r["steps"]) for r in rows.values()) == [2, 2, 4, 10]
    (survivor,) = [name for name, r in rows.items() if r["steps"] == "10"]
    assert rows[survivor]["chosen"] == "1"
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == [survivor]
    assert_same_parameters(saved(tmp_path / "sweep" / survivor), saved(sweeps["adapters"] / "sweep" / survivor))


def test_the_same_command_reproduces_every_row_exactly(sweeps, tiny_checkpoint, alpaca_file, tmp_path) -> None:
    """A tail sweep's configurations compute in lanes, on fewer threads each than a solo run, so they round apart
    from their solo runs; the sweep's own command on the same number of threads reproduces every row of
    ``sweep.csv`` and every configuration's parameters bit for bit (SKIP2LORA_README.md, Sweeps)."""
    train = TrainArgs(epochs=2, **TRAIN, save_interval=3)
    run(tiny_checkpoint, alpaca_file, tmp_path, train=train, sweep=TAIL_SWEEP, **TAIL)
    assert (tmp_path / "sweep.csv").read_text() == (sweeps["tail"] / "sweep.csv").read_text()
    for name in table(tmp_path):
        again, first = saved(tmp_path / "sweep" / name), saved(sweeps["tail"] / "sweep" / name)
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_an_interrupted_sweep_resumes_exactly(
    sweeps, tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    validate_and_save = Trainer.validate_and_save

    def stop_at_step_7(self, *args) -> None:
        validate_and_save(self, *args)
        if self.state["step_count"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    train = TrainArgs(epochs=2, **TRAIN, save_interval=3)
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "validate_and_save", stop_at_step_7)
        with pytest.raises(SystemExit):
            run(tiny_checkpoint, alpaca_file, tmp_path, train=train, sweep=TAIL_SWEEP, **TAIL)
    run(tiny_checkpoint, alpaca_file, tmp_path, train=train, sweep=TAIL_SWEEP, resume=True, **TAIL)
    resumed, full = table(tmp_path), table(sweeps["tail"])
    for name, row in full.items():
        assert float(resumed[name].pop("val_loss")) == pytest.approx(float(row.pop("val_loss")), rel=1e-6)
        assert resumed[name] == row
        assert_same_parameters(saved(tmp_path / "sweep" / name), saved(sweeps["tail"] / "sweep" / name))
    last = torch.load(tmp_path / "step-000010" / "state.pth", weights_only=False)
    assert (
        trained(last, "lora_r=2,lora_dropout=0.0").keys()
        == saved(tmp_path / "sweep" / "lora_r=2,lora_dropout=0.0").keys()
    )


def test_a_sweep_on_the_command_line(tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, capsys) -> None:
    """The issue's command on a tiny model: four rows, one chosen; ``final/`` and an exported configuration
    generate."""
    command = [sys.executable, "-m", "litgpt_skip2lora"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    options = ["--data", "JSON", "--data.json_path", str(alpaca_file), "--data.val_split_fraction", "0.25"]
    options += ["--precision", "32-true", "--train.epochs", "1", "--train.micro_batch_size", "4"]
    options += ["--eval.max_new_tokens", "5", "--sweep.lr", "[0.001,0.003]", "--sweep.lora_r", "[4,8]"]
    options += ["--out_dir", str(tmp_path)]
    in_process("finetune_skip2lora", str(tiny_checkpoint), *options, "--skip2lora_block_indices", "[0,2]")
    printed = capsys.readouterr().out
    each = "lr=0.001,lora_r=4 512; lr=0.001,lora_r=8 1,024; lr=0.003,lora_r=4 512; lr=0.003,lora_r=8 1,024"
    assert f"Number of trainable parameters: {each}; 4 configurations, 3,072 in all" in printed
    rows = table(tmp_path)
    assert len(rows) == 4 and sum(r["chosen"] == "1" for r in rows.values()) == 1
    other = next(name for name, r in rows.items() if r["chosen"] == "0")
    export = [*command, "export_configuration", str(tmp_path / "sweep" / other)]
    subprocess.run(export, env=env, check=True, capture_output=True)
    exported = tmp_path / f"final-{other}"
    assert yaml.safe_load((exported / "model_config.yaml").read_text())["lora_r"] == int(rows[other]["lora_r"])
    generate = ["generate", "--prompt", "the cat", "--max_new_tokens", "3"]
    done = subprocess.run([*command, *generate, str(tmp_path / "final")], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip()
    prompt, answer = re.search(r"greedy answer to '(.*)':\n(.+)\n", printed).groups()  # the final model's answer
    greedy = ["generate", "--temperature", "0", "--prompt", prompt, "--max_new_tokens", "5", str(tmp_path / "final")]
    assert answer in subprocess.run([*command, *greedy], env=env, capture_output=True, text=True).stdout
    capsys.readouterr()
    in_process(*generate, str(exported))
    assert capsys.readouterr().out.strip()


def test_selection_by_label_accuracy(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Answers from a closed set of two labels: every configuration is scored on the validation items by label
    likelihood, and the most accurate is chosen."""
    items = [
        {"instruction": f"what is the colour of item {i} ?", "input": "", "output": "red" if i % 3 else "blue"}
        for i in range(40)
    ]
    data_file = tmp_path / "labels.json"
    data_file.write_text(json.dumps(items))
    sweep = SweepArgs(lr=[0.01, 0.05], select="label_accuracy")
    run(tiny_checkpoint, data_file, tmp_path / "out", epochs=1, sweep=sweep)
    rows = table(tmp_path / "out")
    accuracy = {name: float(r["accuracy"]) for name, r in rows.items()}
    assert all(a * 10 == round(a * 10) for a in accuracy.values())  # a count of the 10 validation items
    (chosen,) = [name for name, r in rows.items() if r["chosen"] == "1"]
    best = [name for name, a in accuracy.items() if a == max(accuracy.values())]
    assert chosen == min(best, key=lambda name: float(rows[name]["val_loss"]))  # a tie goes to the lower loss


def test_a_sweep_that_cannot_fit_is_refused_in_one_line(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(litgpt_skip2lora.finetune, "free_memory", lambda device: 1_000)
    args = ["--data", "JSON", "--data.json_path", str(alpaca_file), "--precision", "32-true", "--out_dir"]
    args += [str(tmp_path / "out"), "--sweep.lr", "[0.01,0.02,0.03]", "--skip2lora_block_indices", "[0,2]"]
    with pytest.raises(SystemExit) as refused:
        in_process("finetune_skip2lora", str(tiny_checkpoint), *args)
    assert refused.value.code.startswith("error: The sweep's 3 configurations need about")
    assert "\n" not in refused.value.code and not list((tmp_path / "out").glob("step-*"))


def two_learning_rates(
    lrs: tuple[float, ...] = (0.01, 0.02),
    seeds: list[int] | None = None,
    fabric: L.Fabric | None = None,
    optimizer: str = "torch.optim.AdamW",
    **options,
) -> Sweep:
    """A sweep of configurations of adapters from both blocks of a tiny model, rank n r = 4, vocabulary 96 (by
    default two configurations of one seed, and no other trained part)."""
    shape = dict(n_layer=2, n_embd=32, n_head=4, padded_vocab_size=96, vocab_size=96, lora_r=2, lora_alpha=4)
    config = Config.from_name("pythia-14m", **shape, skip2lora_enabled=True, skip2lora_block_indices=(0, 1), **options)
    model = GPT(config)
    mark_trainable(model)
    optimizer = {"class_path": optimizer, "init_args": {}}
    constant = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0)  # noqa: E731
    fabric, grid = fabric or L.Fabric(devices=1, accelerator="cpu"), SweepArgs(lr=list(lrs), seed=seeds)
    return build_sweep(fabric, model, grid, configuration_configs(config, grid), optimizer, 1, constant)


def test_clipping_acts_on_the_true_gradients_under_a_loss_scale() -> None:
    """In 16-bit mixed precision the gradients are the loss scale times the true ones: clipped as they are, a step
    would be a scale's fraction of what it should be. A CPU GradScaler stands in for the GPU's."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    sweep = two_learning_rates(lrs=(1.0,), fabric=fabric, optimizer="torch.optim.SGD")
    (c,) = sweep.configurations
    scaler.scale(torch.ones(()))  # the scale is set at the first loss it scales
    before = [p.detach().clone() for p in c.parameters()]
    for p in c.parameters():
        p.grad = torch.full_like(p, 1024.0)  # a true gradient of ones, scaled
    c.optimizer_step(fabric, sweep.model, max_norm=1.0)
    count = sum(p.numel() for p in c.parameters())
    for p, b in zip(c.parameters(), before):  # lr 1: the step is the clipped true gradient, of norm 1
        torch.testing.assert_close(b - p.detach(), torch.full_like(p, count**-0.5))
    assert scaler.get_scale() == 1024.0  # one optimizer step, one update: the scale grows after 2,000 clean ones


def test_a_sweep_in_16_bit_mixed_precision_is_refused_in_one_line() -> None:
    """Fabric scales every configuration's loss by one GradScaler, which each optimizer step would update."""
    with pytest.raises(ValueError, match="--precision 16-mixed shares one loss scale among a sweep's configurations"):
        check_sweep(SweepArgs(lr=[0.1, 0.2]), final_validation=True, precision="16-mixed")
    check_sweep(SweepArgs(lr=[0.1]), final_validation=True, precision="16-mixed")  # a run alone


def test_the_memory_estimate_follows_the_head_the_step_takes() -> None:
    sweep = two_learning_rates()
    model, c, adapters = sweep.model, sweep.configurations[0], [c.adapters for c in sweep.configurations]
    parameters = 4 * 4 * (2 * 2 * 32 + 32 * 4)  # A and B in float32, with gradients and AdamW's two moments
    # 64 rows of two configurations of rank n r = 4 get the factored head; 2 rows the plain one
    assert factors_head(model, 64, adapters, training=True) and not factors_head(model, 2, adapters, training=True)
    assert configuration_bytes(c, 96, factored=True) == parameters + 4 * 2 * 96 * 4  # W B and its gradient
    assert configuration_bytes(c, 96, factored=False) == parameters
    factored_step = 2 * (parameters + 4 * 2 * 96 * 4) + 4 * 64 * 96  # and head(stream), once, never their logits
    check_fits(sweep, 64, factored_step)
    with pytest.raises(MemoryError, match="2 configurations need about"):
        check_fits(sweep, 64, factored_step - 1)
    # the larger of a step's logits, softmax and gradient for one configuration's 2 rows, and a validation's logits
    # for both configurations' 2 rows, which share the head's pass, with as much again bounding its log-softmax
    plain_step = 2 * parameters + 4 * 96 * max(3 * 2, 2 * 2 * 2)
    check_fits(sweep, 2, plain_step)
    with pytest.raises(MemoryError, match="2 configurations need about"):
        check_fits(sweep, 2, plain_step - 1)


@pytest.mark.parametrize(("lrs", "seeds", "shared"), [((0.01, 0.02), None, 1), ((0.01,), [7, 8], 0)])
def test_the_masks_a_factored_step_holds_are_counted(lrs: tuple, seeds: list | None, shared: int) -> None:
    """Two configurations of adapters with dropout, 64 rows, the factored head: each graph keeps its dropped-out
    taps (2 blocks x 64 rows x 32 features in float32) through the step. Of one seed they also share one set of
    masks, held until both have taken it; a seed sweep's configurations share none."""
    sweep = two_learning_rates(lrs, seeds, lora_dropout=0.1)
    taps = 4 * 2 * 64 * 32
    trained = sum(configuration_bytes(c, 96, factored=True) for c in sweep.configurations)
    needed = trained + 4 * 64 * 96 + 2 * taps + shared * taps
    check_fits(sweep, 64, needed)
    with pytest.raises(MemoryError, match="2 configurations need about"):
        check_fits(sweep, 64, needed - 1)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(("threads", "logits"), [(1, 4 * 96 * 2 * 6), (2, 2 * 4 * 96 * 2 * 4)])
def test_each_lane_holds_its_own_logits(threads: int, logits: int, dropout: float, monkeypatch) -> None:
    """A tail's 3 configurations, 2 rows each, on one lane (a validation shares the head's pass over their 6 rows)
    or on two (a lane's 2 configurations share it over 4 rows, and both lanes hold theirs at once). With dropout
    the step also holds one configuration's masks, which all three share: over the taps of blocks 0 and 1 and the
    input of block 1's q/v LoRA layer, 2 rows of 32 features each, in float32."""
    tail = dict(skip2lora_output_layer="block.1", lora_query=True, lora_value=True, lora_dropout=dropout)
    sweep = two_learning_rates((0.01, 0.02, 0.03), **tail)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    parameters = sum(configuration_bytes(c, 96, factored=False) for c in sweep.configurations)
    needed = parameters + logits + (4 * 2 * (2 * 32 + 32) if dropout else 0)
    check_fits(sweep, 2, needed)
    with pytest.raises(MemoryError, match="3 configurations need about"):
        check_fits(sweep, 2, needed - 1)


@pytest.mark.parametrize(("rows", "groups"), [(64, [2]), (2, [1, 1])])  # the factored head; the plain one
def test_each_configurations_graph_is_back_propagated_outside_autocast(rows: int, groups: list[int]) -> None:
    sweep, inside = two_learning_rates(), []

    @contextlib.contextmanager
    def autocast() -> Iterator[None]:
        inside.append(True)
        yield
        inside.pop()

    batch = Batch(Features(torch.randn(2, rows, 32), torch.randn(rows, 32)), torch.randint(0, 96, (rows,)), rows, 0.0)
    sizes = []
    for group in loss_groups(sweep.model, batch, RowLayout.of(sweep.model.config), sweep.configurations, autocast):
        assert not inside  # where the step runs the group's backward
        sizes.append(len(group))
        torch.stack(group).sum().backward()  # the graph is whole: nothing it needs was freed by an earlier group
    assert sizes == groups
    assert all(c.adapters.B.grad.abs().sum() > 0 for c in sweep.configurations)


@torch.no_grad()
def test_in_validation_configurations_share_the_heads_pass_and_keep_their_own_losses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sweep = two_learning_rates()
    for c in sweep.configurations:
        torch.nn.init.normal_(c.adapters.B)  # two different models
    batch = Batch(Features(torch.randn(2, 3, 32), torch.randn(3, 32)), torch.tensor([5, -100, 7]), 3, 0.0)

    def losses(head_rows: int) -> list[list[float]]:
        monkeypatch.setattr(litgpt_skip2lora.execution, "HEAD_ROWS", head_rows)
        groups = loss_groups(sweep.model, batch, RowLayout.of(sweep.model.config), sweep.configurations)
        return [[loss.item() for loss in group] for group in groups]

    shared, own = losses(HEAD_ROWS), losses(3)  # both configurations' 3 rows in one pass; a pass each
    assert len(shared) == 1 and len(own) == 2
    assert shared[0] == pytest.approx(sum(own, []), rel=1e-6)
    assert shared[0][0] != pytest.approx(shared[0][1], rel=1e-3)
    assert head_group_size(sweep.model, 3, 2, training=True) == 1  # a step keeps one graph at a time
    sweep.model.lm_head.linear.weight.requires_grad_(True)  # a head with a trained part is each configuration's own
    assert head_group_size(sweep.model, 3, 2, training=False) == 1


def test_lanes_compute_each_configuration_as_the_processs_own_thread_does() -> None:
    """Three configurations of a tail with q/v LoRA and dropout, on one lane and on two: the same dropout draws,
    and the same losses and gradients up to float32 rounding (one thread sums in another order than two)."""
    tail = dict(skip2lora_output_layer="block.1", lora_query=True, lora_value=True, lora_dropout=0.2)
    features = Features(torch.randn(2, 3, 10, 32), torch.randn(3, 10, 32))
    batch = Batch(features, torch.randint(0, 96, (3, 10)), 30, 0.0)
    threads = set()

    def backward(model: GPT, configurations: list[Configuration]) -> list[torch.Tensor]:
        threads.add((threading.get_ident(), torch.get_num_threads()))
        losses = sum(loss_groups(model, batch, RowLayout.of(model.config), configurations), [])
        torch.stack(losses).sum().backward()
        return [loss.detach() for loss in losses]

    def stepped(lanes: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
        torch.manual_seed(0)
        sweep = two_learning_rates((0.01, 0.02, 0.03), **tail)  # the same weights and configurations
        sweep.set_training(True)
        before = [c.rng["cpu"] for c in sweep.configurations]
        losses = Lanes(sweep.model, lanes).map(backward, sweep.configurations)
        streams = [c.rng["cpu"] for c in sweep.configurations]  # each moved on by its own draws only
        assert not any(torch.equal(a, b) for a, b in zip(before, streams, strict=True))
        return streams, losses, [[p.grad for p in c.parameters()] for c in sweep.configurations]

    one = stepped(1)
    assert threads == {(threading.get_ident(), torch.get_num_threads())}
    threads.clear()
    two = stepped(2)
    assert len(threads) == 2 and {count for _, count in threads} == {max(1, torch.get_num_threads() // 2)}
    assert all(torch.equal(a, b) for a, b in zip(one[0], two[0], strict=True))
    torch.testing.assert_close(one[1:], two[1:], rtol=1e-5, atol=1e-7)
    assert lane_count(two_learning_rates((0.01, 0.02, 0.03), **tail).model, 3) == min(3, torch.get_num_threads())
    assert lane_count(two_learning_rates((0.01, 0.02, 0.03)).model, 3) == 1  # adapters alone: one lane


@pytest.mark.parametrize(("lrs", "seeds", "drawn"), [((0.01, 0.02, 0.03), None, 2), ((0.01,), [7, 8, 9], 0)])
def test_configurations_whose_streams_agree_draw_each_mask_once(lrs, seeds: list[int] | None, drawn: int) -> None:
    """A tail step of three configurations in two lanes draws its two masks (the adapters', q and v's) once for all
    when the configurations share a seed; when they do not, each draws its own. Either way no mask is held once the
    step is done with it, and each configuration's stream, losses and gradients are exactly those it gets drawing
    alone."""
    tail = dict(skip2lora_output_layer="block.1", lora_query=True, lora_value=True, lora_dropout=0.2)
    batch = Batch(Features(torch.randn(2, 3, 10, 32), torch.randn(3, 10, 32)), torch.randint(0, 96, (3, 10)), 30, 0.0)

    def stepped(masks: SharedMasks | None) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
        torch.manual_seed(0)
        sweep = two_learning_rates(lrs, seeds, **tail)
        sweep.set_training(True)

        def backward(model: GPT, configurations: list[Configuration]) -> list[torch.Tensor]:
            losses = sum(loss_groups(model, batch, RowLayout.of(model.config), configurations, masks=masks), [])
            torch.stack(losses).sum().backward()
            return [loss.detach() for loss in losses]

        losses = Lanes(sweep.model, 2).map(backward, sweep.configurations)
        return (
            [c.rng["cpu"] for c in sweep.configurations],
            losses,
            [[p.grad for p in c.parameters()] for c in sweep.configurations],
        )

    torch.manual_seed(0)
    masks = SharedMasks(root(c.rng["cpu"]) for c in two_learning_rates(lrs, seeds, **tail).configurations)
    shared = stepped(masks)
    assert (masks.count, len(masks)) == (drawn, 0)  # drawn to be shared; held after the step
    torch.testing.assert_close(shared, stepped(None), rtol=0, atol=0)


def test_lanes_share_the_processs_threads() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        lanes = Lanes(two_learning_rates().model, 2)
        seen = lanes.map(lambda model, share: [(torch.get_num_threads(), item) for item in share], ["a", "b", "c"])
    finally:
        torch.set_num_threads(before)
    assert seen == [(2, "a"), (2, "b"), (2, "c")]  # shares ["a"] and ["b", "c"], results in the items' order


def test_a_replica_shares_every_tensor_and_has_modules_of_its_own() -> None:
    model = two_learning_rates().model
    copy = replica(model)
    tensors = lambda m: [t.data_ptr() for t in [*m.parameters(), *m.buffers()]]  # noqa: E731
    assert tensors(copy) == tensors(model)
    assert not {id(m) for m in copy.modules()} & {id(m) for m in model.modules()}


def test_the_choice_ranks_accuracy_then_validation_loss() -> None:
    def scored(name: str, accuracy: float, val_loss: float) -> Configuration:
        scores = dict(val_loss=val_loss, best_val_loss=val_loss, accuracy=accuracy)
        return Configuration(name, {}, None, None, {}, 7, {}, **scores)

    configurations = [scored("a", 0.5, 2.0), scored("b", 0.7, 3.0), scored("c", 0.7, 2.5), scored("d", 0.9, math.nan)]
    configurations[3].alive = False  # dropped by halving: never chosen
    sweep = functools.partial(Sweep, None, configurations)
    lrs = [0.1, 0.2, 0.3, 0.4]  # a grid of the four
    assert sweep(SweepArgs(lr=lrs, select="label_accuracy")).chosen().name == "c"  # tie: lower loss
    assert sweep(SweepArgs(lr=lrs)).chosen().name == "a"
    assert sweep(SweepArgs(lr=lrs)).describe_losses() == "best 2.0000 (a), 3 configurations training"
    configurations[2].best_val_loss = 1.5  # lower at an earlier step than at its last: ranked by it unless opted out
    assert sweep(SweepArgs(lr=lrs)).chosen().name == "c"
    assert sweep(SweepArgs(lr=lrs, best_step=False)).chosen().name == "a"
    for c in configurations[1:]:
        c.alive = False
    assert sweep(SweepArgs(lr=lrs)).describe_losses() == "best 2.0000 (a), 1 configuration training"


def test_a_run_hands_over_its_best_validation_steps_parameters(tiny_checkpoint: Path, alpaca_file: Path, tmp_path):
    """At lr 2 the validation loss rises after its lowest: ``final/`` holds that step's parameters, exactly as its
    step checkpoint has them; with ``--sweep.best_step false``, the last step's."""
    train = TrainArgs(epochs=3, **TRAIN, save_interval=1)
    options = dict(train=train, eval=EvalArgs(interval=1, max_new_tokens=3), optimizer=optimizer_at(2.0))
    run(tiny_checkpoint, alpaca_file, tmp_path / "best", **options)
    validations = logged_metrics(tmp_path / "best").dropna(subset=["val_loss"])
    best_step, last_step = int(validations.loc[validations["val_loss"].idxmin(), "step"]), 15  # 5 steps an epoch
    assert 0 < best_step < last_step and int(validations["step"].max()) == last_step
    checkpoint = torch.load(tmp_path / "best" / f"step-{best_step:06d}" / "state.pth", weights_only=False)
    assert all(torch.equal(v, trained(checkpoint)[k]) for k, v in saved(tmp_path / "best" / "final").items())
    run(tiny_checkpoint, alpaca_file, tmp_path / "last", **options, sweep=SweepArgs(best_step=False))
    checkpoint = torch.load(tmp_path / "last" / f"step-{last_step:06d}" / "state.pth", weights_only=False)
    assert all(torch.equal(v, trained(checkpoint)[k]) for k, v in saved(tmp_path / "last" / "final").items())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--sweep.lr", "[0.01,0.02]", "--sweep.lora_r", "[4,8]"],
            "trained lr=0.01,lora_r=4, lr=0.01,lora_r=8, lr=0.05,lora_r=4, lr=0.05,lora_r=8, but this command's sweep"
            " is lr=0.01,lora_r=4, lr=0.01,lora_r=8, lr=0.02,lora_r=4, lr=0.02,lora_r=8: resume with the --sweep"
            " options the run started with.",
        ),
        (
            ["--sweep.lr", "[0.01,0.05]", "--sweep.lora_r", "[4,8]", "--devices", "2", "--train.micro_batch_size", "2"],
            "was trained on 1 device(s), this command runs on 2: resume with --devices 1.",
        ),
    ],
)
def test_a_resume_with_changed_options_is_one_line(sweeps, tiny_checkpoint: Path, alpaca_file: Path, args, message):
    """Refused before anything starts, naming what changed, instead of a KeyError or another sample order."""
    options = ["--data", "JSON", "--data.json_path", str(alpaca_file), "--precision", "32-true"]
    options += ["--train.global_batch_size", "4", "--out_dir", str(sweeps["adapters"]), "--resume", "true", *args]
    with pytest.raises(SystemExit) as refused:
        in_process("finetune_skip2lora", str(tiny_checkpoint), *options)
    assert refused.value.code.startswith("error: --resume true: step-000010 ") and "\n" not in refused.value.code
    assert refused.value.code.endswith(message)


def test_a_checkpoint_of_an_earlier_format_is_refused_in_one_line(sweeps, tiny_checkpoint, alpaca_file, tmp_path):
    """A step checkpoint whose configurations keep their progress in another form (before this one's)."""
    state = torch.load(sweeps["adapters"] / "step-000010" / "state.pth", weights_only=False)
    for configuration in state["sweep"]["configurations"].values():
        del configuration["best_val_loss"]
    (tmp_path / "step-000010").mkdir()
    torch.save(state, tmp_path / "step-000010" / "state.pth")
    options = ["--data", "JSON", "--data.json_path", str(alpaca_file), "--out_dir", str(tmp_path), "--resume", "true"]
    with pytest.raises(SystemExit) as refused:
        in_process("finetune_skip2lora", str(tiny_checkpoint), "--sweep.lr", "[0.01,0.05]", *options)
    assert (
        refused.value.code == "error: --resume true: step-000010 was written by an earlier version: start the run anew."
    )


def test_a_validation_again_at_its_step_keeps_one_row_and_a_non_candidate_is_no_best_step() -> None:
    c = Configuration("run", {}, None, None, {}, 7, {})
    sweep = Sweep(None, [c], SweepArgs(best_step=False))
    sweep.record([2.0], 5)
    sweep.record([1.5], 5, candidate=False)
    assert sweep.history == [{"step": 5, "run": 1.5}]
    assert (c.val_loss, c.best_val_loss, c.best_step) == (1.5, 2.0, 5)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_a_configuration_trains_as_its_solo_run_in_bf16(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, precision: str
) -> None:
    """In bf16 the head's two paths round differently (the plain one rounds ``stream + z``, the factored one
    ``head(stream)``), so a configuration takes the same path in a sweep as alone: the same training losses, exactly."""
    bf16 = dict(precision=precision, train=TrainArgs(epochs=2, **TRAIN))
    run(tiny_checkpoint, alpaca_file, tmp_path / "sweep", sweep=SweepArgs(lr=[0.01, 0.05]), **bf16)
    alone = run(tiny_checkpoint, alpaca_file, tmp_path / "solo", optimizer=optimizer_at(0.01), **bf16)
    swept = logged_metrics(tmp_path / "sweep").dropna(subset=["iter"])
    assert torch.equal(losses(alone), torch.tensor(swept["loss/lr=0.01"].values, dtype=torch.float32))
    # the mean over validation batches, in float32, of a column of the sweep's losses (rounds its last bit apart)
    assert float(table(tmp_path / "sweep")["lr=0.01"]["val_loss"]) == pytest.approx(last_val_loss(tmp_path / "solo"))
