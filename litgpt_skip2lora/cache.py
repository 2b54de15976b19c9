"""The Skip-Cache: per-sample backbone activations, kept because the frozen backbone never changes them.

Each sample's entry holds what the tail needs (see :class:`litgpt_skip2lora.model.Features`) for that sample's
own positions only. An entry is one file, ``<key>.s2l``: safetensors bytes followed by their CRC-32, written to a
temporary name and renamed, so a crash leaves either a whole entry or none, and a truncated or damaged file is
detected on read. ``fingerprint.json`` names everything the activations depend on; a cache whose fingerprint
differs is wiped and rebuilt, with a warning.
"""

import hashlib
import json
import os
import shutil
import warnings
import zlib
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

Entry = dict[str, torch.Tensor]
SUFFIX = ".s2l"
FORMAT_VERSION = 1


class CacheError(ValueError):
    """A cache option that cannot work, reported before training starts."""


class SkipCache:
    """A key -> tensors store on disk (``directory``) or in memory (``directory=None``), with a size limit.

    When the limit or the disk would be exceeded, ``put`` declines with one warning and the caller recomputes
    those samples on every epoch: the run slows down but never fails.
    """

    def __init__(self, directory: Path | None, fingerprint: dict, max_bytes: int | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.memory: dict[str, Entry] = {}
        self.hits = self.misses = 0
        self._full_warned = False
        self.bytes = self._open(fingerprint) if directory is not None else 0

    def get(self, key: str) -> Entry | None:
        entry = self.memory.get(key) if self.directory is None else self._read(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: str, entry: Entry) -> bool:
        """Store an entry; False when it does not fit (the sample will be recomputed next time).

        Its size counts what it occupies: the file's bytes on disk (as ``_open`` counts them), the tensors' in RAM.
        """
        data = None if self.directory is None else _encode(entry)
        size = sum(t.numel() * t.element_size() for t in entry.values()) if data is None else len(data)
        if not self._fits(size):
            return False
        if data is None:
            self.memory[key] = {name: t.detach().clone() for name, t in entry.items()}
        else:
            _atomic_write(self.directory / f"{key}{SUFFIX}", data)
        self.bytes += size
        return True

    def _fits(self, size: int) -> bool:
        over_limit = self.max_bytes is not None and self.bytes + size > self.max_bytes
        over_disk = self.directory is not None and shutil.disk_usage(self.directory).free < 2 * size
        if over_limit or over_disk:
            if not self._full_warned:
                where = f"the limit of {self.max_bytes:,} bytes" if over_limit else f"the free space in {self.directory}"
                warnings.warn(f"Skip-Cache is full ({where}); samples not cached yet will be recomputed each time.")
                self._full_warned = True
            return False
        return True

    def _open(self, fingerprint: dict) -> int:
        """Reuse a directory whose fingerprint matches, otherwise wipe it; return the bytes already stored."""
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
            stale = list(directory.glob(f"*{SUFFIX}"))
            if found is not None or stale:
                warnings.warn(f"Skip-Cache in {str(directory)!r} was built for other inputs; rebuilding it.")
            for path in stale:
                path.unlink()
            _atomic_write(stamp, wanted.encode())
        return sum(p.stat().st_size for p in directory.glob(f"*{SUFFIX}"))

    def _read(self, key: str) -> Entry | None:
        path = self.directory / f"{key}{SUFFIX}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        payload, crc = data[:-4], data[-4:]
        try:
            if len(data) < 4 or zlib.crc32(payload).to_bytes(4, "little") != crc:
                raise ValueError("checksum mismatch")
            return load_tensors(payload)
        except Exception as err:  # any damage: the entry is rebuilt, never used
            warnings.warn(f"Skip-Cache entry {path.name} is damaged ({err}); recomputing it.")
            self.bytes -= len(data)
            path.unlink(missing_ok=True)
            return None


def _encode(entry: Entry) -> bytes:
    """An entry's file: the safetensors encoding of its tensors, then their CRC-32."""
    payload = save_tensors({name: t.detach().contiguous().cpu() for name, t in entry.items()})
    return payload + zlib.crc32(payload).to_bytes(4, "little")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sample_key(split: str, index: int, input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    """A sample's identity: its split, dataset index and a hash of its tokens and labels (not its batch slot)."""
    digest = hashlib.blake2b(digest_size=8)
    for t in (input_ids, labels):
        digest.update(t.detach().cpu().to(torch.int64).numpy().tobytes())
    return f"{split}-{index}-{digest.hexdigest()}"


def file_digest(path: Path, edge_bytes: int = 1 << 20) -> str:
    """Size, mtime and the first and last MiB of a file: cheap even for a 13 GB checkpoint."""
    stat = path.stat()
    digest = hashlib.blake2b(f"{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(edge_bytes))
        f.seek(max(0, stat.st_size - edge_bytes))
        digest.update(f.read(edge_bytes))
    return digest.hexdigest()
