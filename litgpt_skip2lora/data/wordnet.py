"""Word-knowledge instructions built offline from WordNet 3.0 (Debian's `wordnet-base`): free text or a label.

Each `index.<pos>` line lists a lemma's synsets, most frequent first, with each synset's byte offset in
`data.<pos>`, whose line holds its lexicographer file (its supersense, e.g. `noun.animal`), its lemmas and its gloss.
"""

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

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
    """Fill the validation split, then the training split, from whole groups (all samples about one word), so that
    validation measures generalisation to unseen words. ``groups`` is consumed lazily."""
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


POS_FILES = {"noun": "noun", "verb": "verb", "adjective": "adj", "adverb": "adv"}
INSTALL_HINT = "Install it with `apt-get install -y wordnet-base` (Debian/Ubuntu)."
WORD = re.compile(r"[a-z]{3,}")
# WordNet's 45 lexicographer files, numbered as in the second field of a `data.<pos>` line (lexnames(5WN))
SUPERSENSES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()


class Synset(NamedTuple):
    supersense: str
    lemmas: list[str]
    definition: str
    examples: list[str]


@dataclass
class WordNetInstruct(DataModule):
    """Alpaca-format instructions about English words, split by word (validation words never appear in training),
    cached as `train.json`/`val.json` and served by LitGPT's `JSON`.

    ``task="words"``: define the word, give a synonym, use it in a sentence (free text). ``task="supersense"``:
    name the word's category, one of WordNet's 45 supersenses such as ``noun.animal`` (a label, scored by exact
    match).
    """

    task: Literal["words", "supersense"] = "words"
    """Free-text answers about words, or a label per word and part of speech."""
    num_train: int = 1200
    """Number of training samples."""
    num_val: int = 200
    """Number of validation samples (of words that never appear in training)."""
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
    splits_dir: Path = Path("data/wordnet")
    """Where the built splits are kept, a folder per task and parameters."""
    wordnet_dir: Path = Path("/usr/share/wordnet")
    """The WordNet database (`index.noun`, `data.noun`, ...)."""

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
        return self.splits_dir / self.task / f"train{self.num_train}-val{self.num_val}-seed{self.seed}"

    def groups(self) -> Iterator[list[dict[str, str]]]:
        """The samples about each word, words in seeded order."""
        senses = common_senses(self.wordnet_dir)
        samples = supersense_sample if self.task == "supersense" else word_samples
        for word in shuffled(senses, self.seed):
            yield [
                dict(sample, word=word)
                for pos, offset in senses[word]
                for sample in samples(word, pos, read_synset(self.wordnet_dir, pos, offset))
            ]

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


def common_senses(wordnet_dir: Path) -> dict[str, list[tuple[str, int]]]:
    """Each common word (one of its senses tagged in WordNet's corpus) -> (part of speech, offset of its most
    frequent synset) per part of speech."""
    senses: dict[str, list[tuple[str, int]]] = {}
    for pos, suffix in POS_FILES.items():
        for line in wordnet_lines(wordnet_dir / f"index.{suffix}"):
            fields = line.split()
            lemma, synset_count, pointer_count = fields[0], int(fields[2]), int(fields[3])
            tagged_sense_count = int(fields[5 + pointer_count])
            if tagged_sense_count and WORD.fullmatch(lemma):
                first_synset = int(fields[-synset_count])
                senses.setdefault(lemma, []).append((pos, first_synset))
    return senses


def wordnet_lines(path: Path) -> Iterator[str]:
    """The lines of a WordNet file, without its license header (lines starting with spaces)."""
    if not path.is_file():
        raise FileNotFoundError(f"WordNet file {path} not found. {INSTALL_HINT}")
    with open(path, encoding="utf-8") as file:
        yield from (line for line in file if not line.startswith(" "))


def read_synset(wordnet_dir: Path, pos: str, offset: int) -> Synset:
    """The synset whose line starts at byte `offset` of `data.<pos>`."""
    with open(wordnet_dir / f"data.{POS_FILES[pos]}", "rb") as file:
        file.seek(offset)
        line = file.readline().decode("utf-8")
    fields, gloss = line.split(" | ", 1)
    fields = fields.split()
    # lemmas come as (word, lex_id) pairs; adjectives may carry a syntactic marker like "(a)"
    lemmas = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * int(fields[3], 16) : 2]]
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return Synset(SUPERSENSES[int(fields[1])], lemmas, definition, examples)


def word_samples(word: str, pos: str, synset: Synset) -> list[dict[str, str]]:
    """Up to three instructions about one sense of `word`: define it, give a synonym, use it in a sentence."""
    samples = [{"instruction": f'Define the {pos} "{word}".', "input": "", "output": synset.definition}]
    synonyms = [lemma for lemma in synset.lemmas if lemma.lower() != word]
    if synonyms:
        samples.append({"instruction": f'Give a synonym of the {pos} "{word}".', "input": "", "output": synonyms[0]})
    uses = [e for e in synset.examples if re.search(rf"\b{word}(s|es|d|ed|ing|ly)?\b", e, re.IGNORECASE)]
    if uses:
        samples.append({"instruction": f'Use the {pos} "{word}" in a sentence.', "input": "", "output": uses[0]})
    return samples


def supersense_sample(word: str, pos: str, synset: Synset) -> list[dict[str, str]]:
    """The category of one sense of `word`: a label."""
    return [
        {"instruction": f'Which category does the {pos} "{word}" belong to?', "input": "", "output": synset.supersense}
    ]
