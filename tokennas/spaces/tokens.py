"""Token-schedule space: a monotone per-block token schedule, its mechanism and attention sharing.

A monotone per-block token schedule, the reduction mechanism (pool, merge or prune) and attention sharing,
on a fixed or searched trunk. The schedule is not enumerated token by token: a ``shape`` (how removal is spread
over the blocks), a ``start`` (the first block allowed to reduce) and a ``cost`` (the fraction of the budget to
aim at) give the mildest schedule of that shape whose MACs are within ``cost * budget`` (``schedule``). Many
such choices build one config (once a trunk fits unreduced, the rest changes nothing), so the sampler is asked one
integer instead: the position of a candidate among the distinct configs they build, by MACs. Merging is
ToMe's bipartite soft matching (Bolya et al. 2023), pruning EViT's top-k with a fused token (Liang et al.
2022), pooling PSViT's 2D max pooling of the token grid (Chen et al. 2021).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Any

from ..config import config_key
from ..models.layers import block_flops, ln_flops, pooled_length, reduction_flops
from ..models.schedule_vit import ScheduleViTConfig
from . import register_space
from .base import Inputs, Space, uniform_patch

TRUNK_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "class_token")
# Searched trunk without a parent: small ViTs for 32px inputs and budgets around 15M MACs.
SEARCHED_TRUNK = {"embed_dim": (48, 64, 96, 128), "depth": (4, 6, 8, 12), "num_heads": (2, 4)}
MECHANISMS = ("merge", "prune", "pool")
COSTS = (0.6, 0.7, 0.8, 0.9, 1.0)  # fraction of the budget (of the unreduced trunk's cost without a budget)
# How the removal grows over the reducing blocks, t in (0, 1]: the share of the final removal done by then.
SHAPES = {"constant": lambda t: t,  # the same number of tokens per block, ToMe's constant r
          "front": lambda t: 1 - (1 - t) ** 2,  # most of it early
          "back": lambda t: t * t}  # most of it late
STARTS = (0.0, 0.25)  # first block allowed to reduce, as a fraction of the depth (EViT starts at a quarter)
SHARING = ("none", "alternate")


class TokensSpace(Space):
    """Token schedules on a trunk. ``budget``: MACs the ``cost`` fractions refer to (None: the trunk's own
    unreduced cost). ``trunk``: fields of a parent config to keep fixed (any of ``TRUNK_FIELDS``)."""

    name = "tokens"
    description = ("A monotone per-block token schedule, the reduction mechanism (pool, merge or prune) and "
                   "attention sharing, on a fixed or searched trunk; a candidate is one of the distinct schedules, "
                   "solved from a fraction of the budget and a shape, within the budget, in order of MACs.")

    def __init__(self, *, budget: int | None = None, trunk: dict | None = None) -> None:
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"`budget` must be a positive number of MACs or None, got {budget!r}")
        trunk = dict(trunk or {})
        unknown = sorted(set(trunk) - set(TRUNK_FIELDS))
        if unknown:
            raise ValueError(f"`trunk`: unknown field {unknown[0]!r}; expected any of {', '.join(TRUNK_FIELDS)}")
        self.budget = budget
        self.trunk = trunk

    def schedule_dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        """What a schedule is solved from: the trunk, the mechanism, the cost fraction, the shape, the start and the
        sharing. Many of these choices build one config (a trunk that fits unreduced ignores the rest), so the
        sampler is not asked them (``dimensions``)."""
        trunk = {name: (self.trunk[name],) if name in self.trunk else choices
                 for name, choices in SEARCHED_TRUNK.items()}
        # A fixed width or head count leaves only the choices of the other that divide into a valid trunk.
        trunk["embed_dim"] = tuple(d for d in trunk["embed_dim"] if any(d % h == 0 for h in trunk["num_heads"]))
        trunk["num_heads"] = tuple(h for h in trunk["num_heads"] if all(d % h == 0 for d in trunk["embed_dim"]))
        return {**trunk, "mechanism": MECHANISMS, "cost": COSTS, "shape": tuple(SHAPES), "start": STARTS,
                "attn_sharing": SHARING}

    def schedule(self, params: dict[str, Any], inputs: Inputs) -> ScheduleViTConfig:
        """The config solved from one choice of every ``schedule_dimensions``."""
        trunk = self._trunk(params, inputs)
        keep, pool_after, share_attn = _solve(trunk, params["mechanism"], params["cost"], params["shape"],
                                              params["start"], params["attn_sharing"], self.budget)
        return ScheduleViTConfig(**dict(trunk), pool_kind="max2d" if pool_after else "max1d", pool_after=pool_after,
                                 keep_tokens=keep, reduce_kind=params["mechanism"] if keep else "merge",
                                 share_attn=share_attn)

    def candidates(self, inputs: Inputs) -> tuple[ScheduleViTConfig, ...]:
        """The distinct configs the schedules build, by MACs (then by config): those within the budget when one is
        set and any fits, else all."""
        return _candidates(self, inputs)

    def dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        """One ordered integer: the position of a candidate among ``candidates``, so that every value is one
        config (conditional parameters cannot get there: whether a trunk fits unreduced depends on the budget)."""
        return {"candidate": tuple(range(len(self.candidates(inputs))))}

    def build(self, params: dict[str, Any], inputs: Inputs) -> ScheduleViTConfig:
        configs = self.candidates(inputs)
        index = params.get("candidate")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(configs):
            raise ValueError(f"`candidate` must be an integer from 0 to {len(configs) - 1}, got {index!r}")
        return configs[index]

    def _trunk(self, params: dict[str, Any], inputs: Inputs) -> tuple[tuple[str, Any], ...]:
        fixed = {"mlp_ratio": 4.0, "patch_size": uniform_patch(inputs.img_size), "class_token": True,
                 **{k: v for k, v in self.trunk.items() if k not in SEARCHED_TRUNK}}
        return (("img_size", inputs.img_size), ("in_chans", inputs.in_chans), ("num_classes", inputs.num_classes),
                *((k, params[k]) for k in SEARCHED_TRUNK), *sorted(fixed.items()))


def _candidates(space: TokensSpace, inputs: Inputs) -> tuple[ScheduleViTConfig, ...]:
    return _candidates_of(space.budget, tuple(sorted(space.trunk.items())), inputs)


@lru_cache(maxsize=32)
def _candidates_of(budget: int | None, trunk: tuple[tuple[str, Any], ...], inputs: Inputs
                   ) -> tuple[ScheduleViTConfig, ...]:
    space = TokensSpace(budget=budget, trunk=dict(trunk))
    dims = space.schedule_dimensions(inputs)
    found = {}
    for values in itertools.product(*dims.values()):
        config = space.schedule(dict(zip(dims, values, strict=True)), inputs)
        found.setdefault(config_key(config), config)
    ranked = sorted((sum(c.flops_by_module().values()), key, c) for key, c in found.items())
    within = [c for macs, _, c in ranked if budget is None or macs <= budget]
    return tuple(within or (c for _, _, c in ranked))


@lru_cache(maxsize=4096)
def _unreduced_cost(trunk: tuple[tuple[str, Any], ...]) -> int:
    return sum(ScheduleViTConfig(**dict(trunk)).flops_by_module().values())


@lru_cache(maxsize=65536)
def _solve(trunk: tuple[tuple[str, Any], ...], mechanism: str, cost: float, shape: str, start: float, sharing: str,
           budget: int | None) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(keep_tokens, pool_after, share_attn) of the mildest schedule within ``cost`` times the budget, found by
    bisection on the amount (costs fall with it, up to the small matching and scoring terms and sharing, which
    only blocks that keep their tokens may use); the strongest schedule when none is within it."""
    t = dict(trunk)
    target = cost * (budget if budget is not None else _unreduced_cost(trunk))
    schedule = _Schedule(t, mechanism, SHAPES[shape], round(start * t["depth"]), sharing)
    lo, hi = 0, schedule.max_amount
    if schedule.cost(lo) <= target:
        hi = lo
    elif schedule.cost(hi) <= target:
        while hi - lo > 1:  # invariant: amount lo is over the target, amount hi within it
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if schedule.cost(mid) <= target else (mid, hi)
    return schedule.layout(hi)


class _Schedule:
    """The schedules of one shape on one trunk, indexed by the amount (the patch tokens the shape removes by the
    last block, before clipping at one token and at the mechanism's limits), with their cost in closed form
    (the terms of ``ScheduleViTConfig.flops_by_module``, without building a config)."""

    def __init__(self, trunk: dict[str, Any], mechanism: str, shape: Any, start: int, sharing: str) -> None:
        self.D, self.depth, self.heads = trunk["embed_dim"], trunk["depth"], trunk["num_heads"]
        self.mlp_ratio, self.prefix = trunk["mlp_ratio"], int(trunk["class_token"])
        self.grid = trunk["img_size"] // trunk["patch_size"]
        self.patch_tokens = self.grid**2
        self.mechanism, self.shape, self.start, self.sharing = mechanism, shape, min(start, self.depth - 1), sharing
        # The largest amount asks for a single token from the first reducing block on, whatever the shape; the
        # mechanism's own limits (merging halves at most, pooling halves the grid) then make it the strongest.
        self.max_amount = (self.patch_tokens - 1) * (self.depth - self.start)
        self.fixed = (self.patch_tokens * self.D * trunk["in_chans"] * trunk["patch_size"] ** 2
                      + self.D * trunk["num_classes"])  # patch embedding and head

    def desired(self, amount: int) -> list[int]:
        """Patch tokens the shape asks to leave each block."""
        span = self.depth - self.start
        return [self.patch_tokens if b < self.start else
                max(1, self.patch_tokens - round(amount * self.shape((b - self.start + 1) / span)))
                for b in range(self.depth)]

    def layout(self, amount: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(keep_tokens, pool_after, share_attn) of a valid config for ``amount``."""
        desired, n = self.desired(amount), self.patch_tokens
        keep, pool_after, seen = [], [], []
        grid = (self.grid, self.grid)
        for b in range(self.depth):
            seen.append(n)
            if self.mechanism == "pool":
                pooled, pooled_grid = pooled_length("max2d", n, grid)
                # Pool where the wanted count is nearer (geometrically) the pooled count than the current one.
                if b <= self.depth - 2 and n >= 2 and desired[b] <= math.sqrt(n * pooled):
                    pool_after.append(b)
                    n, grid = pooled, pooled_grid
            else:
                floor = n // 2 if self.mechanism == "merge" else 1  # merging removes at most ceil(n / 2)
                n = max(floor, 1, min(n, desired[b]))
            keep.append(n)
        reduces = [keep[b] < seen[b] and self.mechanism != "pool" for b in range(self.depth)]
        share: list[int] = []
        if self.sharing == "alternate":
            for b in range(1, self.depth):
                same_tokens = seen[b] == seen[b - 1]
                if same_tokens and not reduces[b] and b - 1 not in share:
                    share.append(b)
        if all(k == s for k, s in zip(keep, seen, strict=True)) or self.mechanism == "pool":
            keep = []  # nothing merged or pruned: the canonical empty schedule
        return tuple(keep), tuple(pool_after), tuple(share)

    def cost(self, amount: int) -> int:
        keep, pool_after, share = self.layout(amount)
        p, D, total, n = self.prefix, self.D, self.fixed, self.patch_tokens
        grid = (self.grid, self.grid)
        for b in range(self.depth):
            out = keep[b] if keep else n
            total += (block_flops(n + p, D, self.mlp_ratio, b in share, out + p)
                      + reduction_flops(self.mechanism, n, out, p, D, self.heads))
            n = out
            if b in pool_after:
                n, grid = pooled_length("max2d", n, grid)
        return total + ln_flops(n + p, D)


register_space(TokensSpace())
