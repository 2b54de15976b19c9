"""The Skip-Cache: per-sample backbone activations, kept because the frozen backbone never changes them.

:class:`MemoryStore` keeps entries on the GPU or in host RAM, :class:`DiskStore` in shard files read through memory
maps, whose ``.idx`` line is written after the entry's bytes, so a crash leaves an entry whole or absent; its CRC-32
is checked at its first read in a run, and a damaged entry is recomputed. :class:`SkipCache` adds the size limit and
a background writer, so that writes never stall a step.
"""

import hashlib
import json
import os
import queue
import shutil
import threading
import warnings
import zlib
from dataclasses import dataclass
from mmap import ACCESS_COPY, mmap
from pathlib import Path
from typing import Literal, NamedTuple

import psutil
import torch

from litgpt_skip2lora.rows import Entry

FORMAT_VERSION = 2
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
ALIGN = 64


@dataclass
class CacheArgs:
    """Skip-Cache options."""

    enabled: bool = True
    """Keep each sample's backbone activations and skip the backbone whenever the sample comes again."""
    placement: Literal["auto", "device", "memory", "disk"] = "auto"
    """``device``: the training device's memory (on a CPU run that is host RAM); ``memory``: host RAM; ``disk``:
    ``directory``. ``auto``: the device's memory when the cache fits half of it, else disk."""
    directory: Path | None = None
    """The disk placement's folder, reused by a later run of the same fingerprint; default ``<out_dir>/skip_cache``."""
    max_size_gb: float | None = None
    """Size limit; samples that do not fit are recomputed each time."""
    dtype: Literal["float32", "bfloat16", "float16", "int8"] | None = None
    """Storage dtype; default: the dtype the backbone computes in, which keeps cached training exact. ``int8``
    stores each row with its own scale (a quarter of float32's bytes)."""
    prefetch: int = 4
    """Batches read ahead of the training step, by background threads."""


class CacheError(ValueError):
    """A cache option that cannot work, reported before training starts."""


def encode(entry: Entry, dtype: torch.dtype | None) -> Entry:
    """The entry as stored: floats cast to ``dtype``; with int8, each float row scaled to int8 plus its scale."""
    stored = {}
    for name, t in entry.items():
        if dtype is None or not t.is_floating_point():
            stored[name] = t
        elif dtype != torch.int8:
            stored[name] = t.to(dtype)
        else:
            scale = stored[f"{name}.scale"] = t.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127
            stored[name] = (t.float() / scale).round_().to(torch.int8)
    return stored


def decode(batch: Entry, dtype: torch.dtype) -> Entry:
    """Back to compute tensors: int8 rows times their scales, everything floating in ``dtype``."""
    out = {}
    for name, t in batch.items():
        scale = batch.get(f"{name}.scale")
        if scale is not None:
            out[name] = t.to(dtype) * scale.to(dtype)
        elif not name.endswith(".scale"):
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def entry_bytes(entry: Entry) -> int:
    """What an entry occupies, as the disk stores it (each tensor padded to ``ALIGN`` bytes)."""
    return sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in entry.values())


def file_digest(path: Path, edge_bytes: int = 1 << 20) -> str:
    """Size, mtime and the first and last MiB of a file: cheap even for a 13 GB checkpoint."""
    stat = path.stat()
    digest = hashlib.blake2b(f"{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(edge_bytes))
        f.seek(max(0, stat.st_size - edge_bytes))
        digest.update(f.read(edge_bytes))
    return digest.hexdigest()


def check_writable(directory: Path) -> None:
    """Fail before any output is written when the cache directory cannot be created or written."""
    existing = next(p for p in [directory, *directory.parents] if p.exists())
    if not os.access(existing, os.W_OK) or (existing != directory and not existing.is_dir()):
        raise CacheError(f"The Skip-Cache directory {str(directory)!r} cannot be created or written.")


class MemoryStore:
    """Entries as tensors in GPU memory or host RAM (unpinned: the reader collates a batch into pinned memory)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.entries, self.bytes = device, {}, 0

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def put(self, key: str, entry: Entry) -> None:
        self.entries[key] = {name: t.detach().to(self.device, copy=True) for name, t in entry.items()}

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
    """Entries appended to shard files, one per process (created exclusively), listed in ``.idx`` files and read as
    zero-copy memory-map views."""

    def __init__(self, directory: Path, fingerprint: dict) -> None:
        self.directory, self.records, self.verified, self.maps = directory, {}, set(), {}
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
            if key not in self.verified and zlib.crc32(data) != record.crc:
                raise ValueError("checksum mismatch")
            self.verified.add(key)
        except (ValueError, OSError) as err:  # any damage: the entry is rebuilt, never used
            warnings.warn(f"Skip-Cache entry {key} is damaged ({err}); recomputing it.")
            self.records.pop(key, None)
            return None
        entry, offset = {}, 0
        for name, dtype_name, shape in record.tensors:
            dtype = getattr(torch, dtype_name)
            size = torch.Size(shape).numel() * dtype.itemsize
            entry[name] = torch.frombuffer(data, dtype=torch.uint8, count=size, offset=offset).view(dtype).view(shape)
            offset += size + (-size % ALIGN)
        return entry

    def put(self, key: str, entry: Entry) -> None:
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
        check_writable(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = self.directory / "fingerprint.json"
        wanted = json.dumps({"version": FORMAT_VERSION, **fingerprint}, sort_keys=True, default=str)
        found = stamp.read_text() if stamp.is_file() else None
        if found != wanted:
            stale = list(self.directory.glob("shard-*"))
            if found is not None or stale:
                warnings.warn(f"Skip-Cache in {str(self.directory)!r} was built for other inputs; rebuilding it.")
            for path in stale:
                path.unlink()
            tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
            tmp.write_text(wanted)
            os.replace(tmp, stamp)
        for index in sorted(self.directory.glob("shard-*.idx")):
            for line in index.read_text().splitlines(keepends=True):
                if not line.endswith("\n"):
                    break  # torn by a crash: the entry was never complete
                fields = json.loads(line)
                key = fields.pop("key")
                self.records[key] = Record(**fields)

    def _new_shard(self) -> int:
        shard = max((int(p.stem.split("-")[1]) for p in self.directory.glob("shard-*.bin")), default=-1) + 1
        while True:
            try:
                os.close(os.open(self._path(shard, "bin"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return shard
            except FileExistsError:
                shard += 1


class SkipCache:
    """A store with a size limit and a background writer. Past the limit or the disk's room ``put`` declines, with
    one warning: those samples are recomputed each epoch. Entries waiting for the writer are served from memory."""

    def __init__(self, store: MemoryStore | DiskStore, max_bytes: int | None = None, dtype: torch.dtype | None = None):
        self.store, self.max_bytes, self.dtype, self.bytes = store, max_bytes, dtype, store.bytes
        self.pending: dict[str, Entry] = {}
        self._full_warned, self._error = False, None  # the error: the writer's, raised at the next put or flush
        self._queue: queue.Queue = queue.Queue(maxsize=64)
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
        self._raise_writer_error()
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
        self._raise_writer_error()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join()
        self.store.close()

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise RuntimeError("The Skip-Cache writer failed") from self._error

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
        if over_limit or (directory is not None and shutil.disk_usage(directory).free < 2 * size):
            if not self._full_warned:
                where = f"the limit of {self.max_bytes:,} bytes" if over_limit else f"the free space in {directory}"
                warnings.warn(f"Skip-Cache is full ({where}); samples not cached yet will be recomputed each time.")
                self._full_warned = True
            return False
        return True


def choose_placement(
    wanted: str, estimate: int, device: torch.device, max_bytes: int | None, ranks_here: int = 1
) -> tuple[str, str]:
    """The placement and why: the fastest store half of which holds a rank's cache. On a GPU its memory, else the
    disk (host RAM filled more slowly, ``docs/gpu-h200/cache_placement_run2.json``); on the CPU host RAM, shared
    by the ``ranks_here`` ranks, else the disk."""
    if wanted != "auto":
        return wanted, "chosen by --cache.placement"
    need = estimate if max_bytes is None else min(estimate, max_bytes)
    if device.type == "cuda":
        fast, room, where = "device", torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        fast, room, where = "memory", psutil.virtual_memory().available, "of host RAM available"
        need *= ranks_here
    fits = need <= room / 2
    verdict = "fits" if fits else "is more than"
    return fast if fits else "disk", f"{need / 1e9:.2f} GB {verdict} half of the {room / 1e9:.1f} GB {where}"


def open_store(placement: str, device: torch.device, directory: Path, fingerprint: dict) -> MemoryStore | DiskStore:
    if placement == "disk":
        return DiskStore(directory, fingerprint)
    return MemoryStore(device if placement == "device" else torch.device("cpu"))
