"""Every figure in the documents comes from a committed results file named in the same section.

A figure is a number with a decimal point (``0.17x``, ``3.8384``, ``5.45 GiB``) or a count ``N/M`` in prose or a
table; settings and commands are written in code spans, which are not figures. Each section (from one heading to
the next) names the JSON or CSV files its figures come from, and every figure must equal, at its rounding, a value
one of those files holds.
"""

import csv
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
DOCUMENTS = ["README.md", "SKIP2LORA_README.md", "EVALUATION_GUIDE.md"]
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


def values(path: Path) -> set[float]:
    """Every number a JSON or CSV file holds, at any depth."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            cells = [cell for row in csv.reader(f) for cell in row]
        return {float(c) for c in cells if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", c)}
    found, stack = set(), [json.loads(path.read_text())]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            found.add(float(item))
    return found


def held(figure: str, numbers: set[float]) -> bool:
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    target = float(figure.replace(",", ""))
    return any(round(v, decimals) == target or round(-v, decimals) == target for v in numbers)


def figures_and_files(document: str) -> list[tuple[str, list[str], list[str]]]:
    """Per section: its heading, its figures and the results files it names."""
    text = (REPO / document).read_text(encoding="utf-8")
    found = []
    for heading, body in sections(text):
        files = RESULTS_FILE.findall(body)
        prose = CODE.sub(" ", body)
        figures = DECIMAL.findall(prose) + [n for pair in COUNT.findall(prose) for n in pair]
        found.append((heading, figures, files))
    return found


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_figure_is_in_a_results_file_named_beside_it(document: str) -> None:
    missing = []
    for heading, figures, files in figures_and_files(document):
        paths = [p for pattern in files for p in sorted(REPO.glob(pattern))]
        assert len(paths) >= len(set(files)), f"{document} {heading!r} names a file that is not committed: {files}"
        numbers = set().union(*(values(p) for p in paths)) if paths else set()
        missing += [f"{heading!r}: {figure}" for figure in figures if not held(figure, numbers)]
    assert not missing, f"{document}: figures no named results file holds:\n" + "\n".join(missing)


def test_the_check_catches_a_figure_without_a_source(tmp_path: Path) -> None:
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"ratio": 0.1734, "count": 400, "right": [235]}))
    assert held("0.17", values(results)) and held("235", values(results)) and held("0.173", values(results))
    assert not held("0.18", values(results)) and not held("236", values(results))
    prose = CODE.sub(" ", "took 0.17x (`--lr 0.5`), 235/400 right, torch `2.13.0`, LitGPT 0.5.13 and 3 epochs")
    assert DECIMAL.findall(prose) == ["0.17"] and COUNT.findall(prose) == [("235", "400")]
