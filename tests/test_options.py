"""Every option ``finetune_skip2lora`` accepts is read, or refused in one line: none is accepted and ignored."""

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from conftest import in_process
from litgpt.args import EvalArgs, TrainArgs
from litgpt.utils import select_sft_generate_example

from litgpt_skip2lora.cache import CacheArgs
from litgpt_skip2lora.checks import check_train_args, optimizer_spec
from litgpt_skip2lora.finetune import Run, setup
from litgpt_skip2lora.sweep import SWEPT, SweepArgs

PACKAGE = Path(__file__).parents[1] / "litgpt_skip2lora"
# what the loop calls of LitGPT's, reading options there: the accumulation and the example prompt at the end
LITGPT_READERS = [TrainArgs.gradient_accumulation_iters, select_sft_generate_example]
GROUPS = {"train": (TrainArgs, {"train"}), "eval": (EvalArgs, {"eval"}), "cache": (CacheArgs, {"cache", "args"})}
GROUPS["sweep"] = (SweepArgs, {"sweep", "args"})


def reads() -> set[tuple[str, str]]:
    """``(object, attribute)`` for every ``object.attribute`` or ``x.object.attribute`` read in the package and in
    the LitGPT functions it hands the options to."""
    sources = [p.read_text() for p in PACKAGE.rglob("*.py")]
    sources += [inspect.cleandoc("\n" + inspect.getsource(fn)) for fn in LITGPT_READERS]
    found = set()
    for node in (n for source in sources for n in ast.walk(ast.parse(source))):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            owner = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", None)
            found.add((owner, node.attr))
    return found


def refused(group: str, field: dataclasses.Field) -> bool:
    """Whether setting ``group.field`` to a value other than its default is refused by the argument checks."""
    args = {"train": TrainArgs(epochs=1, lr_warmup_steps=None), "eval": EvalArgs(max_new_tokens=5)}
    if group not in args:
        return False
    args[group] = dataclasses.replace(args[group], **{field.name: 0.5})
    try:
        check_train_args(args["train"], args["eval"])
    except ValueError as err:
        return field.name in str(err)
    return False


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_a_group_is_read_or_refused(group: str) -> None:
    cls, owners = GROUPS[group]
    read = {attr for owner, attr in reads() if owner in owners}
    if cls is SweepArgs:  # the list options are read together, by name, when every one of them is given
        read |= set(SweepArgs(**dict.fromkeys(SWEPT, [1])).swept())
    ignored = [f.name for f in dataclasses.fields(cls) if f.name not in read and not refused(group, f)]
    assert not ignored, f"--{group}.<option> accepted and neither read nor refused: {ignored}"


def test_every_argument_of_setup_is_read() -> None:
    body = ast.parse(inspect.cleandoc("\n" + inspect.getsource(setup))).body[0]
    names = {n.id for n in ast.walk(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    names |= {field.name for field in dataclasses.fields(Run)}  # handed to main by name, from locals()
    unread = [p for p in inspect.signature(setup).parameters if p not in names]
    assert not unread, f"finetune_skip2lora arguments never read: {unread}"


LR_FORMS = [
    ["--optimizer.lr", "0.003"],
    ["--optimizer", "AdamW", "--optimizer.lr", "0.003"],
    ["--optimizer.class_path", "torch.optim.AdamW", "--optimizer.init_args.lr", "0.003"],
    ["--optimizer.init_args.lr=0.003", "--optimizer=torch.optim.AdamW"],
]
YAML = Path(__file__).parents[1] / "config_hub/finetune/SmolLM2-135M-Instruct/skip2lora.yaml"


def parsed_optimizer(capsys: pytest.CaptureFixture, *args: str) -> dict:
    """The optimizer ``litgpt-skip2lora finetune ARGS`` trains with: the real parser, in this process."""
    with pytest.raises(SystemExit):
        in_process("finetune", *args, "--print_config")
    return optimizer_spec(yaml.safe_load(capsys.readouterr().out)["optimizer"])


@pytest.mark.parametrize("form", LR_FORMS, ids=" ".join)
def test_the_learning_rate_in_every_form(form, capsys) -> None:
    """Each form LitGPT's own CLI fails on (its issue #1905) sets the learning rate; with ``--config`` it wins over
    the YAML's, and what the YAML sets and the command line does not stays."""
    alone = parsed_optimizer(capsys, "checkpoints/any", *form)
    assert alone == {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}}
    over_yaml = parsed_optimizer(capsys, "--config", str(YAML), *form)
    assert over_yaml == {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 0.0}}


def test_another_optimizer_class_starts_from_its_own_defaults(capsys) -> None:
    typed = ["--optimizer.class_path", "torch.optim.SGD", "--optimizer.lr", "0.1"]
    assert parsed_optimizer(capsys, "--config", str(YAML), *typed) == {
        "class_path": "torch.optim.SGD",
        "init_args": {"lr": 0.1},
    }


@pytest.mark.parametrize("command", ["finetune_skip2lora", "convert_gguf", "evaluate_accuracy", "export_configuration"])
def test_a_commands_help_says_what_it_does_in_whole_sentences(command: str, capsys) -> None:
    """The description ``--help`` prints (the docstring's first line, as jsonargparse takes it) is a sentence."""
    with pytest.raises(SystemExit):
        in_process(command, "--help")
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description.rstrip().endswith("."), description


def test_the_cache_placements_help_says_what_device_means_on_the_cpu(capsys) -> None:
    with pytest.raises(SystemExit):
        in_process("finetune_skip2lora", "--help")
    assert "on a CPU run that is host RAM" in " ".join(capsys.readouterr().out.split())
