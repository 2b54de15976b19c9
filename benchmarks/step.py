"""Benchmark Skip2-LoRA training steps against LitGPT's own LoRA: time per step and peak memory.

Every configuration runs in a fresh process of this script (``--worker NAME``), so that its peak memory is its own:
on CUDA ``torch.cuda.max_memory_allocated``, on CPU the process's peak resident set (``ru_maxrss``). The steps
timed are the real ones: LitGPT's ``finetune_lora`` step for LoRA, and for Skip2-LoRA training's own parts,
``CachedBackbone`` (uncached: one backbone pass per step; cached: tail only, features read from a filled Skip-
Cache, prefetch included) and ``tail_loss``. Each timed step gets a batch of its own, so a cached step reads its
entries as in training: ``-cached`` from the placement ``auto`` picks for a small cache (GPU memory on CUDA, RAM on
CPU), ``-memory`` from pinned host RAM (CUDA only), ``-disk`` from the disk cache with its shard files in the page
cache, ``-disk-cold`` after dropping them from it (``posix_fadvise``); cached rows report the Skip-Cache's bytes
per token. Weights are random, which does not change the cost of a step.

    python benchmark_skip2lora.py                     # SmolLM2-135M-Instruct, CPU-sized default
    python benchmark_skip2lora.py --model Llama-2-7b-hf --precision bf16-true --batch-size 4 --seq-len 512
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import unittest.mock
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import litgpt
import litgpt.lora
import torch
from litgpt.finetune.lora import get_lr_scheduler
from litgpt.utils import chunked_cross_entropy, instantiate_torch_optimizer, num_parameters

from benchmarks.compare import cpu_name, environment
from litgpt_skip2lora.backbone import CachedBackbone
from litgpt_skip2lora.cache import SkipCache, open_store
from litgpt_skip2lora.finetune import bitsandbytes_plugin
from litgpt_skip2lora.model import GPT, Config, default_blocks, default_precision, mark_trainable
from litgpt_skip2lora.rows import IGNORE_INDEX, RowLayout
from litgpt_skip2lora.sweep import Configuration, rng_state
from litgpt_skip2lora.training import loss_groups

BASELINE = "lora"
SAME_PARAMS = "lora-same-params"
QUARTER = "skip2-4-cached-quarter"
# The targets, largest ratios to LoRA: reported, never asserted.
STEP_TARGETS = {"uncached": 0.6, "cached": 0.2, "quarter": 0.05}
MEMORY_TARGET = 0.5


@dataclass(frozen=True)
class Spec:
    """One configuration: LoRA q+v of some rank, or Skip2-LoRA on some blocks, uncached or cached."""

    rank: int
    blocks: tuple[int, ...] = ()
    placement: str | None = None  # where the Skip-Cache keeps entries; None: uncached
    labelled: float = 1.0  # fraction of each sequence that carries labels (the last part)
    cold: bool = False  # disk cache dropped from the page cache before the timed steps
    factored_head: bool = True  # False: the plain head, to show what the factored one saves

    @property
    def cached(self) -> bool:
        return self.placement is not None

    @property
    def kind(self) -> str:
        if not self.blocks:
            return "lora"
        return "quarter" if self.labelled < 1 else "cached" if self.cached else "uncached"


def blocks_for(count: str, n_layer: int) -> tuple[int, ...]:
    """``count`` evenly spaced blocks starting at 0, or ``all``."""
    return tuple(default_blocks(n_layer, n_layer if count == "all" else int(count)))


def model_config(args: argparse.Namespace, spec: Spec) -> litgpt.lora.Config:
    """LitGPT's LoRA q+v, or Skip2-LoRA alone; alpha = 2 r as in ``litgpt finetune_lora``'s defaults (16, 8)."""
    override = {} if args.n_layer is None else {"n_layer": args.n_layer}
    lora = dict(lora_r=spec.rank, lora_alpha=2 * spec.rank, lora_dropout=0.05)
    if spec.blocks:
        skip2lora = dict(skip2lora_enabled=True, skip2lora_block_indices=spec.blocks)
        return Config.from_name(args.model, **override, **lora, **skip2lora)
    return litgpt.lora.Config.from_name(args.model, **override, **lora, lora_query=True, lora_value=True)


def new_model(config: litgpt.lora.Config) -> litgpt.lora.GPT:
    """LitGPT's own LoRA model for the baselines, so that they are exactly what ``litgpt finetune_lora`` trains."""
    return GPT(config) if isinstance(config, Config) else litgpt.lora.GPT(config)


def mark(model: litgpt.lora.GPT) -> None:
    """What trains: LoRA's layers, or the Skip2-LoRA adapters."""
    if isinstance(model, GPT):
        mark_trainable(model)
    else:
        litgpt.lora.mark_only_lora_as_trainable(model)


def trainable_parameters(config: litgpt.lora.Config) -> int:
    with torch.device("meta"):
        model = new_model(config)
    mark(model)
    return num_parameters(model, requires_grad=True)


def configurations(args: argparse.Namespace) -> dict[str, Spec]:
    """All configurations by name; the same-parameters LoRA rank is the one closest to Skip2-LoRA on 4 blocks."""
    n_layer = args.n_layer or litgpt.Config.from_name(args.model).n_layer
    fast = "device" if args.device == "cuda" else "memory"
    specs = {BASELINE: Spec(args.rank)}
    for count in args.blocks.split(","):
        blocks = blocks_for(count, n_layer)
        specs[f"skip2-{count}"] = Spec(args.rank, blocks)
        specs[f"skip2-{count}-cached"] = Spec(args.rank, blocks, fast)
        if args.device == "cuda":
            specs[f"skip2-{count}-memory"] = Spec(args.rank, blocks, "memory")
        specs[f"skip2-{count}-disk"] = Spec(args.rank, blocks, "disk")
        specs[f"skip2-{count}-disk-cold"] = Spec(args.rank, blocks, "disk", cold=True)
        specs[f"skip2-{count}-cached-plain-head"] = Spec(args.rank, blocks, fast, factored_head=False)
    specs[QUARTER] = Spec(args.rank, blocks_for("4", n_layer), fast, labelled=0.25)
    target = trainable_parameters(model_config(args, specs[QUARTER]))
    per_rank = trainable_parameters(model_config(args, Spec(1)))  # LoRA's trainable count is linear in r
    specs[SAME_PARAMS] = Spec(max(1, round(target / per_rank)))
    return specs


class Clock:
    """Timestamps inside a step; on CUDA each waits for the queued kernels, so it marks finished work."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[float] = []

    def mark(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())


def make_batches(config: litgpt.lora.Config, spec: Spec, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One batch per step of random tokens; labels = inputs (as LitGPT's SFT data), -100 on the unlabelled first
    part of each sequence. Tokens differ across batches, so every step reads entries of its own."""
    batches = []
    for _ in range(args.warmup + args.repeats):
        input_ids = torch.randint(config.vocab_size, (args.batch_size, args.seq_len), device=device)
        labels = input_ids.clone()
        labels[:, : round(args.seq_len * (1 - spec.labelled))] = IGNORE_INDEX
        length = torch.full((args.batch_size,), args.seq_len, device=device)
        batches.append({"input_ids": input_ids, "labels": labels, "length": length})
    return batches


def build(
    fabric: L.Fabric, config: litgpt.lora.Config, seq_len: int
) -> tuple[litgpt.lora.GPT, torch.nn.Module, torch.optim.Optimizer]:
    """The model with random weights materialised directly on the device and in the precision's dtype.

    ``empty_init`` skips every ``torch.nn.init`` call, so a 7B model never exists twice; each module's own
    ``reset_parameters`` then writes random weights in place.
    """
    with fabric.init_module(empty_init=True):
        model = new_model(config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    mark(model)
    model.max_seq_length = seq_len
    fabric_model = fabric.setup_module(model)
    optimizer = instantiate_torch_optimizer("AdamW", [p for p in model.parameters() if p.requires_grad])
    return model, fabric_model, fabric.setup_optimizers(optimizer)


def lora_step(
    fabric: L.Fabric, model: torch.nn.Module, optimizer, batches: list[dict], clock: Clock
) -> Callable[[], None]:
    """One step of ``litgpt finetune_lora`` (no gradient accumulation) per call, over the batches in turn."""
    iterator = iter(batches)

    def loss() -> torch.Tensor:
        batch = next(iterator)
        logits = model(batch["input_ids"], lm_head_chunk_size=128)
        logits[-1] = logits[-1][..., :-1, :]
        return chunked_cross_entropy(logits, batch["labels"][..., 1:])

    return timed_step(fabric, optimizer, clock, loss)


def timed_step(fabric: L.Fabric, optimizer, clock: Clock, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """A training step per call: the next batch's ``loss()``, backward, the optimizer and scheduler steps; the clock
    marks the ends of the forward and the backward."""
    scheduler = get_lr_scheduler(optimizer, warmup_steps=1, max_steps=10**6)

    def step() -> None:
        value = loss()
        clock.mark()
        fabric.backward(value)
        clock.mark()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    return step


def skip2lora_step(
    fabric: L.Fabric, model: GPT, optimizer, spec: Spec, batches: list[dict], clock: Clock, out: Path
) -> tuple[Callable[[], None], float | None]:
    """One training step per call, from training's own parts: the batch's features from the ``CachedBackbone``,
    ``loss_groups`` for the model's one configuration, backward and the optimizer step; and the filled cache's bytes
    per token (None uncached).

    For a cached configuration the cache is filled first (the first epoch's work, not timed); the forward time
    then includes waiting for the prefetched entries.
    """
    cache, bytes_per_token, layout = None, None, RowLayout.of(model.config)
    if spec.cached:
        cache = SkipCache(open_store(spec.placement, fabric.device, out / "skip_cache", {"benchmark": True}))
    dtype, reads = model.transformer.wte.weight.dtype, model.skip2lora.reads
    backbone = CachedBackbone(model.backbone, reads, cache, fabric.device, dtype, layout)
    if cache is not None:
        with torch.no_grad():
            for _ in backbone.batches(batches, "train"):
                pass
        cache.flush()
        bytes_per_token = cache.bytes / sum(int(b["length"].sum()) for b in batches)
        if spec.cold:
            drop_from_page_cache(out / "skip_cache")
    iterator = backbone.batches(batches, "train")
    run = [Configuration("run", {}, model.config, model.skip2lora, {}, 1, {}, rng=rng_state(fabric.device))]

    def loss() -> torch.Tensor:
        # the plain head where the policy would factor it: what the factored head saves
        never = unittest.mock.patch("litgpt_skip2lora.execution.factoring_pays", return_value=False)
        with contextlib.nullcontext() if spec.factored_head else never:
            return next(loss_groups(model, next(iterator), layout, run))[0]

    return timed_step(fabric, optimizer, clock, loss), bytes_per_token


def drop_from_page_cache(directory: Path) -> None:
    """Written shard bytes flushed to disk, then evicted from the page cache: the next read comes from the disk."""
    for path in directory.glob("shard-*.bin"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_worker(args: argparse.Namespace, spec: Spec) -> dict:
    """Time one configuration in this process and report its figures, raw times in ms."""
    fabric = L.Fabric(accelerator=args.device, devices=1, **precision_args(args))
    fabric.seed_everything(1337)
    if fabric.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    config = model_config(args, spec)
    model, fabric_model, optimizer = build(fabric, config, args.seq_len)
    batches = make_batches(config, spec, args, fabric.device)
    clock = Clock(fabric.device)
    setup_mib, bytes_per_token = memory_in_use_mib(fabric.device), None
    if spec.blocks:
        with tempfile.TemporaryDirectory(dir=args.out) as scratch:
            step, bytes_per_token = skip2lora_step(fabric, model, optimizer, spec, batches, clock, Path(scratch))
            times = time_steps(step, clock, args)
    else:
        times = time_steps(lora_step(fabric, fabric_model, optimizer, batches, clock), clock, args)
    return {
        "rank": spec.rank,
        "blocks": list(spec.blocks),
        "placement": spec.placement,
        "cold": spec.cold,
        "factored_head": spec.factored_head,
        "labelled_fraction": spec.labelled,
        "total_params": num_parameters(model),
        "trainable_params": num_parameters(model, requires_grad=True),
        "times_ms": times,
        "median_ms": {k: statistics.median(v) for k, v in times.items()},
        "memory_after_setup_mib": setup_mib,
        "peak_memory_mib": peak_memory_mib(fabric.device),
        "cache_bytes_per_token": bytes_per_token,
    }


def time_steps(step: Callable[[], None], clock: Clock, args: argparse.Namespace) -> dict[str, list[float]]:
    """Forward (features included), backward and whole-step times in ms of the steps after the warm-up."""
    times = {"forward": [], "backward": [], "step": []}
    for i in range(args.warmup + args.repeats):
        clock.marks.clear()
        clock.mark()
        step()
        clock.mark()
        start, forward_end, backward_end, end = clock.marks
        if i >= args.warmup:
            times["forward"].append((forward_end - start) * 1e3)
            times["backward"].append((backward_end - forward_end) * 1e3)
            times["step"].append((end - start) * 1e3)
    return times


def precision_args(args: argparse.Namespace) -> dict:
    """Fabric's precision, or with ``--quantize`` the bitsandbytes plugin computing in the precision's dtype."""
    if args.quantize is None:
        return {"precision": args.precision}
    return {"plugins": bitsandbytes_plugin(args.quantize, args.precision)}


def memory_in_use_mib(device: torch.device) -> float:
    """Memory held now (model, optimizer, batch): on CUDA allocated tensors, on CPU the resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mib(device: torch.device) -> float:
    """Peak since the process started: on CUDA allocated tensors, on CPU the resident set (``ru_maxrss``, KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def run_in_subprocess(name: str) -> dict:
    """A fresh interpreter per configuration: its peak memory owes nothing to the others."""
    command = [sys.executable, "-m", "benchmarks.step", *sys.argv[1:], "--worker", name]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"Configuration {name!r} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def add_ratios_to_lora(results: dict[str, dict]) -> None:
    """Every figure divided by the baseline's, measured in the same run."""
    base = results[BASELINE]
    for result in results.values():
        ratios = {k: v / base["median_ms"][k] for k, v in result["median_ms"].items()}
        ratios["peak_memory"] = result["peak_memory_mib"] / base["peak_memory_mib"]
        ratios["trainable_params"] = result["trainable_params"] / base["trainable_params"]
        result["ratio_to_lora"] = ratios


def verdict(ratio: float, target: float | None) -> str:
    return "" if target is None else f" ({'meets' if ratio <= target else 'misses'} <={target}x)"


def table(results: dict[str, dict], specs: dict[str, Spec]) -> str:
    header = (
        f"{'config':<24}{'trainable':>11}{'fwd ms':>9}{'bwd ms':>9}  {'step ms (median [min-max])':<28}"
        f"{'step ratio':<26}{'peak MiB':>9}  memory ratio"
    )
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        kind, steps, ratio = specs[name].kind, r["times_ms"]["step"], r["ratio_to_lora"]
        step_target = STEP_TARGETS.get(kind)
        memory_target = MEMORY_TARGET if specs[name].blocks else None
        step = f"{r['median_ms']['step']:.1f} [{min(steps):.1f}-{max(steps):.1f}]"
        fwd, bwd = r["median_ms"]["forward"], r["median_ms"]["backward"]
        lines.append(
            f"{name:<24}{r['trainable_params']:>11,}{fwd:>9.1f}{bwd:>9.1f}  "
            f"{step:<28}{ratio['step']:.3f}x{verdict(ratio['step'], step_target):<20}"
            f"{r['peak_memory_mib']:>9.0f}  {ratio['peak_memory']:.3f}x{verdict(ratio['peak_memory'], memory_target)}"
        )
    return "\n".join(lines)


def settings(args: argparse.Namespace) -> dict:
    """The machine (``compare``'s ``environment``) and this run's settings."""
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    return {
        **environment(),
        "device": args.device,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "quantize": args.quantize,
        "model": args.model,
        "n_layer_override": args.n_layer,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="any LitGPT config name")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", help="default: 32-true on CPU, bf16-true on CUDA")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--quantize", choices=("bnb.nf4", "bnb.nf4-dq", "bnb.int8"), help="frozen weights in bitsandbytes"
    )
    parser.add_argument("--blocks", default="2,4,6,all", help="Skip2-LoRA block counts, evenly spaced from block 0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--n-layer", type=int, help="shrink the model to this many layers (quick runs)")
    parser.add_argument("--configs", help="comma-separated subset of configurations; the baseline always runs")
    parser.add_argument("--out", type=Path, default=Path("benchmark_results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.precision = args.precision or (default_precision() if args.device == "cuda" else "32-true")
    return args


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)  # also where the disk configurations keep their cache
    specs = configurations(args)
    if args.worker:
        print(json.dumps(run_worker(args, specs[args.worker])))
        return
    names = list(specs) if args.configs is None else [BASELINE, *(n for n in args.configs.split(",") if n != BASELINE)]
    unknown = set(names) - set(specs)
    if unknown:
        raise SystemExit(f"Unknown configurations {sorted(unknown)}; choose from {list(specs)}.")
    if args.n_layer is not None:
        print(f"Note: {args.model} overridden to n_layer={args.n_layer}.")
    weights = f"{args.precision} {args.quantize or ''}".strip()
    print(f"{args.model} | {args.device} {weights} | batch {args.batch_size} x {args.seq_len} | rank {args.rank}")
    print(f"{SAME_PARAMS}: LoRA q+v with rank {specs[SAME_PARAMS].rank}, the trainable count closest to skip2-4's.")
    results = {}
    for name in names:
        print(f"running {name} ...", end=" ", flush=True)
        results[name] = run_in_subprocess(name)
        print(
            f"step {results[name]['median_ms']['step']:.1f} ms, peak {results[name]['peak_memory_mib']:.0f} MiB",
            flush=True,
        )
    add_ratios_to_lora(results)
    print(table(results, specs))
    report = {"environment": settings(args), "configurations": results}
    path = args.out / f"benchmark-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
