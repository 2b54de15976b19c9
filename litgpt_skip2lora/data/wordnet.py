"""Word-knowledge instructions built offline from WordNet 3.0: free text or a label.

Debian's `wordnet-base` package ships the WordNet database as plain text. Each `index.<pos>` line lists a
lemma's synsets most frequent sense first, with the byte offset of each synset's line in `data.<pos>`;
a data line holds the synset's lexicographer file (its supersense, e.g. `noun.animal`), its lemmas and its gloss:
a definition followed by quoted examples.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from litgpt_skip2lora.data.base import InstructData, shuffled

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
class WordNetInstruct(InstructData):
    """Alpaca-format instructions about English words; validation words never appear in training.

    ``task="words"``: define the word, give a synonym, use it in a sentence (free text). ``task="supersense"``:
    name the word's category, one of WordNet's 45 supersenses such as ``noun.animal`` (a label, scored by exact
    match).
    """

    task: Literal["words", "supersense"] = "words"
    """Free-text answers about words, or a label per word and part of speech."""
    download_dir: Path = Path("data/wordnet")
    """Where the built splits are cached."""
    wordnet_dir: Path = Path("/usr/share/wordnet")
    """The WordNet database (`index.noun`, `data.noun`, ...)."""

    @property
    def split_dir(self) -> Path:
        return self.download_dir / self.task / super().split_dir.name

    def groups(self) -> Iterator[list[dict[str, str]]]:
        senses = common_senses(self.wordnet_dir)
        samples = supersense_sample if self.task == "supersense" else word_samples
        for word in shuffled(senses, self.seed):
            yield [
                dict(sample, word=word)
                for pos, offset in senses[word]
                for sample in samples(word, pos, read_synset(self.wordnet_dir, pos, offset))
            ]


def common_senses(wordnet_dir: Path) -> dict[str, list[tuple[str, int]]]:
    """Each common single word -> (part of speech, offset of its most frequent synset) per part of speech.

    A word counts as common when at least one of its senses is tagged in WordNet's sense-tagged corpus.
    """
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
