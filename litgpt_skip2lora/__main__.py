"""``litgpt-skip2lora``: every ``litgpt`` subcommand, plus ``finetune_skip2lora``, ``convert_gguf``,
``convert_smollm2``, ``evaluate_accuracy`` and ``export_configuration``. ``finetune`` runs Skip2-LoRA when
``skip2lora_enabled`` is true; ``generate``, ``chat`` and ``serve`` load plain and Skip2-LoRA checkpoints alike.
"""

import contextlib
import inspect
import io
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import litgpt.chat.base
import litgpt.generate.base
import torch
import yaml
from jsonargparse import CLI, set_config_read_mode, set_docstring_parse_options
from litgpt.__main__ import PARSER_DATA

import litgpt_skip2lora.data  # noqa: F401  (its data modules appear among --data's choices)
from litgpt_skip2lora.api import skip2lora_classes, swapped, trained_precision
from litgpt_skip2lora.checks import optimizer_spec, typed_optimizer
from litgpt_skip2lora.configs import config_first
from litgpt_skip2lora.convert_gguf import convert_gguf, convert_smollm2
from litgpt_skip2lora.evaluate import evaluate_accuracy
from litgpt_skip2lora.finetune import setup as finetune_skip2lora
from litgpt_skip2lora.serve import serve
from litgpt_skip2lora.sweep_outputs import export_configuration

LITGPT_TRAINING = ("finetune_lora", "finetune_full", "finetune_adapter", "finetune_adapter_v2", "pretrain")


class _WithoutConfigDump(io.TextIOBase):
    """Text passed on to ``stream``, but for LitGPT's dump of every config field after ``Loading model ...``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        head, dump, _ = text.partition(" with {")
        self.stream.write(head if dump and text.startswith("Loading model") else text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _generation_command(fn: Callable, module: ModuleType) -> Callable:
    """LitGPT's ``generate`` or ``chat`` with this package's classes, the precision the model trained in unless
    told, no dump of the arguments and config, and the end of the input ending a chat."""

    @wraps(fn)
    def run(**kwargs: Any) -> Any:
        kwargs["precision"] = kwargs.get("precision") or trained_precision(kwargs["checkpoint_dir"])
        quiet = swapped(module, pprint=lambda *args, **kwargs: None)
        with skip2lora_classes(module), quiet, contextlib.redirect_stderr(_WithoutConfigDump(sys.stderr)):
            try:
                return fn(**kwargs)
            except EOFError:
                print()

    return run


def _optimizer_from_any_form(fn: Callable) -> Callable:
    """LitGPT's training command taking every form of ``--optimizer`` (its CLI fails on some, issue #1905), and
    recording it in ``final/hyperparameters.yaml`` in the YAMLs' form."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs["optimizer"] = optimizer_spec(kwargs.get("optimizer", "AdamW"))
        result = fn(*args, **kwargs)
        hyperparameters = Path(kwargs.get("out_dir", ".")) / "final" / "hyperparameters.yaml"
        if hyperparameters.is_file():
            saved = yaml.safe_load(hyperparameters.read_text(encoding="utf-8"))
            saved["optimizer"] = kwargs["optimizer"]
            hyperparameters.write_text(yaml.safe_dump(saved, sort_keys=False), encoding="utf-8")
        return result

    return run


def _with_defaults(fn: Callable, **defaults: Any) -> inspect.Signature:
    signature = inspect.signature(fn)
    params = [p.replace(default=defaults.get(name, p.default)) for name, p in signature.parameters.items()]
    return signature.replace(parameters=params)


def finetune(*args: Any, **kwargs: Any) -> None:
    """LitGPT's ``finetune`` (LoRA on query and value) that runs Skip2-LoRA when ``skip2lora_enabled`` is true."""
    return finetune_skip2lora(*args, **kwargs)


finetune.__signature__ = _with_defaults(finetune_skip2lora, skip2lora_enabled=False, lora_query=True, lora_value=True)


SUBCOMMANDS = {
    **PARSER_DATA,
    **{name: _optimizer_from_any_form(PARSER_DATA[name]) for name in LITGPT_TRAINING},
    "finetune": finetune,
    "finetune_skip2lora": finetune_skip2lora,
    "generate": _generation_command(litgpt.generate.base.main, litgpt.generate.base),
    "chat": _generation_command(litgpt.chat.base.main, litgpt.chat.base),
    "serve": serve,
    "convert_gguf": convert_gguf,
    "convert_smollm2": convert_smollm2,
    "evaluate_accuracy": evaluate_accuracy,
    "export_configuration": export_configuration,
}


def main() -> None:
    set_docstring_parse_options(attribute_docstrings=True)
    set_config_read_mode(urls_enabled=False)
    warnings.filterwarnings("ignore", message=r"The epoch parameter in `scheduler.step\(\)`", category=UserWarning)
    torch.set_float32_matmul_precision("high")
    # in place: LitGPT parses sys.argv again to save hyperparameters
    sys.argv[1:] = config_first(typed_optimizer(sys.argv[1:]))
    try:
        CLI(SUBCOMMANDS)
    except KeyboardInterrupt:  # outside training, whose own handler saves a checkpoint: nothing to save yet
        print("Interrupted.", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # an error the user caused is one line; anything unexpected keeps its traceback
        if getattr(err, "user_error", False):
            raise SystemExit(f"error: {err}") from None
        raise


if __name__ == "__main__":
    main()
