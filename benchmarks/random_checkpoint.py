"""Random-weight LitGPT checkpoints with an offline word-level tokenizer, and JSON data in its words.

Timing needs the model's shape, not its knowledge: a checkpoint of any LitGPT config is made in seconds (on the GPU
when there is one) with nothing downloaded. The tests build their tiny models here too.
"""

import json
import random
from pathlib import Path

import litgpt
import torch
from litgpt.utils import save_config
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

SPECIAL = ["<unk>", "<s>", "</s>"]


def write_checkpoint(directory: Path, config: litgpt.Config, words: list[str], dtype=torch.float32, seed=0) -> Path:
    """A checkpoint folder LitGPT accepts: random weights of ``config`` in ``dtype`` and a tokenizer whose vocabulary
    is the special tokens then ``words`` (``config.vocab_size`` must count both)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL, *words])}
    if len(vocab) != config.vocab_size:
        raise ValueError(f"config.vocab_size is {config.vocab_size}, the tokenizer has {len(vocab)} tokens.")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"})
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        weights = litgpt.model.GPT(config).to(dtype).state_dict()
    torch.save({k: v.cpu() for k, v in weights.items()}, directory / "lit_model.pth")
    save_config(config, directory)
    return directory


def model_config(name: str, vocab: int, n_layer: int | None = None) -> litgpt.Config:
    """LitGPT's config ``name`` with a vocabulary of ``vocab`` tokens (and ``n_layer`` blocks when given)."""
    layers = {} if n_layer is None else {"n_layer": n_layer}
    return litgpt.Config.from_name(name, vocab_size=vocab, padded_vocab_size=vocab, **layers)


def write_sentences(path: Path, samples: int, words: int, vocabulary: list[str], seed: int = 0) -> Path:
    """Alpaca-format JSON: an instruction of ``words // 2`` random words and an output of as many."""
    rng = random.Random(seed)
    half = max(1, words // 2)
    records = [
        {
            "instruction": " ".join(rng.choices(vocabulary, k=half)),
            "input": "",
            "output": " ".join(rng.choices(vocabulary, k=half)),
        }
        for _ in range(samples)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path
