"""The Skip-Cache's own behaviour: every placement round-trips, damage and crashes never reach training."""

import json
import os
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import psutil
import pytest
import torch

from litgpt_skip2lora.cache import (
    DiskStore,
    MemoryStore,
    SkipCache,
    choose_placement,
    decode,
    encode,
    entry_bytes,
    open_store,
)
from litgpt_skip2lora.rows import RowLayout

FINGERPRINT = {"model": "tiny"}
PLACEMENTS = ["memory", "disk"] + (["device"] if torch.cuda.is_available() else [])


def make(i: int, rows: int = 5) -> dict[str, torch.Tensor]:
    """A deterministic entry per number, shaped as the tail's: taps (n_taps, rows, d), base, targets."""
    g = torch.Generator().manual_seed(i)
    return {
        "taps": torch.randn(3, rows, 8, generator=g),
        "stream": torch.randn(rows, 8, generator=g).to(torch.bfloat16),
        "targets": torch.randint(0, 50, (rows,), generator=g),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].cpu(), b[name].cpu()), name


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_round_trip_in_every_placement(tmp_path: Path, placement: str) -> None:
    cache = SkipCache(open_store(placement, device(), tmp_path / "cache", FINGERPRINT))
    for i in range(4):
        assert cache.put(f"train-{i}", make(i))
    for i in range(4):  # served while queued and after being written
        assert_same(cache.get(f"train-{i}"), make(i))
    cache.close()
    if placement == "disk":  # and by a later run
        reopened = SkipCache(DiskStore(tmp_path / "cache", FINGERPRINT))
        assert_same(reopened.get("train-3"), make(3))
        assert reopened.bytes == cache.bytes == sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.bin"))


def test_damage_is_detected_on_first_read(tmp_path: Path) -> None:
    cache = SkipCache(DiskStore(tmp_path, FINGERPRINT))
    for i in range(3):
        cache.put(f"k{i}", make(i))
    cache.close()
    (index,) = tmp_path.glob("shard-*.idx")
    middle = json.loads(index.read_text().splitlines()[1])
    shard = index.with_suffix(".bin")
    data = bytearray(shard.read_bytes())
    data[middle["offset"] + 3] ^= 0x01
    shard.write_bytes(bytes(data))
    store = DiskStore(tmp_path, FINGERPRINT)
    assert_same(store.get("k0"), make(0))
    with pytest.warns(UserWarning, match="k1 is damaged"):
        assert store.get("k1") is None
    assert store.get("k1") is None  # dropped: recomputed and written anew by the caller
    assert_same(store.get("k2"), make(2))


def test_other_fingerprint_rebuilds(tmp_path: Path) -> None:
    cache = SkipCache(DiskStore(tmp_path, FINGERPRINT))
    cache.put("k", make(0))
    cache.close()
    with pytest.warns(UserWarning, match="built for other inputs"):
        store = DiskStore(tmp_path, {"model": "other"})
    assert store.get("k") is None and store.bytes == 0


def test_size_limit_declines_with_one_warning(tmp_path: Path) -> None:
    size = entry_bytes(make(0))
    cache = SkipCache(MemoryStore(torch.device("cpu")), max_bytes=2 * size)
    with pytest.warns(UserWarning, match="Skip-Cache is full") as warned:
        results = [cache.put(f"k{i}", make(i)) for i in range(4)]
    assert results == [True, True, False, False] and len(warned) == 1


def test_a_torn_write_leaves_the_whole_entries_and_nothing_else(tmp_path: Path) -> None:
    cache = SkipCache(DiskStore(tmp_path, FINGERPRINT))
    cache.put("whole", make(0))
    cache.close()
    (index,) = tmp_path.glob("shard-*.idx")
    with open(index.with_suffix(".bin"), "ab") as shard:
        shard.write(b"\x07" * 1000)  # an entry's bytes whose index line never came
    with open(index, "a") as f:
        f.write('{"key": "torn", "shard": 0, "off')  # a line cut by the crash
    store = DiskStore(tmp_path, FINGERPRINT)
    assert_same(store.get("whole"), make(0))
    assert store.get("torn") is None


WRITER = """
import torch
from litgpt_skip2lora.cache import DiskStore, SkipCache
cache = SkipCache(DiskStore(__import__("pathlib").Path({directory!r}), {{"model": "tiny"}}))
for i in range(100000):
    cache.put(f"k{{i}}", {{"taps": torch.full((3, 200, 8), float(i)), "targets": torch.full((200,), i)}})
    if i == 20:
        cache.flush()
        print("writing", flush=True)
"""


def test_killed_writer_leaves_only_whole_entries(tmp_path: Path) -> None:
    script = WRITER.format(directory=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    store = DiskStore(tmp_path, FINGERPRINT)
    assert len(store.records) > 20
    for key in store.records:  # every listed entry is whole and right
        entry, i = store.get(key), int(key[1:])
        assert entry["taps"].shape == (3, 200, 8) and entry["taps"].eq(i).all() and entry["targets"].eq(i).all()


def test_readers_and_the_writer_run_concurrently(tmp_path: Path) -> None:
    cache = SkipCache(DiskStore(tmp_path, FINGERPRINT))
    seen, errors, done = [], [], threading.Event()

    def read() -> None:
        try:
            for round in range(10**6):
                if done.is_set():
                    break
                i = round % 60
                entry = cache.get(f"k{i}")
                if entry is not None:
                    assert_same(entry, make(i))
                    seen.append(i)
        except Exception as err:  # reported below, from the test's thread
            errors.append(err)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for r in readers:
        r.start()
    for i in range(60):
        cache.put(f"k{i}", make(i))
    cache.flush()
    done.set()
    for r in readers:
        r.join()
    cache.close()
    assert not errors and seen
    assert all(cache.get(f"k{i}") is not None for i in range(60))


def test_int8_storage_is_a_quarter_with_small_error() -> None:
    entry = make(0, rows=64)
    stored = encode(entry, torch.int8)
    assert stored["taps"].dtype == torch.int8 and torch.equal(stored["targets"], entry["targets"])
    restored = decode(stored, torch.float32)
    assert set(restored) == set(entry)
    for name in ("taps", "stream"):
        error = (restored[name] - entry[name].float()).abs().amax(-1)
        assert (error <= entry[name].float().abs().amax(-1) / 127).all()
    taps_bytes = entry_bytes({n: t for n, t in stored.items() if n.startswith("taps")})  # rows and their scales
    assert taps_bytes <= 0.375 * entry_bytes({"taps": entry["taps"]})  # float32 rows of 8: 8 + 4 bytes, not 32


def test_collate_flat_and_padded() -> None:
    entries = [make(0, rows=3), make(1, rows=5)]
    flat = RowLayout(flat=True).collate(entries, pin=False)
    assert flat["taps"].shape == (3, 8, 8) and flat["targets"].shape == (8,)
    assert torch.equal(flat["taps"][:, 3:], entries[1]["taps"])
    padded = RowLayout(flat=False).collate(entries, pin=False)
    assert padded["taps"].shape == (3, 2, 5, 8) and padded["stream"].shape == (2, 5, 8)
    assert torch.equal(padded["taps"][:, 0, :3], entries[0]["taps"]) and (padded["taps"][:, 0, 3:] == 0).all()
    assert padded["targets"][0, 3:].eq(-100).all()


def test_placement_is_chosen_by_size_and_says_why() -> None:
    cpu = torch.device("cpu")
    assert choose_placement("disk", 10, cpu, None) == ("disk", "chosen by --cache.placement")
    placement, why = choose_placement("auto", 10**6, cpu, None)
    assert placement == "memory" and "host RAM" in why
    placement, why = choose_placement("auto", 10**15, cpu, None)
    assert placement == "disk" and "more than half" in why


def test_on_a_gpu_a_cache_too_large_for_it_goes_to_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: the free-memory query answers as a GPU with 8 GB free would."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * 10**9, 80 * 10**9))
    gpu = torch.device("cuda", 0)
    assert choose_placement("auto", 10**9, gpu, None)[0] == "device"
    placement, why = choose_placement("auto", 5 * 10**9, gpu, None)
    assert placement == "disk" and "free on the GPU" in why


def test_each_rank_counts_its_own_share_and_the_ranks_on_a_machine_share_its_ram(monkeypatch) -> None:
    """A rank caches its share of the samples; the ranks of one machine fill its RAM together: at one byte over
    half of the RAM available the cache goes to disk."""
    from litgpt_skip2lora.adapters import Reads
    from litgpt_skip2lora.backbone import estimate_bytes
    from litgpt_skip2lora.sampler import RankShareSampler

    dataset = [{"labels": torch.ones(10, dtype=torch.long)}] * 8  # 10 rows each in a tail's layout
    reads, layout, per_row = Reads((0, 2), 3), RowLayout(flat=False), (2 + 1) * 32 * 4 + 8
    shares = [sorted(set(RankShareSampler(8, 2, rank).share)) for rank in (0, 1)]
    assert [estimate_bytes(dataset, share, reads, 32, torch.float32, layout) for share in shares] == [40 * per_row] * 2
    assert estimate_bytes(dataset, list(range(8)), reads, 32, torch.float32, layout) == 80 * per_row
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2 * 1000))
    cpu = torch.device("cpu")
    assert choose_placement("auto", 500, cpu, None, ranks_here=2)[0] == "memory"  # 2 x 500 = half of 2,000
    assert choose_placement("auto", 501, cpu, None, ranks_here=2)[0] == "disk"
    assert choose_placement("auto", 1000, cpu, None)[0] == "memory"
    assert choose_placement("auto", 1001, cpu, None)[0] == "disk"
