"""Every figure in the documents is the value of a committed results file named in the same section.

A figure is a number with a decimal point (``0.17x``, ``3.8384``, ``5.45 GiB``) or a count ``N/M`` in prose or a
table; settings and commands are written in code spans, which are not figures. Each section (from one heading to
the next) names the JSON or CSV files its figures come from, and ``figure_sources.yaml`` ties each figure to its
value: the file and the key (a JSON path, or a CSV row and column). The figure must read as that value at its
rounding, so a changed digit fails.
"""

import csv
import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parent.parent
DOCUMENTS = ["README.md", "SKIP2LORA_README.md", "EVALUATION_GUIDE.md"]
SOURCES = REPO / "tests" / "figure_sources.yaml"
RESULTS_FILE = re.compile(r"(?:benchmark_results|docs)/[\w.*/-]+\.(?:json|csv)")
CODE = re.compile(r"```.*?```|`[^`\n]*`|\]\([^)]*\)", re.DOTALL)  # code blocks, code spans, link targets
DECIMAL = re.compile(r"(?<![\w.])\d[\d,]*\.\d+(?![\w.]*\d)")
COUNT = re.compile(r"(?<![\w./])(\d[\d,]*)/(\d[\d,]*)(?![\w./])")


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs, the text before the first heading under ``""``; a shell comment in a code block is no
    heading."""
    text = re.sub(r"```.*?```", lambda block: re.sub(r"^#", " #", block[0], flags=re.MULTILINE), text, flags=re.DOTALL)
    parts = re.split(r"^(#+ .*)$", text, flags=re.MULTILINE)
    return [("", parts[0]), *zip(parts[1::2], parts[2::2])]


def source_value(path: Path, keys: list) -> float:
    """The number at ``keys`` in a results file: a JSON path, or a CSV row number and column."""
    if path.suffix == ".csv":
        row, column = keys
        with open(path, newline="") as f:
            return float(list(csv.DictReader(f))[row][column])
    value = json.loads(path.read_text())
    for key in keys:
        value = value[key]
    return float(value)


def held(figure: str, value: float) -> bool:
    """Whether ``value`` reads as ``figure`` at the figure's rounding (a sign aside)."""
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    return float(figure.replace(",", "")) in (round(value, decimals), round(-value, decimals))


def figures_and_files(text: str) -> list[tuple[str, list[str], list[str]]]:
    """Per section: its heading, its figures and the results files it names."""
    found = []
    for heading, body in sections(text):
        files = RESULTS_FILE.findall(body)
        prose = CODE.sub(" ", body)
        figures = DECIMAL.findall(prose) + [n for pair in COUNT.findall(prose) for n in pair]
        found.append((heading, figures, files))
    return found


def problems(text: str, sources: dict[str, dict[str, list]], root: Path = REPO) -> list[str]:
    """What is wrong with a document's figures: each must have a source in ``sources`` (section, figure: the file
    and the key of its value), the section must name that file, and the value must read as the figure."""
    found = []
    for heading, figures, files in figures_and_files(text):
        named = sources.get(heading, {})
        for figure in dict.fromkeys(figures):
            if figure not in named:
                found.append(f"{heading!r}: {figure} has no source in {SOURCES.name}")
                continue
            file, *keys = named[figure]
            if not any(fnmatch.fnmatch(file, pattern) for pattern in files):
                found.append(f"{heading!r}: {figure}'s source {file} is not named in the section")
            elif not held(figure, value := source_value(root / file, keys)):
                found.append(f"{heading!r}: {figure}, but {file} {keys} holds {value}")
        found += [
            f"{heading!r}: {SOURCES.name} names {f}, which the section no longer has" for f in set(named) - set(figures)
        ]
    return found


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_figure_is_the_value_its_source_names(document: str) -> None:
    sources = yaml.safe_load(SOURCES.read_text(encoding="utf-8"))
    text = (REPO / document).read_text(encoding="utf-8")
    assert set(sources[document]) <= {heading for heading, _ in sections(text)}, "a section was renamed"
    found = problems(text, sources[document])
    assert not found, f"{document}:\n" + "\n".join(found)


def test_a_changed_digit_fails(tmp_path: Path) -> None:
    """A figure is checked against the one value its source names, not against any number the file holds."""
    results = tmp_path / "benchmark_results" / "r.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"ratio": 0.1734, "other": 0.18, "counts": {"right": 235, "all": 400}}))
    text = "# Results\nIt took 0.17x of LoRA's time, with 235/400 right (`--lr 0.5`; benchmark_results/r.json).\n"
    file = "benchmark_results/r.json"
    sources = {"# Results": {"0.17": [file, "ratio"], "235": [file, "counts", "right"], "400": [file, "counts", "all"]}}
    assert problems(text, sources, tmp_path) == []
    changed = text.replace("0.17x", "0.18x")  # the file holds 0.18, under another key
    assert problems(changed, sources, tmp_path) == [
        "'# Results': 0.18 has no source in figure_sources.yaml",
        "'# Results': figure_sources.yaml names 0.17, which the section no longer has",
    ]
    sources["# Results"]["0.17"] = [file, "other"]
    assert problems(text, sources, tmp_path) == ["'# Results': 0.17, but benchmark_results/r.json ['other'] holds 0.18"]
