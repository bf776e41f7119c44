"""``tokennas.patch``: a user's timm ViT runs a schedule in place, as the ScheduleViT of that schedule would."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokennas
from tokennas.models.schedule_vit import ScheduleViTConfig

TRUNK = dict(img_size=24, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2)  # 144 patches

SCHEDULES = {
    "identity": dict(),
    "share": dict(share_attn=(1, 3)),
    "merge": dict(reduce_kind="merge", keep_tokens=(144, 144, 100, 60), share_attn=(1,)),
    "prune": dict(reduce_kind="prune", keep_tokens=(144, 144, 70, 20), share_attn=(1,)),
    "prune_merge": dict(reduce_kind="prune_merge", keep_tokens=(144, 144, 90, 50), prune_tokens=(144, 144, 120, 80),
                        share_attn=(1,)),
}


def timm_vit(**changes) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**TRUNK, **changes}).eval()


def schedule_vit_like(model: VisionTransformer, config: ScheduleViTConfig) -> torch.nn.Module:
    """The ScheduleViT of ``config`` with the timm model's weights; a sharing block takes the value third of qkv."""
    state = dict(model.state_dict())
    for b in config.share_attn:
        for kind in ("weight", "bias"):
            qkv = state.pop(f"blocks.{b}.attn.qkv.{kind}")
            state[f"blocks.{b}.attn.v.{kind}"] = qkv[2 * config.embed_dim :]
    reference = tokennas.build_model(config).eval()
    reference.load_state_dict(state, strict=True)
    return reference


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("class_token", [True, False])
def test_patched_model_gives_the_schedule_vit_logits(name, class_token):
    timm_args = dict(class_token=class_token, global_pool="token" if class_token else "avg", fc_norm=False)
    model = timm_vit(**timm_args)
    config = ScheduleViTConfig(**TRUNK, class_token=class_token, **SCHEDULES[name])
    reference = schedule_vit_like(model, config)
    parameters = {id(p) for p in model.parameters()}
    names = list(model.state_dict())
    x = torch.randn(3, 1, 24, 24)
    with torch.no_grad():
        original = model(x)
        assert tokennas.patch(model, config) is model
        patched = model(x)
        torch.testing.assert_close(patched, reference(x), rtol=1e-5, atol=1e-6)
        if name == "identity":
            assert torch.equal(patched, original)
        else:
            assert not torch.allclose(patched, original, atol=1e-4)  # the schedule changed the computation
    assert {id(p) for p in model.parameters()} == parameters  # the model's own tensors, none copied or added
    assert list(model.state_dict()) == names


def test_a_patched_model_in_eval_mode_stays_in_eval_mode():
    model = timm_vit(attn_drop_rate=0.5)
    config = ScheduleViTConfig(**TRUNK, **SCHEDULES["prune_merge"])
    reference = schedule_vit_like(model, config)
    tokennas.patch(model, config)
    assert not any(module.training for module in model.modules())
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)  # no attention dropout


def test_patching_again_applies_the_new_schedule():
    model = timm_vit()
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        original = model(x)
        tokennas.patch(model, ScheduleViTConfig(**TRUNK, **SCHEDULES["prune_merge"]))
        config = ScheduleViTConfig(**TRUNK, **SCHEDULES["merge"])
        expected = schedule_vit_like(model, config)(x)
        torch.testing.assert_close(tokennas.patch(model, config)(x), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(tokennas.patch(model, ScheduleViTConfig(**TRUNK))(x), original)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_patch_from_an_exported_config(tmp_path, suffix):
    config = ScheduleViTConfig(**TRUNK, **SCHEDULES["prune_merge"])
    path = tokennas.save_config(config, tmp_path / f"schedule{suffix}")
    from_file, from_config = timm_vit(), timm_vit()
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(tokennas.patch(from_file, str(path))(x), tokennas.patch(from_config, config)(x))
    assert from_file.blocks.schedule == config


def test_patched_model_trains():
    model = timm_vit(drop_path_rate=0.1).train()
    tokennas.patch(model, ScheduleViTConfig(**TRUNK, **SCHEDULES["prune_merge"]))
    model(torch.randn(4, 1, 24, 24)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("model_changes,schedule_changes,match", [
    ({}, dict(depth=3), r"`depth`: the schedule has 3 blocks, the model 4"),
    ({}, dict(embed_dim=32), r"`embed_dim`: the schedule has 32, the model 64"),
    ({}, dict(num_heads=4), r"`num_heads`: the schedule has 4, the model 2"),
    ({}, dict(mlp_ratio=2.0), r"`mlp hidden units`: the schedule has 128, the model 256"),
    ({}, dict(qkv_bias=False), r"`qkv_bias`: the schedule has False, the model True"),
    ({}, dict(img_size=32), r"patch grid: the schedule's is 16x16 .* the model's patch_embed makes 12x12"),
    ({}, dict(img_size=48, patch_size=4), r"patch grid: the schedule's is 12x12 of 4px patches"),
    (dict(class_token=False, global_pool="avg"), {}, r"`class_token`: the schedule has a class token but the model"),
    ({}, dict(class_token=False), r"`class_token`: the model has a class token but the schedule has none"),
    (dict(reg_tokens=4), {}, r"prefix tokens: the model has 5 \(register tokens: 4\)"),
    (dict(no_embed_class=True), {}, r"`no_embed_class`"),
    (dict(dynamic_img_size=True), {}, r"`dynamic_img_size`"),
    (dict(init_values=1e-5), {}, r"block 0 is a Block .*no layer scale"),
    (dict(qk_norm=True), {}, r"block 0 is a Block .*QK norm"),
    ({}, dict(pool_after=(1,)), r"`pool_after` is not supported by patch"),
])
def test_incompatible_schedules_raise_naming_the_mismatch(model_changes, schedule_changes, match):
    model = timm_vit(**model_changes)
    blocks = model.blocks
    with pytest.raises(ValueError, match=match):
        tokennas.patch(model, ScheduleViTConfig(**{**TRUNK, **schedule_changes}))
    assert model.blocks is blocks  # nothing was changed


def test_patch_refuses_other_families_and_models():
    with pytest.raises(ValueError, match="patch runs schedule_vit schedules, got a crossvit config"):
        tokennas.patch(timm_vit(), "crossvit_tiny")
    with pytest.raises(ValueError, match="patch takes a timm VisionTransformer, got Linear"):
        tokennas.patch(torch.nn.Linear(2, 2), ScheduleViTConfig(**TRUNK))
