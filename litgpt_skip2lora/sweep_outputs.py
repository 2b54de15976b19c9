"""What a run hands over: the configuration ``final/`` holds, and a sweep's ``sweep.csv``, ``sweep.png`` and
``sweep/<name>/`` for every configuration that trained to the end. Those hold trained parameters and
hyper-parameters only (sixteen copies of a 7B model would be 200 GB): ``export_configuration`` makes a full
checkpoint of one from ``final/``'s frozen weights.
"""

import csv
import math
import shutil
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer

from litgpt_skip2lora.checkpoints import atomic_directory
from litgpt_skip2lora.evaluate import closed_set, label_accuracy, splits
from litgpt_skip2lora.model import save_model_config
from litgpt_skip2lora.sweep import ADAPTER_OPTIONS, ROUTE_OPTIONS, Configuration, Sweep

TRAINED = "lit_model.pth.lora"
"""A configuration's trained parameters, as ``{"model": {name: tensor}}``, the form of LitGPT's LoRA files."""


def select(fabric: L.Fabric, sweep: Sweep, data: DataModule, tokenizer: Tokenizer) -> Configuration:
    """The configuration ``final/`` holds: the only one, or the sweep's best by its ``select`` rule."""
    if sweep.is_sweep and sweep.args.select == "label_accuracy":
        train_items, items = splits(data, tokenizer)
        labels = closed_set(train_items)
        if not labels:
            warnings.warn("--sweep.select label_accuracy: the answers form no closed set of labels; chose by val_loss.")
            sweep.args.select = "val_loss"
        for c in sweep.alive if labels else ():
            c.install(sweep.model)
            c.accuracy = label_accuracy(sweep.model, tokenizer, data, items, labels)
            fabric.print(f"{c.name}: label accuracy {c.accuracy:.4f} on {len(items)} validation items")
    return sweep.chosen()


def save_sweep(fabric: L.Fabric, sweep: Sweep, chosen: Configuration, precision: str, final: Path) -> None:
    """``sweep.csv``, ``sweep.png`` and ``sweep/<name>/`` for each configuration that trained to the end."""
    out_dir = final.parent
    with atomic_directory(out_dir / "sweep", fabric) as partial_dir:
        if fabric.global_rank == 0:
            saved = yaml.safe_load((final / "hyperparameters.yaml").read_text(encoding="utf-8"))
            for c in sweep.alive:
                save_configuration(c, recorded(saved, c, precision), partial_dir / c.name)
            write_table(sweep, chosen, out_dir / "sweep.csv")
            plot(sweep, chosen, out_dir / "sweep.png")
    chosen.install(sweep.model)
    fabric.print(f"Chose {chosen.name}; every configuration: {str(out_dir / 'sweep.csv')!r}")


def recorded(saved: dict, c: Configuration, precision: str) -> dict:
    """The hyper-parameters that train ``c`` alone: ``saved`` with its swept values in place of the sweep, its
    optimizer, and the precision it trained in (generation uses it)."""
    saved = {k: v for k, v in saved.items() if k != "sweep"}
    model = {k: getattr(c.model_config, k) for k in (*ROUTE_OPTIONS, *ADAPTER_OPTIONS)}
    model["skip2lora_block_indices"] = list(model["skip2lora_block_indices"])
    return {**saved, **model, "seed": c.seed, "optimizer": c.optimizer_spec, "precision": precision}


def write_table(sweep: Sweep, chosen: Configuration, path: Path) -> None:
    """One row per configuration: name, swept values, validation losses, accuracy when it selects, steps, chosen."""
    swept = list(sweep.args.swept())
    best = ["best_step", "best_val_loss"] if sweep.args.best_step else []
    accuracy = ["accuracy"] if sweep.args.select == "label_accuracy" else []
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", *swept, "val_loss", *best, *accuracy, "steps", "chosen"])
        for c in sweep.configurations:
            scores = [
                c.val_loss,
                *([c.best_step, c.best_val_loss] if best else []),
                *([c.accuracy] if accuracy else []),
            ]
            writer.writerow([c.name, *(c.values[k] for k in swept), *scores, c.steps, int(c is chosen)])


def plot(sweep: Sweep, chosen: Configuration, path: Path) -> None:
    """Validation loss against optimizer steps, a line per configuration, the chosen one drawn thick and named."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn(f"matplotlib is not installed: no {path.name} (pip install 'litgpt-skip2lora[eval]').")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for c in sweep.configurations:
        points = [(row["step"], row[c.name]) for row in sweep.history if not math.isnan(row.get(c.name, math.nan))]
        steps, losses = zip(*points) if points else ((), ())
        is_chosen = c is chosen
        label = f"{c.name} (chosen)" if is_chosen else c.name
        ax.plot(steps, losses, marker="o", markersize=3, linewidth=2.5 if is_chosen else 1, label=label)
        if is_chosen and points:  # the step it was handed over at
            handed = (c.best_step, c.best_val_loss) if sweep.args.best_step else (steps[-1], losses[-1])
            ax.scatter(*handed, s=160, marker="*", color="black", zorder=5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Sweep of {len(sweep.configurations)} configurations; chosen: {chosen.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(sweep.configurations) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_configuration(c: Configuration, hyperparameters: dict, folder: Path) -> None:
    """What ``final/`` and ``sweep/<name>/`` both hold: trained parameters, model config, hyper-parameters."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.detach().cpu() for k, v in c.trained_state().items()}}, folder / TRAINED)
    save_model_config(c.model_config, folder)
    (folder / "hyperparameters.yaml").write_text(yaml.safe_dump(hyperparameters, sort_keys=False), encoding="utf-8")


def export_configuration(configuration_dir: Path, final_dir: Path | None = None, out_dir: Path | None = None) -> Path:
    """Make a full checkpoint of one configuration of a sweep, loaded as ``final/`` is.

    Args:
        configuration_dir: ``<out_dir>/sweep/<name>``, written by a sweep.
        final_dir: The sweep's ``final/``, whose frozen weights and tokenizer are reused; default ``<out_dir>/final``.
        out_dir: Where the checkpoint goes; default ``<out_dir>/final-<name>``.
    """
    configuration_dir = Path(configuration_dir)
    run_dir = configuration_dir.parent.parent
    final_dir = Path(final_dir or run_dir / "final")
    out_dir = Path(out_dir or run_dir / f"final-{configuration_dir.name}")
    for needed in (configuration_dir / TRAINED, final_dir / "lit_model.pth"):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: is {configuration_dir} a configuration of a sweep?")
    with atomic_directory(out_dir) as partial_dir:
        ignored = shutil.ignore_patterns("lit_model.pth*", "evaluate_accuracy.json")
        shutil.copytree(final_dir, partial_dir, ignore=ignored, dirs_exist_ok=True)
        state = torch.load(final_dir / "lit_model.pth", mmap=True, weights_only=True)
        chosen = torch.load(final_dir / TRAINED, mmap=True, weights_only=True)["model"]  # a tail of another depth's
        state = {k: v for k, v in state.items() if k not in chosen}
        state.update(torch.load(configuration_dir / TRAINED, weights_only=True)["model"])
        torch.save(state, partial_dir / "lit_model.pth")
        for name in (TRAINED, "model_config.yaml", "hyperparameters.yaml"):
            shutil.copy2(configuration_dir / name, partial_dir / name)
    print(f"Saved {configuration_dir.name} as a full checkpoint in {str(out_dir)!r}")
    return out_dir
