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
