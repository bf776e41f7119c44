"""A budget means something at the resolution it is counted at: `--flops 4G` without `--img-size` is counted at
224px (the convention it is written in) when it constrains nothing at the data's own 32px, with one line saying so;
an explicit `--img-size` at which the budget constrains nothing is refused (exit 2, one line, nothing written)."""

import pytest
from test_parents import cli

from tokennas.flops import parse_flops
from tokennas.search.settings import largest_candidate, with_defaults
from tokennas.spaces import get_space
from tokennas.spaces.base import Inputs

BASE = {"dataset": "fashion-mnist", "parent": None, "strategy": None}


def test_the_largest_candidate_is_the_maximum_over_the_grid():
    space, inputs = get_space("stt"), Inputs(32, 1, 10)
    costs = [sum(space.build(p, inputs).flops_by_module().values()) for p in space.grid(inputs)]
    assert largest_candidate("stt", 32, 1) == max(costs) > min(costs)


def test_a_budget_that_constrains_nothing_at_32px_is_counted_at_224px():
    assert largest_candidate("psvit", 32, 1) < parse_flops("4G") < largest_candidate("psvit", 224, 1)
    options, notice = with_defaults({**BASE, "space": "psvit", "flops": "4G", "img_size": None})
    assert options["img_size"] == 224 and options["strategy"] == "standalone"
    assert notice.startswith("--flops 4G constrains nothing at 32px (the largest psvit candidate costs ")
    assert notice.endswith("; searching at 224px") and "\n" not in notice


def test_a_budget_that_binds_keeps_the_data_resolution():
    assert with_defaults({**BASE, "space": "psvit", "flops": "30M", "img_size": None}) == (
        {**BASE, "space": "psvit", "flops": "30M", "img_size": 32, "strategy": "standalone"}, None)
    folder = with_defaults({**BASE, "dataset": "folder", "space": "psvit", "flops": "4G", "img_size": None})
    assert folder[0]["img_size"] == 224 and folder[1] is None  # folders and timm datasets default to 224px


def test_an_explicit_resolution_where_the_budget_binds_nothing_is_refused_naming_the_implied_one(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "search", "--space", "psvit", "--flops", "4G", "--img-size", "32", "--out",
                            str(out))
    assert code == 2 and stdout == "" and not out.exists()
    assert err.startswith("error: invalid --flops 4G at --img-size 32: it constrains nothing there (the largest "
                          "psvit candidate costs ") and err.endswith("; it is a budget for 224px (--img-size 224)\n")
    assert err.count("\n") == 1


def test_a_budget_that_binds_at_no_resolution_is_refused():
    with pytest.raises(ValueError, match=r"^invalid --flops 1T at --img-size 32: it constrains nothing there .*; it "
                                         r"binds at no resolution up to 512px; lower it$"):
        with_defaults({**BASE, "space": "stt", "flops": "1T", "img_size": None})
