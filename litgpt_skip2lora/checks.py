"""Input refused in one line, before anything is written or loaded: an error raised inside :func:`user_errors` is
the user's, printed as ``error: ...`` without a traceback; anything else keeps its traceback.
"""

import contextlib
import importlib.util
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import requests
import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import JSON, DataModule


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Marks the errors raised inside as the user's."""
    try:
        yield
    except Exception as err:
        err.user_error = True
        raise


def refuse(error: Exception) -> None:
    """Raise ``error`` as the user's."""
    with user_errors():
        raise error


def check_train_args(train: TrainArgs, eval: EvalArgs) -> None:
    """Refuse settings that would train nothing or that this loop does not read, in one line each."""
    if not train.epochs and not train.max_steps:
        raise ValueError(f"--train.epochs must be at least 1 (or set --train.max_steps); got epochs={train.epochs}.")
    counts = "epochs max_steps micro_batch_size global_batch_size log_interval save_interval".split()
    for group, args, names in (("train", train, counts), ("eval", eval, ["interval", "max_iters"])):
        for name in names:
            if (value := getattr(args, name)) is not None and value < 1:
                raise ValueError(f"--{group}.{name} must be at least 1, got {value}.")
    if (train.lr_warmup_steps or 0) < 0:
        raise ValueError(f"--train.lr_warmup_steps must not be negative, got {train.lr_warmup_steps}.")
    if eval.max_new_tokens is None:
        raise ValueError("--eval.max_new_tokens must be set.")
    for name in ("max_tokens", "tie_embeddings", "lr_warmup_fraction"):
        if getattr(train, name) is not None:
            raise ValueError(f"finetune_skip2lora does not support --train.{name}; leave it unset.")


def check_batch_split(train: TrainArgs, world_size: int) -> None:
    """The global batch must split into micro-batches on every device (LitGPT would assert, or floor it silently)."""
    size, micro = train.global_batch_size, train.micro_batch_size
    for name, value in (("global_batch_size", size), ("micro_batch_size", micro)):
        if value < 1:
            raise ValueError(f"--train.{name} must be at least 1, got {value}.")
    if size % (world_size * micro) == 0:
        return
    micros = [m for m in range(1, micro) if size % (world_size * m) == 0]
    fix = f"a multiple of {world_size * micro}" + (f", or --train.micro_batch_size {micros[-1]}" if micros else "")
    raise ValueError(
        f"--train.global_batch_size {size} does not split into micro-batches of {micro} over {world_size} devices:"
        f" use a global batch size that is {fix}."
    )


def check_precision(precision: str | None) -> None:
    """16-bit mixed precision needs a CUDA GPU: on the CPU Lightning would train in bf16-mixed instead, silently."""
    if precision in ("16-mixed", "16") and not torch.cuda.is_available():
        raise ValueError(f"--precision {precision} needs a CUDA GPU; on the CPU use 32-true or bf16-mixed.")


def check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and write in it once (a permission check passes for root even in ``/proc``)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise ValueError(f"--out_dir {str(out_dir)!r} cannot be created or written: {err.strerror}.") from None


def check_json_data(data: DataModule) -> None:
    """A ``JSON`` data set's files must parse: say which file and where, before the model loads."""
    if not isinstance(data, JSON):
        return
    path = Path(data.json_path)
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.json*") if p.stem in ("train", "val"))
    for file in files:
        text = file.read_text(encoding="utf-8")
        documents = text.splitlines() if file.suffix == ".jsonl" else [text]  # JSON Lines: one document a line
        items = []
        for number, document in enumerate(documents, start=1):
            try:
                parsed = json.loads(document)
            except json.JSONDecodeError as err:
                line = number if file.suffix == ".jsonl" else err.lineno
                raise ValueError(f"{file}: invalid JSON at line {line}, column {err.colno}: {err.msg}.") from None
            items.extend(parsed if isinstance(parsed, list) else [parsed])
        check_items(file, items)


def check_items(file: Path, items: list) -> None:
    """Every item is an object with the keys LitGPT's prompt styles read (``input`` may be left out)."""
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{file}: item {index} is not an object with 'instruction' and 'output'.")
        for key in ("instruction", "output"):
            if key not in item:
                raise ValueError(f"{file}: item {index} has no {key!r} (items need 'instruction' and 'output').")


def check_quantize(quantize: str | None, precision: str | None) -> None:
    """bitsandbytes quantizes on CUDA GPUs only, its int8 layers compute in float16: say so before anything starts."""
    if quantize is None:
        return
    if quantize.startswith("bnb.int8") and precision != "16-true":
        raise ValueError(f"--quantize {quantize} computes in float16: add --precision 16-true.")
    if not torch.cuda.is_available():
        raise ValueError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); none is available here.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes")


@contextlib.contextmanager
def download_hint(data: DataModule) -> Iterator[None]:
    """A data module that downloads (LitGPT's default ``Alpaca`` does) fails offline: say how to pass local data."""
    try:
        yield
    except requests.exceptions.RequestException as err:
        raise ConnectionError(
            f"--data {type(data).__name__} downloads its data, which failed ({type(err).__name__}). Without internet,"
            " pass local data: --data JSON --data.json_path FILE, or --data litgpt_skip2lora.data.WordNetInstruct."
        ) from None


def optimizer_spec(optimizer: str | dict) -> dict:
    """The optimizer as the YAMLs write it, ``{"class_path": ..., "init_args": {...}}``, from any form a user types:
    jsonargparse hands ``--optimizer.lr 0.003`` over as a top-level ``lr`` and a typed class as ``class``
    (:func:`typed_optimizer`). Typed keys win over the YAML's; a typed class other than its starts from defaults."""
    if isinstance(optimizer, str):
        optimizer = {"class": optimizer}
    typed = {k: number(v) for k, v in optimizer.items() if k not in ("class_path", "init_args", "class")}
    yaml_class = full_class_path(optimizer.get("class_path", "AdamW"))
    class_path = full_class_path(optimizer.get("class", yaml_class))
    init_args = (optimizer.get("init_args") or {}) if class_path == yaml_class else {}
    return {"class_path": class_path, "init_args": {**init_args, **typed}}


def typed_optimizer(args: list[str]) -> list[str]:
    """``args`` with a typed optimizer class as ``--optimizer.class SGD``, which jsonargparse keeps beside the other
    keys for :func:`optimizer_spec` (as itself it drops the keys typed before it, or crashes: LitGPT's #1905)."""
    out, rest = [], list(args)
    while rest:
        option, equals, value = rest.pop(0).partition("=")
        if option in ("--optimizer", "--optimizer.class_path") and (equals or rest):
            value = value if equals else rest.pop(0)
            out += [option, value] if value.lstrip().startswith("{") else ["--optimizer.class", value]
        else:
            out.append(option + equals + value)
    return out


def full_class_path(name: str) -> str:
    """``AdamW`` as ``torch.optim.AdamW``; a dotted path as it is."""
    return name if "." in name else f"torch.optim.{name}"


def number(value):
    """``"0.003"`` as 0.003 and ``"8"`` as 8; anything else as it is."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
