"""Layers space: a per-block token schedule on a fixed, trained parent (DiffRate's granularity).

Each block may prune patch tokens (DiffRate's pruning: the patch tokens the class token attends to least are
dropped) and then merge some of the rest (ToMe's bipartite soft matching), either of them zero, and may reuse the
previous block's attention map where it sees the same tokens (PSViT's sharing). The parent's weights are kept:
merging, pruning and sharing have no weights of their own.

A proposal is a *direction*: per block a prune rate and a merge rate in [0, 1] (relative, not yet scaled) and a
sharing flag. ``build`` projects it onto the budget, as the ``tokens`` space solves its cost fraction: it finds the
smallest scale ``lam`` at which the schedule (block ``b`` prunes ``min(1, lam * prune_b)`` of the tokens it
receives, then merges ``min(1/2, lam * merge_b)`` of the rest) costs at most the budget, so every proposal is the
mildest schedule of its direction within the budget. Schedules are monotone by construction (a block only removes).
Vectors on one ray from the origin are one direction and build one schedule (see the README's space table).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from ..models.schedule_vit import ScheduleViTConfig
from . import register_space
from .base import Inputs, Space

TRUNK_FIELDS = ("img_size", "in_chans", "num_classes", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                "qkv_bias", "class_token")
# The shipped parent's trunk (tokennas/parents/fmnist-vit/config.yaml): what `tokennas spaces` lists without one.
DEFAULT_TRUNK = {"img_size": 32, "in_chans": 1, "num_classes": 10, "patch_size": 4, "embed_dim": 64, "depth": 12,
                 "num_heads": 1, "mlp_ratio": 4.0, "qkv_bias": True, "class_token": True}
BISECTIONS = 40  # steps on the scale: its resolution (1e-12 of the range) is far below one token


class LayersSpace(Space):
    """Per-block prune and merge counts and attention reuse on ``trunk`` (a parent's fields, ``TRUNK_FIELDS``),
    projected onto ``budget`` MACs (None: no projection, only the rates as given at scale 1)."""

    name = "layers"
    description = ("A per-block schedule on a trained parent (--parent): how many patch tokens each block prunes "
                   "(DiffRate) and merges (ToMe), and whether it reuses the previous block's attention map, every "
                   "proposal projected onto the budget; scored on the parent's own weights.")
    enumerable = False  # continuous rates: proposals are built, never enumerated
    default_strategy = "frozen"

    def __init__(self, *, trunk: dict[str, Any] | None = None, budget: int | None = None) -> None:
        trunk = {**DEFAULT_TRUNK, **{k: v for k, v in (trunk or {}).items() if k in TRUNK_FIELDS}}
        if not trunk["class_token"]:
            raise ValueError("the layers space needs a parent with a class token (DiffRate's pruning scores patch "
                             "tokens by the class token's attention)")
        self.trunk, self.budget = trunk, budget

    def dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        """Per block: ``prune{b}`` and ``merge{b}``, floats in [0, 1] (given as their bounds), and ``share{b}`` for
        every block after the first."""
        dims: dict[str, tuple[Any, ...]] = {}
        for b in range(self.trunk["depth"]):
            dims[f"prune{b}"] = (0.0, 1.0)
            dims[f"merge{b}"] = (0.0, 1.0)
            if b:
                dims[f"share{b}"] = (False, True)
        return dims

    def size(self, inputs: Inputs) -> int:
        return 0  # continuous: no finite count

    def suggest(self, trial: Any, inputs: Inputs) -> ScheduleViTConfig:
        params: dict[str, Any] = {}
        for name, choices in self.dimensions(inputs).items():
            params[name] = trial.suggest_categorical(name, list(choices)) if name.startswith("share") else \
                trial.suggest_float(name, *choices)
        return self.build(params, inputs)

    def distributions(self, inputs: Inputs) -> dict[str, Any]:
        import optuna

        return {name: optuna.distributions.CategoricalDistribution(list(choices)) if name.startswith("share") else
                optuna.distributions.FloatDistribution(*choices) for name, choices in self.dimensions(inputs).items()}

    def build(self, params: dict[str, Any], inputs: Inputs) -> ScheduleViTConfig:
        depth = self.trunk["depth"]
        prune = tuple(float(params.get(f"prune{b}", 0.0)) for b in range(depth))
        merge = tuple(float(params.get(f"merge{b}", 0.0)) for b in range(depth))
        share = tuple(bool(params.get(f"share{b}", False)) for b in range(depth))
        for name, value in (("prune", prune), ("merge", merge)):
            bad = [(b, v) for b, v in enumerate(value) if not 0.0 <= v <= 1.0 or math.isnan(v)]
            if bad:
                raise ValueError(f"`{name}{bad[0][0]}` must be in [0, 1], got {bad[0][1]}")
        return _project(tuple(sorted(self.trunk.items())), prune, merge, share, self.budget)

    def starts(self, inputs: Inputs) -> dict[str, dict[str, Any]]:
        """The hand-set directions the sampler starts from (each projected onto the budget like any proposal):
        merging in every block at one rate (ToMe's rule, as a rate of the tokens left rather than a count), at a rate
        rising with depth (close to ToMe's constant count), only in the second half; pruning in every block at one
        rate (DiffRate's pruning alone), at a rate rising with depth; and both in every block. With 35 dimensions at
        12 blocks, random start-up points mostly prune the first blocks hard; these put the sampler's first model
        near the published rules, which it then refines block by block."""
        depth = self.trunk["depth"]
        rising = [(b + 1) / depth for b in range(depth)]
        late = [float(b >= depth // 2) for b in range(depth)]

        def direction(prune: list[float], merge: list[float]) -> dict[str, Any]:
            return {**{f"prune{b}": prune[b] for b in range(depth)}, **{f"merge{b}": merge[b] for b in range(depth)},
                    **{f"share{b}": False for b in range(1, depth)}}

        zero, one = [0.0] * depth, [1.0] * depth
        return {"merge, every block": direction(zero, one), "merge, rising": direction(zero, rising),
                "merge, second half": direction(zero, late), "prune, every block": direction(one, zero),
                "prune, rising": direction(rising, zero), "prune and merge, every block": direction(one, one)}

    def grid(self, inputs: Inputs):
        raise ValueError("the layers space is continuous: its candidates cannot be enumerated")

    def feasible(self, budget: int, inputs: Inputs) -> tuple[dict[str, dict[str, Any]], int]:
        """Nothing is enumerated ({}); the smallest cost is the strongest schedule's."""
        return {}, self.min_flops(inputs)

    def min_flops(self, inputs: Inputs) -> int:
        depth = self.trunk["depth"]
        return _cost(_layout(tuple(sorted(self.trunk.items())), (1.0,) * depth, (1.0,) * depth, (False,) * depth,
                             1.0))

    def parent(self) -> ScheduleViTConfig:
        return ScheduleViTConfig(**self.trunk)

    def baseline(self, budget: int, inputs: Inputs) -> ScheduleViTConfig | None:
        """ToMe's constant r (Bolya et al. 2023) on the parent: the smallest r merged in every block whose schedule
        is within ``budget`` (the parent itself when it fits); None when no r fits."""
        return tome_schedule(self.parent(), budget)

    def describe_baseline(self, config: ScheduleViTConfig) -> str:
        if not config.keep_tokens:
            return "the parent itself (it fits the budget)"
        n = config.grid**2
        return f"ToMe's constant r = {n - config.keep_tokens[0]} on the parent (the smallest r within the budget)"


def tome_schedule(parent: ScheduleViTConfig, budget: int) -> ScheduleViTConfig | None:
    """The mildest ToMe constant-r schedule of ``parent`` within ``budget`` MACs (r = 0: the parent)."""
    n0 = parent.grid**2
    for r in range(n0):
        keep, n = [], n0
        for _ in range(parent.depth):
            n = max(1, n - min(r, (n + 1) // 2))
            keep.append(n)
        config = parent.replace(reduce_kind="merge", keep_tokens=tuple(keep) if r else ())
        if sum(config.flops_by_module().values()) <= budget:
            return config
    return None


def _layout(trunk: tuple[tuple[str, Any], ...], prune: tuple[float, ...], merge: tuple[float, ...],
            share: tuple[bool, ...], lam: float) -> ScheduleViTConfig:
    """The schedule of one direction at scale ``lam``, as a valid config."""
    t = dict(trunk)
    n = (t["img_size"] // t["patch_size"]) ** 2
    pruned_to, keep, seen = [], [], []
    for b in range(t["depth"]):
        seen.append(n)
        after_prune = max(1, n - math.floor(min(1.0, lam * prune[b]) * n))
        removed = min(math.floor(min(0.5, lam * merge[b]) * after_prune), (after_prune + 1) // 2, after_prune - 1)
        pruned_to.append(after_prune)
        n = after_prune - removed
        keep.append(n)
    reduces = [keep[b] < seen[b] for b in range(t["depth"])]
    shared = tuple(b for b in range(1, t["depth"])
                   if share[b] and not reduces[b] and not reduces[b - 1] and seen[b] == seen[b - 1])
    if not any(reduces):
        return ScheduleViTConfig(**t, share_attn=shared)
    return ScheduleViTConfig(**t, reduce_kind="prune_merge", keep_tokens=tuple(keep), prune_tokens=tuple(pruned_to),
                             share_attn=shared)


def _cost(config: ScheduleViTConfig) -> int:
    return sum(config.flops_by_module().values())


@lru_cache(maxsize=65536)
def _project(trunk: tuple[tuple[str, Any], ...], prune: tuple[float, ...], merge: tuple[float, ...],
             share: tuple[bool, ...], budget: int | None) -> ScheduleViTConfig:
    """The mildest schedule of the direction within ``budget``: bisection on the scale (the invariant: the upper end
    is within the budget); the strongest schedule of the direction when even that is over (told infeasible)."""
    if budget is None:
        return _layout(trunk, prune, merge, share, 1.0)
    if _cost(_layout(trunk, prune, merge, share, 0.0)) <= budget:
        return _layout(trunk, prune, merge, share, 0.0)
    positive = [w for w in prune + merge if w > 0]
    if not positive:
        return _layout(trunk, prune, merge, share, 0.0)  # nothing may be removed: over budget, told infeasible
    lo, hi = 0.0, 2.0 / min(positive)  # at hi every positive rate is saturated: the direction's strongest schedule
    if _cost(_layout(trunk, prune, merge, share, hi)) > budget:
        return _layout(trunk, prune, merge, share, hi)
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _cost(_layout(trunk, prune, merge, share, mid)) <= budget else (mid, hi)
    return _layout(trunk, prune, merge, share, hi)


register_space(LayersSpace())
