"""The differentiable strategy (DiffRate-style rates learned on a frozen parent): the closed-form expected MACs, a
search stopped mid-learning and resumed from its checkpoint, its schedules within the budget, and bad input."""

import json
import random

import pandas as pd
import pytest
import torch
from conftest import train_tiny_parent

from tokennas import count_flops
from tokennas.cli import main
from tokennas.config import load_config
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.search import stages
from tokennas.search.strategies import differentiable
from tokennas.spaces import Inputs
from tokennas.spaces.layers import LayersSpace

TRUNK = {"img_size": 16, "in_chans": 1, "num_classes": 10, "patch_size": 4, "embed_dim": 32, "depth": 4,
         "num_heads": 1}  # 16 patch tokens
STOP_AT = 6  # the step after which the first session is stopped
STEPS = 30


def parent_macs() -> int:
    return count_flops(ScheduleViTConfig(**TRUNK))


def main_code(argv) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code


def test_expected_macs_equal_the_closed_form_at_whole_counts():
    space = LayersSpace(trunk=TRUNK, budget=None)
    rng = random.Random(0)
    for _ in range(20):
        config = space.build({f"{k}{b}": rng.random() * 0.6 for k in ("prune", "merge") for b in range(4)},
                             Inputs(16, 1, 10))
        n, counts = 16, []
        for b in range(4):
            keep = config.keep_tokens[b] if config.keep_tokens else n
            pruned = config.prune_tokens[b] if config.prune_tokens else n
            counts.append([torch.tensor(float(c)) for c in (n, pruned, keep)])
            n = keep
        assert differentiable.expected_macs(config, *zip(*counts, strict=True)).item() == count_flops(config)


def test_tokens_from_the_rounded_expected_count_on_are_removed_outright():
    """DiffRate's hard removal: of 8 tokens whose count is 2, 3 or 4 with probabilities 0.3, 0.4, 0.3 (expected 3),
    the 3 first in the sort order keep their soft weights (1, 1, 0.7) and the other 5 weigh exactly 0, though 0.3 of
    the mass keeps a fourth; the loss reaches the logits through the soft weights."""
    logits = torch.full((8,), -1e9)
    logits[1:4] = torch.tensor([0.3, 0.4, 0.3]).log()  # candidate j keeps j + 1 tokens
    logits.requires_grad_(True)
    key = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4]])  # descending order: tokens 1, 4, 6, then the rest
    masks = differentiable._keep_masks(logits, key, descending=True)
    expected = torch.zeros(8)
    expected[[1, 4, 6]] = torch.tensor([1.0, 1.0, 0.7])
    assert torch.allclose(masks[0], expected, atol=1e-6)
    masks.sum().backward()  # d(0.7)/d(logit of count 2) = -0.3 * 0.7
    assert logits.grad[1].item() == pytest.approx(-0.21, abs=1e-4)


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory):
    """A 4-block ViT at 16px with patch 4 (16 patch tokens), trained for one epoch on 600 images: seconds."""
    return train_tiny_parent(tmp_path_factory.mktemp("parent"), TRUNK)


def test_each_learned_schedule_is_scored_as_learned_and_merged_alone():
    """The candidates of a learning: per step, its expected counts as learned (pruned, then merged) and the same
    per-block counts merged alone (ToMe's operator), distinct schedules, the last step's first, ``count`` at most."""
    space = LayersSpace(trunk=TRUNK, budget=parent_macs() // 2)
    inputs = Inputs(16, 1, 10)
    rng, rows = random.Random(0), []
    for step in range(1, 21):
        tokens = 16
        for block in range(TRUNK["depth"]):
            pruned, merged = rng.uniform(0, 0.3) * tokens, rng.uniform(0, 0.2) * tokens
            rows.append([step, block, tokens, pruned, merged, 0.0, 0.0])
            tokens -= pruned + merged
    rates = pd.DataFrame(rows, columns=differentiable.RATE_COLUMNS)
    chosen = differentiable.candidates(rates, space, inputs, 6)
    assert [label for label, _ in chosen[:2]] == ["learned", "learned, merged alone"]
    assert len(chosen) == 6 and {label for label, _ in chosen[2:]} == {"learned, earlier step",
                                                                       "learned, earlier step, merged alone"}
    last = rates[rates["step"] == 20]
    assert chosen[0][1] == differentiable.direction(last)
    alone = chosen[1][1]
    for row in last.itertuples():
        assert alone[f"prune{row.block}"] == 0.0
        assert alone[f"merge{row.block}"] == pytest.approx((row.pruned + row.merged) / row.tokens_in)
    configs = [space.build(params, inputs) for _, params in chosen]
    assert len({json.dumps(c.to_dict(), sort_keys=True) for c in configs}) == 6
    for config, (label, _) in zip(configs, chosen, strict=True):  # merged alone: no block prunes a token
        entering = (16, *config.keep_tokens[:-1])
        assert (tuple(config.prune_tokens) == entering) == label.endswith("merged alone"), (label, config)
    assert all(count_flops(c) <= parent_macs() // 2 for c in configs)


@pytest.fixture(scope="module")
def resumed_run(tiny_parent, tmp_path_factory):
    """A differentiable search stopped after STOP_AT steps of learning (exit 1, the checkpoint kept), then resumed."""
    run_dir = tmp_path_factory.mktemp("diff") / "run"
    steps = []
    with pytest.MonkeyPatch.context() as patch:
        forward = differentiable.soft_forward

        def counted(*args):
            steps.append(1)
            return forward(*args)

        patch.setattr(differentiable, "soft_forward", counted)
        patch.setattr(differentiable, "CHECKPOINT_EVERY", 4)
        patch.setattr(stages.StageContext, "time_left", lambda self: len(steps) < STOP_AT)
        code = main_code(["search", "--space", "layers", "--strategy", "differentiable", "--parent", str(tiny_parent),
                          "--flops", "50%", "--diff-steps", str(STEPS), "--diff-lr", "0.1", "--batch-size", "32",
                          "--train-subset", "600", "--trials", "3", "--score-images", "100", "--top", "1", "--seed",
                          "0", "--quiet", "--out", str(run_dir)])
    assert code == 1 and len(steps) == STOP_AT  # the search stage is incomplete: the learning was stopped
    first = pd.read_csv(run_dir / "rates.csv")
    assert first["step"].max() == STOP_AT and torch.load(run_dir / "differentiable.pt")["step"] == STOP_AT
    assert main_code(["search", "--resume", str(run_dir), "--quiet"]) == 0
    return run_dir, first


@pytest.mark.slow  # one search stopped and resumed through Ray: about 80 s of CPU (make test-all)
def test_resume_goes_on_from_the_checkpoint(resumed_run):
    run_dir, first = resumed_run
    rates = pd.read_csv(run_dir / "rates.csv")
    assert rates["step"].drop_duplicates().tolist() == list(range(1, STEPS + 1))  # each step once, none again
    pd.testing.assert_frame_equal(rates[rates["step"] <= STOP_AT].reset_index(drop=True), first)
    state = torch.load(run_dir / "differentiable.pt")
    assert state["step"] == STEPS and state["sessions"] == [0, STOP_AT]
    assert f"resumed from the checkpoint at step {STOP_AT}" in (run_dir / "summary.md").read_text()


@pytest.mark.slow  # one search stopped and resumed through Ray: about 80 s of CPU (make test-all)
def test_the_penalty_pulls_the_expected_macs_to_the_budget(resumed_run):
    rates = pd.read_csv(resumed_run[0] / "rates.csv").drop_duplicates("step")
    budget = parent_macs() // 2
    assert rates["macs"].iloc[0] > 1.2 * budget  # it starts near the parent
    assert abs(rates["macs"].iloc[-5:].mean() / budget - 1) < 0.1


@pytest.mark.slow  # one search stopped and resumed through Ray: about 80 s of CPU (make test-all)
def test_the_learned_schedules_are_scored_within_the_budget(resumed_run, tiny_parent, capsys):
    run_dir = resumed_run[0]
    budget = parent_macs() // 2
    frame = pd.read_csv(run_dir / "trials.csv")
    scored = frame[(frame["role"] == "candidate") & (frame["state"] == "COMPLETE")]
    assert len(scored) == 3 and (scored["flops"] <= budget).all()
    assert frame[frame["role"] == "baseline"]["state"].tolist() == ["COMPLETE"]  # ToMe's constant r
    best = sorted((run_dir / "best").glob("*.yaml"))
    assert best and all(count_flops(load_config(p)) <= budget for p in best)
    assert "Learned rates over training" in (run_dir / "report.html").read_text()
    assert "strategy: differentiable" in (run_dir / "summary.md").read_text()
    capsys.readouterr()
    assert main_code(["evaluate", str(best[0]), "--parent", str(tiny_parent), "--split", "val", "--images", "100",
                      "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["flops"] == count_flops(load_config(best[0])) and 0 <= result["acc"] <= 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--space", "psvit", "--flops", "1M"], "invalid --space 'psvit' for --strategy differentiable"),
    (["--space", "layers", "--flops", "10M"], "needs --parent"),
    (["--space", "layers", "--parent", "fmnist-vit", "--flops", "50%", "--diff-steps", "0"], "invalid --diff-steps 0"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    assert main_code(["search", "--strategy", "differentiable", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_its_options_need_the_strategy(tmp_path, capsys):
    assert main_code(["search", "--space", "layers", "--parent", "fmnist-vit", "--flops", "50%", "--diff-steps", "9",
                      "--out", str(tmp_path / "run")]) == 2
    assert "--diff-steps needs --strategy differentiable" in capsys.readouterr().err


def test_a_diverged_learning_fails_the_run_in_one_line(tiny_parent, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(differentiable, "PENALTY", float("nan"))  # every loss non-finite
    code = main_code(["search", "--space", "layers", "--strategy", "differentiable", "--parent", str(tiny_parent),
                      "--flops", "50%", "--diff-steps", "3", "--batch-size", "32", "--train-subset", "600",
                      "--trials", "2", "--score-images", "100", "--seed", "0", "--quiet", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "loss is nan" in err.strip().splitlines()[-1]
    trials = pd.read_csv(tmp_path / "r" / "trials.csv")
    assert not len(trials[trials["role"] == "candidate"])  # no schedule of NaN rates was scored
