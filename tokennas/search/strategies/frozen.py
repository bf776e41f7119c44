"""The frozen-parent strategy (``--strategy frozen``, the default for ``--space layers``): token schedules of a trained
ViT, scored on its own weights.

1. **The parent** (``--parent``: a shipped parent's name, a ``tokennas train`` checkpoint or a timm ViT/DeiT state
   dict) is used as it is: its classifier must fit the data. It is kept in the run folder as ``supernet.pt`` (a
   supernet of one trunk), which fine-tuning starts from.
2. **Scoring.** Optuna's sampler (``--sampler tpe``, ``cmaes`` over the continuous rates, ``nsga2`` with ``--objective
   pareto``, or ``random``) proposes schedules, each projected onto the budget by the space, starting (except
   ``random``) from the space's hand-set directions (``Space.starts``: ToMe-like and DiffRate-like rules); each new
   schedule is scored by its validation accuracy on the parent's weights, on the first ``--score-images`` images of
   the validation split (the same ``BudgetSearcher`` and scoring loop as the one-shot strategy: repeats are never scored
   twice). The space's reference, ToMe's constant r within the budget, is scored the same way.
3. **Speed.** The ``--top`` schedules and the reference are timed against the parent at batch 1 and batch 256,
   interleaved (``tokennas.speed``); the report lists their speed-ups and flags any slower than the parent. With
   ``--objective pareto-latency`` every schedule on the front of predicted latency is timed too (and at
   ``--latency-batch``): the report's front is drawn in measured latency.
4. **Fine-tuning** (optional, ``--finetune-epochs N``): the top ``--retrain-top`` schedules and the reference are
   fine-tuned from the parent's weights for N epochs on ``--retrain-seeds`` seeds, through Ray Tune, and re-ranked.

With ``--objective pareto-latency`` (accuracy against predicted latency) or a ``--latency MS`` budget, every proposal's
latency at ``--latency-batch`` images is predicted by a latency model of the parent's trunk (``tokennas.latency``),
measured on this machine before the search starts (or read from its cache); a proposal predicted over ``--latency``
is infeasible, as one over the MACs budget. The measured speed of step 3 is the check of those predictions, and the
front the report draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...config import ModelConfig, config_from_dict
from ...latency import latency_model
from ...models.supernet import Supernet, build_supernet
from ...speed import throughput_against
from ..settings import SearchSettings
from ..stages import Prepared, StageContext
from .oneshot import check_scoring, drop_baseline_unless_held, parent_weights, score_stage, supernet_path

FROZEN_SPACES = ("layers",)  # spaces whose candidates are schedules of one parent, weights unchanged
SPEED_BATCHES = (1, 256)


class Frozen:
    name = "frozen"
    stall = 4  # scoring costs seconds: the same rule as the one-shot strategy's
    # 200 schedules on 1,000 images take about 4.5 minutes on 2 cores (2,000: 9); one image in a thousand is a tenth
    # of a point, and the standard error at 0.88 is about one point (README: `make search`)
    score_images = 1000
    evaluated = "scored"
    options = ("parent", "finetune_epochs", "score_images", "latency", "latency_batch")
    no_retrain = "no --finetune-epochs: the schedules run on the parent's weights as they are"

    spaces_why = "schedules of one trained parent"  # what --space must hold, in the error's words

    def validate(self, settings: SearchSettings) -> None:
        if settings.space not in FROZEN_SPACES:
            raise ValueError(f"invalid --space {settings.space!r} for --strategy {self.name}; expected one of: "
                             f"{', '.join(FROZEN_SPACES)} ({self.spaces_why})")
        if settings.parent is None:
            raise ValueError(f"--strategy {self.name} needs --parent (a trained ViT: a shipped parent's name such as "
                             "fmnist-vit, a `tokennas train` checkpoint.pt or a timm ViT/DeiT state dict)")
        check_scoring(settings)

    def check(self, settings: SearchSettings, prepared: Prepared) -> None:
        """The parent loads, its classifier fits the data, and it runs the space's schedules and the reference; the
        latency model of its trunk is measured (or read from the cache) when the search predicts latency."""
        drop_baseline_unless_held(parent_net(settings, prepared), prepared, "the parent cannot run it")
        if settings.uses_latency:
            device = "cuda" if settings.gpus() > 0 else "cpu"  # where the schedules are scored and timed
            prepared.latency = latency_model(prepared.space.parent(), settings.latency_batch, device=device)

    def search_stage(self, ctx: StageContext) -> None:
        keep_parent(ctx)
        enqueue_starts(ctx)
        if ctx.time_left():
            score_stage(ctx, self.stall, self.search_epochs(ctx.settings))
        if ctx.time_left():
            measure_speed(ctx)

    def unfinished(self, ctx: StageContext) -> str | None:
        if speed_targets(ctx) is None:
            return None
        return "the speed of the exported schedules was not measured (a resume measures it)"

    def retrain_start(self, settings: SearchSettings, run_dir: Path, config: ModelConfig) -> dict[str, Any] | None:
        try:
            Supernet.load(supernet_path(run_dir)).check(config)
        except ValueError:
            return None
        return {"init": str(supernet_path(run_dir).resolve())}

    def search_epochs(self, settings: SearchSettings) -> int:
        return 0  # scored on the parent's weights, not trained

    def retrain_epochs(self, settings: SearchSettings) -> int:
        return settings.finetune_epochs

    def describe(self, settings: SearchSettings, run_dir: Path) -> list[str]:
        lines = [f"- strategy: frozen parent; schedules scored on the weights of --parent {settings.parent} as they "
                 f"are, on the first {settings.score_images} validation images, with no training (`scored` in "
                 "trials.csv)"]
        if settings.sampler != "random":
            lines.append("- start: the sampler's first proposals are the space's hand-set directions (merging or "
                         "pruning at one rate in every block, at a rate rising with depth, merging in the second "
                         "half, both), each projected onto the budget")
        if settings.finetune_epochs:
            lines.append(f"- re-ranking: the top {settings.retrain_top} and the reference fine-tuned from the "
                         f"parent's weights for {settings.finetune_epochs} epochs")
        if settings.uses_latency:
            budget = f"; a proposal predicted over {settings.latency:g} ms is infeasible" if settings.latency else ""
            lines.append(f"- latency: predicted per forward at batch {settings.latency_batch} by a latency model of "
                         "the parent's trunk measured on the machine that ran the search (tokennas.latency), "
                         f"`predicted_latency_ms_batch{settings.latency_batch}` in trials.csv{budget}; the measured "
                         "speed below is its check")
        return lines


def parent_net(settings: SearchSettings, prepared: Prepared) -> Supernet:
    """``--parent`` as a supernet of one trunk, its classifier fitting the data (else a ``ValueError``)."""
    inputs = prepared.inputs
    parent = parent_weights(settings, prepared)
    if not parent.head_kept:
        raise ValueError(f"invalid --parent {settings.parent!r}: its classifier does not fit the data's "
                         f"{inputs.num_classes} classes; the frozen strategy scores schedules with the parent's own "
                         "classifier (fine-tune it with `tokennas train` first)")
    return build_supernet([prepared.space.parent()], parent)


def keep_parent(ctx: StageContext) -> None:
    """The parent kept in the run as ``supernet.pt`` (a supernet of one trunk), once: what scoring and fine-tuning
    load."""
    if not supernet_path(ctx.run_dir).is_file():
        parent_net(ctx.settings, ctx.prepared).save(supernet_path(ctx.run_dir), parent=ctx.settings.parent, epochs=0)


def enqueue_starts(ctx: StageContext) -> None:
    """Hand the sampler the space's hand-set directions first (``Space.starts``), once per study: not with ``--sampler
    random``, whose proposals stay the random-search reference."""
    study = ctx.study
    if ctx.settings.sampler == "random" or study.user_attrs.get("starts_enqueued"):
        return
    for name, params in ctx.prepared.space.starts(ctx.prepared.inputs).items():
        study.enqueue_trial(params, user_attrs={"start": name})
    study.set_user_attr("starts_enqueued", True)


def speed_targets(ctx: StageContext):
    """The schedules ``measure_speed`` times (the ``--top`` ones; with ``--objective pareto-latency`` every one on the
    front of predicted latency too), as rows of the ranked trial table; None when there is none, or when these very
    schedules were timed already (a resumed run that scored nothing better)."""
    from ...report.tables import ranked, trial_table

    order = ranked(trial_table(ctx.study), ctx.settings.objective)
    timed = order.head(ctx.settings.top)
    if ctx.settings.objective == "pareto-latency" and len(order):
        timed = order[order.index.isin(timed.index) | order["pareto"]]
    measured = {row["name"] for row in ctx.study.user_attrs.get("speed", [])}
    if timed.empty or measured == {f"trial {int(n)}" for n in timed["number"]} | {"reference"} & measured:
        return None
    return timed


def measure_speed(ctx: StageContext) -> None:
    """Time the ``--top`` schedules and the reference against the parent (batch 1 and 256, interleaved); with
    ``--objective pareto-latency``, every schedule on the front of predicted latency too, at ``--latency-batch`` as
    well, so that the report draws the front in measured latency. The rows go into the study (``speed``), which the
    report reads."""
    settings, study = ctx.settings, ctx.study
    timed = speed_targets(ctx)
    if timed is None:
        return
    net = Supernet.load(supernet_path(ctx.run_dir)).eval()
    configs = {t.number: t.user_attrs["config"] for t in study.get_trials(deepcopy=False)
               if t.number in set(timed["number"])}
    models = {f"trial {int(n)}": net.child_model(config_from_dict(configs[int(n)])) for n in timed["number"]}
    if ctx.prepared.baseline is not None:
        models["reference"] = net.child_model(ctx.prepared.baseline)
    parent = net.child_model(ctx.prepared.space.parent())
    batches = tuple(sorted(set(SPEED_BATCHES) | ({settings.latency_batch} if settings.uses_latency else set())))
    rows = throughput_against(parent, models, settings.img_size, ctx.prepared.inputs.in_chans, batches)
    study.set_user_attr("speed", rows)
