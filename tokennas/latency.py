"""A latency model of one parent trunk's token schedules, measured on the machine that runs the search.

MACs do not predict latency here: at width 64 and batch 1 a merge's small ops cost more than the matmuls it saves, so
a schedule at half the parent's MACs can run slower than the parent. The model times the real submodules of one
``Block`` of the trunk (random weights: timing does not depend on them) at a grid of token counts, interleaved (every
grid point once per round, medians over the rounds):

- the attention stage (norm1, attention, residual) over N tokens, in three variants: fused SDPA; the map materialised
  because the next block shares it; a sharing block (value projection and the given map only). After the first merge
  a token-size tensor flows and attention adds log(size) to its logits: the fused and materialised variants are also
  timed on that path.
- each reduction (``TokenMerge``, ``TokenDrop``, ``TokenPrune``, ``TokenPruneMerge``) on the patch tokens it receives,
  at the mildest and strongest reduction it can do there (both, because what it keeps changes its gathers); merging
  also on the size path. Dropping and pruning only carry a size tensor along, a 1/width share of their gathers: not
  timed separately.
- the MLP stage (norm2, MLP, residual) over the tokens left.

Between grid points the tables are interpolated linearly (in the token count, and in the share of the removable tokens
removed). The rest (patch embedding, class and positional embeddings, the final norm, the head, per-block glue) is
calibrated from one whole forward of the parent timed in the same rounds: ``fixed = measured(parent) - sum of its
stages``. What a reducing block costs beyond its timed stages (the glue around a reduction inside ``Block.forward``,
which the parent does not run) is calibrated on the space's hand-set schedules at 65% of the parent's MACs
(``LayersSpace.starts``: merging, pruning and both, in every block or some), timed in the same rounds: one
``per_reduction`` time per reducing block, the least-squares fit of their residuals. The clock is the wall clock
(latency), or this process's CPU time (``clock="cpu"``, with one thread: on a shared CPU other processes' load then
stretches no step; see ``tokennas.speed``).

Measured models are cached as JSON under ``~/.cache/tokennas/latency`` (``$XDG_CACHE_HOME``), keyed by the machine
(CPU model, logical cores, torch threads, torch version, device and GPU name), the trunk, the batch size, the clock and
the grid; a file that does not read back as a model of its key, with every table entry a positive finite time, is
measured again, never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import build_model
from .flops import count_flops
from .models.layers import Block, TokenDrop, TokenMerge, TokenPrune, TokenPruneMerge
from .models.schedule_vit import ScheduleViTConfig, block_reduction
from .spaces import Inputs
from .spaces.layers import TRUNK_FIELDS, LayersSpace
from .speed import CLOCKS, forward_step, interleaved

FORMAT = 2  # bump when the tables' layout or what they time changes: older cache files are then measured again
GRID_POINTS = 8  # token counts per table; quadratic spacing, denser where tokens are few
LOCAL_FIELDS = ("cached", "cache_file")  # where this copy of a model came from: not stored in the cache file
STEP_SECONDS = 3e-4  # a timed sample repeats a short stage until it takes about this long (batch 1: ~50 us a call)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """What block ``b`` of a schedule runs, as ``ScheduleViT`` builds it: ``tokens`` patch tokens in (class token
    excluded), attention ``fused``/``map`` (materialised for the next block)/``shared``, ``sized`` when a token-size
    tensor flows in (a merge ran before), the reduction (``merge``/``drop``/``prune``/``prune_merge``, None) with the
    patch tokens left after its pruning step (``pruned``) and after it (``keep``)."""

    tokens: int
    attention: str
    sized: bool
    reduction: str | None
    pruned: int
    keep: int


def block_plans(config: ScheduleViTConfig) -> list[BlockPlan]:
    """Each block's work in ``config``, derived as ``ScheduleViT.__init__`` derives it (``block_reduction``, and the
    map materialised where the next block shares it). Pooling between blocks is not modelled: a ``ValueError``."""
    if config.pool_after:
        raise ValueError(f"`pool_after` must be empty for the latency model (it times in-block merging, pruning and "
                         f"sharing, not pooling), got {list(config.pool_after)}")
    prefix = int(config.class_token)
    seen = [t - prefix for t in config.tokens_per_block()["tokens"]]
    plans, sized = [], False
    for b, n in enumerate(seen):
        attention = "shared" if b in config.share_attn else "map" if b + 1 in config.share_attn else "fused"
        module = block_reduction(config, b, n)
        if module is None:
            kind, pruned, keep = None, n, n
        elif isinstance(module, TokenPruneMerge):
            kind, pruned, keep = "prune_merge", module.drop.keep, module.merge.keep
        elif isinstance(module, TokenMerge):
            kind, pruned, keep = "merge", n, module.keep
        elif isinstance(module, TokenDrop):  # before TokenPrune: a TokenDrop is one
            kind, pruned, keep = "drop", module.keep, module.keep
        elif isinstance(module, TokenPrune):
            kind, pruned, keep = "prune", module.keep, module.keep
        else:
            raise TypeError(f"block {b}: no latency table for {type(module).__name__}")
        plans.append(BlockPlan(n, attention, sized, kind, pruned, keep))
        sized = sized or kind in ("merge", "prune_merge")  # a merge returns sizes; dropping and pruning pass them on
    return plans


# -- where a reduction sits in its table: the share of the removable range it removes, 0 (mildest) to 1 (strongest) --
def _share(low: int, high: int, value: int) -> float:
    """Where ``value`` lies from ``low`` (0) to ``high`` (1)."""
    return 0.0 if high == low else (value - low) / (high - low)


def merge_corners(n: int) -> tuple[int, int]:
    """``keep`` of the mildest (one token merged) and strongest (half of them, bipartite matching) merge of ``n``."""
    return n - 1, n - (n + 1) // 2


def drop_corners(n: int) -> tuple[int, int]:
    """``keep`` of the mildest (one token removed) and strongest (one kept) drop or prune of ``n``."""
    return n - 1, 1


def prune_merge_corners(n: int) -> tuple[int, int]:
    """``pruned`` of the mildest (one token pruned) and strongest (two left to merge) pruning step of ``n``."""
    return n - 1, 2


REDUCTION_MIN_TOKENS = {"merge": 2, "drop": 2, "prune": 2, "prune_merge": 3}  # fewer tokens: nothing to reduce
SIZED_REDUCTIONS = ("merge", "prune_merge")  # those whose work changes on the size path (size-weighted averages)


def token_grid(patch_tokens: int, points: int = GRID_POINTS, low: int = 1) -> list[int]:
    """Patch-token counts from ``low`` to ``patch_tokens``, spaced quadratically (denser where there are few)."""
    if patch_tokens < low:
        return []
    span = patch_tokens - low
    return sorted({low + round(span * (i / (points - 1)) ** 2) for i in range(points)})


def grids(patch_tokens: int, points: int = GRID_POINTS) -> tuple[list[int], dict[str, list[int]]]:
    """The token grid of the attention and MLP tables, and each reduction's (from the fewest tokens it reduces)."""
    reduction_grid = {kind: token_grid(patch_tokens, points, low) for kind, low in REDUCTION_MIN_TOKENS.items()}
    return token_grid(patch_tokens, points), {kind: ns for kind, ns in reduction_grid.items() if ns}


def machine_fingerprint(device: torch.device) -> dict[str, Any]:
    """What a measured table depends on besides the trunk and the batch: the CPU (or GPU), cores, threads, torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def trunk_of(config: ScheduleViTConfig) -> dict[str, Any]:
    """The fields of ``config`` that the tables depend on (``TRUNK_FIELDS``)."""
    return {name: getattr(config, name) for name in TRUNK_FIELDS}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tokennas/latency``, else ``~/.cache/tokennas/latency``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokennas" / "latency"


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """Seconds per forward of any schedule of ``trunk`` at ``batch`` images, on the machine ``machine`` describes.

    ``tables``: seconds per stage at the patch-token counts ``grid`` (attention and MLP: a list over ``grid``;
    ``merge``/``drop``/``prune``: per entry of ``reduction_grid[kind]`` the mildest and strongest reduction;
    ``prune_merge``: per entry, mildest and strongest pruning step, each with the mildest and strongest merge).
    ``fixed``: seconds outside the blocks' stages (calibrated on the parent). ``per_reduction``: seconds a reducing
    block costs beyond its stages (calibrated on the hand-set schedules). ``parent_seconds``: the parent's
    measured forward. ``clock``: ``wall`` (latency) or ``cpu`` (this process's CPU time, see ``tokennas.speed``).
    ``measure_seconds``, ``measure_cpu_seconds``: how long measuring took, wall-clock and in this process's CPU time
    (on a busy machine the first is mostly other processes' time). ``cached``: read from the cache, not measured;
    ``cache_file``: the file it was read from or written to (delete it to measure again).
    """

    trunk: dict[str, Any]
    batch: int
    machine: dict[str, Any]
    clock: str
    grid: list[int]
    reduction_grid: dict[str, list[int]]
    tables: dict[str, list]
    fixed: float
    per_reduction: float
    parent_seconds: float
    measure_seconds: float
    measure_cpu_seconds: float
    cached: bool = False
    cache_file: str | None = None

    def predict(self, config: ScheduleViTConfig) -> float:
        """Predicted seconds per forward of ``config`` (a schedule of this trunk) at this batch size."""
        return self.fixed + sum(self.block_seconds(config))

    def block_seconds(self, config: ScheduleViTConfig) -> list[float]:
        """Predicted seconds of each block: its stages (attention, reduction, MLP), and ``per_reduction`` where it
        reduces."""
        self.check(config)
        return [self.attention(plan.attention, plan.tokens, plan.sized) + self.reduction(plan)
                + self.stage("mlp", plan.keep) + (self.per_reduction if plan.reduction else 0.0)
                for plan in block_plans(config)]

    def check(self, config: ScheduleViTConfig) -> None:
        """A ``ValueError`` naming the first trunk field in which ``config`` differs from the measured trunk."""
        if not isinstance(config, ScheduleViTConfig):
            raise ValueError(f"the latency model predicts schedule_vit configs, not {config.family}")
        for name, value in trunk_of(config).items():
            if value != self.trunk[name]:
                raise ValueError(f"`{name}` is {value!r} but the latency model was measured for {self.trunk[name]!r}")

    def stage(self, name: str, tokens: int) -> float:
        """Seconds of the stage ``name`` (a table over ``grid``) at ``tokens`` patch tokens."""
        return float(np.interp(tokens, self.grid, self.tables[name]))

    def attention(self, kind: str, tokens: int, sized: bool) -> float:
        """Seconds of the attention stage ``kind`` over ``tokens`` patch tokens (``sized``: with the log-size bias)."""
        name = f"attention_{kind}" + ("_sized" if sized and kind != "shared" else "")
        return self.stage(name, tokens)

    def reduction(self, plan: BlockPlan) -> float:
        """Seconds of ``plan``'s reduction: its table interpolated in the tokens received, then between the mildest
        and strongest reductions there."""
        if plan.reduction is None:
            return 0.0
        n, kind = plan.tokens, plan.reduction
        grid = self.reduction_grid[kind]
        table = self.tables[kind + ("_sized" if plan.sized and kind in SIZED_REDUCTIONS else "")]

        def at(corner: Callable[[list], float]) -> float:
            return float(np.interp(n, grid, [corner(row) for row in table]))

        if kind == "prune_merge":
            u = _share(*prune_merge_corners(n), plan.pruned)
            v = _share(*merge_corners(plan.pruned), plan.keep)
            return sum(at(lambda row, i=i, j=j: row[i][j]) * wu * wv
                       for i, wu in enumerate((1 - u, u)) for j, wv in enumerate((1 - v, v)))
        u = _share(*(merge_corners(n) if kind == "merge" else drop_corners(n)), plan.keep)
        return at(lambda row: row[0]) * (1 - u) + at(lambda row: row[1]) * u

    def record(self) -> dict[str, Any]:
        """What a search records of the model it predicted with: batch, clock, machine, the parent's measured
        milliseconds, how long measuring took and whether the model was read from the cache."""
        return {"batch": self.batch, "clock": self.clock, "machine": self.machine,
                "parent_ms": self.parent_seconds * 1e3, "measure_seconds": self.measure_seconds, "cached": self.cached,
                "cache_file": self.cache_file}

    def to_dict(self) -> dict[str, Any]:
        """Every field but ``cached`` and ``cache_file`` (where it is), as JSON takes it."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in LOCAL_FIELDS}


# -- measuring --
def _steps(trunk: dict[str, Any], batch: int, grid: list[int], reduction_grid: dict[str, list[int]],
           device: torch.device) -> dict[tuple, Callable[[], None]]:
    """One stage call per table entry, on random inputs of the right shapes (``_bunched`` adds no grad, autocast)."""
    D, heads, prefix = trunk["embed_dim"], trunk["num_heads"], int(trunk["class_token"])
    hd, scale = D // heads, (D // heads) ** -0.5
    block = Block(D, heads, trunk["mlp_ratio"], trunk["qkv_bias"]).to(device).eval()
    sharing = Block(D, heads, trunk["mlp_ratio"], trunk["qkv_bias"], share_attn=True).to(device).eval()
    inputs: dict[int, tuple] = {}

    def tensors(n: int) -> tuple:
        """x (B, N, D), sizes (B, N, 1), q and k (B, nh, N, hd) from the block's own projection, a map (B, nh, N, N)."""
        if n not in inputs:
            N = n + prefix
            x = torch.randn(batch, N, D, device=device)
            size = torch.rand(batch, N, 1, device=device) + 1
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                qkv = block.attn.qkv(block.norm1(x)).reshape(batch, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            attn = torch.randn(batch, heads, N, N, device=device).softmax(-1)
            inputs[n] = (x, size, q, k, attn)
        return inputs[n]

    def attention(blk: Block, x, shared, return_attn, size) -> Any:  # as Block.forward runs it
        y, _, _ = blk.attn(blk.norm1(x), shared, return_attn, size)
        return x + blk.drop_path1(y)

    steps: dict[tuple, Callable[[], Any]] = {}
    for n in grid:
        x, size, q, k, attn = tensors(n)
        for sized in (False, True):
            s = size if sized else None
            suffix = "_sized" if sized else ""
            steps[("attention_fused" + suffix, n)] = lambda x=x, s=s: attention(block, x, None, False, s)
            steps[("attention_map" + suffix, n)] = lambda x=x, s=s: attention(block, x, None, True, s)
        steps[("attention_shared", n)] = lambda x=x, a=attn: attention(sharing, x, a, False, None)
        steps[("mlp", n)] = lambda x=x: x + block.drop_path2(block.mlp(block.norm2(x)))
    for kind, ns in reduction_grid.items():
        for n in ns:
            x, size, q, k, _ = tensors(n)
            if kind == "prune_merge":
                modules = {(i, j): TokenPruneMerge(pruned, keep, prefix, scale)
                           for i, pruned in enumerate(prune_merge_corners(n))
                           for j, keep in enumerate(merge_corners(pruned))}
            else:
                corners = merge_corners(n) if kind == "merge" else drop_corners(n)
                modules = {(i,): TokenMerge(keep, prefix) if kind == "merge" else
                           (TokenDrop if kind == "drop" else TokenPrune)(keep, prefix, scale)
                           for i, keep in enumerate(corners)}
            for sized in (False, True) if kind in SIZED_REDUCTIONS else (False,):
                s = size if sized else None
                for corner, module in modules.items():
                    steps[(kind + ("_sized" if sized else ""), n, *corner)] = (
                        lambda m=module, x=x, s=s, q=q, k=k: m(x, s, q, k))
    return steps


def _bunched(call: Callable[[], Any], device: torch.device, seconds: float,
             inference: bool = True) -> tuple[Callable[[], None], int]:
    """``call`` repeated enough times that one bunch takes about ``seconds`` (short stages are timed in bunches), and
    the count. ``inference``: the bunch runs under no grad and bf16 autocast on CUDA, entered once per bunch as a
    model's forward enters them once for all its stages; then CUDA is synchronised."""

    def bunch(repeats: int) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=inference and device.type == "cuda"):
                for _ in range(repeats):
                    call()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    once = bunch(1)
    once()
    start = time.perf_counter()
    once()
    repeats = max(1, min(100, math.ceil(seconds / max(time.perf_counter() - start, 1e-7))))
    return bunch(repeats), repeats


def measure(trunk: ScheduleViTConfig, batch: int = 1, *, device: torch.device | str = "cpu", clock: str = "wall",
            rounds: int | None = None, points: int = GRID_POINTS) -> LatencyModel:
    """Time ``trunk``'s stages and its whole forward at ``batch`` images on ``device`` (interleaved, ``rounds`` rounds,
    default 11 at batch <= 8, else 5; ``clock`` as ``tokennas.speed.interleaved`` takes it) and return the model.
    Always measures; ``latency_model`` reads the cache first."""
    device = torch.device(device)
    if clock not in CLOCKS:
        raise ValueError(f"`clock` must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if points < 2:
        raise ValueError(f"`points` must be at least 2 (the ends of each table), got {points}")
    if trunk.pool_after or trunk.share_attn or trunk.keep_tokens:
        raise ValueError("the latency model's trunk must be a uniform parent: no pooling, sharing or reduction")
    began, began_cpu = time.perf_counter(), time.process_time()
    grid, reduction_grid = grids(trunk.grid**2, points)
    fields = trunk_of(trunk)
    steps, repeats = {}, {}
    for key, call in _steps(fields, batch, grid, reduction_grid, device).items():
        steps[key], repeats[key] = _bunched(call, device, STEP_SECONDS)
    parent = ScheduleViTConfig(**fields)
    images = torch.randn(batch, trunk.in_chans, trunk.img_size, trunk.img_size, device=device)
    # the parent timed as tokennas.speed times a model: each forward enters no grad and autocast itself
    forward = forward_step(build_model(parent), images)
    steps[("parent",)], repeats[("parent",)] = _bunched(forward, device, STEP_SECONDS, inference=False)
    calibration = calibration_schedules(parent)
    for name, config in calibration.items():
        steps[("calibration", name)], repeats[("calibration", name)] = _bunched(
            forward_step(build_model(config), images), device, STEP_SECONDS, inference=False)
    rounds = rounds or (11 if batch <= 8 else 5)
    timings = interleaved(steps, rounds, warmup=0, clock=clock)  # _bunched ran each step twice already
    seconds = {key: statistics.median(timings.seconds[key]) / repeats[key] for key in steps}

    tables: dict[str, list] = {}
    for key, value in seconds.items():
        if key[0] not in ("parent", "calibration"):
            tables.setdefault(key[0], {})[key[1:]] = value
    out: dict[str, list] = {}
    for name, entries in tables.items():
        kind = name.removesuffix("_sized")
        if kind in reduction_grid:
            ns = reduction_grid[kind]
            if kind == "prune_merge":
                out[name] = [[[entries[(n, i, j)] for j in (0, 1)] for i in (0, 1)] for n in ns]
            else:
                out[name] = [[entries[(n, i)] for i in (0, 1)] for n in ns]
        else:
            out[name] = [entries[(n,)] for n in grid]
    model = LatencyModel(trunk=fields, batch=batch, machine=machine_fingerprint(device), clock=clock, grid=grid,
                         reduction_grid=reduction_grid, tables=out, fixed=0.0, per_reduction=0.0,
                         parent_seconds=seconds[("parent",)], measure_seconds=0.0, measure_cpu_seconds=0.0)
    model = dataclasses.replace(model, fixed=seconds[("parent",)] - sum(model.block_seconds(parent)))
    # the least-squares time per reducing block of the calibration schedules' residuals (a line through 0)
    residual = np.array([seconds[("calibration", name)] - model.predict(c) for name, c in calibration.items()])
    reducing = np.array([sum(p.reduction is not None for p in block_plans(c)) for c in calibration.values()])
    per_reduction = float(residual @ reducing / (reducing @ reducing)) if reducing.any() else 0.0
    return dataclasses.replace(model, per_reduction=per_reduction, measure_seconds=time.perf_counter() - began,
                               measure_cpu_seconds=time.process_time() - began_cpu)


def calibration_schedules(parent: ScheduleViTConfig) -> dict[str, ScheduleViTConfig]:
    """The layers space's hand-set directions projected onto 65% of ``parent``'s MACs, those that reduce."""
    trunk = trunk_of(parent)
    space = LayersSpace(trunk=trunk, budget=int(0.65 * count_flops(parent)))
    inputs = Inputs(parent.img_size, parent.in_chans, parent.num_classes)
    built = {name: space.build(params, inputs) for name, params in space.starts(inputs).items()}
    return {name: config for name, config in built.items() if config.keep_tokens}


# -- the cache --
def cache_key(trunk: ScheduleViTConfig, batch: int, device: torch.device | str = "cpu", clock: str = "wall",
              points: int = GRID_POINTS) -> dict[str, Any]:
    """What a cached model must match: the format, the machine, the trunk, the batch size, the clock and the grid."""
    return {"format": FORMAT, "machine": machine_fingerprint(torch.device(device)), "trunk": trunk_of(trunk),
            "batch": batch, "clock": clock, "points": points}


def cache_path(key: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """The file of ``key`` in ``cache_dir`` (default: ``default_cache_dir()``), named by a hash of the key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir or default_cache_dir()) / f"{digest}.json"


def read_cached(path: Path, key: dict[str, Any]) -> LatencyModel | None:
    """The model cached at ``path`` when the file holds one of ``key`` whose tables have the shapes that key's grid
    gives and hold positive finite seconds; None otherwise (missing, unreadable, another key, a hole in a table)."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        stored = data["model"]
        if set(stored) != {f.name for f in dataclasses.fields(LatencyModel)} - set(LOCAL_FIELDS):
            return None
        model = LatencyModel(**stored, cached=True, cache_file=str(path))
        if [model.machine, model.trunk, model.batch, model.clock] != [key[k] for k in ("machine", "trunk", "batch",
                                                                                        "clock")]:
            return None
        shapes = {name: np.shape(table) for name, table in model.tables.items()}
        if shapes != table_shapes(ScheduleViTConfig(**model.trunk), key["points"]):
            return None
        values = np.concatenate([np.ravel(np.asarray(table, dtype=float)) for table in model.tables.values()])
        scalars = np.asarray([model.fixed, model.per_reduction, model.parent_seconds, model.measure_seconds,
                              model.measure_cpu_seconds], dtype=float)
        if not (np.all(np.isfinite(values)) and np.all(values > 0) and np.all(np.isfinite(scalars))):
            return None
        return model
    except (OSError, ValueError, TypeError, KeyError):
        return None


def table_shapes(trunk: ScheduleViTConfig, points: int = GRID_POINTS) -> dict[str, tuple[int, ...]]:
    """The shape of every table of ``trunk`` measured on a grid of ``points``."""
    grid, reduction_grid = grids(trunk.grid**2, points)
    shapes = {f"attention_{kind}{suffix}": (len(grid),) for kind in ("fused", "map") for suffix in ("", "_sized")}
    shapes.update({"attention_shared": (len(grid),), "mlp": (len(grid),)})
    for kind, ns in reduction_grid.items():
        shape = (len(ns), 2, 2) if kind == "prune_merge" else (len(ns), 2)
        shapes.update({name: shape for name in ([kind, kind + "_sized"] if kind in SIZED_REDUCTIONS else [kind])})
    return shapes


def latency_model(trunk: ScheduleViTConfig, batch: int = 1, *, device: torch.device | str = "cpu",
                  clock: str = "wall", cache_dir: str | Path | None = None, points: int = GRID_POINTS,
                  rounds: int | None = None) -> LatencyModel:
    """The latency model of ``trunk`` at ``batch`` on this machine: read from the cache when a valid file of this key
    is there (``cached=True``), else measured (``measure``, with ``rounds``) and written there, replacing whatever the
    file held. ``cache_dir`` overrides ``default_cache_dir()``."""
    key = cache_key(trunk, batch, device, clock, points)
    path = cache_path(key, cache_dir)
    model = read_cached(path, key)
    if model is not None:
        return model
    model = measure(trunk, batch, device=device, clock=clock, rounds=rounds, points=points)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "model": model.to_dict()}))
    tmp.replace(path)
    return dataclasses.replace(model, cache_file=str(path))
