"""The differentiable strategy (``--strategy differentiable``, ``--space layers``): per-block prune and merge rates
learned by gradient on the frozen parent, in the spirit of DiffRate (Chen et al., ICCV 2023).

1. **The parent** is used as the frozen strategy uses it (``frozen.py``): its classifier must fit the data, it is kept
   in the run as ``supernet.pt``, and its weights never change.
2. **Learning the rates** (``--diff-steps`` Adam steps from ``--diff-lr``, cosine-annealed, on batches of
   ``--batch-size`` images of the training split; the validation split is never read here). As in DiffRate's
   differentiable discrete proxy, each block holds two learnable distributions (softmax over logits) over a discrete
   set of candidate counts: the patch tokens kept by its pruning and kept by its merging, every count from 1 to N (N:
   the parent's patch tokens). The patch tokens are sorted by importance for pruning (the class token's attention in
   that block) and by similarity for merging (the cosine similarity of their keys to their closest other token, least
   similar first); a token at sorted position i is kept with the probability that the count exceeds i (the mass of
   the candidates above i), and removed outright from the rounded expected count on; the loss reaches the logits
   through the soft masks of the tokens within the count. Removed weight is masked out of
   the attention of later blocks (DiffRate's attention masking, here as ``log(size)`` added to the keys' logits,
   ToMe's proportional attention); merged weight moves into its most similar token, whose features become the
   size-weighted mean. The loss is the cross-entropy on the labels plus ``PENALTY * (E[MACs] / budget - 1) ** 2``,
   where E[MACs] is the closed form of ``ScheduleViTConfig.flops_by_module`` evaluated at the expected token counts
   (the sums of the soft masks), so the penalty pulls the expected MACs to the ``--flops`` budget.
3. **Candidates.** The expected counts of a step give a direction of the ``layers`` space (per block the expected
   share of the tokens it receives that it prunes, and of the survivors that it merges), which the space projects
   onto the budget like any proposal (the mildest schedule of that direction within the budget). Each step also
   gives its counts *merged alone*: per block the same share of the tokens removed, all by merging (ToMe's operator),
   because the learning sets the counts well and the split between pruning and merging badly (on ``fmnist-vit`` at
   50%, the learned schedule scored 0.694 on validation and its counts merged alone 0.881; benchmarks/RESULTS.md).
   ``--trials`` distinct schedules are taken from the learning, in pairs (as learned, merged alone): the last
   step's, and steps spread evenly before it (then the latest others when those repeat one another); each is scored
   on the validation images as the frozen strategy scores (the same ``score_stage``), beside ToMe's constant r, and
   the validation score picks between them. Should the learning give fewer distinct schedules
   than ``--trials``, the sampler proposes the rest as in the frozen strategy.
4. **Speed and fine-tuning** as in the frozen strategy (``measure_speed``, ``--finetune-epochs``).

``rates.csv`` holds the expected counts of every step; ``differentiable.pt`` the logits, the optimizer's state and
those rows, written atomically every ``CHECKPOINT_EVERY`` steps and at the end: ``--resume`` goes on from it, and a
finished learning is not done again.

As in DiffRate, the tokens from the rounded expected count on are removed outright (their mask is 0: pruned, or
merged whole into their partner), so the soft forward pass sees what the exported schedule will run, and only the
tokens within the count are weighed by their soft masks. Where it differs from DiffRate: the removed tokens stay in
the tensors with zero weight (affordable at the parent's size) instead of being cut out; merging is relaxed
by moving weight to each token's most similar token rather than by ToMe's bipartite matching on alternate tokens
(the learned rates are run with ToMe's matching afterwards); the merge candidates are capped at half of the expected
survivors (the bipartite limit the hard schedule has); the learned counts become a direction that the space projects
onto the budget, so the exported schedule is within it by construction rather than by the penalty alone; and
several schedules of the learning, each also with its counts merged alone, are scored on validation images, the best
kept.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from ...models.layers import block_flops, ln_flops
from ...models.supernet import Supernet
from ...train import TrainSettings, check_finite, training_batches, write_atomic
from ..settings import SearchSettings
from ..stages import StageContext
from .frozen import Frozen, keep_parent, measure_speed
from .oneshot import score_stage, supernet_path

PENALTY = 20.0  # weight of the squared relative distance of the expected MACs to the budget
KEEP_AT_START = 0.95  # the starting probability of the candidate "keep every token": the parent's schedule, nearly
CHECKPOINT_EVERY = 25  # steps between checkpoints (and at the end, or when the run is stopped)
RATE_COLUMNS = ["step", "block", "tokens_in", "pruned", "merged", "macs", "loss"]


def _floor(x: torch.Tensor) -> torch.Tensor:
    """floor(x) in value, the identity in gradient (straight through)."""
    return x + (x.floor() - x).detach()


def expected_macs(config, tokens_in, pruned, kept) -> torch.Tensor:
    """MACs of the parent ``config`` whose block b receives ``tokens_in[b]`` patch tokens, prunes to ``pruned[b]`` and
    merges to ``kept[b]`` (tensors, fractional in expectation): ``flops_by_module``'s closed form of a prune_merge
    schedule, equal to it at whole counts, whose reduction costs grow linearly over the first token removed."""
    D, p, hd = config.embed_dim, int(config.class_token), config.embed_dim // config.num_heads
    total = tokens_in[0].new_tensor(float(config.grid**2 * D * config.in_chans * config.patch_size**2
                                          + D * config.num_classes))
    for n, m, k in zip(tokens_in, pruned, kept, strict=True):
        total = total + block_flops(n + p, D, config.mlp_ratio, False, k + p)
        total = total + (n - m).clamp(0, 1) * (n + p) * D  # the pruning's scoring, when it removes a token
        total = total + (m - k).clamp(0, 1) * _floor((m + 1) / 2) * _floor(m / 2) * hd  # the merging's similarities
    return total + ln_flops(kept[-1] + p, D)


def _keep_masks(logits: torch.Tensor, key: torch.Tensor, descending: bool) -> torch.Tensor:
    """(B, n): each token's probability of being kept, the candidate counts' mass above its sorted position; 0 from
    the rounded expected count on (DiffRate's hard removal: those tokens are gone, as in the exported schedule)."""
    probs = logits.softmax(-1)
    above = probs.flip(-1).cumsum(-1).flip(-1)  # [i]: P(count > i), candidate j keeps j + 1 tokens
    positions = torch.arange(len(above), device=above.device)
    expected = (probs * (positions + 1)).sum().detach()
    above = above * (positions < expected.round()).to(above.dtype)
    order = key.argsort(dim=-1, descending=descending)
    return torch.zeros_like(key).scatter(1, order, above.expand_as(key).to(key.dtype))


def soft_forward(net: Supernet, images: torch.Tensor, prune_logits: torch.Tensor,
                 merge_logits: torch.Tensor) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The parent's logits under the soft schedule, and per block the expected patch tokens it receives, prunes and
    merges (batch means). ``*_logits`` (depth, N): candidate j keeps j + 1 of the N patch tokens."""
    x = net.patch_embed(images)
    x = torch.cat([net.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + net.pos_embed
    B, T, C = x.shape
    n = T - 1
    size = x.new_ones(B, T)  # the patches each token stands for, times its presence
    present = x.new_ones(B, n)  # each patch token's presence, in [0, 1]
    counts: list[list[torch.Tensor]] = []
    for b, block in enumerate(net.blocks):
        attn_mod = block.attn
        qkv = attn_mod.qkv(block.norm1(x)).reshape(B, T, 3, attn_mod.num_heads, attn_mod.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * attn_mod.scale) @ k.transpose(-2, -1) + size.clamp_min(1e-6).log()[:, None, None]).softmax(-1)
        x = x + attn_mod.proj((attn @ v).transpose(1, 2).reshape(B, T, C))
        tokens_in = present.sum(1).mean()
        # pruning: by the class token's attention (absent tokens, which it no longer sees, sort last)
        keep = _keep_masks(prune_logits[b], attn[:, :, 0, 1:].mean(1), descending=True)
        present, size = present * keep, torch.cat([size[:, :1], size[:, 1:] * keep], 1)
        after_prune = present.sum(1).mean()
        # merging: by the keys' similarity to the closest other present token, least similar kept first
        metric = F.normalize(k.mean(1)[:, 1:], dim=-1)
        similar = metric @ metric.transpose(1, 2) - 4 * (1 - present)[:, None, :]
        similar = similar - 8 * torch.eye(n, device=x.device)
        best, partner = similar.max(-1)
        floor = math.floor(after_prune.item() / 2)  # the bipartite matching removes at most half of the survivors
        allowed = merge_logits[b].masked_fill(torch.arange(n, device=x.device) + 1 < floor, -math.inf)
        stay = _keep_masks(allowed, best + 4 * (1 - present), descending=False)
        moved = size[:, 1:] * (1 - stay)  # (B, n): the size each token hands to its partner
        patches = x[:, 1:]
        gained = torch.zeros_like(moved).scatter_add(1, partner, moved)
        mixed = torch.zeros_like(patches).scatter_add(1, partner[..., None].expand(-1, -1, C),
                                                      moved[..., None] * patches)
        kept_size = size[:, 1:] * stay
        total = (kept_size + gained)[..., None]
        patches = (kept_size[..., None] * patches + mixed) / total.clamp_min(1e-6)
        x = torch.cat([x[:, :1], patches], 1)
        size = torch.cat([size[:, :1], kept_size + gained], 1)
        present = present * stay
        counts.append([tokens_in, after_prune, present.sum(1).mean()])
        x = x + block.mlp(block.norm2(x))
    return net.head(net.norm(x)[:, 0]), counts


def direction(rows: pd.DataFrame, merged_alone: bool = False) -> dict[str, Any]:
    """The ``layers`` direction of one step's expected counts: per block the share of the tokens it receives that it
    prunes, and of the survivors that it merges; ``merged_alone``: the same tokens removed, all by merging (ToMe's
    operator). No attention sharing."""
    params: dict[str, Any] = {}
    for row in rows.itertuples():
        pruned = 0.0 if merged_alone else row.pruned
        merged = row.merged + row.pruned - pruned
        params[f"prune{row.block}"] = min(1.0, max(0.0, pruned / row.tokens_in))
        params[f"merge{row.block}"] = min(1.0, max(0.0, merged / max(row.tokens_in - pruned, 1e-9)))
        if row.block:
            params[f"share{row.block}"] = False
    return params


def state_path(run_dir: Path) -> Path:
    return run_dir / "differentiable.pt"


def learn(ctx: StageContext) -> bool:
    """Learn the rates from the last checkpoint on; True once ``--diff-steps`` are done (False: stopped, saved)."""
    settings, path = ctx.settings, state_path(ctx.run_dir)
    state = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    if state is not None and state["step"] >= settings.diff_steps:
        return True
    device = torch.device("cuda" if settings.gpus() > 0 else "cpu")
    net = Supernet.load(supernet_path(ctx.run_dir)).eval().requires_grad_(False).to(device)
    depth, n = net.config.depth, net.config.grid**2
    start = torch.zeros(depth, n)
    start[:, -1] = math.log(KEEP_AT_START / (1 - KEEP_AT_START) * (n - 1))
    prune_logits = torch.nn.Parameter(start.clone().to(device))
    merge_logits = torch.nn.Parameter(start.clone().to(device))
    optimizer = torch.optim.Adam([prune_logits, merge_logits], lr=settings.diff_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.diff_steps)
    step, rows, sessions = 0, [], []
    if state is not None:
        step, rows, sessions = state["step"], state["rows"], state["sessions"]
        with torch.no_grad():
            prune_logits.copy_(state["prune_logits"])
            merge_logits.copy_(state["merge_logits"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    sessions = [*sessions, step]  # the step each session of the learning started from
    train = training_batches(ctx.prepared.data, TrainSettings(batch_size=settings.batch_size, augment=settings.augment,
                                                              seed=settings.seed + step), settings.img_size, device)
    budget = float(settings.budget)

    def save() -> None:
        write_atomic(path, lambda tmp: torch.save({"step": step, "prune_logits": prune_logits.detach().cpu(),
                                                   "merge_logits": merge_logits.detach().cpu(),
                                                   "optimizer": optimizer.state_dict(),
                                                   "schedule": schedule.state_dict(), "rows": rows,
                                                   "sessions": sessions}, tmp))
        write_atomic(ctx.run_dir / "rates.csv",
                     lambda tmp: pd.DataFrame(rows, columns=RATE_COLUMNS).to_csv(tmp, index=False))

    batches = itertools.chain.from_iterable(itertools.repeat(train))  # epoch after epoch
    while step < settings.diff_steps:
        if not ctx.time_left():
            save()
            return False
        images, labels = next(batches)
        logits, counts = soft_forward(net, images, prune_logits, merge_logits)
        macs = expected_macs(net.config, *zip(*counts, strict=True))
        loss = F.cross_entropy(logits, labels) + PENALTY * (macs / budget - 1) ** 2
        check_finite(loss.detach().reshape(1), 0, step + 1)  # a diverged learning fails the run, never scores NaN rates
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        rows += [[step, b, t.item(), (t - m).item(), (m - k).item(), macs.item(), loss.item()]
                 for b, (t, m, k) in enumerate(counts)]
        if step % CHECKPOINT_EVERY == 0:
            save()
    save()
    return True


def candidates(rates: pd.DataFrame, space, inputs, count: int) -> list[tuple[str, dict[str, Any]]]:
    """Up to ``count`` (label, direction) pairs of distinct schedules: of the last step's expected counts, of steps
    spread evenly before it, then of the latest others, each as learned and with its counts merged alone."""
    from ...config import config_key

    steps = sorted(rates["step"].unique())
    pairs = (count + 1) // 2
    spread = [steps[round(i * (len(steps) - 1) / max(pairs - 1, 1))] for i in range(pairs)][::-1]
    seen, chosen = set(), []
    for step in dict.fromkeys(spread + steps[::-1]):
        rows = rates[rates["step"] == step]
        when = "learned" if step == steps[-1] else "learned, earlier step"
        for label, params in ((when, direction(rows)), (f"{when}, merged alone", direction(rows, merged_alone=True))):
            key = config_key(space.build(params, inputs))
            if key not in seen:
                seen.add(key)
                chosen.append((label, params))
            if len(chosen) == count:
                return chosen
    return chosen


class Differentiable(Frozen):
    name = "differentiable"
    score_images = SearchSettings.score_images  # its benchmarks (RESULTS.md) score on 2,000 images
    options = ("parent", "finetune_epochs", "score_images", "diff_steps", "diff_lr")

    spaces_why = "rates learned on one trained parent"

    def validate(self, settings: SearchSettings) -> None:
        super().validate(settings)  # the space, --parent and the scoring options, as the frozen strategy checks them
        if settings.diff_steps < 1:
            raise ValueError(f"invalid --diff-steps {settings.diff_steps}; expected at least 1")
        if not (math.isfinite(settings.diff_lr) and settings.diff_lr > 0):
            raise ValueError(f"invalid --diff-lr {settings.diff_lr}; expected a positive number")

    def search_stage(self, ctx: StageContext) -> None:
        keep_parent(ctx)
        if not learn(ctx):
            return  # stopped: the checkpoint holds the learning so far, --resume goes on from it
        study = ctx.study
        if not study.user_attrs.get("learned_enqueued"):
            rates = pd.read_csv(ctx.run_dir / "rates.csv")
            for label, params in candidates(rates, ctx.prepared.space, ctx.prepared.inputs, ctx.settings.trials):
                study.enqueue_trial(params, user_attrs={"start": label})
            study.set_user_attr("learned_enqueued", True)
        if ctx.time_left():
            score_stage(ctx, self.stall, self.search_epochs(ctx.settings))
        if ctx.time_left():
            measure_speed(ctx)

    def describe(self, settings: SearchSettings, run_dir: Path) -> list[str]:
        path = state_path(run_dir)
        state = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
        if state is None:
            learned = "not started"
        else:
            resumed = [s for s in state["sessions"] if s]
            learned = (f"{state['step']} of {settings.diff_steps} steps done"
                       + (f", resumed from the checkpoint at step {', '.join(map(str, resumed))}" if resumed else ""))
        lines = [f"- strategy: differentiable (DiffRate-style); per-block prune and merge counts learned by gradient "
                 f"on the frozen weights of --parent {settings.parent}: {settings.diff_steps} Adam steps at lr "
                 f"{settings.diff_lr}, batches of {settings.batch_size} training images, cross-entropy plus a penalty "
                 f"pulling the expected MACs to the budget ({learned}; rates.csv); up to {settings.trials} distinct "
                 "schedules of the learning (the last step's, then earlier steps'), in pairs: as learned, then with "
                 "the same per-block counts removed by merging alone (a twin that repeats a schedule already taken, "
                 "or past the count, is left out), projected onto the budget, scored on the first "
                 f"{settings.score_images} validation images (`scored` in trials.csv)"]
        if settings.finetune_epochs:
            lines.append(f"- re-ranking: the top {settings.retrain_top} and the reference fine-tuned from the "
                         f"parent's weights for {settings.finetune_epochs} epochs")
        return lines
