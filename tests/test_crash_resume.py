"""The crash check on a tiny run: one SIGKILL, resumed to the end, must give the reference's exact adapters."""

import json
from pathlib import Path

from benchmarks import crash_resume


def test_a_killed_run_resumes_to_the_references_exact_adapters(tmp_path: Path) -> None:
    """The benchmark in this process; each of its training runs is a process of its own, killed or not."""
    out = tmp_path / "outcomes.json"
    crash_resume.main(["--kills", "1", "--samples", "24", "--work", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["summary"] == {"kills": 1, "exact": 1, "samples": 24, "seed": 0}
    (outcome,) = report["outcomes"]
    assert outcome["killed_exit_code"] == -9 and outcome["max_adapter_difference"] == 0
