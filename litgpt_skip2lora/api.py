"""LitGPT's ``LLM``, ``generate``, ``chat`` and ``serve`` for this package's checkpoints: they build this package's
``GPT`` and ``Config`` for the duration of a call only (:func:`swapped`), and a tuned model runs in the precision it
was trained in unless one is given.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import litgpt.api
import yaml

from litgpt_skip2lora.model import GPT, Config


@contextlib.contextmanager
def swapped(module: ModuleType, **names: Any) -> Iterator[None]:
    """``module``'s globals ``names`` replaced while the block runs, then restored."""
    saved = {name: getattr(module, name) for name in names}
    for name, value in names.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def skip2lora_classes(module: ModuleType) -> contextlib.AbstractContextManager:
    """``module.GPT`` and ``module.Config`` are this package's while the block runs."""
    return swapped(module, GPT=GPT, Config=Config)


def trained_precision(checkpoint_dir: Path) -> str | None:
    """The precision a ``final/`` was trained in, or None where none is recorded (a base checkpoint)."""
    hyperparameters = Path(checkpoint_dir) / "hyperparameters.yaml"
    if not hyperparameters.is_file():
        return None
    return (yaml.safe_load(hyperparameters.read_text(encoding="utf-8")) or {}).get("precision")


class LLM(litgpt.api.LLM):
    """LitGPT's ``LLM`` (``load``, ``generate``, ``distribute``, ...) for base checkpoints and this package's tuned
    ones: ``LLM.load("out/demo/final").generate("...")``."""

    @classmethod
    def load(cls, model: str, *args: Any, distribute: str | None = "auto", **kwargs: Any) -> "LLM":
        """As LitGPT's; ``distribute="auto"`` puts the model on one device in the precision it was trained in."""
        with skip2lora_classes(litgpt.api):
            llm = super().load(model, *args, distribute=None, **kwargs)
        if distribute == "auto":
            llm.distribute(devices=1)
        return llm

    def distribute(self, *args: Any, precision: str | None = None, **kwargs: Any) -> None:
        precision = precision or trained_precision(self.checkpoint_dir)
        with skip2lora_classes(litgpt.api):
            super().distribute(*args, precision=precision, **kwargs)

    def trainer_setup(self, *args: Any, **kwargs: Any) -> None:
        with skip2lora_classes(litgpt.api):
            super().trainer_setup(*args, **kwargs)
