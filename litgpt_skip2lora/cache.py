"""The Skip-Cache: per-sample backbone activations, kept because the frozen backbone never changes them.

Everything about the cache lives here: what an entry holds (:func:`make_entry`), how entries become a batch
(:func:`collate`), where they are kept (:class:`MemoryStore` on the GPU or in host RAM, :class:`DiskStore` in
shard files), the fingerprint that says what they depend on, and :class:`FeatureLoader`, which the training loop
asks for each batch's features: it reads the next batches ahead of need in background threads, into pinned
memory when the device is a GPU, and hands new entries to a bounded background writer, so that neither reads nor
writes stall a step that has compute to do.

The disk format reads at page-cache speed: entries are appended to shard files that are read through memory maps
as zero-copy tensor views. A shard's entries are listed in its ``.idx`` file, one JSON line per entry, written only
after the entry's bytes: a crash leaves an entry whole or absent (a torn last line or unlisted bytes are ignored).
Each entry carries a CRC-32 of its bytes, checked the first time the entry is read in a run (in a reader thread,
off the training loop; CRC-32 because ``zlib`` ships it and releases the GIL), so a damaged entry is recomputed,
never used, without paying the checksum again on every later epoch.
"""

import hashlib
import json
import os
import queue
import shutil
import threading
import time
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from mmap import ACCESS_COPY, mmap
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from litgpt_skip2lora.model import Features

Entry = dict[str, torch.Tensor]
IGNORE_INDEX = -100
FORMAT_VERSION = 2
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
QUANTIZED = ("taps", "stream")  # what 8-bit storage quantizes; targets stay as they are
ALIGN = 64


@dataclass
class CacheArgs:
    """Skip-Cache options."""

    enabled: bool = True
    """Keep each sample's backbone activations and skip the backbone whenever the sample comes again."""
    placement: Literal["auto", "device", "memory", "disk"] = "auto"
    """Where entries live. ``auto``: on a GPU, GPU memory when the whole cache fits half of what is free there, else
    ``directory`` on disk; on the CPU, host RAM when the cache fits half of what is available, else disk."""
    directory: Path | None = None
    """The disk placement's folder; default ``<out_dir>/skip_cache``. A later run with the same fingerprint reuses
    it."""
    max_size_gb: float | None = None
    """Size limit; samples that do not fit are recomputed each time."""
    dtype: Literal["float32", "bfloat16", "float16", "int8"] | None = None
    """Storage dtype; default: the dtype the backbone computes in, which keeps cached training exact. ``int8``
    stores each row with its own scale (a quarter of float32's bytes)."""
    prefetch: int = 4
    """Batches read ahead of the training step, by background threads."""


class CacheError(ValueError):
    """A cache option that cannot work, reported before training starts."""


# ---------------------------------------------------------------------------------------------------- entries


def make_entry(features: Features, row: int, labels: torch.Tensor, length: int, position_wise: bool) -> Entry:
    """One sample's tail input: every real position, or for a position-wise tail only the supervised ones."""
    targets = torch.full((length,), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    targets[:-1] = labels[1:length]
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1) if position_wise else slice(0, length)
    entry = {
        "taps": torch.stack([t[row, keep] for t in features.taps]),
        "stream": features.stream[row, keep],
        "targets": targets[keep],
    }
    return entry


def encode(entry: Entry, dtype: torch.dtype | None) -> Entry:
    """The entry as stored: floats cast to ``dtype``; with int8, ``taps``/``stream`` as int8 rows plus row scales."""
    if dtype is None:
        return entry
    stored = {}
    for name, t in entry.items():
        if dtype == torch.int8 and name in QUANTIZED:
            scale = t.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127
            stored[name] = (t.float() / scale).round_().to(torch.int8)
            stored[f"{name}.scale"] = scale
        elif dtype != torch.int8 and t.is_floating_point():
            stored[name] = t.to(dtype)
        else:
            stored[name] = t
    return stored


def decode(batch: Entry, dtype: torch.dtype) -> Entry:
    """Back to compute tensors: int8 rows times their scales, everything floating in ``dtype``."""
    out = {}
    for name, t in batch.items():
        if name.endswith(".scale"):
            continue
        scale = batch.get(f"{name}.scale")
        out[name] = (
            (t.to(dtype) * scale.to(dtype)) if scale is not None else t.to(dtype) if t.is_floating_point() else t
        )
    return out


def collate(entries: list[Entry], position_wise: bool, pin: bool) -> Entry:
    """A batch from entries: flat rows of all samples for a position-wise tail, else padded ``(B, T)``.

    With ``pin`` the result is in pinned host memory, ready for a ``non_blocking`` copy to the GPU.
    """
    batch = {}
    for name in entries[0]:
        parts = [e[name] for e in entries]
        if position_wise:
            dim = 1 if parts[0].dim() == 3 else 0  # taps are (n_taps, rows, ...): rows are dim 1
            shape = list(parts[0].shape)
            shape[dim] = sum(p.size(dim) for p in parts)
            out = torch.empty(shape, dtype=parts[0].dtype, device=parts[0].device, pin_memory=pin)
            batch[name] = torch.cat(parts, dim=dim, out=out)
        else:
            value = IGNORE_INDEX if name == "targets" else 0
            if parts[0].dim() == 3:  # taps: pad the rows of each (n_taps, rows, d)
                batch[name] = pad_sequence([p.transpose(0, 1) for p in parts], True, value).permute(2, 0, 1, 3)
            else:
                batch[name] = pad_sequence(parts, batch_first=True, padding_value=value)
        if pin and not batch[name].is_pinned():
            batch[name] = batch[name].pin_memory()
    return batch


def to_features(batch: Entry, device: torch.device, dtype: torch.dtype) -> tuple[Features, torch.Tensor]:
    """The tail's input on ``device``: a batch copied without blocking (pinned sources), then decoded there."""
    batch = decode({k: v.to(device, non_blocking=True) for k, v in batch.items()}, dtype)
    return Features(list(batch["taps"]), batch["stream"]), batch["targets"]


def entry_bytes(entry: Entry) -> int:
    """What an entry occupies, as the disk stores it (each tensor padded to ``ALIGN`` bytes)."""
    return sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in entry.values())


def sample_key(split: str, input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    """A sample's identity: its split and a hash of its tokens and labels, which are all its entry depends on
    besides the fingerprint. So the data module's settings need no fingerprint: a run whose selection of samples
    grew, shrank or was reshuffled reuses the entries of every sample it shares with the cache's earlier runs."""
    digest = hashlib.blake2b(digest_size=16)
    for t in (input_ids, labels):
        digest.update(t.detach().cpu().to(torch.int64).numpy().tobytes())
    return f"{split}-{digest.hexdigest()}"


def file_digest(path: Path, edge_bytes: int = 1 << 20) -> str:
    """Size, mtime and the first and last MiB of a file: cheap even for a 13 GB checkpoint."""
    stat = path.stat()
    digest = hashlib.blake2b(f"{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(edge_bytes))
        f.seek(max(0, stat.st_size - edge_bytes))
        digest.update(f.read(edge_bytes))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- stores


class MemoryStore:
    """Entries as tensors in GPU memory or host RAM.

    Host entries are not pinned one by one (each pinning is a slow, synchronising allocation); the reader collates
    a batch into one pinned buffer instead.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.entries: dict[str, Entry] = {}

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def put(self, key: str, entry: Entry) -> int:
        kept = {name: t.detach().to(self.device, copy=True) for name, t in entry.items()}
        self.entries[key] = kept
        return entry_bytes(kept)

    def close(self) -> None:
        pass


class Record(NamedTuple):
    """Where an entry's bytes are: shard number, offset, length, CRC-32, and each tensor's name, dtype and shape."""

    shard: int
    offset: int
    length: int
    crc: int
    tensors: list[tuple[str, str, list[int]]]


class DiskStore:
    """Entries appended to shard files, listed in per-shard ``.idx`` files, read as zero-copy memory-map views.

    Every process writes a shard of its own (created exclusively), so concurrent ranks never share a file; reads
    see the shards found when the store opened plus what this process wrote.
    """

    def __init__(self, directory: Path, fingerprint: dict) -> None:
        self.directory = directory
        self.records: dict[str, Record] = {}
        self.verified: set[str] = set()
        self.maps: dict[int, mmap] = {}
        self.lock = threading.Lock()
        self._open(fingerprint)
        self.shard = self._new_shard()
        self.shard_file = open(self._path(self.shard, "bin"), "ab")
        self.index_file = open(self._path(self.shard, "idx"), "a")
        self.written = 0

    @property
    def bytes(self) -> int:
        return sum(r.length for r in self.records.values())

    def get(self, key: str) -> Entry | None:
        record = self.records.get(key)
        if record is None:
            return None
        try:
            data = self._view(record)
            if key not in self.verified:
                if zlib.crc32(data) != record.crc:
                    raise ValueError("checksum mismatch")
                self.verified.add(key)
            return _unpack(data, record)
        except (ValueError, OSError) as err:  # any damage: the entry is rebuilt, never used
            warnings.warn(f"Skip-Cache entry {key} is damaged ({err}); recomputing it.")
            self.records.pop(key, None)
            return None

    def put(self, key: str, entry: Entry) -> int:
        """Append the entry's bytes, then its index line: the line is what makes the entry exist."""
        crc, length, tensors = 0, 0, []
        for name, t in entry.items():
            raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data
            for chunk in (raw, b"\0" * (-len(raw) % ALIGN)):
                self.shard_file.write(chunk)
                crc, length = zlib.crc32(chunk, crc), length + len(chunk)
            tensors.append((name, str(t.dtype).removeprefix("torch."), list(t.shape)))
        self.shard_file.flush()
        record = Record(self.shard, self.written, length, crc, tensors)
        self.index_file.write(json.dumps({"key": key, **record._asdict()}) + "\n")
        self.index_file.flush()
        self.written += length
        self.verified.add(key)
        self.records[key] = record
        return length

    def close(self) -> None:
        self.shard_file.close()
        self.index_file.close()

    def _path(self, shard: int, suffix: str) -> Path:
        return self.directory / f"shard-{shard:05d}.{suffix}"

    def _view(self, record: Record) -> memoryview:
        with self.lock:
            mapped = self.maps.get(record.shard)
            if mapped is None or len(mapped) < record.offset + record.length:
                path = self._path(record.shard, "bin")
                if path.stat().st_size < record.offset + record.length:
                    raise ValueError("truncated shard")
                with open(path, "rb") as f:
                    mapped = self.maps[record.shard] = mmap(f.fileno(), 0, access=ACCESS_COPY)
        return memoryview(mapped)[record.offset : record.offset + record.length]

    def _open(self, fingerprint: dict) -> None:
        """Reuse a directory whose fingerprint matches, otherwise wipe it; then read every shard's index."""
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise CacheError(f"The Skip-Cache directory {str(directory)!r} is not writable: {err}") from err
        stamp = directory / "fingerprint.json"
        wanted = json.dumps({"version": FORMAT_VERSION, **fingerprint}, sort_keys=True, default=str)
        found = stamp.read_text() if stamp.is_file() else None
        if found != wanted:
            stale = [*directory.glob("shard-*"), *directory.glob("*.s2l")]
            if found is not None or stale:
                warnings.warn(f"Skip-Cache in {str(directory)!r} was built for other inputs; rebuilding it.")
            for path in stale:
                path.unlink()
            tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
            tmp.write_text(wanted)
            os.replace(tmp, stamp)
        for index in sorted(directory.glob("shard-*.idx")):
            for line in index.read_text().splitlines(keepends=True):
                if not line.endswith("\n"):
                    break  # torn by a crash: the entry was never complete
                item = json.loads(line)
                key = item.pop("key")
                self.records[key] = Record(**item)

    def _new_shard(self) -> int:
        shard = max((int(p.stem.split("-")[1]) for p in self.directory.glob("shard-*.bin")), default=-1) + 1
        while True:
            try:
                os.close(os.open(self._path(shard, "bin"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return shard
            except FileExistsError:
                shard += 1


def _unpack(data: memoryview, record: Record) -> Entry:
    entry, offset = {}, 0
    for name, dtype, shape in record.tensors:
        dtype = getattr(torch, dtype)
        numel = int(torch.Size(shape).numel())
        size = numel * dtype.itemsize
        entry[name] = torch.frombuffer(data, dtype=torch.uint8, count=size, offset=offset).view(dtype).view(shape)
        offset += size + (-size % ALIGN)
    return entry


# ---------------------------------------------------------------------------------------------------- the cache


class SkipCache:
    """A key -> entry store with a size limit and a bounded background writer.

    When the limit or the disk would be exceeded, ``put`` declines with one warning and the caller recomputes
    those samples on every epoch: the run slows down but never fails. Entries waiting for the writer are served
    from memory, so a sample is never computed twice because its entry was still being written.
    """

    def __init__(self, store: MemoryStore | DiskStore, max_bytes: int | None = None, dtype: torch.dtype | None = None):
        self.store, self.max_bytes, self.dtype = store, max_bytes, dtype
        self.bytes = store.bytes if isinstance(store, DiskStore) else 0
        self.pending: dict[str, Entry] = {}
        self._full_warned = False
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, daemon=True, name="skip-cache-writer")
        self._writer.start()

    @property
    def placement(self) -> str:
        store = self.store
        return "disk" if isinstance(store, DiskStore) else "device" if store.device.type != "cpu" else "memory"

    def get(self, key: str) -> Entry | None:
        entry = self.pending.get(key)
        return self.store.get(key) if entry is None else entry

    def put(self, key: str, entry: Entry) -> bool:
        """Queue an ``encode``-d entry for storage; False when it does not fit (it will be recomputed next time)."""
        if self._error is not None:
            raise RuntimeError("The Skip-Cache writer failed") from self._error
        size = entry_bytes(entry)
        if not self._fits(size):
            return False
        self.bytes += size
        self.pending[key] = entry
        self._queue.put((key, entry))
        return True

    def flush(self) -> None:
        """Wait until every queued entry is stored."""
        self._queue.join()
        if self._error is not None:
            raise RuntimeError("The Skip-Cache writer failed") from self._error

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join()
        self.store.close()

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            key, entry = item
            try:
                if self._error is None:
                    self.store.put(key, entry)
            except BaseException as err:  # reported to the training loop at its next put or flush
                self._error = err
            finally:
                self.pending.pop(key, None)
                self._queue.task_done()
        self._queue.task_done()

    def _fits(self, size: int) -> bool:
        over_limit = self.max_bytes is not None and self.bytes + size > self.max_bytes
        directory = getattr(self.store, "directory", None)
        over_disk = directory is not None and shutil.disk_usage(directory).free < 2 * size
        if over_limit or over_disk:
            if not self._full_warned:
                where = f"the limit of {self.max_bytes:,} bytes" if over_limit else f"the free space in {directory}"
                warnings.warn(f"Skip-Cache is full ({where}); samples not cached yet will be recomputed each time.")
                self._full_warned = True
            return False
        return True


def choose_placement(wanted: str, estimate: int, device: torch.device, max_bytes: int | None) -> tuple[str, str]:
    """The placement and the reason, in words: the fastest store the whole cache fits in, at most half of its room."""
    if wanted != "auto":
        return wanted, "chosen by --cache.placement"
    need = estimate if max_bytes is None else min(estimate, max_bytes)
    gb = f"{need / 1e9:.2f} GB"
    if device.type == "cuda":  # host RAM is no faster than the disk there, and fills more slowly (EVALUATION_GUIDE §4)
        free = torch.cuda.mem_get_info(device)[0]
        if need <= free / 2:
            return "device", f"{gb} fits half of the {free / 1e9:.1f} GB free on the GPU"
        return "disk", f"{gb} is more than half of the {free / 1e9:.1f} GB free on the GPU"
    available = _host_available()
    if need <= available / 2:
        return "memory", f"{gb} fits half of the {available / 1e9:.1f} GB of host RAM available"
    return "disk", f"{gb} is more than half of the {available / 1e9:.1f} GB of host RAM available"


def _host_available() -> int:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def open_store(placement: str, device: torch.device, directory: Path, fingerprint: dict) -> MemoryStore | DiskStore:
    if placement == "disk":
        return DiskStore(directory, fingerprint)
    return MemoryStore(device if placement == "device" else torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------- loading


class Batch(NamedTuple):
    """One batch's tail input and what it cost to get it."""

    features: Features
    targets: torch.Tensor
    tokens: int
    wait: float
    """Seconds the training loop waited for features read by the prefetcher (0 when computed)."""


class FeatureLoader:
    """Each batch's features: from the cache when every sample is there, else from one backbone pass.

    The entries of the next ``prefetch`` batches are read (and collated, into pinned memory on a GPU) by
    background threads while the current batch trains.
    """

    def __init__(
        self,
        compute: Callable[[torch.Tensor], Features],
        cache: SkipCache | None,
        device: torch.device,
        dtype: torch.dtype,
        position_wise: bool,
        prefetch: int = 4,
    ) -> None:
        self.compute, self.cache, self.device, self.dtype = compute, cache, device, dtype
        self.position_wise, self.prefetch = position_wise, max(0, prefetch)
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

    def close(self) -> None:
        self.pool.shutdown()
        if self.cache is not None:
            self.cache.close()

    def _read(self, batch: dict, split: str) -> tuple[list[str], list[Entry | None], Entry | None]:
        """The samples' keys (hashing them is off the training loop too) and the entries found in the cache;
        collated as well when every sample was found."""
        if self.cache is None:
            return [], [None] * len(batch["length"]), None
        keys = batch_keys(batch, split)
        entries = [self.cache.get(key) for key in keys]
        if any(e is None for e in entries):
            return keys, entries, None
        # entries still queued for the writer are where they were computed: bring them where the others are
        entries = [{k: v.to(self.read_device) for k, v in e.items()} for e in entries]
        return keys, entries, collate(entries, self.position_wise, self.pin)

    def _resolve(self, batch: dict, future: Future) -> Batch:
        t0 = time.perf_counter()
        keys, entries, collated = future.result()
        wait = time.perf_counter() - t0
        self.cache_hits += sum(e is not None for e in entries)
        tokens = int(batch["length"].sum())
        if collated is not None:
            self.time["read_wait"] += wait
            self.time["read_batches"] += 1
            return Batch(*to_features(collated, self.device, self.dtype), tokens, wait)
        missing = [j for j, e in enumerate(entries) if e is None]
        input_ids, labels, lengths = batch["input_ids"], batch["labels"], batch["length"].tolist()
        t0 = self._now()
        features = self.compute(input_ids[missing, : max(lengths[j] for j in missing)])
        self.time["backbone"] += self._now() - t0
        self.time["backbone_batches"] += 1
        self.backbone_samples += len(missing)
        for row, j in enumerate(missing):
            entries[j] = make_entry(features, row, labels[j], lengths[j], self.position_wise)
            if self.cache is not None:  # later epochs read what is stored: the first trains on the same values
                entries[j] = encode(entries[j], self.cache.dtype)
                self.cache.put(keys[j], entries[j])
        entries = [{k: v.to(self.device) for k, v in e.items()} for e in entries]
        return Batch(*to_features(collate(entries, self.position_wise, False), self.device, self.dtype), tokens, 0.0)

    def describe(self) -> str:
        """Where features come from, for the progress bar."""
        return "cache off" if self.cache is None else f"cache: {self.cache.placement}"

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
        """The time once queued GPU work is done, so that the backbone's time is its real cost."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def batch_keys(batch: dict, split: str) -> list[str]:
    input_ids, labels, lengths = batch["input_ids"], batch["labels"], batch["length"].tolist()
    return [sample_key(split, input_ids[j, :n], labels[j, :n]) for j, n in enumerate(lengths)]
