import json
from pathlib import Path

import pytest
from litgpt import Tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from litgpt_skip2lora.data import WordNetInstruct
from litgpt_skip2lora.data.wordnet import SUPERSENSES, common_senses, read_synset, split_groups

needs_wordnet = pytest.mark.skipif(
    not Path("/usr/share/wordnet/index.noun").is_file(), reason="needs WordNet: apt-get install -y wordnet-base"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A byte-level tokenizer without merges (one token per byte): offline and tiny."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<s>", "</s>", *alphabet])}
    hf_tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    checkpoint_dir = tmp_path_factory.mktemp("byte_tokenizer")
    hf_tokenizer.save(str(checkpoint_dir / "tokenizer.json"))
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>"}
    (checkpoint_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(checkpoint_dir)


def read_splits(split_dir: Path) -> tuple[list[dict], list[dict]]:
    return tuple(json.loads((split_dir / f"{name}.json").read_text()) for name in ("train", "val"))


def test_split_groups_keeps_groups_whole() -> None:
    groups = [[(g, i) for i in range(3)] for g in range(10)]
    train, val = split_groups(iter(groups), num_train=7, num_val=4)
    assert len(train) == 7 and len(val) == 4
    assert not {g for g, _ in train} & {g for g, _ in val}
    with pytest.raises(ValueError, match="asked for 100 / 4"):
        split_groups(iter(groups), num_train=100, num_val=4)


@needs_wordnet
def test_wordnet_is_deterministic(tmp_path: Path) -> None:
    first, second = (WordNetInstruct(num_train=60, num_val=20, splits_dir=tmp_path / d) for d in ("a", "b"))
    first.prepare_data()
    second.prepare_data()
    for name in ("train.json", "val.json"):
        assert (first.split_dir / name).read_bytes() == (second.split_dir / name).read_bytes()
    other_seed = WordNetInstruct(num_train=60, num_val=20, seed=1, splits_dir=tmp_path / "a")
    other_seed.prepare_data()
    assert read_splits(other_seed.split_dir) != read_splits(first.split_dir)


@needs_wordnet
def test_wordnet_holds_out_whole_words(tmp_path: Path) -> None:
    data = WordNetInstruct(splits_dir=tmp_path)
    data.prepare_data()
    train, val = read_splits(data.split_dir)
    assert (len(train), len(val)) == (1200, 200)
    assert not {s["word"] for s in train} & {s["word"] for s in val}
    assert all(s["output"] and f'"{s["word"]}"' in s["instruction"] for s in train + val)
    assert {s["instruction"].split()[0] for s in train} == {"Define", "Give", "Use"}


@needs_wordnet
def test_wordnet_batches(tmp_path: Path, tokenizer: Tokenizer) -> None:
    data = WordNetInstruct(num_train=8, num_val=4, num_workers=0, splits_dir=tmp_path)
    data.connect(tokenizer, batch_size=4, max_seq_length=200)
    data.prepare_data()
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 200
    assert (batch["labels"][:, :50] == -100).all()  # the Alpaca prompt is masked
    assert len(data.val_dataloader()) == 1


def test_wordnet_missing_source(tmp_path: Path) -> None:
    data = WordNetInstruct(splits_dir=tmp_path / "cache", wordnet_dir=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="apt-get install -y wordnet-base"):
        data.prepare_data()


@needs_wordnet
def test_wordnet_supersense_labels_held_out_words(tmp_path: Path) -> None:
    data = WordNetInstruct(task="supersense", num_train=300, num_val=60, splits_dir=tmp_path)
    data.prepare_data()
    train, val = read_splits(data.split_dir)
    assert not {s["word"] for s in train} & {s["word"] for s in val}
    assert all(s["output"] in SUPERSENSES and s["instruction"].startswith("Which category") for s in train + val)
    assert len({s["output"] for s in train}) > 20  # many of the 45 labels, not one
    assert data.split_dir != WordNetInstruct(num_train=300, num_val=60, splits_dir=tmp_path).split_dir
    (pos, offset), *_ = common_senses(data.wordnet_dir)["dog"]
    assert read_synset(data.wordnet_dir, pos, offset).supersense == "noun.animal"  # its most frequent sense
