"""The report and the export of a real quick search: the page read in headless Chromium, and an export that never
deletes or overwrites a file the user wrote."""

import html
import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tokennas.report.export import EXPORT_MARK, write_export
from tokennas.report.page import markdown_html
from tokennas.report.plots import pareto_figure

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# psvit under 15M MACs: the first proposals are mostly over budget, so the run has INFEASIBLE rows to draw (at 30M,
# with psvit's ordered encoding, seed 0's first proposals all fit)
SEARCH = ("search", "--space", "psvit", "--flops", "15M", "--trials", "2", "--epochs", "1", "--train-subset", "300",
          "--seed", "0", "--retrain-top", "0", "--quiet")
BUDGET = 15_000_000
# appended to a copy of the page: what Plotly drew, each trace with the title of its y axis, as JSON in the DOM
PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const plots = [...document.querySelectorAll(".js-plotly-plot")].map(gd => gd._fullData.map(t => ({
    name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || []),
    axis: ((gd._fullLayout["yaxis" + t.yaxis.slice(1)] || {}).title || {}).text || ""})));
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(plots);
  document.body.appendChild(pre);
}, 500));
</script>"""


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "tokennas.cli", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    result = cli(*SEARCH, "--out", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli("report", run_dir)  # a rebuild replaces the run's own best/, a previous export
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def infeasible(run_dir):
    frame = pd.read_csv(run_dir / "trials.csv")
    over = frame[frame["state"] == "INFEASIBLE"]
    assert len(over), "the fixture's budget left no proposal over budget; pick a tighter --flops"
    return over


def test_markdown_subset_becomes_html():
    text = ("# Run <1>\n\n- objective: acc & more\n- seed: 0\n\n| rank | trial |\n|---|:---:|\n| 1 | <b>8</b> |\n"
            "| 2 |  |\n\nA paragraph\nover two lines.\n| not a table\n")
    page = markdown_html(text)
    assert page.startswith("<h1>Run &lt;1&gt;</h1>")
    assert "<ul><li>objective: acc &amp; more</li><li>seed: 0</li></ul>" in page
    assert ("<table><thead><tr><th>rank</th><th>trial</th></tr></thead><tbody><tr><td>1</td><td>&lt;b&gt;8&lt;/b&gt;"
            "</td></tr><tr><td>2</td><td></td></tr></tbody></table>") in page
    assert page.endswith("<p>A paragraph over two lines.</p>\n<p>| not a table</p>")  # a lone "|" line is text
    assert "|---|" not in page and "<b>" not in page
    # **bold** (a schedule slower than its parent is flagged so), also in table cells, its content still escaped
    assert markdown_html("| a |\n|---|\n| 0.9x **SLOWER <x>** |\n") == (
        "<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>0.9x <strong>SLOWER &lt;x&gt;</strong></td></tr>"
        "</tbody></table>")


def test_export_refuses_a_folder_of_user_configs(run_dir, tmp_path):
    mine = tmp_path / "configs"
    mine.mkdir()
    files = {"01-my-baseline.yaml": b"embed_dim: 192\n", "02-ablation.yaml": b"embed_dim: 96  # no pooling\n"}
    for name, data in files.items():
        (mine / name).write_bytes(data)
    result = cli("export", run_dir, "--top", "1", "--out", mine)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "01-my-baseline.yaml" in result.stderr
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == files  # untouched, and nothing added


def test_export_touches_only_the_files_it_listed(run_dir, tmp_path):
    best = sorted((run_dir / "best").glob("*.yaml"))
    assert len(best) >= 2 and (run_dir / "best" / EXPORT_MARK).read_text().split() == [p.name for p in best]
    entries = [(p.name, yaml.safe_load(p.read_text())) for p in best[:2]]
    out = tmp_path / "exported"
    write_export(entries, out)
    (out / "notes.txt").write_text("mine")
    write_export(entries[:1], out)  # the previous export's second config goes, the note stays
    assert sorted(p.name for p in out.iterdir()) == sorted([EXPORT_MARK, best[0].name, "notes.txt"])
    (out / best[1].name).write_text("the user's own config\n")  # not in the list: the next export must not take it
    with pytest.raises(ValueError, match=re.escape(best[1].name)):
        write_export(entries, out)
    assert (out / best[1].name).read_text() == "the user's own config\n"
    assert (out / EXPORT_MARK).read_text().split() == [best[0].name] and (out / best[0].name).is_file()


def test_pareto_png_keeps_over_budget_proposals_off_the_accuracy_axis(run_dir, infeasible):
    import matplotlib.pyplot as plt

    fig = pareto_figure(pd.read_csv(run_dir / "trials.csv"), BUDGET)
    try:
        drawn = {ax.get_ylabel(): {x for c in ax.collections for x, _ in c.get_offsets()} for ax in fig.axes}
    finally:
        plt.close(fig)
    over = set(infeasible["flops"].astype(float))
    assert not drawn.pop("validation accuracy") & over
    assert [label for label, xs in drawn.items() if over <= xs] == [f"over budget,\nnot trained ({len(over)})"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it with apt-get as root)")
def test_report_page_in_chromium(run_dir, infeasible, tmp_path_factory):
    page = tmp_path_factory.mktemp("page") / "report.html"
    page.write_text((run_dir / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--virtual-time-budget=15000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180).stdout
    text = re.sub(r"<script.*?</script>", "", dom, flags=re.S)
    # the summary is a table, not markdown in a <pre>
    tables = re.findall(r"<table.*?</table>", text, flags=re.S)
    assert any("<th>rank</th>" in t and "<th>trial</th>" in t for t in tables)
    assert "|---|" not in text and "<pre>#" not in text
    probe = re.search(r'<pre id="probe">(.*?)</pre>', dom, flags=re.S)
    assert probe, "Plotly did not finish drawing in Chromium"
    plots = json.loads(html.unescape(probe.group(1)))
    assert len(plots) >= 3
    numbers, flops = set(infeasible["number"].astype(float)), set(infeasible["flops"].astype(float))
    # no over-budget proposal on an accuracy axis, where Optuna's own history drew them at 0
    traces = [trace for plot in plots for trace in plot]
    on_accuracy = [trace for trace in traces if "acc" in trace["axis"]]
    assert on_accuracy
    for trace in on_accuracy:
        points = list(zip(trace["x"], trace["y"], strict=True))
        assert not [(x, y) for x, y in points if x in numbers | flops], trace["name"]
    # ... but drawn apart, in the history and against FLOPs, each under its own legend entry
    label = f"over budget, not trained ({len(infeasible)})"
    apart = [trace for trace in traces if trace["name"] == label]
    assert len(apart) == 2 and {"acc" in trace["axis"] for trace in apart} == {False}
    assert numbers <= set(apart[0]["x"]) | set(apart[1]["x"]) and flops <= set(apart[0]["x"]) | set(apart[1]["x"])
    assert label in text  # in the rendered legend


@pytest.mark.parametrize("objective,cost", [("pareto", "flops"), ("pareto-latency", "predicted_latency_ms_batch1")])
def test_without_re_ranking_the_pareto_ranking_puts_the_search_front_first(objective, cost):
    """Nothing re-ranked: the exported order is the front of the search's accuracy against the cost (FLOPs, or
    predicted latency), as ``ranked`` orders the schedules the frozen strategy times, not accuracy alone."""
    import optuna

    from tokennas.report.tables import final_ranking, ranked, retrain_table

    frame = pd.DataFrame({"number": pd.array([0, 1, 2], dtype="Int64"), "role": "candidate", "state": "COMPLETE",
                          "flops": [30, 10, 40], "params": 1, "val_acc": [0.9, 0.8, 0.85], "epochs": 0})
    if cost != "flops":
        frame[cost], frame["flops"] = [3.0, 1.0, 4.0], 5  # the same front, on the predicted latency
    ranking = final_ranking(frame, retrain_table(optuna.create_study()), objective)  # no re-ranking runs
    assert list(ranking["number"]) == [0, 1, 2] == list(ranked(frame, objective)["number"])
    assert list(ranking["pareto"]) == [True, True, False]
