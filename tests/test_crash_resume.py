"""The crash check on a tiny run: one SIGKILL, resumed to the end, must give the reference's exact adapters."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent


def test_a_killed_run_resumes_to_the_references_exact_adapters(tmp_path: Path) -> None:
    out = tmp_path / "outcomes.json"
    command = [sys.executable, "-m", "benchmarks.crash_resume", "--kills", "1", "--samples", "24"]
    command += ["--work", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["summary"] == {"kills": 1, "exact": 1, "samples": 24, "seed": 0}
    (outcome,) = report["outcomes"]
    assert outcome["killed_exit_code"] == -9 and outcome["max_adapter_difference"] == 0
