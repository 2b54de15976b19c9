"""The frozen backbone behind the Skip-Cache: each batch's features, read ahead by background threads when every
sample is cached, else computed by one backbone pass whose entries are then cached.
"""

import dataclasses
import hashlib
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import Dataset

from litgpt_skip2lora.adapters import Features, Reads
from litgpt_skip2lora.cache import (
    STORAGE_DTYPES,
    CacheArgs,
    SkipCache,
    choose_placement,
    decode,
    encode,
    file_digest,
    open_store,
)
from litgpt_skip2lora.model import GPT
from litgpt_skip2lora.rows import Entry, RowLayout, shifted_targets
from litgpt_skip2lora.sweep import Sweep


def make_entry(features: Features, row: int, labels: torch.Tensor, length: int, layout: RowLayout) -> Entry:
    """Sample ``row``'s tail input: the rows its layout keeps, with their targets."""
    targets = shifted_targets(labels, length)
    keep = layout.kept(targets)
    return {"taps": features.taps[:, row, keep], "stream": features.stream[row, keep], "targets": targets[keep]}


def to_features(batch: Entry, device: torch.device, dtype: torch.dtype, reads: Reads) -> tuple[Features, torch.Tensor]:
    """The tail's input on ``device``: a batch copied without blocking (pinned sources), then decoded there."""
    batch = decode({k: v.to(device, non_blocking=True) for k, v in batch.items()}, dtype)
    return Features(batch["taps"], batch["stream"], reads), batch["targets"]


def sample_key(split: str, input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    """Its split and a hash of its tokens and labels: a run over other samples reuses every entry it shares."""
    digest = hashlib.blake2b(digest_size=16)
    for t in (input_ids, labels):
        digest.update(t.detach().cpu().to(torch.int64).numpy().tobytes())
    return f"{split}-{digest.hexdigest()}"


class Batch(NamedTuple):
    """One batch's tail input and what it cost to get it."""

    features: Features
    targets: torch.Tensor
    tokens: int
    wait: float
    """Seconds the training loop waited for features read by the prefetcher (0 when computed)."""


class CachedBackbone:
    """Each batch's features, from the cache or one backbone pass; the next ``prefetch`` batches' entries are read
    and collated (pinned, for a GPU) by background threads while the current one trains."""

    def __init__(
        self,
        compute: Callable[[torch.Tensor, Reads], Features],
        reads: Reads,
        cache: SkipCache | None,
        device: torch.device,
        dtype: torch.dtype,
        layout: RowLayout,
        prefetch: int = 4,
    ) -> None:
        self.compute, self.reads, self.cache, self.device, self.dtype = compute, reads, cache, device, dtype
        self.layout, self.prefetch = layout, max(0, prefetch)
        on_device = cache is not None and cache.placement == "device"
        self.pin = device.type == "cuda" and not on_device
        self.read_device = device if on_device else torch.device("cpu")
        self.backbone_samples = self.cache_hits = 0
        self.time = {"read_wait": 0.0, "read_batches": 0, "backbone": 0.0, "backbone_batches": 0}
        self._slow_warned = False
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="skip-cache-reader")

    def batches(self, loader: Iterable[dict], split: str) -> Iterator[Batch]:
        """The loader's batches with their features; reads run ``prefetch`` batches ahead."""
        ahead: deque[tuple[dict, Future]] = deque()
        for batch in loader:
            ahead.append((batch, self.pool.submit(self._read, batch, split)))
            if len(ahead) > self.prefetch:
                yield self._resolve(*ahead.popleft())
        while ahead:
            yield self._resolve(*ahead.popleft())

    def counters(self) -> dict[str, int]:
        """This rank's samples through the backbone and from the cache so far, and the cache's size."""
        size = self.cache.bytes if self.cache else 0
        return {"cache_hits": self.cache_hits, "cache_bytes": size, "backbone_samples": self.backbone_samples}

    def close(self) -> None:
        self.pool.shutdown()
        if self.cache is not None:
            self.cache.close()

    def _read(self, batch: dict, split: str) -> tuple[list[str], list[Entry | None], Entry | None]:
        """The samples' keys and cached entries, collated when every sample was found."""
        if self.cache is None:
            return [], [None] * len(batch["length"]), None
        input_ids, labels, lengths = batch["input_ids"], batch["labels"], batch["length"].tolist()
        keys = [sample_key(split, input_ids[j, :n], labels[j, :n]) for j, n in enumerate(lengths)]
        entries = [self.cache.get(key) for key in keys]
        if any(e is None for e in entries):
            return keys, entries, None
        # entries still queued for the writer are where they were computed: bring them where the others are
        entries = [{k: v.to(self.read_device) for k, v in e.items()} for e in entries]
        return keys, entries, self.layout.collate(entries, self.pin)

    def _resolve(self, batch: dict, future: Future) -> Batch:
        t0 = time.perf_counter()
        keys, entries, collated = future.result()
        wait = time.perf_counter() - t0
        self.cache_hits += sum(e is not None for e in entries)
        tokens = int(batch["length"].sum())
        if collated is not None:
            self.time["read_wait"] += wait
            self.time["read_batches"] += 1
            return Batch(*to_features(collated, self.device, self.dtype, self.reads), tokens, wait)
        missing = [j for j, e in enumerate(entries) if e is None]
        input_ids, labels, lengths = batch["input_ids"], batch["labels"], batch["length"].tolist()
        t0 = self._now()
        features = self.compute(input_ids[missing, : max(lengths[j] for j in missing)], self.reads)
        self.time["backbone"] += self._now() - t0
        self.time["backbone_batches"] += 1
        self.backbone_samples += len(missing)
        for row, j in enumerate(missing):
            entries[j] = make_entry(features, row, labels[j], lengths[j], self.layout)
            if self.cache is not None:  # later epochs read what is stored: the first trains on the same values
                entries[j] = encode(entries[j], self.cache.dtype)
                self.cache.put(keys[j], entries[j])
        entries = [{k: v.to(self.device) for k, v in e.items()} for e in entries]
        batch = self.layout.collate(entries, False)
        return Batch(*to_features(batch, self.device, self.dtype, self.reads), tokens, 0.0)

    def warn_if_reads_are_slow(self) -> None:
        """A cache that keeps the step waiting longer than the backbone would take is no gain: say so, once."""
        t = self.time
        if self._slow_warned or not t["read_batches"] or not t["backbone_batches"]:
            return
        read, compute = t["read_wait"] / t["read_batches"], t["backbone"] / t["backbone_batches"]
        if read > compute:
            warnings.warn(
                f"Skip-Cache reads ({self.cache.placement}) kept each step waiting {read * 1000:.0f} ms, longer than"
                f" the backbone took ({compute * 1000:.0f} ms per batch): --cache.placement memory (if it fits) or"
                " --cache.enabled false would be faster."
            )
            self._slow_warned = True

    def _now(self) -> float:
        """The time once queued GPU work is done."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def cached_backbone(
    fabric: L.Fabric, sweep: Sweep, args: CacheArgs, out_dir: Path, checkpoint_dir: Path, quantize: str | None, loader
) -> CachedBackbone:
    """The sweep's backbone, keeping what its configurations read, with a Skip-Cache placed where it fits best."""
    model, reads = sweep.model, sweep.reads
    dtype, layout = model.transformer.wte.weight.dtype, RowLayout.of(model.config)
    cache = None
    if not args.enabled:
        fabric.print("Skip-Cache: off (--cache.enabled false); every step runs the backbone.")
    elif model.backbone_requires_grad():
        warnings.warn("Ordinary LoRA trains blocks before the Skip2-LoRA output place: the Skip-Cache is off.")
    else:
        stored = STORAGE_DTYPES.get(args.dtype) or dtype
        share = sorted(set(loader.sampler.share))  # what this rank caches (:mod:`litgpt_skip2lora.sampler`)
        estimate = estimate_bytes(loader.dataset, share, reads, model.config.n_embd, stored, layout)
        max_bytes = None if args.max_size_gb is None else int(args.max_size_gb * 1e9)
        ranks_here = getattr(fabric.strategy, "num_processes", 1)  # they share this machine's RAM
        placement, why = choose_placement(args.placement, estimate, fabric.device, max_bytes, ranks_here)
        fabric.print(f"Skip-Cache: {placement} ({why}; about {estimate / 1e9:.2f} GB a rank).")
        stamp = fingerprint(fabric, model, reads, args, checkpoint_dir, quantize)
        with fabric.rank_zero_first():
            store = open_store(placement, fabric.device, args.directory or out_dir / "skip_cache", stamp)
        cache = SkipCache(store, max_bytes, STORAGE_DTYPES.get(args.dtype))
    return CachedBackbone(model.backbone, reads, cache, fabric.device, dtype, layout, args.prefetch)


def fingerprint(
    fabric: L.Fabric, model: GPT, reads: Reads, args: CacheArgs, checkpoint_dir: Path, quantize: str | None
) -> dict:
    """Everything the cached activations depend on; a cache built for anything else is rebuilt."""
    return {
        "reads": [list(reads.blocks), reads.start],
        "checkpoint": file_digest(checkpoint_dir / "lit_model.pth"),
        "tokenizer": {p.name: file_digest(p) for p in sorted(checkpoint_dir.glob("tokenizer*"))},
        "config": {k: v for k, v in dataclasses.asdict(model.config).items() if not k.startswith("lora_")},
        "precision": getattr(fabric.strategy.precision, "precision", type(fabric.strategy.precision).__name__),
        "quantize": quantize,  # a 4-bit backbone's activations differ from a bf16 one's
        "dtype": args.dtype,
    }


def estimate_bytes(
    dataset: Dataset, indices: list[int], reads: Reads, n_embd: int, dtype: torch.dtype, layout: RowLayout
) -> int:
    """The cache size of the samples at ``indices`` (a rank's share), from the rows of about 256 of them."""
    taken = [dataset[i] for i in indices[:: max(1, len(indices) // 256)]]
    rows = [layout.row_count(s["labels"]) for s in taken]
    per_row = (len(reads.blocks) + 1) * n_embd * dtype.itemsize + 8
    return int(sum(rows) / max(1, len(rows)) * len(indices) * per_row)
