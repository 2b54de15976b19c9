"""Crash safety with the background cache writer: SIGKILL at random moments, resume, compare with a clean run.

One uninterrupted ``finetune_skip2lora`` run (disk Skip-Cache, 3 epochs, a checkpoint every few steps) is the
reference. Then, ``--kills`` times, a fresh run is killed with SIGKILL at a random iteration (half of them while the
first epoch builds the cache, half in the cached epochs; the moment within the step is random too) and resumed
with ``--resume true`` until it finishes. Each outcome: where it was killed, whether the cache reported a damaged
entry (detected and recomputed, never used), the largest difference of its final adapters from the reference's,
and its final validation loss against the reference's::

    python -m benchmarks.crash_resume --kills 10

writes ``benchmark_results/crash_resume-<UTC>.json``. The suite runs it with one kill on fewer samples.
"""

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.random_checkpoint import model_config, write_checkpoint, write_sentences

# tqdm's bar, "Epoch 1/3 [cache: disk]:  40%|####      | 4/10"
PROGRESS = re.compile(r"Epoch (\d+)/\d+(?: \[[^\]]*\])?:\s+\d+%\|[^|]*\| (\d+)/(\d+)")
VAL_LOSS = re.compile(r"Validation loss after training: ([0-9.]+)")


def command(checkpoint: Path, data: Path, out_dir: Path, resume: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "litgpt_skip2lora",
        "finetune_skip2lora",
        str(checkpoint),
        "--precision",
        "32-true",
        "--skip2lora_block_indices",
        "[0,2,4]",
        "--data",
        "JSON",
        "--data.json_path",
        str(data),
        "--data.val_split_fraction",
        "0.1",
        "--train.epochs",
        "3",
        "--train.micro_batch_size",
        "4",
        "--train.global_batch_size",
        "4",
        "--train.max_seq_length",
        "128",
        "--train.lr_warmup_steps",
        "1",
        "--train.save_interval",
        "4",
        "--eval.interval",
        "100000",
        "--eval.max_new_tokens",
        "2",
        "--cache.placement",
        "disk",
        "--out_dir",
        str(out_dir),
        "--resume",
        str(resume).lower(),
    ]


def run_until(args: list[str], target: tuple[int, int] | None, rng: random.Random) -> tuple[int, str, str]:
    """Run to the end, or SIGKILL it once its progress bar reaches ``target`` (epoch, iteration)."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    stderr, stdout = [], []
    reader = threading.Thread(target=lambda: stdout.append(process.stdout.read()))
    reader.start()
    buffer = ""
    while chunk := process.stderr.read(1):
        buffer += chunk
        stderr.append(chunk)
        if chunk in "\r\n":
            match = PROGRESS.search(buffer)
            buffer = ""
            if target and match and (int(match[1]), int(match[2])) >= target:
                time.sleep(rng.uniform(0, 0.2))  # somewhere within the next step
                process.send_signal(signal.SIGKILL)
                break
    process.wait()
    reader.join()
    return process.returncode, "".join(stdout), "".join(stderr)


def adapters(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "final" / "lit_model.pth.lora", weights_only=True)["model"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=160, help="training and validation samples")
    parser.add_argument("--work", type=Path, default=Path("out/crash_resume"))
    parser.add_argument("--out", type=Path, help="default: benchmark_results/crash_resume-<UTC>.json")
    args = parser.parse_args(argv)
    out = args.out or Path("benchmark_results") / f"crash_resume-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    rng = random.Random(args.seed)
    checkpoint, data = args.work / "checkpoint", args.work / "data.json"
    words = [f"w{i}" for i in range(509)]
    write_checkpoint(checkpoint, model_config("pythia-14m", 512), words)
    write_sentences(data, args.samples, 100, words)

    code, stdout, stderr = run_until(command(checkpoint, data, args.work / "reference", False), None, rng)
    assert code == 0, stderr[-3000:]
    reference, reference_loss = adapters(args.work / "reference"), float(VAL_LOSS.search(stdout)[1])
    iterations = int(PROGRESS.findall(stderr)[-1][2])
    outcomes = []
    for k in range(args.kills):
        epoch = 1 if k % 2 == 0 else rng.choice([2, 3])
        target = (epoch, rng.randint(1, iterations))
        out_dir = args.work / f"kill-{k}"
        killed_code, _, _ = run_until(command(checkpoint, data, out_dir, False), target, rng)
        restarts, damaged = 0, 0
        while not (out_dir / "final").exists():
            resumable = any(out_dir.glob("step-*/state.pth"))
            code, stdout, stderr = run_until(command(checkpoint, data, out_dir, resumable), None, rng)
            restarts, damaged = restarts + 1, damaged + stderr.count("is damaged")
            assert code == 0, stderr[-3000:]
        difference = max((adapters(out_dir)[key] - value).abs().max().item() for key, value in reference.items())
        loss = float(VAL_LOSS.search(stdout)[1])
        outcomes.append(
            {
                "killed_at": f"epoch {target[0]}, iteration {target[1]}/{iterations}",
                "killed_exit_code": killed_code,
                "resumed_from_checkpoint": resumable,
                "damaged_entries_detected": damaged,
                "max_adapter_difference": difference,
                "final_val_loss": loss,
                "reference_val_loss": reference_loss,
            }
        )
        print(json.dumps(outcomes[-1]), flush=True)
    same = sum(o["max_adapter_difference"] == 0 and o["final_val_loss"] == reference_loss for o in outcomes)
    summary = {"kills": len(outcomes), "exact": same, "samples": args.samples, "seed": args.seed}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "outcomes": outcomes}, indent=2))
    print(f"{same}/{len(outcomes)} resumed runs ended with the reference's exact adapters and validation loss")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
