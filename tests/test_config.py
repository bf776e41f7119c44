"""YAML/JSON round trip and error messages."""

import pytest

import tokennas
from tokennas.config import config_from_dict, load_config, save_config


@pytest.mark.parametrize("name", tokennas.list_presets())
def test_round_trip(name, tmp_path):
    config = load_config(name)
    for suffix in (".yaml", ".json"):
        path = save_config(config, tmp_path / f"c{suffix}")
        again = load_config(path)
        assert again == config
        assert tokennas.count_flops(again) == tokennas.count_flops(config)
        assert tokennas.count_params(again) == tokennas.count_params(config)


def test_yaml_has_family_key(tmp_path):
    text = save_config(load_config("hvt_s_2"), tmp_path / "c.yaml").read_text()
    assert text.startswith("family: schedule_vit")


@pytest.mark.parametrize("data,match", [
    ({"embed_dim": 64}, "family"),
    ({"family": "nope"}, "unknown family 'nope'"),
    ({"family": "schedule_vit", "widht": 3}, "unknown field 'widht'"),
    ({"family": "schedule_vit", "depth": "deep"}, "depth"),
    ([1, 2], "mapping"),
])
def test_bad_dicts_name_the_problem(data, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(data)


def test_bad_names_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nonexistent'"):
        load_config("nonexistent")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("preset,field,value,match", [
    ("deit_tiny", "mlp_ratio", float("inf"), "`mlp_ratio` must be a finite number, got inf"),
    ("deit_tiny", "mlp_ratio", float("nan"), "`mlp_ratio` must be a finite number"),
    ("deit_tiny", "mlp_ratio", 10**400, "`mlp_ratio` must be a finite number"),
    ("deit_tiny", "mlp_ratio", 1e-4, "`mlp_ratio` must give at least one MLP hidden unit"),
    ("deit_tiny", "drop_path_rate", 1.5, r"`drop_path_rate` must be in \[0, 1\)"),
    ("deit_tiny", "depth", True, "`depth` must be an integer, got True"),
    ("deit_tiny", "depth", 12.0, "`depth` must be an integer, got 12.0"),
    ("deit_tiny", "keep_tokens", [196] * 11 + [98.5], r"`keep_tokens` must be a list of integers, got \[196"),
    ("deit_tiny", "pool_after", [True], "`pool_after` must be a list of integers"),
    ("deit_tiny", "share_attn", [[1]], "`share_attn` must be a list of integers"),
    ("deit_tiny", "keep_tokens", 5, "`keep_tokens` must be a list of integers, got 5"),
    ("crossvit_15", "mlp_ratio", [4.0, float("inf")], "`mlp_ratio` must be a list of finite numbers"),
    ("crossvit_15", "depth", [1, 4.0], "`depth` must be a list of integers"),
    ("stt_tiny", "global_blocks", [1.0], "`global_blocks` must be a list of integers"),
    ("stt_tiny", "drop_path_rate", -0.1, "`drop_path_rate`"),
    ("quadformer_s_256_100", "mlp_ratio", float("-inf"), "`mlp_ratio` must be a finite number"),
])
def test_every_family_refuses_non_finite_and_non_integer_values(preset, field, value, match):
    data = {**load_config(preset).to_dict(), field: value}
    with pytest.raises(ValueError, match=match):
        config_from_dict(data)
