"""The ready-made YAMLs, shipped inside the package: ``--config`` takes one by short name
(``SmolLM2-135M-Instruct/skip2lora_tail``) or by its clone path from anywhere, and is moved in front of the other
arguments, so that what the command line says wins over the YAML.
"""

from pathlib import Path

SHIPPED = Path(__file__).parent / "config_hub"  # finetune/<model>/<name>.yaml


def shipped_configs() -> dict[str, Path]:
    """Each shipped YAML by its short name, ``<model>/<name>``."""
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(SHIPPED.glob("finetune/*/*.yaml"))}


def find_config(name: str) -> Path:
    """An existing file, else the shipped YAML ``name`` names; anything else refused in one line."""
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
    """``args`` with each ``--config`` moved right after the subcommand, its value resolved."""
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
