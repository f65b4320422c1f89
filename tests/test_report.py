"""`autopeft report`: the HTML report of a study, its figures, escaping, and rendering in a real headless Chromium.

Studies are written with Optuna's API exactly as the engine writes them (directions, metric names, the `autopeft`
settings attribute, per-trial plan / params / curve / epochs / seconds / baseline / fail_reason), so these tests
need no Ray; tests/test_dashboard.py builds a report from a real search.
"""

from __future__ import annotations

import re
import subprocess
import warnings
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from autopeft.cli import main
from autopeft.records import TrialRecord
from autopeft.report import FIGURES, build_report, report_figures, write_report
from autopeft.search import storage as st
from autopeft.search.study_settings import StudySettings

CHROMIUM = Path("/usr/bin/chromium")
N_FIGURES = len(FIGURES)
SETTINGS = {
    "study": "rich", "dataset": "digits", "budget": "5%", "backbone": "autopeft_test_vit", "weights": None,
    "data_root": None, "space": "unified", "trials": 12, "epochs": 3, "grace_epochs": 1, "reduction_factor": 2,
    "sampler": "tpe", "objectives": ["acc", "params"], "gpus_per_trial": 0.0, "cpus_per_trial": 1.0,
    "concurrency": 2, "warm_start": None, "seed": 0, "baselines": True, "budget_limit": 1622,
    "budget_percent": 4.998767258382643, "backbone_params": 32448, "num_classes": 10,
}
DISTRIBUTIONS = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "weight_decay": FloatDistribution(0.0, 0.1),
                 "block0.update": CategoricalDistribution(["lora", "ssf", "none"])}


def lora(rank: int, blocks: range | list[int]) -> dict:
    return {"version": 1, "blocks": {str(b): [{"method": "lora", "rank": rank, "alpha": 0.0, "targets": ["q", "v"]}]
                                     for b in blocks}, "global": []}


def plan_of(*parts: tuple[int, dict], shallow: int = 0) -> dict:
    blocks: dict[str, list] = {}
    for block, entry in parts:
        blocks.setdefault(str(block), []).append(entry)
    return {"version": 1, "blocks": blocks, "global": [{"method": "vpt_shallow", "length": shallow}] if shallow else []}


def trial(state: str, plan: dict, params: int, curve: list[float], lr: float = 1e-3, **tags: Any) -> dict:
    return {"state": state, "plan": plan, "params": params, "curve": curve, "lr": lr, **tags}


def make_study(url: str, name: str, trials: list[dict], settings: dict | None = None) -> optuna.Study:
    """A study as the engine leaves it: FAIL/PRUNED trials without values, COMPLETE ones with (val_acc, params)."""
    study = optuna.create_study(study_name=name, storage=st.open_storage(url), directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_acc", "peft_params"])
    study.set_user_attr(st.STUDY_SETTINGS, dict(settings or SETTINGS, study=name))
    for t in trials:
        attrs = {st.ATTR_PLAN: t["plan"], st.ATTR_PARAMS: t["params"], st.ATTR_PERCENT: 100 * t["params"] / 32448,
                 st.ATTR_MAX_EPOCHS: 3, st.ATTR_OVERHEAD: 0.0, st.ATTR_HPARAMS: {"lr": t["lr"]},
                 st.ATTR_CURVE: t["curve"], st.ATTR_EPOCHS: len(t["curve"]), st.ATTR_SECONDS: 1.5 * len(t["curve"]),
                 st.ATTR_NODE: "n0"}
        for key in (st.ATTR_BASELINE, st.ATTR_REASON):
            if key in t:
                attrs[key] = t[key]
        params = {"lr": t["lr"], "weight_decay": 0.05 if t.get(st.ATTR_BASELINE) else t["lr"] * 7 % 0.1}
        if not t.get(st.ATTR_BASELINE):
            params["block0.update"] = t["plan"]["blocks"].get("0", [{"method": "none"}])[0]["method"]
        state = TrialState[t["state"]]
        values = [t["curve"][-1], float(t["params"])] if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, values=values, params=params,
                                     distributions={k: DISTRIBUTIONS[k] for k in params}, user_attrs=attrs))
    return study


RICH = [
    trial("COMPLETE", lora(4, range(3)), 1536, [0.30, 0.52, 0.61], baseline="lora"),
    trial("PRUNED", plan_of(*[(b, {"method": "adapter", "dim": 4, "position": "mlp"}) for b in range(3)]), 876,
          [0.22], baseline="adapter"),
    trial("COMPLETE", {"version": 1, "blocks": {}, "global": [{"method": "linear"}]}, 0, [0.20, 0.31, 0.35],
          baseline="linear"),
    trial("FAIL", plan_of(*[(b, {"method": "vpt_deep", "length": 10}) for b in range(3)]), 960, [0.1],
          baseline="vpt_deep", fail_reason="training diverged (NaN loss)"),
    trial("COMPLETE", plan_of(*[(b, {"method": "bitfit"}) for b in range(3)]), 700, [0.28, 0.45, 0.50],
          lr=3e-3, baseline="bitfit"),
    trial("COMPLETE", lora(8, [1, 2]), 1024 + 400, [0.35, 0.58, 0.66], lr=2e-3),
    trial("PRUNED", plan_of((0, {"method": "ssf", "init": "identity"}), (2, {"method": "adapter", "dim": 2,
                                                                              "position": "mlp"})), 600,
          [0.21, 0.30], lr=5e-4),
    trial("COMPLETE", plan_of((0, {"method": "lora", "rank": 2, "alpha": 0.0, "targets": ["q", "v"]}),
                              (1, {"method": "vpt_deep", "length": 5}), shallow=4), 650, [0.33, 0.49, 0.57],
          lr=4e-3),
    trial("PRUNED", lora(2, [2]), 256, [0.12], lr=1.2e-4),
    trial("COMPLETE", plan_of((1, {"method": "adaptformer", "dim": 4, "scale": 0.1}),
                              (2, {"method": "lora", "rank": 4, "alpha": 8.0, "targets": ["q", "k", "v"]})), 1100,
          [0.31, 0.55, 0.63], lr=2.5e-3),
    trial("FAIL", lora(4, [0]), 512, [], lr=9e-3, fail_reason="the trial's worker process failed; see the Ray logs"),
    trial("COMPLETE", plan_of((0, {"method": "ssf", "init": "identity"})), 300, [0.26, 0.40, 0.44], lr=6e-3),
]


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> tuple[str, Path]:
    """(storage URL, report path) of a 12-trial study with baselines, stopped, failed and head-only trials."""
    d = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{d}/rich.db"
    make_study(url, "rich", RICH)
    path, n = write_report("rich", url, d / "rich.html")
    assert n == len(RICH)
    return url, path


def newplot_count(html: str) -> int:
    return html.count("Plotly.newPlot(")


# -- content -------------------------------------------------------------------------------------------------------


def test_report_names_the_study_and_embeds_plotly(rich) -> None:
    _, path = rich
    html = path.read_text()
    title = re.search(r"<title>(.*?)</title>", html).group(1)
    for part in ("rich", "digits", "autopeft_test_vit", "budget 5%", "UTC"):
        assert part in title, part
    assert re.search(r"\d{4}-\d\d-\d\d", title)
    # self-contained: plotly.js inline, no script or stylesheet loaded from elsewhere
    assert all("src=" not in tag for tag in re.findall(r"<script[^>]*>", html)) and "<link" not in html
    assert len(html) > 3_000_000
    assert newplot_count(html) == N_FIGURES
    assert 'id="configs"' in html and "lora@0-2" in html  # the Pareto table
    assert "training diverged (NaN loss)" in html  # the failed-trials table


def test_figures_show_every_trial_the_front_budget_and_baselines(rich) -> None:
    url, _ = rich
    study = st.load_study("rich", url)
    settings, records = st.load_records("rich", url)
    figs = report_figures(settings, records, study)
    assert list(figs) == [key for key, _ in FIGURES]

    pareto = figs["pareto"]
    names = [t.name for t in pareto.data]
    assert pareto.layout.xaxis.type == "log"
    drawn = sum(len(t.x) for t in pareto.data if t.name and t.name.startswith(("complete", "stopped", "failed")))
    assert drawn == len(RICH)  # every finished trial, pruned and failed ones included
    front = next(t for t in pareto.data if t.name.startswith("Pareto front"))
    assert len(front.x) >= 2 and list(front.y) == sorted(front.y)
    assert any(n.startswith("budget 5% = 1,622") for n in names)
    labels = next(t for t in pareto.data if t.name == "baselines")
    assert set(labels.text) == {"lora", "adapter", "linear", "vpt_deep", "bitfit"}
    hovers = " ".join(h for t in pareto.data if t.hovertext for h in t.hovertext)
    assert "lora(rank=8)@1-2" in hovers and "failed: training diverged" in hovers

    layers = figs["layers"].data[0]
    assert list(layers.x) == ["global", "0", "1", "2"]
    sizes = {v for row in layers.z for v in row if v is not None}
    assert {8.0, 4.0, 5.0} <= sizes  # lora rank, prompt lengths, adapter dims

    curves = figs["curves"]
    stops = next(t for t in curves.data if t.name.startswith("stopped by ASHA"))
    assert len(stops.x) == 3 and sorted(stops.x) == [1, 1, 2]

    families = {t.name.split(" (")[0]: t.legendgroup for t in figs["families"].data if t.legendgroup}
    assert families["lora"] == families["linear"] == "partial" and families["vpt_deep"] == "addition"

    importance = figs["importance"].data[0]
    assert importance.type == "bar" and "lr" in importance.y

    totals = figs["compute"].data[-1]
    assert list(totals.y) == [sum(len(t["curve"]) for t in RICH), 3 * len(RICH)]


def test_report_of_failed_and_pruned_trials_only(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    make_study(url, "bad", [t for t in RICH if t["state"] != "COMPLETE"])
    path, _ = write_report("bad", url, tmp_path / "bad.html")
    html = path.read_text()
    assert newplot_count(html) == N_FIGURES
    assert "no trial has been trained to full length yet" in html  # layer map and families say why
    assert "importance not available" in html
    assert "no trial trained to full length fits the budget yet" in html


def test_report_of_one_trial_and_of_an_empty_study(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    make_study(url, "one", RICH[:1])
    html = write_report("one", url, tmp_path / "one.html")[0].read_text()
    assert newplot_count(html) == N_FIGURES
    assert "needs at least 2 complete trials; the study has 1" in html
    make_study(url, "none", [])
    html = write_report("none", url, tmp_path / "none.html")[0].read_text()
    assert newplot_count(html) == N_FIGURES and "no trial has finished yet" in html


def test_report_from_records_without_a_study() -> None:
    records = [TrialRecord(number=0, plan=RICH[0]["plan"], peft_params=1536, val_acc=0.6, curve=[0.5, 0.6],
                              epochs=2, max_epochs=2)]
    html = build_report(StudySettings.from_stored(SETTINGS), records)
    assert newplot_count(html) == N_FIGURES and "built without its Optuna study" in html


HOSTILE = "<script>alert(1)</script>"


def test_strings_from_the_study_are_escaped(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    evil_plan = {"version": 1, "blocks": {"0": [{"method": "<img src=x onerror=alert(2)>", "dim": 4}]}, "global": []}
    make_study(url, HOSTILE, [
        trial("COMPLETE", evil_plan, 10, [0.5, 0.6, 0.7], baseline="<b>bold</b>"),
        trial("COMPLETE", lora(4, [0]), 20, [0.5, 0.6, 0.8]),
        trial("FAIL", lora(4, [1]), 20, [0.1], fail_reason="</script><script>alert(3)</script>"),
    ])
    path, _ = write_report(HOSTILE, url, tmp_path / "hostile.html")
    html = path.read_text()
    for raw in (HOSTILE, "<img src=x", "alert(3)</script>", "<b>bold</b>"):
        assert raw not in html, raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown as text in the title and heading
    assert "&lt;/script&gt;&lt;script&gt;alert(3)" in html  # the failed-trials table
    assert html.count("<script") == 1 + N_FIGURES  # plotly.js and one script per figure, nothing injected


def test_cli_writes_the_report_and_refuses_unknown_studies(rich, tmp_path, capsys) -> None:
    url, _ = rich
    out = tmp_path / "r" / "x.html"
    assert main(["report", "--study", "rich", "--storage", url, "-o", str(out), "--top-k", "3"]) == 0
    assert out.is_file() and f"written to {out}" in capsys.readouterr().out
    rows = report_figures(*st.load_records("rich", url), top_k=3)["layers"].layout.yaxis.ticktext
    assert {label.split(" ")[0] for label in rows} == {"#1", "#2", "#3"}
    assert main(["report", "--study", "nope", "--storage", url]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


# -- a real browser --------------------------------------------------------------------------------------------------


class _PlotCounter(HTMLParser):
    """Counts `.js-plotly-plot` elements in a DOM dump and the plotly SVGs (`svg.main-svg`) inside each."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, int | None]] = []  # open elements: (tag, index of the plot it opens or None)
        self.plots: list[int] = []  # main SVGs found inside each plot

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        index = None
        if tag == "div" and "js-plotly-plot" in classes:
            index = len(self.plots)
            self.plots.append(0)
        elif tag == "svg" and "main-svg" in classes:
            inside = [i for _, i in self.stack if i is not None]
            if inside:
                self.plots[inside[-1]] += 1
        if tag not in self.VOID:
            self.stack.append((tag, index))

    def handle_endtag(self, tag: str) -> None:
        if any(name == tag for name, _ in self.stack):
            while self.stack.pop()[0] != tag:
                pass


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a file, offline and with a fresh profile; virtual time lets plotly finish drawing."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--virtual-time-budget=20000", *args, page.absolute().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="/usr/bin/chromium is absent (apt-get install chromium; .ci/run does)")


@needs_chromium
def test_every_figure_renders_in_headless_chromium(rich, tmp_path) -> None:
    _, path = rich
    dom = chromium(path, tmp_path / "p1", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    counter = _PlotCounter()
    counter.feed(dom.stdout)
    assert len(counter.plots) == N_FIGURES, counter.plots
    assert all(n >= 1 for n in counter.plots), f"figures without SVG: {counter.plots}"

    from PIL import Image

    shot = tmp_path / "report.png"
    run = chromium(path, tmp_path / "p2", f"--screenshot={shot}", "--window-size=1280,1150")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1150)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 100, "the screenshot is (nearly) one colour"
    background = max(colors)[0] / (image.width * image.height)
    assert background < 0.9, f"{background:.0%} of the screenshot is one colour"


@needs_chromium
def test_escaped_strings_stay_text_in_the_browser(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    make_study(url, HOSTILE, [trial("FAIL", lora(4, [1]), 20, [0.1], fail_reason="<img src=x onerror=alert(3)>")])
    path, _ = write_report(HOSTILE, url, tmp_path / "hostile.html")
    dom = chromium(path, tmp_path / "p", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    title = re.search(r"<h1>(.*?)</h1>", dom.stdout).group(1)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in title
    assert "<img" not in dom.stdout and "<script>alert" not in dom.stdout
