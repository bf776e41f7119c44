"""FLOPs budgets: what `--flops` accepts, and one line (exit 2, nothing written) for what it does not."""

import subprocess
import sys

import pytest

from tokennas.flops import MAX_FLOPS, parse_flops


@pytest.mark.parametrize("text,macs", [("4G", 4 * 10**9), ("30M", 30 * 10**6), ("1.5k", 1500), ("250", 250),
                                       ("1e6", 10**6), ("1000T", MAX_FLOPS)])
def test_budgets_in_macs(text, macs):
    assert parse_flops(text) == macs


@pytest.mark.parametrize("text", ["1e400", "infM", "nanM", "inf", "-3M", "0.5", "0", "2000T", "30X", "M", ""])
def test_non_finite_tiny_or_absurd_budgets_name_the_value(text):
    with pytest.raises(ValueError, match=f"invalid FLOPs budget {text!r}; expected a positive finite number") as err:
        parse_flops(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("budget", ["1e400", "infM", "nanM"])
def test_search_refuses_a_non_finite_budget_in_one_line(tmp_path, budget):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "tokennas.cli", "search", "--space", "psvit", "--flops", budget,
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and f"'{budget}'" in result.stderr and "30M or 4G" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()
