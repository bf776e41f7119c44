"""Search settings: every option of `tokennas search`, validated, and stored as ``search.yaml``.

The driver and the reports both depend on this module, and not on each other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import yaml

from ..data import AUGMENTS, EMBEDDED
from ..flops import format_flops, parse_budget
from ..spaces import get_space
from .studies import study as S

SCHEDULERS = ("asha", "fifo")


# seeds are offset by the trials so far (and a driver's process id) before Optuna takes them (at most 2**32 - 1)
MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """Everything a search needs; stored as ``search.yaml`` in the run folder."""

    space: str
    flops: str  # the budget as typed, e.g. "30M"
    trials: int = 12  # trained candidates; over-budget, repeated and failed proposals don't count
    epochs: int = 3
    objective: str = "acc"
    sampler: str = "tpe"
    scheduler: str = "asha"
    seed: int = 0
    sampler_seed: int | None = None  # None: --seed; seeds the proposals only (the sampler and the stall fallback)
    dataset: str = EMBEDDED
    data_dir: str | None = None
    img_size: int = 32
    train_subset: int | None = None
    batch_size: int = 64
    lr: float = 3e-3
    gpus_per_trial: float | None = None  # None: 1 when CUDA is present, else 0
    cpus_per_trial: float = 1.0
    time_budget: str | None = None  # e.g. "30m"; the search stops gracefully
    top: int = 5
    max_failures: int = 3  # failed trials (an exception, a non-finite loss) before the search stops
    retrain_top: int = 3  # candidates retrained from scratch after the search, with the baseline
    retrain_epochs: int = 6
    retrain_seeds: int = 2
    augment: str = "auto"
    recipe: str = "default"  # deit: DeiT's RandAugment, random erasing, Mixup/CutMix, label smoothing (long runs)
    scorer_weights: str | None = None  # lcnet_050 weights that put the quadtree space's `feature` scorer in play
    # where it runs and where the study lives (see cluster.py and storage.py)
    ray_address: str | None = None  # None/local: a private Ray; auto; HOST:PORT; ray://HOST:PORT
    ray_storage: str | None = None  # Ray Tune's storage_path (shared filesystem or cloud URI); None: RUN_DIR/ray
    storage: str | None = None  # Optuna storage URL, password never stored; None: RUN_DIR/study.db
    study_name: str = S.STUDY_NAME
    heartbeat: int = 30  # seconds between heartbeats of a shared RDB study; a trial is lost after twice that
    # how candidates are evaluated (search/strategies/): standalone training, or scoring on a supernet's shared weights
    strategy: str = "standalone"
    parent: str | None = None  # oneshot: the supernet's weights (tokennas checkpoint or timm ViT/DeiT state dict)
    supernet_epochs: int | None = None  # oneshot: None = 6 (0 with a parent whose classifier fits the data)
    finetune_epochs: int = 0  # oneshot: re-ranking fine-tunes from the supernet for this many epochs (0: scratch)
    score_images: int = 2000  # oneshot: validation images each candidate is scored on (the first N of the split)
    diff_steps: int = 200  # differentiable: optimisation steps of the per-block rates
    diff_lr: float = 0.05  # differentiable: Adam's learning rate on the rates' logits
    # frozen: the predicted latency (tokennas.latency, measured on this machine) as a budget and/or a Pareto objective
    latency: float | None = None  # ms per forward at latency_batch; a proposal predicted slower is infeasible
    latency_batch: int = 1  # images per forward the latency is predicted at

    # what `--resume RUN` may change; everything else is fixed by search.yaml
    RESUMABLE = ("trials", "time_budget", "max_failures", "retrain_top", "retrain_epochs", "retrain_seeds", "top",
                 "ray_address", "heartbeat")

    @property
    def proposal_seed(self) -> int:
        """What seeds the proposals (the sampler, the stall fallback): ``--sampler-seed``, else ``--seed``."""
        return self.seed if self.sampler_seed is None else self.sampler_seed

    @property
    def budget(self) -> int:
        """MACs; ``--flops 50%`` is a share of the parent's uniform ViT at ``--img-size``."""
        return parse_budget(self.flops, parent_flops(self.parent, self.img_size) if self.parent and
                            str(self.flops).strip().endswith("%") else None)

    def validate(self) -> None:
        """One ``ValueError`` naming the first bad option."""
        get_space(self.space)
        self.budget  # noqa: B018  (raises on a bad budget)
        checks = [
            (self.trials >= 1, f"invalid --trials {self.trials}; expected at least 1"),
            (self.epochs >= 1, f"invalid --epochs {self.epochs}; expected at least 1"),
            (self.objective in S.OBJECTIVES, f"invalid --objective {self.objective!r}; expected one of: "
                                             f"{', '.join(S.OBJECTIVES)}"),
            (self.sampler in S.SAMPLERS, f"invalid --sampler {self.sampler!r}; expected one of: "
                                         f"{', '.join(S.SAMPLERS)}"),
            (self.scheduler in SCHEDULERS, f"invalid --scheduler {self.scheduler!r}; expected one of: "
                                           f"{', '.join(SCHEDULERS)}"),
            *((0 <= value <= MAX_SEED, f"invalid --{name.replace('_', '-')} {value}; expected an integer from 0 to "
               f"{MAX_SEED}") for name, value in (("seed", self.seed), ("sampler_seed", self.sampler_seed))
              if value is not None),
            (self.batch_size >= 1, f"invalid --batch-size {self.batch_size}; expected at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, f"invalid --lr {self.lr}; expected a positive number"),
            (self.max_failures >= 1, f"invalid --max-failures {self.max_failures}; expected at least 1"),
            (self.retrain_top >= 0, f"invalid --retrain-top {self.retrain_top}; expected 0 (no re-ranking) or more"),
            (self.retrain_epochs >= 1, f"invalid --retrain-epochs {self.retrain_epochs}; expected at least 1"),
            (self.retrain_seeds >= 1, f"invalid --retrain-seeds {self.retrain_seeds}; expected at least 1"),
            (self.augment in AUGMENTS, f"invalid --augment {self.augment!r}; expected one of: {', '.join(AUGMENTS)}"),
            (self.scorer_weights is None or Path(self.scorer_weights).is_file(),
             f"invalid --scorer-weights {self.scorer_weights!r}; expected an existing lcnet_050 weights file"),
            (self.cpus_per_trial > 0, f"invalid --cpus-per-trial {self.cpus_per_trial}; expected > 0"),
            (self.gpus_per_trial is None or self.gpus_per_trial >= 0,
             f"invalid --gpus-per-trial {self.gpus_per_trial}; expected >= 0"),
            (self.top >= 1, f"invalid --top {self.top}; expected at least 1"),
            (self.latency is None or (math.isfinite(self.latency) and self.latency > 0),
             f"invalid --latency {self.latency}; expected a positive number of milliseconds"),
            (self.latency_batch >= 1, f"invalid --latency-batch {self.latency_batch}; expected at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        from ..train import TrainSettings

        TrainSettings(batch_size=self.batch_size, recipe=self.recipe)  # the recipe's own checks (train.py)
        if self.sampler == "cmaes" and getattr(get_space(self.space), "enumerable", True):
            raise ValueError(f"invalid --sampler cmaes for --space {self.space}: CMA-ES models continuous parameters "
                             f"and {self.space}'s are categorical (it would draw them at random); use tpe, nsga2 or "
                             "random, or cmaes with --space layers")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.gpus_per_trial and self.local_ray:  # a cluster's GPUs are checked once it is joined
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"invalid --gpus-per-trial {self.gpus_per_trial}: CUDA is not available on this "
                                 "machine; use 0 or leave it unset")
        self.validate_cluster()

    def validate_cluster(self) -> None:
        """The cluster and storage options: form only, no I/O (connections are checked by storage.py and
        cluster.py)."""
        from .studies import storage
        from .tune import cluster

        cluster.check_address(self.ray_address)
        storage.check_url(self.storage)
        if not self.study_name or not str(self.study_name).strip():
            raise ValueError(f"invalid --study-name {self.study_name!r}; expected a non-empty name")
        if self.heartbeat < 1:
            raise ValueError(f"invalid --heartbeat {self.heartbeat}; expected at least 1 second")

    @property
    def uses_latency(self) -> bool:
        """The search predicts latency: a latency objective or a latency budget."""
        return self.objective == "pareto-latency" or self.latency is not None

    @property
    def local_ray(self) -> bool:
        return self.ray_address in (None, "local")

    def gpus(self) -> float:
        """GPUs per trial: as asked, else 1 where CUDA is present (on this machine, or in the joined cluster)."""
        if self.gpus_per_trial is not None:
            return self.gpus_per_trial
        if not self.local_ray:
            from .tune.cluster import has_gpus

            return 1.0 if has_gpus() else 0.0
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0

    def space_object(self, inputs=None):
        """The search space, with the quadtree scorer's weights when they are given; the ``layers`` space on the
        parent's trunk at the data's ``inputs``."""
        space = get_space(self.space)
        if self.space == "layers":
            if not self.parent:
                raise ValueError("--space layers needs --parent (a trained ViT: a shipped parent's name such as "
                                 "fmnist-vit, a `tokennas train` checkpoint.pt or a timm ViT/DeiT state dict)")
            from ..models.supernet import parent_uniform_config

            trunk = parent_uniform_config(self.parent, self.img_size).to_dict()
            if inputs is not None:
                trunk.update(in_chans=inputs.in_chans, num_classes=inputs.num_classes)
            return type(space)(trunk=trunk, budget=self.budget)
        if self.scorer_weights and hasattr(space, "scorer_checkpoint"):
            space = type(space)(scorer_checkpoint=str(Path(self.scorer_weights).resolve()))
        if self.space == "tokens":  # schedules are fractions of the budget, on the parent's trunk when there is one
            from ..models.supernet import parent_trunk

            space = type(space)(budget=self.budget, trunk=parent_trunk(self.parent) if self.parent else None)
        return space


@functools.lru_cache(maxsize=16)
def parent_flops(parent: str, img_size: int) -> int:
    from ..models.supernet import parent_uniform_config

    return sum(parent_uniform_config(parent, img_size).flops_by_module().values())


# Budgets such as "4G" are written at ImageNet's 224px (DeiT-S: 4.6G); the resolutions a refusal may name.
CONVENTION_PX = 224
RESOLUTIONS = (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)


@functools.lru_cache(maxsize=64)
def largest_candidate(space: str, img_size: int, in_chans: int) -> int:
    """MACs of the space's costliest candidate at a resolution (10 classes: the head barely counts)."""
    from ..spaces.base import Inputs

    return get_space(space).max_flops(Inputs(img_size, in_chans, 10))


def with_defaults(options: dict) -> tuple[dict, str | None]:
    """Options left unset (None) on the command line, resolved, and a one-line notice to print when the
    resolution was chosen for the budget. ``--strategy`` is the space's default strategy (``frozen`` for
    ``layers``, else ``standalone``). ``--img-size`` is the parent's resolution with a --parent, else the data's
    own (32 for the embedded data, 224 for image folders and timm datasets); a budget that constrains nothing
    there (at or above the space's costliest candidate) is counted at 224px, the convention it is written in.
    An explicit ``--img-size`` at which the budget constrains nothing is refused (``ValueError``)."""
    options = dict(options)
    space = get_space(options["space"])
    if options.get("strategy") is None:
        options["strategy"] = getattr(space, "default_strategy", "standalone")
    explicit = options.get("img_size") is not None
    if not explicit:
        options["img_size"] = 32 if options.get("dataset", EMBEDDED) == EMBEDDED else CONVENTION_PX
        if options.get("parent"):
            from ..models.supernet import parent_uniform_config

            try:
                options["img_size"] = parent_uniform_config(options["parent"]).img_size
            except ValueError:
                pass  # a bad --parent is refused by the validation, after the options that come first
    # with a parent (layers, or a trunk that fixes the resolution) the parent's resolution stands
    if options.get("parent") or not getattr(space, "enumerable", True):
        return options, None
    return options, fit_resolution(options, explicit)


def fit_resolution(options: dict, explicit: bool) -> str | None:
    """Moves an implicit resolution to 224px when the budget constrains nothing at it (returns the notice), and
    refuses an explicit one (or a budget that binds at no resolution up to 512px)."""
    flops, name, size = options["flops"], options["space"], options["img_size"]
    budget = parse_budget(flops)
    chans = 1 if options.get("dataset", EMBEDDED) == EMBEDDED else 3
    largest = largest_candidate(name, size, chans)
    if budget < largest:
        return None
    why = f"the largest {name} candidate costs {format_flops(largest)} at {size}px"
    if not explicit and size < CONVENTION_PX and largest_candidate(name, CONVENTION_PX, chans) > budget:
        options["img_size"] = CONVENTION_PX
        return f"--flops {flops} constrains nothing at {size}px ({why}); searching at {CONVENTION_PX}px"
    implied = next((r for r in RESOLUTIONS if r > size and largest_candidate(name, r, chans) > budget), None)
    hint = f"it is a budget for {implied}px (--img-size {implied})" if implied else \
        f"it binds at no resolution up to {RESOLUTIONS[-1]}px; lower it"
    raise ValueError(f"invalid --flops {flops} at --img-size {size}: it constrains nothing there ({why}); {hint}")


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = str(text).strip().lower()
    try:
        value = float(raw[:-1]) * units[raw[-1]] if raw[-1:] in units else float(raw)
    except (ValueError, IndexError):
        value = -1
    if value <= 0:
        raise ValueError(f"invalid --time-budget {text!r}; expected a duration such as 90s, 30m or 2h")
    return value


def load_settings(run_dir: Path) -> SearchSettings:
    path = run_dir / "search.yaml"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a tokennas run folder (no search.yaml)")
    stored = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(SearchSettings)}
    return SearchSettings(**{k: v for k, v in stored.items() if k in known})


def save_settings(settings: SearchSettings, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(dataclasses.asdict(settings), sort_keys=False))
    tmp.replace(path)
