"""Shared pieces of the offline data modules: grouped train/val splits and a cached-JSON instruction module."""

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from litgpt.data import JSON, DataModule, SFTDataset
from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader

T = TypeVar("T")


def shuffled(items: Iterable[T], seed: int) -> list[T]:
    """The items in a random order that depends only on `seed` (and the items' sorted order)."""
    items = sorted(items)
    random.Random(seed).shuffle(items)
    return items


def split_groups(groups: Iterable[list[T]], num_train: int, num_val: int) -> tuple[list[T], list[T]]:
    """Fill the validation split, then the training split, from whole groups.

    A group (all samples about one word, one passage, one play) never lands in both splits, so the
    validation loss measures generalisation to unseen groups. `groups` is consumed lazily: only as many
    groups as needed are built.
    """
    train, val = [], []
    for group in groups:
        (val if len(val) < num_val else train).extend(group)
        if len(train) >= num_train:
            return train[:num_train], val[:num_val]
    raise ValueError(
        f"Only {len(train)} training / {len(val)} validation samples available, asked for {num_train} / {num_val}."
    )


def write_json(path: Path, samples: list[dict[str, str]]) -> None:
    path.write_text(json.dumps(samples, indent=1, ensure_ascii=False), encoding="utf-8")


@dataclass
class InstructData(DataModule):
    """An instruction data set built offline, cached as `train.json`/`val.json` and served by LitGPT's `JSON`.

    Subclasses only say how to build the samples (`groups`); splitting, caching, tokenizing and batching
    are shared.
    """

    num_train: int = 1200
    """Number of training samples."""
    num_val: int = 200
    """Number of validation samples (from groups that never appear in training)."""
    seed: int = 42
    """Seed of the train/val split and of the training-loader shuffle."""
    mask_prompt: bool = True
    """Whether to mask the prompt section from the label (with ``ignore_index``)."""
    prompt_style: str | PromptStyle = "alpaca"
    """The style to apply to instruction prompts. See `litgpt.prompts` for a list of available styles."""
    ignore_index: int = -100
    """The index to use for elements to be ignored in the label."""
    num_workers: int = 4
    """How many DataLoader processes to use for loading."""
    download_dir: Path = Path("data")
    """Where the built splits (and any downloaded source) are cached."""

    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    max_seq_length: int | None = field(default=None, init=False, repr=False)
    json_data: JSON | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        if isinstance(self.prompt_style, str):  # LitGPT's finetune scripts call prompt_style.apply
            self.prompt_style = PromptStyle.from_name(self.prompt_style)

    @property
    def split_dir(self) -> Path:
        """The cache folder of this split: changing its parameters never reuses a stale one."""
        return self.download_dir / f"train{self.num_train}-val{self.num_val}-seed{self.seed}"

    def groups(self) -> Iterator[list[dict[str, str]]]:
        """Alpaca-format samples, grouped by what must not straddle train and val, in seeded order."""
        raise NotImplementedError

    def connect(
        self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length

    def prepare_data(self) -> None:
        if (self.split_dir / "val.json").is_file():
            return
        train, val = split_groups(self.groups(), self.num_train, self.num_val)
        self.split_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.split_dir / "train.json", train)
        write_json(self.split_dir / "val.json", val)  # written last: its presence means the cache is complete

    def setup(self, stage: str = "") -> None:
        self.prepare_data()
        self.json_data = JSON(
            self.split_dir,
            mask_prompt=self.mask_prompt,
            prompt_style=self.prompt_style,
            ignore_index=self.ignore_index,
            seed=self.seed,
            num_workers=self.num_workers,
        )
        self.json_data.connect(self.tokenizer, self.batch_size, self.max_seq_length)
        self.json_data.setup()

    @property
    def train_dataset(self) -> SFTDataset:
        return self.json_data.train_dataset

    @property
    def test_dataset(self) -> SFTDataset:
        """The validation split, under the name LitGPT's ``select_sft_generate_example`` reads."""
        return self.json_data.test_dataset

    def train_dataloader(self) -> DataLoader:
        return self.json_data.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.json_data.val_dataloader()
