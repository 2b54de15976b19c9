"""Sweeps: many configurations trained in lockstep on the same batches, so the backbone runs once per sample for
all. Each has its own trained parameters, optimizer, scheduler and dropout stream, so it trains as its solo run
would; a run is a sweep of one. As in DINOv2's linear evaluation, validation chooses the best; ``keep`` below 1
drops the weaker ones at each validation (successive halving).
"""

import contextlib
import functools
import itertools
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn
from litgpt.lora import LoRALayer
from litgpt.utils import instantiate_torch_optimizer

from litgpt_skip2lora.adapters import Adapters, Reads
from litgpt_skip2lora.dropout import SharedMasks, drawing_from, root
from litgpt_skip2lora.execution import factors_head, head_group_size, lane_count
from litgpt_skip2lora.lanes import Lanes
from litgpt_skip2lora.model import GPT, Config, output_block, reads

ROUTE_OPTIONS = ("skip2lora_output_layer", "skip2lora_block_indices")  # each tail from the one Skip-Cache
ADAPTER_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout")  # shape the adapters and the tail's LoRA layers
OPTIMIZER_OPTIONS = ("lr", "weight_decay")
SWEPT = (*ROUTE_OPTIONS, *OPTIMIZER_OPTIONS, *ADAPTER_OPTIONS, "seed")  # in the order names list them
PROGRESS = ("alive", "steps", "val_loss", "best_val_loss", "best_step", "best", "accuracy")  # a checkpoint's


@dataclass
class SweepArgs:
    """Options swept in one run: each takes a list, and every combination of the lists' values is trained."""

    skip2lora_output_layer: list[str] | None = None
    """Output places ``block.K``: tails of different depths, their blocks' LoRA layers each configuration's own."""
    skip2lora_block_indices: list[list[int]] | None = None
    """Lists of blocks whose inputs feed the adapters; a configuration drops the blocks after its output place."""
    lr: list[float] | None = None
    """Learning rates (the optimizer's ``lr``)."""
    weight_decay: list[float] | None = None
    """The optimizer's ``weight_decay`` values."""
    lora_r: list[int] | None = None
    """Ranks of the adapters and of the tail's LoRA layers."""
    lora_alpha: list[int] | None = None
    """Scaling numerators of the adapters and of the tail's LoRA layers."""
    lora_dropout: list[float] | None = None
    """Dropout rates of the adapters and of the tail's LoRA layers."""
    seed: list[int] | None = None
    """Seeds of the trained parameters' initial values and of dropout; the batches' order follows ``--seed``."""
    keep: float = 1.0
    """At each validation, the best fraction of the configurations still training goes on (at least one)."""
    best_step: bool = True
    """Hand over each configuration's parameters at its lowest validation loss, which halving and the choice rank."""
    select: Literal["val_loss", "label_accuracy"] = "val_loss"
    """Choose by the lowest validation loss, or by the most validation answers likeliest among the task's labels."""

    def swept(self) -> dict[str, list]:
        """The swept options and their values, in a fixed order."""
        return {name: list(getattr(self, name)) for name in SWEPT if getattr(self, name) is not None}

    @property
    def is_sweep(self) -> bool:
        """More than one configuration: the run chooses among them by validation. Decided here only."""
        return len(self.grid()) > 1

    def grid(self) -> list[dict[str, Any]]:
        """One dict of swept values per configuration; ``[{}]`` when nothing is swept."""
        swept = self.swept()
        return [dict(zip(swept, values)) for values in itertools.product(*swept.values())]


def check_sweep(args: SweepArgs, final_validation: bool, precision: str | None) -> None:
    """Refuse a sweep that cannot run, in one line, before the model loads (16-bit mixed precision: Fabric's one
    GradScaler, updated by each configuration's step)."""
    for name, values in args.swept().items():
        if not values:
            raise ValueError(f"--sweep.{name} is an empty list: give at least one value.")
        if len({repr(v) for v in values}) != len(values):
            raise ValueError(f"--sweep.{name} repeats a value: {values}.")
    if not all(re.fullmatch(r"block\.\d+", place) for place in args.skip2lora_output_layer or ()):
        raise ValueError(f"--sweep.skip2lora_output_layer takes block.K places: {args.skip2lora_output_layer}.")
    if not 0 < args.keep <= 1:
        raise ValueError(f"--sweep.keep must be in (0, 1], got {args.keep}.")
    if any(r <= 0 for r in args.lora_r or ()):
        raise ValueError(f"--sweep.lora_r values must be positive: {args.lora_r}.")
    if args.is_sweep and not final_validation:
        raise ValueError("A sweep chooses its best configuration by validation: leave --eval.final_validation true.")
    if args.is_sweep and precision in ("16-mixed", "16"):
        raise ValueError(
            f"--precision {precision} shares one loss scale among a sweep's configurations, so none would train as"
            " alone: sweep in bf16-true, bf16-mixed or 32-true, or run each configuration by itself."
        )


def configuration_name(values: dict[str, Any]) -> str:
    """``lr=0.003,lora_r=8``, blocks as ``skip2lora_block_indices=0+6+12``; ``run`` when nothing is swept."""
    shown = {k: "+".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
    return ",".join(f"{k}={v}" for k, v in shown.items()) or "run"


def configuration_configs(config: Config, args: SweepArgs) -> list[tuple[dict[str, Any], Config]]:
    """Each configuration's swept values and model config. Its adapters read the blocks of its list at or before its
    output place; where that drops some, its values, and so its name, list the blocks it reads."""
    grid = []
    for values in args.grid():
        given = list(values.get("skip2lora_block_indices", config.skip2lora_block_indices))
        if "skip2lora_output_layer" in values:
            place, n = values["skip2lora_output_layer"], config.n_layer
            start = output_block(place, n)
            blocks = [i for i in given if not (isinstance(i, int) and -n <= i < n and i % n > start)]
            if not blocks:
                raise ValueError(f"No block of {given} lies at or before --sweep.skip2lora_output_layer {place}.")
            if blocks != given:
                values = {**values, "skip2lora_block_indices": blocks}
                values = {k: values[k] for k in SWEPT if k in values}
        options = {k: values[k] for k in (*ROUTE_OPTIONS, *ADAPTER_OPTIONS) if k in values}
        grid.append((values, replace(config, skip2lora_enabled=True, **options)))
    return grid


@dataclass
class Configuration:
    """One configuration's trained parameters and training state."""

    name: str
    values: dict[str, Any]
    model_config: Config
    """The model's config with its adapter options: what its checkpoint is loaded with."""
    adapters: Adapters
    lora: dict[str, nn.Parameter]  # its own copies of the tail's LoRA parameters, by their names in the model
    seed: int
    optimizer_spec: dict
    """The run's optimizer, ``{"class_path": ..., "init_args": {...}}``, with its swept values."""
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # its dropout stream's generator state
    alive: bool = True
    steps: int = 0
    val_loss: float = math.nan
    best_val_loss: float = math.nan
    best_step: int = 0
    best: list[torch.Tensor] | None = None  # its trained parameters at best_step, with --sweep.best_step
    accuracy: float = math.nan

    def tagged(self, metric: str) -> str:
        """Its metric's name in the logs: ``loss`` in a run, ``loss/lr=0.003`` in a sweep."""
        return metric if self.name == "run" else f"{metric}/{self.name}"

    def parameters(self) -> list[nn.Parameter]:
        return [*self.adapters.parameters(), *self.lora.values()]

    def trained_state(self) -> dict[str, nn.Parameter]:
        """Its trained parameters by their names in the model: what its checkpoint files hold."""
        return {**{f"skip2lora.{k}": p for k, p in self.adapters.named_parameters()}, **self.lora}

    def install(self, model: GPT) -> None:
        """From now on ``model`` computes this configuration: its parameters, LoRA rank, scaling and dropout."""
        model.skip2lora, config = self.adapters, self.model_config
        for name, parameter in self.lora.items():
            module_name, _, attribute = name.rpartition(".")
            layer = model.get_submodule(module_name)
            setattr(layer, attribute, parameter)
            if isinstance(layer, LoRALayer):
                layer.r, layer.lora_alpha = config.lora_r, config.lora_alpha
                layer.scaling, layer.lora_dropout.p = config.lora_alpha / config.lora_r, config.lora_dropout

    @contextlib.contextmanager
    def random_stream(self, device: torch.device, masks: SharedMasks | None = None) -> Iterator[None]:
        """Draw its dropout masks from its own stream, sharing the step's ``masks``; the global generator is left."""
        generator = torch.Generator(device)
        generator.set_state(self.rng[device.type])
        with drawing_from(generator, masks) as stream:
            yield
        self.rng = {device.type: stream.state()}

    def consider_best(self, loss: float, step: int, keep_best: bool) -> None:
        """A new lowest validation loss becomes its best step (its parameters copied when kept)."""
        if not math.isnan(loss) and not loss >= self.best_val_loss:  # the first loss, or a lower one
            self.best_val_loss, self.best_step = loss, step
            self.best = [p.detach().clone() for p in self.parameters()] if keep_best else None

    def restore_best(self) -> None:
        """Its trained parameters back to those of its best step (when they were kept)."""
        with torch.no_grad():
            for p, best in zip(self.parameters(), self.best or ()):
                p.copy_(best)

    def optimizer_step(self, fabric: L.Fabric, model: GPT, max_norm: float | None) -> None:
        """Its gradients averaged over the ranks, clipped to ``max_norm`` and applied; its schedule advances."""
        average_gradients(fabric, self.parameters())
        if max_norm:  # Fabric unscales a 16-bit mixed-precision run's gradients first
            fabric.clip_gradients(model, self.optimizer, max_norm=max_norm, error_if_nonfinite=False)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        modules = {name: getattr(self, name).state_dict() for name in ("adapters", "optimizer", "scheduler")}
        progress = {name: getattr(self, name) for name in PROGRESS}
        return {**modules, "lora": {n: p.detach() for n, p in self.lora.items()}, **progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("adapters", "optimizer", "scheduler"):
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            for name, p in self.lora.items():
                p.copy_(state["lora"][name])
        for name in PROGRESS:
            setattr(self, name, state[name])


def average_gradients(fabric: L.Fabric, parameters: list[nn.Parameter]) -> None:
    """Under DDP, the gradients averaged over the ranks, as DDP does: the loop calls the model itself, so that a
    configuration dropped by halving takes no collective."""
    if fabric.world_size == 1:
        return
    grads = [p.grad for p in parameters]
    flat = fabric.all_reduce(torch.cat([g.flatten() for g in grads]), reduce_op="mean")
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The state of torch's global generator for ``device``: where a configuration's dropout stream starts."""
    return {device.type: torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()}


class Sweep:
    """The configurations of a run, and the model whose frozen weights they share, in its lanes."""

    def __init__(self, model: GPT, configurations: list[Configuration], args: SweepArgs) -> None:
        self.model, self.configurations, self.args = model, configurations, args
        self.history: list[dict] = []
        """Every validation: its step and each live configuration's loss, for the sweep's plot."""

    @functools.cached_property
    def lanes(self) -> Lanes:
        """Made at first use, once the model is where it trains."""
        return Lanes(self.model, lane_count(self.model, len(self.configurations)))

    @functools.cached_property
    def reads(self) -> Reads:
        """What the backbone keeps for the whole sweep: every block a configuration reads, and the stream at the
        earliest output place (a later one's is the input of its block, a tap)."""
        starts = {c.adapters.reads.start for c in self.configurations}
        blocks = {b for c in self.configurations for b in c.adapters.reads.blocks} | (starts - {min(starts)})
        return Reads(tuple(sorted(blocks)), min(starts))

    @property
    def alive(self) -> list[Configuration]:
        return [c for c in self.configurations if c.alive]

    @functools.cached_property
    def is_sweep(self) -> bool:
        return self.args.is_sweep

    def record(self, losses: list[float], step: int, candidate: bool = True) -> dict[str, float]:
        """The live configurations' validation losses at ``step``, returned with perplexities as logged. Only a
        ``candidate`` validation can become a best step."""
        for c, loss in zip(self.alive, losses):
            c.val_loss = loss
            if candidate:
                c.consider_best(loss, step, self.args.best_step)
        if self.history and self.history[-1]["step"] == step:  # validated again at resume: one row a step
            self.history.pop()
        self.history.append({"step": step, **{c.name: c.val_loss for c in self.alive}})
        named = (("val_loss", float), ("val_ppl", math.exp))
        return {c.tagged(metric): f(c.val_loss) for c in self.alive for metric, f in named}

    def halve(self) -> list[Configuration]:
        """Keep the best ``keep`` fraction of the live configurations (at least one); return the dropped ones."""
        alive = sorted(self.alive, key=self.rank_key)
        kept = max(1, math.ceil(len(alive) * self.args.keep))
        for c in alive[kept:]:
            c.alive = False
        return alive[kept:]

    def rank_key(self, c: Configuration) -> tuple[float, float]:
        """Best first: by accuracy when it selects, then by :meth:`loss` (NaN last)."""
        loss = self.loss(c)
        loss = math.inf if math.isnan(loss) else loss
        accuracy = c.accuracy if self.args.select == "label_accuracy" and not math.isnan(c.accuracy) else 0.0
        return (-accuracy, loss)

    def loss(self, c: Configuration) -> float:
        """The validation loss ``c`` is ranked by: its best step's, or with ``best_step`` off its last."""
        return c.best_val_loss if self.args.best_step else c.val_loss

    def restore_best(self) -> None:
        for c in self.alive:
            c.restore_best()

    def describe_best(self) -> str:
        """Which step's parameters are handed over."""
        if self.is_sweep:
            return "Each configuration handed over at its best validation step (sweep.csv: best_step, best_val_loss)"
        c = self.configurations[0]
        return f"Handed over the parameters of step {c.best_step}, validation loss {c.best_val_loss:.4f} (its lowest)"

    def chosen(self) -> Configuration:
        """The selected configuration among those that trained to the end."""
        return min(self.alive, key=self.rank_key)

    def describe_losses(self) -> str:
        """The validation loss, or for a sweep the best one and how many configurations train."""
        if not self.is_sweep:
            return f"{self.configurations[0].val_loss:.4f}"
        best = self.chosen()
        alive = len(self.alive)
        return f"best {self.loss(best):.4f} ({best.name}), {alive} configuration{'s' * (alive != 1)} training"

    def progress(self) -> dict[str, str]:
        """For a sweep's progress bar."""
        if not self.is_sweep:
            return {}
        known = [c.val_loss for c in self.alive if not math.isnan(c.val_loss)]
        best = f"{min(known):.3f}" if known else "n/a"
        return {"alive": f"{len(self.alive)}/{len(self.configurations)}", "best_val": best}

    def set_training(self, mode: bool) -> None:
        """Dropout on with ``mode`` in what trains, always off in the frozen part: the one place modes are set."""
        for model in self.lanes.models:
            model.eval()
        tails = [module for model in self.lanes.models for module in model.tail_modules]
        for module in [*(c.adapters for c in self.configurations), *tails]:
            module.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {"configurations": {c.name: c.state_dict() for c in self.configurations}, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for c in self.configurations:
            c.load_state_dict(state["configurations"][c.name])
        self.history = state["history"]


def configuration_bytes(c: Configuration, vocab: int, factored: bool) -> int:
    """Its parameters, their gradients and AdamW's two moments; with the factored head its ``W B`` and gradient."""
    parameters = sum(p.numel() * p.element_size() for p in c.parameters())
    return 4 * parameters + (4 * 2 * vocab * c.adapters.B.size(1) if factored else 0)


def check_fits(sweep: Sweep, rows: int, available: int) -> None:
    """Refuse, in one line, a sweep that would not fit ``available`` bytes: its trained state, shared masks, and
    head. The plain head holds in each lane one configuration's logits, softmax and gradient in float32, and in a
    validation a group's logits and as much again; the factored one ``head(stream)`` and every configuration's
    graph. The tail's graphs, one per lane, are not counted (a solo run holds one)."""
    model, count = sweep.model, len(sweep.configurations)
    vocab, value = model.config.padded_vocab_size, head_value_bytes(model)
    factored = factors_head(model, rows, [c.adapters for c in sweep.configurations], training=True)
    if factored:  # a graph keeps its dropped-out taps, or its share of the sweep's taps
        kept = [c for c in sweep.configurations if c.model_config.lora_dropout or c.adapters.reads != sweep.reads]
        head = value * rows * vocab + sum(dropout_input_bytes(model, c, rows) for c in kept)
    else:
        lanes = lane_count(model, count)
        validation_rows = rows * head_group_size(model, rows, math.ceil(count / lanes), training=False)
        head = lanes * 4 * vocab * max(3 * rows, 2 * validation_rows)
    trained = sum(configuration_bytes(c, vocab, factored) for c in sweep.configurations)
    needed = head + trained + shared_mask_bytes(sweep, rows)
    if sweep.is_sweep and needed > available:
        raise MemoryError(
            f"The sweep's {count} configurations need about {needed / 1e9:.1f} GB for {rows} rows a micro-batch, more"
            f" than the {available / 1e9:.1f} GB free: sweep fewer values or lower --train.micro_batch_size."
        )


def head_value_bytes(model: GPT) -> int:
    """The size of a value the head computes: in the autocast's dtype when there is one, else in its weights'."""
    weight = model.lm_head.linear.weight
    autocast = torch.is_autocast_enabled(weight.device.type)
    return torch.get_autocast_dtype(weight.device.type).itemsize if autocast else weight.element_size()


def dropout_input_bytes(model: GPT, c: Configuration, rows: int) -> int:
    """The size of ``c``'s masks on ``rows`` rows: the taps its adapters read and its LoRA layers' inputs."""
    layers = {model.get_submodule(name.rpartition(".")[0]) for name in c.lora}
    features = len(c.adapters.reads.blocks) * model.config.n_embd
    features += sum(layer.linear.in_features for layer in layers if isinstance(layer, LoRALayer))
    return rows * features * model.lm_head.linear.weight.element_size()


def shared_mask_bytes(sweep: Sweep, rows: int) -> int:
    """What :class:`~litgpt_skip2lora.dropout.SharedMasks` holds through a step: a mask is kept until every stream
    that began in its state took it, so one configuration's masks per way of drawing in each shared state."""
    device = sweep.model.lm_head.linear.weight.device.type
    roots = [root(c.rng[device]) for c in sweep.configurations]
    states, ways = Counter(roots), {}
    for c, state in zip(sweep.configurations, roots):
        if states[state] > 1 and c.model_config.lora_dropout:
            ways.setdefault((state, c.model_config.lora_dropout, c.adapters.reads), c)
    return sum(dropout_input_bytes(sweep.model, c, rows) for c in ways.values())


def build_sweep(
    fabric: L.Fabric, model: GPT, args: SweepArgs, grid: list[tuple[dict, Config]], optimizer: dict, seed: int, schedule
) -> Sweep:
    """Every configuration of the ``grid`` (:func:`configuration_configs`), each with its parameters drawn from its
    seed as a solo run draws them, its optimizer over them and its scheduler (``schedule(optimizer)``). The model
    is the longest tail's; a shorter tail trains the LoRA layers of its own blocks only."""
    trained_lora = [name for name, p in model.named_parameters() if p.requires_grad and "skip2lora." not in name]
    like = model.skip2lora.A
    configurations = []
    for values, config in grid:
        options = [getattr(config, k) for k in ADAPTER_OPTIONS]
        adapters = Adapters(reads(config), config.n_embd, *options).to(like.device, like.dtype)
        tail = [name for name in trained_lora if in_tail(name, config.skip2lora_tail_start)]
        lora = {name: own_parameter(model, name, config.lora_r) for name in tail}
        swept = {k: values[k] for k in OPTIMIZER_OPTIONS if k in values}
        spec = {**optimizer, "init_args": {**optimizer["init_args"], **swept}}
        c = Configuration(configuration_name(values), values, config, adapters, lora, values.get("seed", seed), spec)
        c.install(model)
        c.rng = initialize(model, c.parameters(), c.seed, fabric.device)
        c.optimizer = fabric.setup_optimizers(instantiate_torch_optimizer(spec, c.parameters()))
        c.scheduler = schedule(c.optimizer)
        configurations.append(c)
    configurations[0].install(model)
    return Sweep(model, configurations, args)


def own_parameter(model: GPT, name: str, r: int) -> nn.Parameter:
    """A configuration's copy of the trained parameter ``name``: a LoRA matrix at rank ``r``, drawn later
    (:func:`initialize`); any other (``benchmarks.full_tail``'s) from its values."""
    parameter, layer = model.get_parameter(name), model.get_submodule(name.rpartition(".")[0])
    if not isinstance(layer, LoRALayer):
        return nn.Parameter(parameter.detach().clone())
    rows, columns = parameter.shape
    shape = (rows // layer.r * r, columns) if name.endswith("lora_A") else (rows, r)
    return nn.Parameter(torch.empty(shape, device=parameter.device, dtype=parameter.dtype))


def in_tail(name: str, start: int) -> bool:
    """Whether the parameter ``name`` is outside the blocks, or in a block from ``start`` on."""
    block = re.match(r"transformer\.h\.(\d+)\.", name)
    return block is None or int(block[1]) >= start


def initialize(model: GPT, parameters: list[nn.Parameter], seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Draw the installed configuration's ``parameters`` from ``seed`` in its solo model's order; return the stream
    its dropout continues from."""
    own = {id(p) for p in parameters}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                mine = any(id(p) in own for p in module.parameters(recurse=False))
                if mine and isinstance(module, (Adapters, LoRALayer)):
                    module.reset_parameters()
        return rng_state(device)
