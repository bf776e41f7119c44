"""The one-shot strategy: the supernet's weight sharing, parents, and real searches through the CLI."""

import json
import random

import pandas as pd
import pytest
import timm
import torch
from ray._private.utils import get_num_cpus as ray_cpus  # the cores Ray counts on this machine

from tokennas.cli import main
from tokennas.config import build_model
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.models.supernet import Supernet, build_supernet, load_parent
from tokennas.spaces import Inputs, get_space

ONESHOT = ("--strategy", "oneshot", "--train-subset", "300", "--supernet-epochs", "1", "--score-images", "200",
           "--seed", "0", "--quiet")


def feasible(space_name, budget=30_000_000):
    space, inputs = get_space(space_name), Inputs()
    return [space.build(p, inputs) for p in space.feasible(budget, inputs)[0].values()]


@pytest.mark.parametrize("space_name", ["psvit", "hvt"])
def test_a_child_computes_what_its_standalone_model_computes(space_name):
    configs = feasible(space_name)
    net = build_supernet(configs).eval()
    x = torch.randn(2, 1, 32, 32)
    for config in random.Random(0).sample(configs, 12):
        model = build_model(config).eval()
        model.load_state_dict(net.child_state_dict(config))  # strict: every parameter has its slice
        with torch.no_grad():
            assert torch.allclose(net(x, config), model(x), atol=1e-5), config


def test_children_share_the_parents_tensors_and_train_them():
    configs = feasible("psvit")
    net = build_supernet(configs)
    narrow = min(configs, key=lambda c: (c.embed_dim, c.depth))
    net(torch.randn(2, 1, 32, 32), narrow).sum().backward()
    grad = net.blocks[0].attn.qkv.weight.grad.view(3, net.config.embed_dim, -1)
    d = narrow.embed_dim
    assert grad[:, :d, :d].abs().sum() > 0 and grad[:, d:, :].abs().sum() == 0  # only the child's slice learns
    assert all(b.attn.qkv.weight.grad is None for b in net.blocks[narrow.depth:])  # nor deeper blocks


def test_a_sharing_block_uses_the_value_third_of_qkv():
    config = ScheduleViTConfig(img_size=32, in_chans=1, num_classes=10, patch_size=4, embed_dim=64, depth=4,
                               num_heads=2, share_attn=(1, 3))
    net = build_supernet([config, config.replace(share_attn=(), embed_dim=96)])
    weights = net.child_weights(config)
    assert torch.equal(weights["blocks.1.attn.v.weight"], net.blocks[1].attn.qkv.weight.view(3, 96, 96)[2, :64, :64])


def test_the_patch_size_cannot_share_weights():
    a = ScheduleViTConfig(img_size=32, in_chans=1, num_classes=10, patch_size=4, embed_dim=64, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="`patch_size` cannot share weights"):
        build_supernet([a, a.replace(patch_size=8)])


def test_a_timm_deit_state_dict_is_a_parent(tmp_path):
    """A parent from timm: with the data's own channels and classes the identity child gives timm's logits; for
    grey 10-class data timm's adapters fit the input conv and drop the head."""
    deit = timm.create_model("deit_tiny_patch16_224").eval()
    torch.save(deit.state_dict(), tmp_path / "deit.pth")
    parent = load_parent(tmp_path / "deit.pth", 224, 3, 1000)
    assert parent.head_kept and (parent.trunk.embed_dim, parent.trunk.depth, parent.trunk.num_heads) == (192, 12, 3)
    identity = parent.trunk.replace(num_heads=3)
    net = build_supernet([identity], parent).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(net(x, identity), deit(x), atol=1e-4)
    grey = load_parent(tmp_path / "deit.pth", 224, 1, 10)
    assert not grey.head_kept and "head.weight" not in grey.state
    assert torch.allclose(grey.state["patch_embed.proj.weight"], deit.patch_embed.proj.weight.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="`embed_dim` is 384 but the parent holds at most 192"):
        build_supernet([grey.trunk.replace(embed_dim=384, num_heads=6)], grey)


def test_supernet_save_and_load_round_trip(tmp_path):
    configs = feasible("hvt")
    net = build_supernet(configs)
    net.save(tmp_path / "supernet.pt")
    again = Supernet.load(tmp_path / "supernet.pt")
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(x, configs[5]), again.eval()(x, configs[5]))


def test_a_parent_too_narrow_for_the_space_exits_2(tmp_path, capsys):
    narrow = build_model(ScheduleViTConfig(img_size=32, in_chans=1, num_classes=10, patch_size=4, embed_dim=32,
                                           depth=2, num_heads=1))
    torch.save(narrow.state_dict(), tmp_path / "narrow.pth")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--space", "psvit", "--flops", "30M", "--strategy", "oneshot", "--parent",
              str(tmp_path / "narrow.pth"), "--train-subset", "300", "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "the parent holds at most 32" in err and err.count("\n") == 1
    assert not run_dir.exists()


def test_oneshot_psvit_search_scores_on_shared_weights_then_retrains(tmp_path):
    """A real one-shot search: the supernet trains as a Ray Tune trial, 12 candidates are scored on its weights,
    the top one and the baseline are fine-tuned from them; then --resume scores 4 more without a new supernet."""
    run_dir = tmp_path / "run"
    main_ok(["search", "--space", "psvit", "--flops", "30M", "--trials", "12", *ONESHOT, "--retrain-top", "1",
             "--retrain-seeds", "1", "--finetune-epochs", "1", "--out", str(run_dir)])
    frame = pd.read_csv(run_dir / "trials.csv")
    scored = frame[(frame["role"] == "candidate") & (frame["state"] == "COMPLETE")]
    assert len(scored) == 12 and (scored["scored"] == "shared weights").all() and (scored["flops"] <= 30e6).all()
    assert scored["val_acc"].between(0, 1).all() and scored["val_acc"].nunique() > 1
    assert frame[frame["role"] == "baseline"]["scored"].tolist() == ["shared weights"]
    retrain = pd.read_csv(run_dir / "retrain.csv")
    assert sorted(retrain["role"]) == ["baseline", "candidate"] and (retrain["state"] == "COMPLETE").all()
    assert (retrain["start"] == "supernet weights").all() and (retrain["epochs"] == 1).all()
    summary = (run_dir / "summary.md").read_text()
    assert "one-shot" in summary and "trained 1 epochs in this run" in summary
    assert (run_dir / "supernet.pt").is_file() and list((run_dir / "best").glob("01-*.yaml"))
    stamp = (run_dir / "supernet.pt").stat().st_mtime_ns
    # the supernet, its stage's only trial, gets all the cores of the node; the re-ranking trials --cpus-per-trial
    cores = {stage: {json.loads(p.read_text())["cpus"] for p in (run_dir / "ray").glob(f"{stage}-*/*/params.json")}
             for stage in ("supernet", "retrain")}
    assert cores == {"supernet": {float(ray_cpus())}, "retrain": {1.0}}

    main_ok(["search", "--resume", str(run_dir), "--trials", "16", "--quiet"])
    frame = pd.read_csv(run_dir / "trials.csv")
    assert ((frame["role"] == "candidate") & (frame["state"] == "COMPLETE")).sum() == 16
    assert (run_dir / "supernet.pt").stat().st_mtime_ns == stamp  # the supernet is not trained again


def main_ok(argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0


@pytest.mark.slow  # about a minute: train a parent, then search on it
def test_tokens_search_on_a_tokennas_train_parent(tmp_path):
    """`tokennas train` writes a uniform ViT; its classifier fits the data, so it is the supernet as it is: no
    supernet training, the tokens space's trunk is the parent's, candidates are merge/prune/pool schedules."""
    (tmp_path / "vit.yaml").write_text("family: schedule_vit\nimg_size: 32\nin_chans: 1\nnum_classes: 10\n"
                                       "patch_size: 4\nembed_dim: 64\ndepth: 4\nnum_heads: 2\n")
    main_ok(["train", str(tmp_path / "vit.yaml"), "--epochs", "1", "--train-subset", "200", "--out",
             str(tmp_path / "parent")])
    run_dir = tmp_path / "run"
    main_ok(["search", "--space", "tokens", "--strategy", "oneshot", "--flops", "12M", "--trials", "10", "--parent",
             str(tmp_path / "parent" / "checkpoint.pt"), "--train-subset", "300", "--score-images", "200",
             "--retrain-top", "1", "--retrain-epochs", "1", "--retrain-seeds", "1", "--quiet", "--out", str(run_dir)])
    frame = pd.read_csv(run_dir / "trials.csv")
    scored = frame[(frame["role"] == "candidate") & (frame["state"] == "COMPLETE")]
    assert len(scored) == 10 and (scored["scored"] == "shared weights").all() and (scored["flops"] <= 12e6).all()
    assert set(scored["param_embed_dim"]) == {64} and set(scored["param_depth"]) == {4}  # the parent's trunk
    assert "--parent" in (run_dir / "summary.md").read_text() and "as it is" in (run_dir / "summary.md").read_text()
    runs = pd.read_csv(run_dir / "retrain.csv")
    assert (runs["state"] == "COMPLETE").all() and len(runs) == 2


@pytest.mark.slow  # about a minute: 224px on the CPU
def test_tokens_search_on_a_timm_deit_tiny_state_dict_at_224px(tmp_path):
    """A saved timm deit_tiny_patch16_224 state dict: grey 10-class data, so timm's adapters sum the input conv and
    the 1000-class head is dropped; the supernet then trains one epoch from the parent inside the run."""
    torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), tmp_path / "deit.pth")
    run_dir = tmp_path / "run"
    main_ok(["search", "--space", "tokens", "--strategy", "oneshot", "--flops", "800M", "--img-size", "224",
             "--parent", str(tmp_path / "deit.pth"), "--trials", "4", "--train-subset", "32", "--batch-size", "16",
             "--score-images", "16", "--supernet-epochs", "1", "--retrain-top", "1", "--retrain-epochs", "1",
             "--retrain-seeds", "1", "--quiet", "--out", str(run_dir)])
    frame = pd.read_csv(run_dir / "trials.csv")
    scored = frame[(frame["role"] == "candidate") & (frame["state"] == "COMPLETE")]
    assert len(scored) == 4 and (scored["flops"] <= 800e6).all()
    assert set(scored["param_embed_dim"]) == {192} and set(scored["param_depth"]) == {12}
    net = Supernet.load(run_dir / "supernet.pt")
    assert (net.config.img_size, net.config.embed_dim, net.config.in_chans) == (224, 192, 1)
    assert "trained 1 epochs in this run (sandwich rule) from --parent" in (run_dir / "summary.md").read_text()


@pytest.mark.slow  # about 50 s
def test_oneshot_hvt_search(tmp_path):
    """HVT's candidates share weights too: per-stage positional embeddings, class token or average head."""
    run_dir = tmp_path / "run"
    main_ok(["search", "--space", "hvt", "--flops", "30M", "--trials", "8", *ONESHOT, "--retrain-top", "0",
             "--out", str(run_dir)])
    frame = pd.read_csv(run_dir / "trials.csv")
    scored = frame[(frame["role"] == "candidate") & (frame["state"] == "COMPLETE")]
    assert len(scored) == 8 and (scored["scored"] == "shared weights").all() and (scored["flops"] <= 30e6).all()
    net = Supernet.load(run_dir / "supernet.pt")
    assert len(net.stage_pos) >= 1  # HVT's per-stage positional embeddings are held by the supernet


def test_a_candidate_whose_logits_are_not_finite_is_a_failure_not_an_accuracy():
    from tokennas.data import TensorSplit
    from tokennas.search.strategies.oneshot import score, scoring_batches
    from tokennas.train import NonFiniteLoss

    configs = feasible("psvit")
    net = build_supernet(configs)
    data = type("Data", (), {"val": TensorSplit(torch.randint(0, 255, (8, 1, 32, 32), dtype=torch.uint8),
                                                torch.arange(8) % 10), "stats": (0.5, 0.25)})()
    batches = scoring_batches(data, 8, 32, torch.device("cpu"))
    assert 0.0 <= score(net, configs[0], batches) <= 1.0
    with torch.no_grad():
        net.head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="validation loss is nan"):
        score(net, configs[0], batches)
