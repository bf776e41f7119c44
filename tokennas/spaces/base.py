"""What a search space is: named dimensions of choices and a pure function from a choice to a config."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from typing import Any

from ..config import ModelConfig, config_key


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the data fixes about every candidate."""

    img_size: int = 32
    in_chans: int = 1
    num_classes: int = 10


class Space:
    """A search space: ``dimensions(inputs)`` lists the choices, ``build`` maps a choice to a config.

    Subclasses set ``name`` and ``description`` and implement ``dimensions`` and ``build``. Every
    combination of choices must build a valid config, so that a sampled candidate has one encoding
    and the cost is a pure function of it (the sampler can then be told about infeasibility).
    """

    name: str = ""
    description: str = ""

    def dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        raise NotImplementedError

    def build(self, params: dict[str, Any], inputs: Inputs) -> ModelConfig:
        raise NotImplementedError

    def unused(self, params: dict[str, Any], inputs: Inputs) -> set[str]:
        """Dimensions that have no effect given the choices made so far (in ``dimensions`` order)."""
        return set()

    def asked(self, params: dict[str, Any], inputs: Inputs) -> dict[str, Any]:
        """The part of a full choice ``params`` that ``suggest`` asks for: the dimensions with an effect."""
        so_far, asked = {}, {}
        for name, choices in self.dimensions(inputs).items():
            if name in self.unused(so_far, inputs):
                so_far[name] = choices[0]
            else:
                so_far[name] = asked[name] = params[name]
        return asked

    def completed(self, asked: dict[str, Any], inputs: Inputs) -> dict[str, Any] | None:
        """The full choice that ``suggest`` builds from the answers ``asked`` (the inverse of ``asked``): every
        dimension without effect at its first choice; None when a dimension with an effect is not answered."""
        params: dict[str, Any] = {}
        for name, choices in self.dimensions(inputs).items():
            if name in self.unused(params, inputs):
                params[name] = choices[0]
            elif name in asked:
                params[name] = asked[name]
            else:
                return None
        return params

    def suggest(self, trial: Any, inputs: Inputs) -> ModelConfig:
        """Optuna define-by-run: ask for every dimension that has an effect, then build the config. A
        dimension without effect is not asked (its first choice stands in), so the sampler does not
        spread its model over parameters that change nothing. Evenly spaced numbers are asked as Optuna
        ints or stepped floats, so that the sampler models their order (``ask``)."""
        params: dict[str, Any] = {}
        for name, choices in self.dimensions(inputs).items():
            params[name] = choices[0] if name in self.unused(params, inputs) else ask(trial, name, choices)
        return self.build(params, inputs)

    def distributions(self, inputs: Inputs) -> dict[str, Any]:
        """The Optuna distribution each dimension is asked with, by name (for checking a stored study)."""
        import optuna

        dims = self.dimensions(inputs)
        trial = optuna.trial.FixedTrial({name: choices[0] for name, choices in dims.items()})
        for name, choices in dims.items():
            ask(trial, name, choices)
        return dict(trial.distributions)

    def size(self, inputs: Inputs) -> int:
        return math.prod(len(v) for v in self.dimensions(inputs).values())

    def grid(self, inputs: Inputs) -> Iterator[dict[str, Any]]:
        dims = self.dimensions(inputs)
        for values in itertools.product(*dims.values()):
            yield dict(zip(dims, values, strict=True))

    def min_flops(self, inputs: Inputs) -> int:
        """The smallest cost any candidate reaches, by exhaustive analytic count."""
        return min(sum(self.build(p, inputs).flops_by_module().values()) for p in self.grid(inputs))

    def max_flops(self, inputs: Inputs) -> int:
        """The largest cost any candidate reaches, by exhaustive analytic count: a budget at or above it constrains
        nothing."""
        return max(sum(self.build(p, inputs).flops_by_module().values()) for p in self.grid(inputs))

    def feasible(self, budget: int, inputs: Inputs) -> tuple[dict[str, dict[str, Any]], int]:
        """The distinct configs within ``budget`` (canonical config key -> one parameter set that builds it),
        and the smallest cost in the space. Many parameter sets can build one config (a pooling kind with
        no pooling, say); a candidate is its config."""
        feasible, smallest = {}, None
        for params in self.grid(inputs):
            config = self.build(params, inputs)
            flops = sum(config.flops_by_module().values())
            smallest = flops if smallest is None else min(smallest, flops)
            if flops <= budget:
                feasible.setdefault(config_key(config), params)
        return feasible, smallest

    def starts(self, inputs: Inputs) -> dict[str, dict[str, Any]]:
        """Named parameter sets the sampler is handed first (``enqueue_trial``), before its own proposals: a space's
        published hand-set designs, where the sampler would otherwise start from random points. None by default."""
        return {}

    def baseline(self, budget: int, inputs: Inputs) -> ModelConfig | None:
        """DeiT's recipe within ``budget``: depth 12 (fewer only if nothing fits), heads of 64 channels,
        no pooling, no sharing, the widest such ViT. For comparison with what the search finds."""
        from ..models.schedule_vit import ScheduleViTConfig

        for depth in (12, 10, 8, 6, 4, 2, 1):
            fits = []
            for width in (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
                config = ScheduleViTConfig(img_size=inputs.img_size, in_chans=inputs.in_chans,
                                           num_classes=inputs.num_classes, patch_size=uniform_patch(inputs.img_size),
                                           embed_dim=width, num_heads=max(1, width // 64), depth=depth)
                if sum(config.flops_by_module().values()) <= budget:
                    fits.append(config)
            if fits:
                return fits[-1]
        return None


def ask(trial: Any, name: str, choices: tuple[Any, ...]) -> Any:
    """One dimension from an Optuna trial. Evenly spaced numbers are an int or a stepped float (the sampler then
    models their neighbourhoods; a float is snapped to its choice, against rounding); anything else, unevenly
    spaced numbers included, is categorical: an Optuna distribution cannot list arbitrary values in order."""
    numbers = len(choices) > 1 and all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices)
    steps = {round(b - a, 9) for a, b in itertools.pairwise(choices)} if numbers else set()
    if len(steps) != 1 or min(steps) <= 0:
        return trial.suggest_categorical(name, list(choices))
    step = steps.pop()
    if all(isinstance(c, int) for c in choices):
        return trial.suggest_int(name, choices[0], choices[-1], step=int(step))
    value = trial.suggest_float(name, choices[0], choices[-1], step=step)
    return min(choices, key=lambda c: abs(c - value))


def uniform_patch(img_size: int) -> int:
    """The DeiT-style patch for a resolution: 16 at ImageNet scale, else the divisor giving about an 8x8 grid."""
    if img_size >= 128 and img_size % 16 == 0:
        return 16
    return min((p for p in range(1, img_size + 1) if img_size % p == 0), key=lambda p: abs(img_size / p - 8))
