"""finetune_skip2lora end to end on a tiny random-weight checkpoint: the real loop, the real cache, no mocks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import in_process, losses, run, trained
from litgpt.args import TrainArgs
from litgpt.data import JSON

import litgpt_skip2lora.__main__
import litgpt_skip2lora.model
import litgpt_skip2lora.training
from benchmarks.runs import logged_metrics
from litgpt_skip2lora.backbone import CachedBackbone
from litgpt_skip2lora.cache import CacheArgs
from litgpt_skip2lora.rows import RowLayout
from litgpt_skip2lora.training import Trainer

REPO = Path(__file__).parent.parent
N_LAYER = 4


@pytest.fixture()
def block_calls_per_step(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the backbone block forwards of each training step, its features' computation included."""
    calls, fetched, per_step = [0], [0], []
    block_forward, resolve, loss_groups = (
        litgpt_skip2lora.model.Block.forward,
        CachedBackbone._resolve,
        litgpt_skip2lora.training.loss_groups,
    )

    def counting_forward(self, *args, **kwargs):
        calls[0] += 1
        return block_forward(self, *args, **kwargs)

    def counting_resolve(self, *args):  # a batch's features are resolved just before its step
        before = calls[0]
        result = resolve(self, *args)
        fetched[0] = calls[0] - before
        return result

    def counting_groups(*args):
        before = calls[0]
        yield from loss_groups(*args)
        if torch.is_grad_enabled():  # a training step, not validation
            per_step.append(fetched[0] + calls[0] - before)

    monkeypatch.setattr(litgpt_skip2lora.model.Block, "forward", counting_forward)
    monkeypatch.setattr(CachedBackbone, "_resolve", counting_resolve)
    monkeypatch.setattr(litgpt_skip2lora.training, "loss_groups", counting_groups)
    return per_step


# in a tail, block 3 trains with q/v LoRA and dropout: the random stream must not depend on the cache
TAIL = dict(skip2lora_output_layer="block.3", lora_query=True, lora_value=True, lora_dropout=0.2)
CACHED_VARIANTS = {"adapters": {}, "tail": TAIL}
TRAIN = dict(micro_batch_size=4, global_batch_size=4, lr_warmup_steps=1)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path, alpaca_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-epoch run for the module, with step checkpoints every 3 steps (5 steps an epoch); the
    runs that stop, fill up or resume are compared with it."""
    out_dir = tmp_path_factory.mktemp("reference") / "out"
    run(tiny_checkpoint, alpaca_file, out_dir, train=TrainArgs(epochs=2, **TRAIN, save_interval=3))
    return out_dir


def reference_losses(reference: Path) -> torch.Tensor:
    metrics = logged_metrics(reference)
    return losses(metrics.dropna(subset=["loss"]))


@pytest.mark.parametrize("variant", CACHED_VARIANTS)
def test_cached_epochs_skip_the_backbone_and_match_uncached_losses(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, block_calls_per_step: list[int], variant: str
) -> None:
    options = CACHED_VARIANTS[variant]
    cached = run(tiny_checkpoint, alpaca_file, tmp_path / "cached", **options)
    steps_per_epoch = len(cached) // 3
    tail_blocks = 1 if "skip2lora_output_layer" in options else 0  # block.3 runs in the tail, with gradients
    assert block_calls_per_step[:steps_per_epoch] == [N_LAYER] * steps_per_epoch
    assert block_calls_per_step[steps_per_epoch : 3 * steps_per_epoch] == [tail_blocks] * (2 * steps_per_epoch)

    uncached = run(tiny_checkpoint, alpaca_file, tmp_path / "uncached", cache=CacheArgs(enabled=False), **options)
    n_train, n_val = 18, 6  # the first validation runs before training and fills the val entries
    assert cached["backbone_samples"].iloc[-1] == n_train + n_val
    assert uncached["backbone_samples"].iloc[-1] == 3 * n_train + n_val
    torch.testing.assert_close(losses(cached), losses(uncached))
    assert cached["loss"].iloc[-3:].mean() < cached["loss"].iloc[:3].mean()  # it learns


def test_final_checkpoint_holds_the_trained_model(reference: Path) -> None:
    """``final/`` loads with this package's classes and holds what the last step trained, outside the backbone."""
    final = reference / "final"
    assert {"lit_model.pth", "lit_model.pth.lora", "model_config.yaml", "hyperparameters.yaml", "tokenizer.json"} <= {
        p.name for p in final.iterdir()
    }
    model = litgpt_skip2lora.model.GPT(litgpt_skip2lora.model.Config.from_checkpoint(final))
    model.load_state_dict(torch.load(final / "lit_model.pth"))  # strict: every key of the model, no other
    last_step = trained(torch.load(reference / "step-000010" / "state.pth", weights_only=False))
    adapters = torch.load(final / "lit_model.pth.lora")["model"]
    assert set(adapters) == set(last_step) == {"skip2lora.A", "skip2lora.B"}
    for key, value in last_step.items():
        assert torch.equal(adapters[key], value) and torch.equal(model.state_dict()[key], value)
    assert model.skip2lora.B.abs().sum() > 0


def test_epoch_times_are_the_breakdowns_epochs(reference: Path) -> None:
    """One clock: the epochs' logged times add up to the wall-clock breakdown's epoch phases."""
    metrics = logged_metrics(reference)
    epochs = metrics["epoch_time"].dropna().tolist()
    wall = metrics.filter(like="wall_").ffill().iloc[-1]
    assert len(epochs) == 2
    assert epochs[0] == pytest.approx(wall["wall_epoch_1"], abs=1e-6)
    assert epochs[1] == pytest.approx(wall["wall_later_epochs"], abs=1e-6)


def test_cache_is_reused_and_damage_is_detected(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, block_calls_per_step: list[int]
) -> None:
    cache = CacheArgs(placement="disk", directory=tmp_path / "cache")
    first = run(tiny_checkpoint, alpaca_file, tmp_path / "a", epochs=1, cache=cache)
    (index,) = (tmp_path / "cache").glob("shard-*.idx")
    records = [json.loads(line) for line in index.read_text().splitlines()]
    assert sum(r["key"].startswith("train-") for r in records) == 18

    block_calls_per_step.clear()
    run(tiny_checkpoint, alpaca_file, tmp_path / "b", epochs=1, cache=cache)
    assert sum(block_calls_per_step) == 0  # a second run on the same data reads everything back

    shard = index.with_suffix(".bin")
    data = bytearray(shard.read_bytes())
    train = [r for r in records if r["key"].startswith("train-")]
    data[train[0]["offset"] + train[0]["length"] // 2] ^= 0xFF  # one entry damaged, the last one cut short
    shard.write_bytes(bytes(data[: train[-1]["offset"] + train[-1]["length"] - 100]))
    block_calls_per_step.clear()
    with pytest.warns(UserWarning, match="damaged"):
        again = run(tiny_checkpoint, alpaca_file, tmp_path / "c", epochs=1, cache=cache)
    assert again["backbone_samples"].iloc[-1] == 2 and sum(block_calls_per_step) > 0
    torch.testing.assert_close(losses(again), losses(first))

    with pytest.warns(UserWarning, match="built for other inputs"):
        run(tiny_checkpoint, alpaca_file, tmp_path / "d", epochs=1, cache=cache, skip2lora_block_indices=[1, 3])


def test_size_limit_falls_back_to_recomputation(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, reference: Path
) -> None:
    with pytest.warns(UserWarning, match="Skip-Cache is full"):
        metrics = run(tiny_checkpoint, alpaca_file, tmp_path / "out", epochs=2, cache=CacheArgs(max_size_gb=2e-4))
    assert 18 + 6 < metrics["backbone_samples"].iloc[-1] < 2 * 18 + 6  # some train samples fit, some not
    torch.testing.assert_close(losses(metrics), reference_losses(reference))  # recomputed samples train the same


def test_resume_continues_from_the_last_checkpoint(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, reference: Path
) -> None:
    crashed = tmp_path / "crashed"  # as if killed after step 5: its later checkpoints and final output never written
    later = shutil.ignore_patterns("step-000006", "step-000009", "step-000010", "final")
    shutil.copytree(reference, crashed, ignore=later)
    resumed = run(
        tiny_checkpoint, alpaca_file, crashed, train=TrainArgs(epochs=2, **TRAIN, save_interval=3), resume=True
    )
    assert resumed["iter"].iloc[0] == 6
    torch.testing.assert_close(losses(resumed), reference_losses(reference)[5:])


def test_a_resume_in_the_middle_of_an_accumulation_ends_as_the_uninterrupted_run(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path
) -> None:
    """5 micro-batches an epoch, 2 a step: epoch 1 ends after the first micro-batch of step 3, and the checkpoint
    written then must carry that micro-batch's gradients."""
    train = TrainArgs(epochs=2, micro_batch_size=4, global_batch_size=8, lr_warmup_steps=1)
    full = run(tiny_checkpoint, alpaca_file, tmp_path / "full", train=train, **TAIL)
    crashed = tmp_path / "crashed"  # killed in epoch 2: only epoch 1's checkpoint (after iteration 5) was written
    shutil.copytree(tmp_path / "full", crashed, ignore=shutil.ignore_patterns("step-000004", "final"))
    assert torch.load(crashed / "step-000002" / "state.pth", weights_only=False)["iter_num"] == 5
    resumed = run(tiny_checkpoint, alpaca_file, crashed, train=train, resume=True, **TAIL)
    torch.testing.assert_close(losses(resumed), losses(full)[5:])
    runs = (tmp_path / "full", crashed)
    final = [torch.load(d / "final/lit_model.pth.lora", weights_only=True)["model"] for d in runs]
    assert final[0].keys() == final[1].keys()
    for name in final[0]:
        torch.testing.assert_close(final[1][name], final[0][name], rtol=0, atol=0)


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run(
        [sys.executable, "-m", "litgpt_skip2lora", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_finetune_command_follows_the_yaml(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Skip2-LoRA YAML runs Skip2-LoRA (as a user's process); a LoRA YAML runs LitGPT's LoRA."""
    common = {
        "checkpoint_dir": str(tiny_checkpoint),
        "precision": "32-true",
        "lora_r": 4,
        "lora_alpha": 8,
        "data": {
            "class_path": "litgpt.data.JSON",
            "init_args": {"json_path": str(alpaca_file), "val_split_fraction": 0.25},
        },
        "train": {"epochs": 1, "micro_batch_size": 4, "global_batch_size": 4, "lr_warmup_steps": 1},
        "eval": {"interval": 1000, "max_new_tokens": 2},
    }
    skip2lora = {"skip2lora_enabled": True, "skip2lora_block_indices": [0, 1], "lora_query": False, "lora_value": False}
    skip2lora["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001, "weight_decay": 0.02}}
    for name, extra in {"skip2lora": skip2lora, "lora": {}}.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**common, **extra, "out_dir": str(tmp_path / name)}))
    # a class typed over the YAML's optimizer: LitGPT's re-parse of the command line, when saving, used to crash
    typed = ["--optimizer.class_path", "torch.optim.SGD", "--optimizer.init_args.lr", "0.003"]
    result = cli("finetune", "--config", str(tmp_path / "skip2lora.yaml"), *typed, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "skip2lora" / "final" / "hyperparameters.yaml").read_text())
    assert saved["optimizer"] == {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.003}}
    skip2lora_config = yaml.safe_load((tmp_path / "skip2lora" / "final" / "model_config.yaml").read_text())
    assert skip2lora_config["skip2lora_block_indices"] == [0, 1]
    fast = "device" if torch.cuda.is_available() else "memory"  # a tiny cache fits there: no disk cache is written
    assert f"Skip-Cache: {fast}" in result.stdout
    monkeypatch.chdir(tmp_path)
    in_process("finetune", "--config", str(tmp_path / "lora.yaml"))
    lora_config = yaml.safe_load((tmp_path / "lora" / "final" / "model_config.yaml").read_text())
    hyperparameters = yaml.safe_load((tmp_path / "lora" / "final" / "hyperparameters.yaml").read_text())
    assert "skip2lora_enabled" not in lora_config and hyperparameters["lora_query"] and hyperparameters["lora_value"]
    assert (tmp_path / "lora" / "final" / "lit_model.pth").is_file() and not (tmp_path / "lora" / "skip_cache").exists()


DDP_OPTIONS = (
    "--devices 2 --precision 32-true --lora_r 4 --skip2lora_block_indices [0,2] --data JSON --seed 7"
    " --data.val_split_fraction 0.25 --train.epochs 3 --train.micro_batch_size 2 --train.global_batch_size 4"
    " --train.lr_warmup_steps 1 --train.save_interval 2 --eval.interval 1000 --eval.max_new_tokens 2"
).split()
DDP_SWEEP = ("--sweep.lr", "[0.001,0.003]")
STOP_AT_STEP = """
import os, signal
from litgpt_skip2lora.__main__ import main
from litgpt_skip2lora.training import Trainer
after_step = Trainer.validate_and_save  # called after every optimizer step
def step(self, *args):
    after_step(self, *args)
    if self.state["step_count"] == int(os.environ["STOP_AT_STEP"]):
        if self.fabric.global_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 1 alone, no clean-up of any kind
Trainer.validate_and_save = step
main()
"""


def ddp_run(checkpoint: Path, data_file: Path, out_dir: Path, *options: str, stop_at: int = 0) -> pd.DataFrame:
    """``finetune_skip2lora`` in 2 CPU processes; rank 0's metrics (its per-rank counts cover both ranks), and what
    the processes wrote to stderr in ``attrs``. With ``stop_at``, rank 1 is killed right after that optimizer step."""
    runner = out_dir.parent / "stop_at_step.py"
    runner.write_text(STOP_AT_STEP)
    args = [str(runner), "finetune_skip2lora", str(checkpoint), *DDP_OPTIONS, *options]
    args += ["--data.json_path", str(data_file), "--out_dir", str(out_dir)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "", "STOP_AT_STEP": str(stop_at)}
    command = [sys.executable, *args]
    result = subprocess.run(command, cwd=out_dir.parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == (1 if stop_at else 0), result.stderr[-3000:]
    metrics = logged_metrics(out_dir)
    metrics.attrs["stderr"] = result.stderr
    return metrics


DDP_RUNS = {  # the device store is the memory store on the CPU; that run is a sweep whose lr=0.001 is the others'
    "device": ("--cache.placement", "device", *DDP_SWEEP),
    "uncached": ("--cache.enabled", "false"),
}


@pytest.fixture(scope="module")
def ddp_reference(tiny_checkpoint: Path, alpaca_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted 2-process runs (``DDP_RUNS``), each run once for the module."""
    runs: dict[str, pd.DataFrame] = {}

    def run_for(name: str) -> pd.DataFrame:
        if name not in runs:
            out_dir = tmp_path_factory.mktemp(f"ddp-{name}") / "ddp"
            runs[name] = ddp_run(tiny_checkpoint, alpaca_file, out_dir, *DDP_RUNS[name])
            runs[name].attrs["out_dir"] = out_dir
        return runs[name]

    return run_for


def test_ddp_ranks_keep_their_samples_cached(ddp_reference) -> None:
    metrics = ddp_reference("device")
    last = metrics.ffill().iloc[-1]
    n_train, n_val = 18, 6  # 9 and 3 per rank
    # each sample went through the backbone once, on the one rank that has it for the whole run
    assert last["backbone_samples_rank0"] + last["backbone_samples_rank1"] == n_train + n_val
    # from the cache: every training sample in epochs 2 and 3, every validation sample after training
    assert [last["cache_hits_rank0"], last["cache_hits_rank1"]] == [(2 * n_train + n_val) // 2] * 2
    assert last["iter"] == 15 and "wall_total" in metrics  # 5 micro-batches per rank and epoch, 3 epochs


def test_a_ddp_sweep_trains_each_configuration_as_its_uncached_ddp_run(ddp_reference) -> None:
    """Gradients averaged over the ranks per configuration, as DDP averages a run's, and cached features equal to
    recomputed ones: the cached sweep's lr=0.001 equals the uncached 2-process run at AdamW's default, 0.001."""
    swept, alone = ddp_reference("device"), ddp_reference("uncached")
    swept_losses = torch.tensor(swept["loss/lr=0.001"].dropna().values, dtype=torch.float32)
    assert len(swept_losses) == 15  # 5 micro-batches of 2 per rank and epoch (the last holds 1 sample), 3 epochs
    torch.testing.assert_close(swept_losses, losses(alone.dropna(subset=["loss"])))
    table = pd.read_csv(swept.attrs["out_dir"] / "sweep.csv")
    assert list(table["name"]) == ["lr=0.001", "lr=0.003"] and table["chosen"].sum() == 1
    assert table.loc[0, "val_loss"] == pytest.approx(alone["val_loss"].dropna().iloc[-1], rel=1e-5)


def test_a_ddp_rank_killed_alone_stops_the_other_and_the_run_resumes_exactly_with_its_disk_cache(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, ddp_reference
) -> None:
    """Rank 1 SIGKILLed alone: rank 0 stops at its next collective or within its watcher's second, with one line.
    Each rank keeps its share of the samples in the disk store, across the death and the resume. (Both ranks dying
    at once leaves the same checkpoints and cache behind.)"""
    disk = ("--cache.placement", "disk")
    full = ddp_reference("uncached").dropna(subset=["loss"])
    died = ddp_run(tiny_checkpoint, alpaca_file, tmp_path / "died", *disk, stop_at=5)
    line = "error: lost rank 1 (killed by SIGKILL): this rank stops too; continue with --resume true."
    assert died.attrs["stderr"].strip().splitlines()[-1] == line and "Traceback" not in died.attrs["stderr"]
    # 5 steps an epoch (one micro-batch of 2 per rank and step); saved every 2; died after step 5, before the
    # epoch's own checkpoint
    assert sorted(p.name for p in (tmp_path / "died").glob("step-*")) == ["step-000002", "step-000004"]
    resumed = ddp_run(tiny_checkpoint, alpaca_file, tmp_path / "died", *disk, "--resume", "true")
    last = resumed.ffill().iloc[-1]
    assert last["backbone_samples_rank0"] + last["backbone_samples_rank1"] == 0  # every entry whole and reused
    # each rank's own samples from the disk: validation at resume (3), epoch 1's last step (1), epochs 2 and 3
    # (2 x 9) and the final validation (3)
    assert [last["cache_hits_rank0"], last["cache_hits_rank1"]] == [25, 25]
    resumed = resumed.dropna(subset=["loss"])
    assert resumed["iter"].iloc[0] == 5
    torch.testing.assert_close(losses(resumed), losses(full)[4:])


def test_step_checkpoints_hold_only_what_training_changes(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path
) -> None:
    train = TrainArgs(epochs=1, micro_batch_size=4, global_batch_size=4, lr_warmup_steps=1, save_interval=2)
    run(tiny_checkpoint, alpaca_file, tmp_path / "out", train=train)
    step = sorted((tmp_path / "out").glob("step-*/state.pth"))[0]
    state = trained(torch.load(step, weights_only=False))
    assert set(state) == {"skip2lora.A", "skip2lora.B"}
    trained_count = sum(t.numel() for t in state.values())
    assert trained_count == 2 * 2 * 4 * 32  # two adapters, A (r x d) and B (d x r), r=4, n_embd=32
    frozen = sum(t.numel() for t in torch.load(tiny_checkpoint / "lit_model.pth").values())
    # parameters and AdamW's two moments in float32, plus counters, RNG state and pickling overhead
    assert step.stat().st_size < 3 * 4 * trained_count + 64_000 < 4 * frozen
    assert not list((tmp_path / "out").glob(".step-*"))  # written under a temporary name, then renamed


def interrupt_at(step: int, sig: signal.Signals, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sends ``sig`` to this process right after optimizer step ``step``, as a user's Ctrl-C or a scheduler would."""
    after_step = Trainer.validate_and_save  # called after every optimizer step

    def signalling_step(self, *args) -> None:
        after_step(self, *args)
        if self.state["step_count"] == step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(Trainer, "validate_and_save", signalling_step)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_that_resumes_exactly(
    tiny_checkpoint: Path,
    alpaca_file: Path,
    tmp_path: Path,
    sig: signal.Signals,
    capsys: pytest.CaptureFixture,
    reference: Path,
) -> None:
    train = TrainArgs(epochs=2, **TRAIN, save_interval=None)
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at(7, sig, patch)
        with pytest.raises(SystemExit) as stopped:
            run(tiny_checkpoint, alpaca_file, tmp_path / "stopped", train=train)
    assert stopped.value.code == 130 and "--resume true" in capsys.readouterr().out
    assert (tmp_path / "stopped" / "step-000007" / "state.pth").is_file()
    assert not (tmp_path / "stopped" / "final").exists()
    resumed = run(tiny_checkpoint, alpaca_file, tmp_path / "stopped", train=train, resume=True)
    assert "Validation loss at resume (step 7)" in capsys.readouterr().out
    torch.testing.assert_close(losses(resumed), reference_losses(reference)[7:])


def test_a_second_run_keeps_the_first_runs_model(tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path) -> None:
    run(tiny_checkpoint, alpaca_file, tmp_path / "out", epochs=1)
    first = (tmp_path / "out" / "final" / "lit_model.pth").read_bytes()
    with pytest.warns(UserWarning, match="holds an earlier run's model"):
        run(tiny_checkpoint, alpaca_file, tmp_path / "out", epochs=1, skip2lora_block_indices=[1, 3])
    assert (tmp_path / "out" / "final" / "lit_model.pth").read_bytes() == first
    second = yaml.safe_load((tmp_path / "out" / "final-1" / "model_config.yaml").read_text())
    assert second["skip2lora_block_indices"] == [1, 3]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint_dir", "/nonexistent/checkpoint"], "checkpoint_dir"),
        (["--skip2lora_block_indices", "[0,9]"], "9 is not a block index of a 4-layer model"),
        (["--skip2lora_output_layer", "head"], "skip2lora_output_layer must be"),
        (["--cache.directory", "{tmp}/a-file/cache", "--cache.placement", "disk"], "cannot be created or written"),
        (["--train.epochs", "0"], "--train.epochs must be at least 1"),
        (["--train.epochs", "-1"], "--train.epochs must be at least 1"),
        (["--train.micro_batch_size", "0"], "--train.micro_batch_size must be at least 1, got 0"),
        (["--train.global_batch_size", "-4"], "--train.global_batch_size must be at least 1, got -4"),
        (["--train.save_interval", "0"], "--train.save_interval must be at least 1, got 0"),
        (["--eval.interval", "0"], "--eval.interval must be at least 1, got 0"),
        (["--train.max_steps", "-2"], "--train.max_steps must be at least 1, got -2"),
        (["--resume", "true"], "holds no step-"),
        (["--quantize", "bnb.nf4"], "needs a CUDA GPU"),
        (["--quantize", "bnb.int8"], "computes in float16: add --precision 16-true"),
        (["--data.json_path", "{tmp}/bad.json"], "bad.json: invalid JSON at line 2, column 13: Expecting value."),
        (["--data.json_path", "{tmp}/no-output.json"], "no-output.json: item 1 has no 'output'"),
        (["--out_dir", "/proc/skip2lora-out"], "--out_dir '/proc/skip2lora-out' cannot be created or written"),
        (["--sweep.lr", "[]"], "--sweep.lr is an empty list"),
        (["--sweep.lr", "[0.1,0.1]"], "--sweep.lr repeats a value"),
        (["--sweep.keep", "0"], "--sweep.keep must be in (0, 1]"),
        (["--sweep.skip2lora_output_layer", "[lm_head,block.2]"], "takes block.K places: ['lm_head', 'block.2']"),
        (["--sweep.skip2lora_output_layer", "[block.4,block.2]"], "'block.K' (0 < K < 4): 'block.4'"),
        (
            ["--sweep.skip2lora_output_layer", "[block.1,block.2]", "--skip2lora_block_indices", "[2,3]"],
            "No block of [2, 3] lies at or before --sweep.skip2lora_output_layer block.1.",
        ),
        (["--sweep.skip2lora_block_indices", "[[0],[0]]"], "--sweep.skip2lora_block_indices repeats a value"),
        (["--sweep.lora_r", "[0,4]"], "--sweep.lora_r values must be positive: [0, 4]."),
        (["--sweep.lr", "[0.1,0.2]", "--eval.final_validation", "false"], "leave --eval.final_validation true"),
        (
            ["--devices", "2", "--train.global_batch_size", "8", "--train.micro_batch_size", "8"],
            "--train.global_batch_size 8 does not split into micro-batches of 8 over 2 devices: use a global batch"
            " size that is a multiple of 16, or --train.micro_batch_size 4.",
        ),
        (
            ["--devices", "3", "--train.global_batch_size", "8", "--train.micro_batch_size", "4"],
            "over 3 devices: use a global batch size that is a multiple of 12.",
        ),
        (["--precision", "16-mixed"], "--precision 16-mixed needs a CUDA GPU; on the CPU use 32-true or bf16-mixed."),
    ],
)
def test_a_users_error_is_one_line_without_traceback(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, args: list[str], message: str, monkeypatch
) -> None:
    """Refused before anything is written, as one ``error: ...`` line (``main`` turns only a user's error into
    one; anything else would keep its traceback)."""
    if ("--quantize" in args or "16-mixed" in args) and torch.cuda.is_available():
        pytest.skip("this machine has the GPU that the refusal is about")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "bad.json").write_text('[\n {"output": }\n]')
    items = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]
    (tmp_path / "no-output.json").write_text(json.dumps(items))
    checkpoint = args.pop(1) if args[0] == "--checkpoint_dir" else str(tiny_checkpoint)
    args = args[1:] if args and args[0] == "--checkpoint_dir" else args
    common = ["--data", "JSON", "--data.json_path", str(alpaca_file), "--precision", "32-true"]
    options = [*common, "--out_dir", str(tmp_path / "out"), *[a.format(tmp=tmp_path) for a in args]]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        in_process("finetune_skip2lora", checkpoint, *options)
    assert isinstance(refused.value.code, str) and refused.value.code.startswith("error: ")
    assert message in refused.value.code and "\n" not in refused.value.code
    assert not (tmp_path / "out").exists()


def test_data_that_cannot_be_downloaded_is_one_line(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """LitGPT's default data, Alpaca, is downloaded: offline (here, a port nothing listens on) the error says how to
    pass local data, before the model loads."""
    url = ["--data.file_url", "http://127.0.0.1:9/alpaca.json", "--data.download_dir", str(tmp_path / "alpaca")]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        in_process("finetune_skip2lora", str(tiny_checkpoint), "--data", "Alpaca", *url)
    assert refused.value.code == (
        "error: --data Alpaca downloads its data, which failed (ConnectionError). Without internet, pass local data:"
        " --data JSON --data.json_path FILE, or --data litgpt_skip2lora.data.WordNetInstruct."
    )
    assert "Number of trainable parameters" not in capsys.readouterr().out


def test_cache_serves_a_grown_selection_of_samples(tiny_checkpoint: Path, tmp_path: Path, alpaca_writer) -> None:
    """Entries are keyed by their tokens: more samples only adds entries, the shared ones are read back."""
    write_alpaca = alpaca_writer
    cache = CacheArgs(placement="disk", directory=tmp_path / "cache")
    few, more = write_alpaca(tmp_path / "few.json", 24), write_alpaca(tmp_path / "more.json", 40)
    data = dict(val_split_fraction=0.25, num_workers=0)
    run(tiny_checkpoint, few, tmp_path / "a", epochs=1, cache=cache, data=JSON(json_path=few, **data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grown = run(tiny_checkpoint, more, tmp_path / "b", epochs=1, cache=cache, data=JSON(json_path=more, **data))
    assert not [w for w in caught if "built for other inputs" in str(w.message)]  # nothing was wiped
    assert 0 < grown["backbone_samples"].iloc[-1] < 40


def test_a_smollm2_shaped_step_checkpoint_holds_only_the_adapters(
    alpaca_file: Path, tmp_path: Path, checkpoint_writer
) -> None:
    checkpoint = checkpoint_writer(tmp_path / "smollm2", config_name="SmolLM2-135M-Instruct")
    train = TrainArgs(epochs=1, micro_batch_size=8, global_batch_size=8, lr_warmup_steps=1, save_interval=None)
    run(checkpoint, alpaca_file, tmp_path / "out", train=train, skip2lora_block_indices=None, lora_r=8, lora_alpha=16)
    (step,) = (tmp_path / "out").glob("step-*/state.pth")  # the end of the epoch's
    parameters = trained(torch.load(step, weights_only=False))
    assert sum(t.numel() for t in parameters.values()) == 4 * 2 * 8 * 576  # 4 default blocks, A and B, r=8, n_embd 576
    frozen = sum(t.numel() for t in torch.load(checkpoint / "lit_model.pth", mmap=True).values())
    assert frozen > 100_000_000
    assert step.stat().st_size < 3 * 4 * 36_864 + 64_000  # parameters and AdamW's two moments in float32, plus state


@pytest.mark.parametrize("placement", ["memory", "disk"] + (["device"] if torch.cuda.is_available() else []))
def test_every_placement_trains_as_uncached(
    tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path, placement: str
) -> None:
    cached = run(tiny_checkpoint, alpaca_file, tmp_path / "cached", cache=CacheArgs(placement=placement))
    uncached = run(tiny_checkpoint, alpaca_file, tmp_path / "uncached", cache=CacheArgs(enabled=False))
    assert cached["cache_hits"].iloc[-1] > 0
    torch.testing.assert_close(losses(cached), losses(uncached))


def test_reads_slower_than_the_backbone_are_reported() -> None:
    from litgpt_skip2lora.cache import MemoryStore, SkipCache

    cache = SkipCache(MemoryStore(torch.device("cpu")))
    features = CachedBackbone(lambda idx: None, None, cache, torch.device("cpu"), torch.float32, RowLayout(flat=True))
    features.time.update(read_wait=0.5, read_batches=5, backbone=0.2, backbone_batches=4)  # 100 ms against 50 ms
    with pytest.warns(UserWarning, match="waiting 100 ms, longer than the backbone took \\(50 ms"):
        features.warn_if_reads_are_slow()
    features.time.update(read_wait=0.1)
    features._slow_warned = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        features.warn_if_reads_are_slow()  # 20 ms against 50 ms: nothing to say
    features.close()


def test_ctrl_c_before_training_is_one_line(tiny_checkpoint: Path, alpaca_file: Path, tmp_path: Path) -> None:
    """Ctrl-C while the model loads: no traceback, exit code 130."""
    command = [sys.executable, "-m", "litgpt_skip2lora", "finetune_skip2lora", str(tiny_checkpoint)]
    command += ["--data", "JSON", "--data.json_path", str(alpaca_file), "--out_dir", str(tmp_path / "out")]
    runner = (  # the real CLI, with the checkpoint load replaced by a Ctrl-C
        "import os, runpy, signal, sys, litgpt.utils\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal, even under a background job
        "litgpt.utils.load_checkpoint = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGINT)\n"
        f"sys.argv = {command[2:]!r}\n"
        "runpy.run_module('litgpt_skip2lora', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1] == "Interrupted."
