"""The ready-made YAMLs, shipped inside the package, and how ``--config`` finds them.

A clone has them under ``config_hub/``; a ``pip install`` has them in the package only. So ``--config`` takes a
shipped YAML by a short name (``SmolLM2-135M-Instruct/skip2lora_tail``) or by its path in a clone
(``config_hub/finetune/SmolLM2-135M-Instruct/skip2lora_tail.yaml``) wherever the command runs; a file that exists
is read as it is. ``--config`` is moved in front of the other arguments: jsonargparse applies arguments in order,
and an explicit value on the command line (the positional checkpoint folder included) must win over the YAML's.
"""

from pathlib import Path

SHIPPED = Path(__file__).parent / "config_hub"
"""Where the shipped YAMLs are: ``finetune/<model>/<name>.yaml``."""


def shipped_configs() -> dict[str, Path]:
    """Each shipped YAML by its short name, ``<model>/<name>``."""
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(SHIPPED.glob("finetune/*/*.yaml"))}


def find_config(name: str) -> Path:
    """The YAML ``name`` means: an existing file, else the shipped one it names by short name or by its path in a
    clone; anything else is refused in one line that lists the shipped names."""
    if Path(name).is_file():
        return Path(name)
    short = name.removesuffix(".yaml").removeprefix("config_hub/").removeprefix("finetune/")
    shipped = shipped_configs()
    if short in shipped:
        return shipped[short]
    raise SystemExit(
        f"error: --config {name}: no such file, nor a shipped config of that name. Shipped (in {SHIPPED}/finetune):"
        f" {', '.join(shipped)}."
    )


def config_first(args: list[str]) -> list[str]:
    """``args`` (a subcommand and its arguments) with each ``--config`` moved right after the subcommand, in their
    order, its value resolved by :func:`find_config`."""
    if not args or args[0].startswith("-"):
        return args
    configs, rest, remaining = [], [], list(args[1:])
    while remaining:
        option, equals, value = remaining.pop(0).partition("=")
        if option == "--config" and (equals or remaining):
            configs += [option, str(find_config(value if equals else remaining.pop(0)))]
        else:
            rest.append(option + equals + value)
    return [args[0], *configs, *rest]
