"""Sweeps in sweeps/ and the analysis package: loader, labels, aggregation over seeds, figures, report command,
the walkthrough notebook, robust timing records, resumable sweeps."""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the tests only draw into files and objects

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from conftest import CONF, ROOT, TINY, cli, make_cfg, read_metrics, run_job  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402

from analysis import figures as F  # noqa: E402
from analysis.labels import labels, preset  # noqa: E402
from analysis.load import load_metrics, load_runs, sweep_root, time_column, time_to_target  # noqa: E402
from analysis.report import jobs_table, readable, table, to_markdown  # noqa: E402
from analysis.report import main as report_main  # noqa: E402
from analysis.stats import aggregate, fmt, interval  # noqa: E402
from detox.config import validate  # noqa: E402
from detox.timing import Timer  # noqa: E402
from detox.trainer import ROBUST_KEYS, _Window  # noqa: E402

SWEEPS = ROOT / "sweeps"
SWEEP_FILES = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
# composing every job of a paper-scale sweep takes seconds each: the full suite checks them
SWEEP_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n.endswith("_full") else n for n in SWEEP_FILES]
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))

# ----------------------------------------------------------------------------------- synthetic multiruns


def write_job(root: Path, method: str, attack: str, seed: int, accs: list[float], *, q: int = 5,
              status: str = "completed", figure: str = "A", per_step: float | None = None, t_comm: float = 0.0,
              corrupted: float | None = None, approach_changes: dict | None = None,
              attack_params: dict | None = None) -> Path:
    """A finished job folder as a sweep writes it (named by its overrides), with metrics every 10 steps."""
    name = f"err_mode={attack},method={method},seed={seed},task=fc-fashion" + (f",worker_fail={q}" if figure == "E"
                                                                                else "")
    d = root / name
    d.mkdir(parents=True)
    settings = copy.deepcopy(preset(method))  # (preset is cached: changing its dict would change every later job's)
    settings["approach"].update(approach_changes or {})
    config = {**settings, "err_mode": {"name": attack, **(attack_params or {})}, "seed": seed, "workers": 45,
              "worker_fail": q, "dataset": {"name": "fashion_mnist", "num_classes": 10}, "data_root": f"/tmp/{seed}"}
    (d / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    defence = "detox" if method.startswith("detox") else "vanilla"
    summary = {"status": status, "choices": {"network": "fc", "dataset": "fashion_mnist",
                                             "mode": settings["mode"]["name"],
                                             "approach": settings["approach"]["name"], "err_mode": attack,
                                             "engine": "local", "task": "fc-fashion", "method": method},
               "workers": 45, "worker_fail": q, "group_size": 3, "placement": "random", "figure": figure,
               "target_acc": 0.85, "seed": seed}
    if status == "failed":
        summary["error"] = "RuntimeError: boom"
        (d / "summary.json").write_text(json.dumps(summary))
        return d
    per_step = per_step if per_step is not None else (0.01 if defence == "detox" else 0.03)
    records = []
    for i, acc in enumerate(accs):
        step, timed = 10 * i, i > 0
        # the mean-based clock carries a load spike in seed 1's vanilla runs; the median-based one does not
        spike = 1.0 + (2.0 if seed == 1 and defence == "vanilla" else 0.0)
        records.append({"step": step, "cluster_time": step * per_step * spike, "cluster_time_median": step * per_step,
                        "wall_time": step * 0.05, "test_acc": acc, "t_compute": timed and 0.3 * per_step,
                        "t_comm": timed and t_comm, "t_vote": timed and (0.2 * per_step if defence == "detox" else 0),
                        "t_aggregate": timed and 0.5 * per_step * spike, "t_update": timed and 0.01 * per_step,
                        "t_compute_median": timed and 0.3 * per_step, "t_comm_median": timed and t_comm,
                        "t_vote_median": timed and (0.2 * per_step if defence == "detox" else 0.0),
                        "t_aggregate_median": timed and 0.5 * per_step, "t_update_median": timed and 0.01 * per_step,
                        "t_step_p10": timed and 0.8 * per_step, "t_step_p90": timed and 1.5 * per_step,
                        "corrupted_groups": None if not timed else (corrupted if corrupted is not None else
                                                                    (0.4 if defence == "detox" else q))})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary.update({"final_test_acc": accs[-1], "best_test_acc": max(accs), "steps": 10 * (len(accs) - 1)})
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def _curve(defence: str, seed: int, bad: bool = False) -> list[float]:
    """Accuracies at steps 0..60 that differ in the third decimal, as the real robust curves do."""
    top = 0.872 if defence == "vanilla" else 0.862
    curve = [0.1, 0.70, 0.80, 0.84, 0.85, 0.86, top]
    if bad:
        curve = [0.1, 0.70, 0.72, 0.68, 0.64, 0.60, 0.56]
    return [round(a + (0 if i == 0 else 0.003 * (seed - 1)), 4) for i, a in enumerate(curve)]


def sweep_a(root: Path) -> Path:
    """Figure A: 2 attacks x 2 rules x vanilla/DETOX x 3 seeds; DETOX-Bulyan with one seed (n=1), vanilla Bulyan
    failed, one job killed before it wrote anything, one folder that is no job."""
    for attack, rule, defence, seed in itertools.product(("rev_grad", "constant"), ("multi-krum", "coord-median"),
                                                         ("vanilla", "detox"), (0, 1, 2)):
        bad = attack == "constant" and rule == "coord-median" and defence == "vanilla"
        write_job(root, f"{defence}-{rule}", attack, seed, _curve(defence, seed, bad),
                  attack_params={"scale": 100.0} if attack == "rev_grad" else {"value": -100.0})
    write_job(root, "vanilla-bulyan", "rev_grad", 0, [], status="failed")
    write_job(root, "detox-bulyan", "rev_grad", 0, _curve("detox", 1))
    (root / "err_mode=constant,method=detox-bulyan,seed=0,task=fc-fashion" / ".hydra").mkdir(parents=True)
    (root / "report-notes").mkdir()  # not a job folder
    return root


def sweep_b(root: Path) -> Path:
    for rule, defence, seed in itertools.product(("multi-krum", "bulyan", "coord-median"), ("vanilla", "detox"),
                                                 (0, 1, 2)):
        write_job(root, f"{defence}-{rule}", "rev_grad", seed, _curve(defence, seed), figure="B",
                  per_step=0.02 * (1 + 0.1 * seed) if defence == "detox" else 0.03 * (1 + 0.05 * seed))
    return root


def sweep_c(root: Path) -> Path:
    for method in ("vanilla-multi-krum", "detox-multi-krum", "vanilla-mean", "maj-vote"):
        for seed in (0, 1, 2):
            if method == "vanilla-mean":
                write_job(root, method, "rev_grad", seed, [0.1, 0.1], status="diverged", figure="C", per_step=0.004)
            elif method == "maj-vote":
                write_job(root, method, "rev_grad", seed, [0.1, 0.1, 0.1], figure="C", per_step=0.006)
            else:
                write_job(root, method, "rev_grad", seed, _curve(method.split("-")[0], seed), figure="C")
    return root


def sweep_d(root: Path) -> Path:
    for method, final in (("vanilla-multi-krum", 0.63), ("detox-multi-krum", 0.83), ("sign-sgd", 0.65)):
        for seed in (0, 1, 2):
            write_job(root, method, "alie", seed, [0.1, 0.7, 0.78, final + 0.01 * seed], figure="D",
                      attack_params={"z": 1.0})
    return root


def sweep_e(root: Path) -> Path:
    expected = [0, 0, 0.045, 0.134, 0.264, 0.433]
    for method, q, seed in itertools.product(("vanilla-mean", "vanilla-multi-krum", "detox-multi-krum",
                                              "vanilla-coord-median", "detox-coord-median"), range(6), (0, 1, 2)):
        defence = method.split("-")[0]
        if method == "vanilla-mean" and q > 0:
            write_job(root, method, "rev_grad", seed, [0.1, 0.1], q=q, status="diverged", figure="E")
            continue
        drop = {"vanilla-multi-krum": 0.0, "detox-multi-krum": 0.002, "vanilla-coord-median": 0.004,
                "detox-coord-median": 0.003, "vanilla-mean": 0.0}[method] * q
        accs = [0.1, 0.8, 0.87 - drop + 0.001 * seed]
        # every grouped method with the same seed meets the same Byzantine draws: identical counts
        write_job(root, method, "rev_grad", seed, accs, q=q, figure="E",
                  corrupted=max(0.0, expected[q] + 0.01 * (seed - 1)) if defence == "detox" else q)
    return root


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return sweep_a(tmp_path / "multirun")


# ----------------------------------------------------------------------------------- loader and labels


def test_loader_groups_seeds_and_keeps_failures(sweep: Path) -> None:
    runs = load_runs(sweep)
    assert len(runs) == 2 * 2 * 2 * 3 + 3
    assert all(isinstance(j, str) and "seed=" in j for j in runs["job"])
    failed = runs[runs["status"] == "failed"].iloc[0]
    assert failed["error"] == "RuntimeError: boom" and failed["label"] == "vanilla-bulyan"
    assert (runs["status"] == "missing").sum() == 1
    mk = runs[(runs["label"] == "detox-multi-krum") & (runs["err_mode"] == "rev_grad")]
    assert sorted(mk["seed"]) == [0, 1, 2] and mk["config"].nunique() == 1  # seeds: one configuration
    assert runs[runs["label"] == "detox-multi-krum"]["config"].nunique() == 2  # two attacks: two configurations
    assert mk[["defence", "rule"]].drop_duplicates().values.tolist() == [["detox", "multi-krum"]]
    assert mk["attack"].iloc[0] == "rev_grad (scale = 100)"
    assert mk["t_aggregate"].iloc[0] == pytest.approx(0.005) and mk["t_aggregate_median"].iloc[0] == pytest.approx(
        0.005)
    spiked = runs[(runs["label"] == "vanilla-multi-krum") & (runs["seed"] == 1)].iloc[0]
    assert spiked["t_aggregate"] == pytest.approx(3 * spiked["t_aggregate_median"])
    assert spiked["cluster_time_median"] == pytest.approx(60 * 0.03) and spiked["corrupted_per_step"] == 5
    metrics = load_metrics(sweep, runs)
    assert len(metrics) == 25 * 7
    assert set(metrics.columns) >= {"step", "test_acc", "label", "err_mode", "config", "seed", "worker_fail"}
    assert time_column(metrics) == "cluster_time_median"
    assert time_column(metrics.drop(columns="cluster_time_median")) == "cluster_time"


def test_relative_sweep_roots_resolve_from_the_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT / "analysis")  # where a notebook kernel starts
    assert sweep_root("multirun/fig_a_cpu") == ROOT / "multirun" / "fig_a_cpu"
    assert sweep_root(tmp_path) == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert sweep_root("here") == Path("here")  # present under the current folder: taken as it is


@pytest.mark.parametrize("method", METHODS)
def test_preset_settings_match_hydra_composition(method: str) -> None:
    cfg = make_cfg([f"method={method}"])
    composed = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in ("approach", "mode")}
    assert preset(method) == composed
    assert labels(method, None, None, OmegaConf.to_container(cfg, resolve=True))[0] == method


def test_labels_come_from_the_config_that_ran() -> None:
    def label(*overrides: str) -> tuple[str, str, str]:
        cfg = OmegaConf.to_container(make_cfg(list(overrides)), resolve=True)
        return labels(cfg.get("method"), cfg["approach"]["name"], cfg["mode"]["name"], cfg)

    assert label("method=detox-multi-krum") == ("detox-multi-krum", "detox", "multi-krum")
    assert label("approach=draco-lite", "mode=multi-krum") == ("draco-lite/multi-krum", "detox", "multi-krum")
    assert label("method=detox-multi-krum", "approach.buckets=null")[0] == "draco-lite/mean (vote=boyer-moore)"
    assert label("method=detox-coord-median", "approach.buckets=3") == (
        "draco-lite/3×mean→coord-median (vote=boyer-moore)", "detox", "coord-median")
    assert label("method=vanilla-multi-krum", "mode.m=10") == ("baseline/multi-krum (m=10, neighbours=original)",
                                                               "vanilla", "multi-krum")
    assert label("approach=baseline", "mode=bulyan") == ("baseline/bulyan", "vanilla", "bulyan")
    assert labels("detox-bulyan", "draco-lite", "bulyan") == ("detox-bulyan", "detox", "bulyan")  # no config: trusted


# ----------------------------------------------------------------------------------- aggregation over seeds


def test_interval_is_the_student_t_interval() -> None:
    s = interval([0.80, 0.82, 0.87, None, float("nan")])
    assert s.n == 3 and s.mean == pytest.approx(0.83) and s.sd == pytest.approx(np.std([0.8, 0.82, 0.87], ddof=1))
    half = scipy_stats.t.ppf(0.975, 2) * s.sd / math.sqrt(3)
    assert (s.lo, s.hi) == pytest.approx((0.83 - half, 0.83 + half))
    assert half == pytest.approx(4.303 * s.sd / math.sqrt(3), rel=1e-3)
    one = interval([0.9])
    assert one.n == 1 and math.isnan(one.sd) and math.isnan(one.lo) and one.text() == "0.9 (n=1)"
    assert interval([]).n == 0 and fmt(np.nan, np.nan, 0) == ""
    assert s.text() == "0.83 ± 0.036 (n=3)"
    same = interval([0.4, 0.4])
    assert (same.lo, same.hi) == (0.4, 0.4)
    agg = aggregate(pd.DataFrame({"config": ["a", "a", "a", "b"], "v": [1.0, 2.0, 3.0, 10.0]}), "config", ["v"])
    assert agg["v"].tolist() == [2.0, 10.0] and agg["v_n"].tolist() == [3, 1] and math.isnan(agg["v_lo"].iloc[1])


def test_time_to_target_and_speedup_over_seeds(tmp_path: Path) -> None:
    root = sweep_b(tmp_path / "b")
    runs = load_runs(root)
    metrics = load_metrics(root, runs)
    ttt = time_to_target(metrics, 0.85)
    job = runs[(runs["label"] == "vanilla-bulyan") & (runs["seed"] == 1)]["job"].iloc[0]
    # vanilla seed 1 reaches 0.85 at step 40 (0.847 + 0.003); on the median clock 40 * 0.03 * 1.05
    assert ttt[job] == pytest.approx(40 * 0.03 * 1.05)
    assert time_to_target(metrics, 0.85, "cluster_time")[job] == pytest.approx(3 * 40 * 0.03 * 1.05)  # the spike
    sp = F.speedups(runs, metrics, 0.85).set_index("rule")
    # both reach 0.85 at step 50, 40, 40 in seeds 0, 1, 2 (seed 0 is 0.003 lower); their clocks differ per seed
    ratios = [0.03 * (1 + 0.05 * s) / (0.02 * (1 + 0.1 * s)) for s in (0, 1, 2)]
    assert sp.loc["bulyan", "speedup"] == pytest.approx(np.mean(ratios))
    assert sp.loc["bulyan", "speedup_n"] == 3 and sp.loc["bulyan", "vanilla_reached"] == 3
    assert sp.loc["bulyan", "speedup_lo"] < sp.loc["bulyan", "speedup"] < sp.loc["bulyan", "speedup_hi"]
    assert sp.loc["bulyan", "clock"] == "cluster_time_median"


# ----------------------------------------------------------------------------------- figures


def _texts(fig: plt.Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [
        t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_fig_a_shades_intervals_counts_seeds_and_zooms(sweep: Path) -> None:
    runs = load_runs(sweep)
    metrics = load_metrics(sweep, runs)
    fig = F.fig_a(metrics)
    assert len(fig.axes) == 2 * 3  # attacks x rules
    ax = fig.axes[0]  # multi-krum, rev_grad
    assert [ln.get_color() for ln in ax.get_lines()] == ["tab:blue", "tab:orange"]  # vanilla, DETOX
    assert len(ax.collections) == 2  # one shaded interval per configuration
    assert set(_texts(fig)) >= {"vanilla-multi-krum (n=3)", "detox-multi-krum (n=3)", "detox-bulyan (n=1)"}
    assert ax.get_ylim()[0] > 0.6 and ax.get_ylim()[1] < 0.95  # zoomed onto 0.70-0.875
    assert ax.get_xlabel() == "cluster time (s, per-phase medians)"
    bulyan = fig.axes[1]
    band = bulyan.collections[0].get_paths()
    assert all(len(p.vertices) == 0 for p in band)  # n=1: nothing shaded
    bad = fig.axes[5]  # coord-median, constant: the vanilla median falls to 0.56
    assert bad.get_ylim()[0] < 0.56 and bad.get_ylim()[0] > 0.4
    plt.close("all")


def test_fig_b_labels_sit_over_their_pair_below_the_frame(tmp_path: Path) -> None:
    root = sweep_b(tmp_path / "b")
    runs = load_runs(root)
    fig = F.fig_b(runs, load_metrics(root, runs), 0.85)
    ax = fig.axes[0]
    labels_ = [t for t in ax.texts if "×" in t.get_text()]
    assert [round(t.get_position()[0], 6) for t in labels_] == [0.0, 1.0, 2.0]  # centred on each pair
    assert all("[" in t.get_text() and "n=3" in t.get_text() for t in labels_)  # interval and seed count
    fig.canvas.draw()
    frame = ax.get_window_extent()
    for t in labels_:
        assert t.get_window_extent().y1 < frame.y1 - 2  # clear of the frame
    bars = ax.patches
    assert bars[0].get_facecolor() == matplotlib.colors.to_rgba("tab:blue")  # vanilla as in fig_a
    assert bars[3].get_facecolor() == matplotlib.colors.to_rgba("tab:orange")
    assert len([c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]) == 2
    plt.close("all")


def test_fig_c_drops_zero_phases_and_marks_failed_methods(tmp_path: Path) -> None:
    root = sweep_c(tmp_path / "c")
    fig = F.fig_c(load_runs(root))
    texts = _texts(fig)
    assert "comm" not in texts and {"compute", "vote", "aggregate", "update"} <= set(texts)
    assert "diverged\n3/3 seeds" in texts and "chance\naccuracy" in texts
    assert fig.axes[0].get_ylabel() == "ms per iteration (median per phase)"
    total = fig.axes[0].containers[-1]  # the 95 % whiskers of the totals
    assert isinstance(total, matplotlib.container.ErrorbarContainer)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[0] == "vanilla-multi-krum\n(n=3)"
    # the vanilla multi-krum bar stacks the medians (30 ms per step), not the spiked means
    heights = [p.get_height() + p.get_y() for p in fig.axes[0].patches[:16] if abs(p.get_x() + 0.3) < 1e-9]
    assert max(heights) == pytest.approx(30 * (0.3 + 0.5 + 0.01))
    plt.close("all")


def test_fig_d_title_names_the_attack_strength_and_colours_match(tmp_path: Path) -> None:
    root = sweep_d(tmp_path / "d")
    fig = F.fig_d(load_runs(root))
    ax = fig.axes[0]
    assert "alie (z = 1)" in ax.get_title() and "q = 5 of P = 45" in ax.get_title()
    colours = [p.get_facecolor() for p in ax.patches[:3]]
    assert colours == [matplotlib.colors.to_rgba(c) for c in ("tab:blue", "tab:orange", "tab:gray")]
    plt.close("all")


def test_fig_e_shows_the_gap_to_the_clean_run(tmp_path: Path) -> None:
    root = sweep_e(tmp_path / "e")
    runs = load_runs(root)
    fig = F.fig_e(runs)
    left, right = fig.axes
    assert left.get_ylim() == (0, 1)
    assert "not drawn (diverged or at chance): vanilla-mean" in right.get_title()
    assert len(right.get_legend().get_texts()) == 4
    lo, hi = right.get_ylim()
    assert -0.03 < lo < -0.02 and hi < 0.01  # zoomed onto the gaps (down to -0.02 at q = 5)
    # the detox-coord-median gap at q = 5: -0.003 * 5 in every seed
    line = [ln for ln in right.get_lines() if ln.get_color() == "tab:orange" and ln.get_marker() == "^"][0]
    assert line.get_ydata()[-1] == pytest.approx(-0.015)
    theory = F.fig_theory(runs)
    ax = theory.axes[0]
    expected = ax.get_lines()[-1].get_ydata()
    assert expected[5] == pytest.approx(0.433, abs=1e-3)  # P=45, q=5, r=3
    measured = [c.lines[0] for c in ax.containers]
    assert len(measured) == 2
    xs = [m.get_xdata()[5] for m in measured]
    assert xs[0] != xs[1]  # the same counts, set side by side
    assert [m.get_ydata()[5] for m in measured] == pytest.approx([0.433, 0.433])
    plt.close("all")


def test_report_command_writes_figures_and_tables(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    for name in ("fig_a_time", "fig_a_iter"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.pdf").exists()
    md = (out / "table.md").read_text()
    assert "| detox-multi-krum | rev_grad | 5 | 3 | 3 completed | 0.862 ± 0.003 (n=3)" in md
    assert "| detox-bulyan | rev_grad | 5 | 1 | 1 completed | 0.862 (n=1)" in md
    assert "| vanilla-bulyan | rev_grad | 5 | 1 | 1 failed |" in md
    assert "| err_mode=constant,method=detox-bulyan,seed=0,task=fc-fashion |  |  | 1 | 1 missing |" in md
    assert "| 5 ± 0 (n=3) |" in md and "| 0.4 ± 0 (n=3) |" in md  # corrupted groups: no round-off noise
    assert "t_aggregate_median_ms" in md and "| 15 ± 0 (n=3) |" in md  # 0.5 x 30 ms, the spike left out
    jobs = (out / "jobs.csv").read_text().splitlines()
    assert len(jobs) == 1 + 27
    assert report_main([str(tmp_path / "nowhere")]) == 2
    root_b = sweep_b(tmp_path / "b")
    assert report_main([str(root_b), "--out", str(tmp_path / "rb")]) == 0
    md = (tmp_path / "rb" / "table.md").read_text()
    assert "## Speedup to 85% test accuracy (cluster time (s, per-phase medians))" in md
    assert "(n=3)" in md.split("## Speedup")[1] and (tmp_path / "rb" / "fig_b.png").exists()


# ----------------------------------------------------------------------------------- unfinished and broken jobs


def kill(job: Path) -> Path:
    """The job as a kill leaves it: its records up to where it stopped and no summary."""
    (job / "summary.json").unlink()
    return job


def fail(job: Path) -> Path:
    """The job as a failure part-way leaves it: its records so far and a failed summary without accuracies."""
    summary = json.loads((job / "summary.json").read_text())
    for k in ("final_test_acc", "best_test_acc", "steps"):
        summary.pop(k)
    (job / "summary.json").write_text(json.dumps({**summary, "status": "failed", "error": "RuntimeError: boom"}))
    return job


def external(job: Path) -> Path:
    """The job as ``evaluation=external`` leaves it once the evaluator ran: accuracies only in eval.jsonl."""
    records = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    (job / "eval.jsonl").write_text("".join(json.dumps({"step": r["step"], "test_acc": r["test_acc"],
                                                        "test_loss": 1.0}) + "\n" for r in records))
    (job / "metrics.jsonl").write_text("".join(json.dumps({**r, "test_acc": None}) + "\n" for r in records))
    summary = json.loads((job / "summary.json").read_text())
    (job / "summary.json").write_text(json.dumps({**summary, "final_test_acc": None, "best_test_acc": None}))
    return job


def sweep_unfinished(root: Path) -> dict[str, Path]:
    """vanilla-multi-krum: seed 0 completed (final 0.869), seed 1 failed and seed 2 killed part-way, both already
    past it (0.95, 0.97) and faster; DETOX-Multi-Krum: three completed seeds."""
    jobs = {"done": write_job(root, "vanilla-multi-krum", "rev_grad", 0, _curve("vanilla", 0), figure="B"),
            "failed": fail(write_job(root, "vanilla-multi-krum", "rev_grad", 1, [0.1, 0.95], figure="B",
                                     per_step=0.001)),
            "killed": kill(write_job(root, "vanilla-multi-krum", "rev_grad", 2, [0.1, 0.97], figure="B",
                                     per_step=0.001))}
    for seed in (0, 1, 2):
        write_job(root, "detox-multi-krum", "rev_grad", seed, _curve("detox", seed), figure="B")
    return jobs


def test_only_finished_runs_enter_the_numbers(tmp_path: Path) -> None:
    jobs = sweep_unfinished(tmp_path / "m")
    runs = load_runs(tmp_path / "m")
    for name, status in (("failed", "failed"), ("killed", "missing")):
        row = runs.loc[jobs[name].name]
        assert row["status"] == status
        # nothing filled in from the records it left: they stop part-way
        assert pd.isna(row["final_test_acc"]) and pd.isna(row["best_test_acc"])
        assert pd.isna(row["cluster_time_median"]) and pd.isna(row["t_aggregate_median"])
    metrics = load_metrics(tmp_path / "m", runs)
    assert jobs["failed"].name not in set(metrics["job"]) and jobs["killed"].name not in set(metrics["job"])
    tab = table(runs, metrics, 0.85).set_index("label")
    vanilla = tab.loc["vanilla-multi-krum"]
    assert vanilla["seeds"] == 3 and vanilla["status"] == "1 completed, 1 failed, 1 missing"
    for k in ("final_test_acc", "best_test_acc", "cluster_time_median", "t_aggregate_median_ms",
              "cluster_time_median_to_0.85"):
        assert vanilla[f"{k}_n"] == 1, k  # n counts the runs that contributed: the completed one
    assert vanilla["final_test_acc"] == pytest.approx(0.869)
    assert "| vanilla-multi-krum | rev_grad | 5 | 3 | 1 completed, 1 failed, 1 missing | 0.869 (n=1) |" in \
        to_markdown(readable(table(runs, metrics, 0.85)))
    sp = F.speedups(runs, metrics, 0.85).iloc[0]
    assert (sp["vanilla_seeds"], sp["vanilla_reached"], sp["speedup_n"]) == (1, 1, 1)
    jobs_csv = jobs_table(runs, metrics, 0.85).set_index("job")
    assert jobs_csv.loc[jobs["failed"].name, "status"] == "failed"
    assert jobs_csv.loc[[jobs["failed"].name, jobs["killed"].name], "final_test_acc"].isna().all()


def test_external_evaluations_fill_finished_runs_only(tmp_path: Path) -> None:
    done = external(write_job(tmp_path, "detox-bulyan", "rev_grad", 0, _curve("detox", 0)))
    failed = external(fail(write_job(tmp_path, "detox-bulyan", "rev_grad", 1, [0.1, 0.95])))
    runs = load_runs(tmp_path)
    assert runs.loc[done.name, "final_test_acc"] == pytest.approx(0.859)  # from eval.jsonl, as before
    assert runs.loc[done.name, "best_test_acc"] == pytest.approx(0.859)
    assert pd.isna(runs.loc[failed.name, "final_test_acc"])
    assert set(load_metrics(tmp_path, runs)["job"]) == {done.name}


def test_a_running_job_is_marked_running_and_gives_no_numbers(tmp_path: Path) -> None:
    from detox.results import job_lock

    root = tmp_path / "m"
    write_job(root, "detox-bulyan", "rev_grad", 0, _curve("detox", 0))
    live = kill(write_job(root, "detox-bulyan", "rev_grad", 1, [0.1, 0.99]))  # no summary yet
    with job_lock(live):  # as detox.train holds it while the run owns the folder
        runs = load_runs(root)
        assert runs.loc[live.name, "status"] == "running" and pd.isna(runs.loc[live.name, "final_test_acc"])
        assert report_main([str(root), "--out", str(tmp_path / "out")]) == 0
    jobs_csv = pd.read_csv(tmp_path / "out" / "jobs.csv").set_index("job")
    assert jobs_csv.loc[live.name, "status"] == "running" and pd.isna(jobs_csv.loc[live.name, "final_test_acc"])
    assert "| 2 | 1 completed, 1 running | 0.859 (n=1) |" in (tmp_path / "out" / "table.md").read_text()
    assert load_runs(root).loc[live.name, "status"] == "missing"  # the lock released: it died


def _two_jobs(root: Path) -> Path:
    """A root of two finished jobs; returns the first (the one a test then breaks)."""
    job = write_job(root, "vanilla-bulyan", "rev_grad", 0, _curve("vanilla", 0))
    write_job(root, "detox-bulyan", "rev_grad", 0, _curve("detox", 0))
    return job


@pytest.mark.parametrize("content", [b"", b"123\n", b'{"test_acc": 0.5}\n', b"null\n", b"[1, 2]\n",
                                     b'{"step": 0}\n{"step": "ten"}\n', b'{"step": 10}\n{"step": 0}\n',
                                     b'{"step": 0, "test_acc": "high"}\n', b'{"step": 0}\nnot json\n{"step": 10}\n',
                                     bytes(range(256)) * 4],
                         ids=["empty", "number", "no-step", "null", "list", "step-text", "steps-back", "acc-text",
                              "bad-line", "random-bytes"])
def test_a_broken_metrics_file_is_one_warning_naming_it(tmp_path: Path, content: bytes,
                                                        capsys: pytest.CaptureFixture) -> None:
    job = _two_jobs(tmp_path / "m")
    (job / "metrics.jsonl").write_bytes(content)
    assert report_main([str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(job / "metrics.jsonl") in err[0] and err[0].startswith("analysis: warning: ")
    runs = load_runs(tmp_path / "m")
    assert job.name not in set(load_metrics(tmp_path / "m", runs)["job"])  # no curve, no time split
    assert pd.isna(runs.loc[job.name, "cluster_time_median"])
    assert runs.loc[job.name, "final_test_acc"] == pytest.approx(0.869)  # its summary still stands
    assert (tmp_path / "out" / "fig_a_time.png").exists()


def test_a_torn_last_line_is_no_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = _two_jobs(tmp_path)
    with open(job / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 70, "test_a')  # a run killed mid-write
    runs = load_runs(tmp_path)
    assert capsys.readouterr().err == "" and runs.loc[job.name, "cluster_time_median"] == pytest.approx(60 * 0.03)


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"completed"', "{not json", '{"status": 3}',
                                     '{"status": "completed", "final_test_acc": "high"}',
                                     '{"status": "completed", "choices": [1]}'])
def test_a_summary_that_is_no_run_summary_is_one_warning(tmp_path: Path, content: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    job = _two_jobs(tmp_path / "m")
    (job / "summary.json").write_text(content)
    assert report_main([str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(job / "summary.json") in err[0] and "counts as missing" in err[0]
    assert load_runs(tmp_path / "m").loc[job.name, "status"] == "missing"
    assert "| 1 | 1 missing |  |" in (tmp_path / "out" / "table.md").read_text()  # a row, no numbers


def _only_failed(root: Path) -> None:
    write_job(root, "vanilla-bulyan", "rev_grad", 0, [], status="failed")


def _only_unreadable(root: Path) -> None:
    (write_job(root, "vanilla-bulyan", "rev_grad", 0, [0.1, 0.5]) / "summary.json").write_text("[1, 2]")


def _only_killed(root: Path) -> None:
    kill(write_job(root, "vanilla-bulyan", "rev_grad", 0, [0.1, 0.5]))


@pytest.mark.parametrize("make", [_only_failed, _only_unreadable, _only_killed])
def test_a_root_without_a_finished_job_is_one_line_and_exit_2(tmp_path: Path, make: Callable[[Path], None],
                                                              capsys: pytest.CaptureFixture) -> None:
    make(tmp_path / "m")
    assert report_main([str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("analysis: warning: ")]
    assert len(errors) == 1 and errors[0].startswith(f"analysis.report: error: {tmp_path / 'm'}: no finished")
    assert not (tmp_path / "out").exists()


def test_figures_without_their_data_say_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _only_failed(tmp_path / "failed")
    runs = load_runs(tmp_path / "failed")
    metrics = load_metrics(tmp_path / "failed", runs)
    for draw in (lambda: F.fig_a(metrics), lambda: F.fig_b(runs, metrics, 0.85), lambda: F.fig_c(runs),
                 lambda: F.fig_d(runs), lambda: F.fig_e(runs), lambda: F.fig_theory(runs)):
        with pytest.raises(F.NothingToDraw, match="^no "):
            draw()
    # one completed job without records (A: records without accuracies or clocks): its table, and one line per
    # figure that needs the records
    for letter in "ABCDE":
        root = tmp_path / letter
        job = write_job(root, "vanilla-multi-krum", "rev_grad", 0, _curve("vanilla", 0), figure=letter)
        (job / "metrics.jsonl").write_text('{"step": 0}\n{"step": 10}\n' if letter == "A" else "")
        assert report_main([str(root), "--out", str(tmp_path / f"out{letter}")]) == 0, letter
        assert (tmp_path / f"out{letter}" / "table.md").exists()
    err = capsys.readouterr().err
    assert "analysis: warning: fig_a_time skipped: no evaluation records of a finished run" in err
    assert "analysis: warning: fig_b skipped: no evaluation records with cluster_time" in err
    assert "analysis: warning: fig_c skipped: no finished run recorded phase times" in err
    assert "analysis: warning: fig_theory skipped: no grouped run" in err
    assert (tmp_path / "outD" / "fig_d.png").exists() and (tmp_path / "outE" / "fig_e.png").exists()


@pytest.mark.parametrize("target", ["nan", "inf", "-inf", "-0.5", "0", "1.5", "85"])
def test_a_target_that_is_no_accuracy_is_refused(sweep: Path, tmp_path: Path, target: str,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert report_main([str(sweep), "--out", str(tmp_path / "out"), f"--target={target}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"analysis.report: error: --target {float(target):g}: a target test accuracy lies in (0, 1], "
                   f"e.g. 0.85"]
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_one_line_and_exit_2(sweep: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("keep")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert report_main([str(sweep), "--out", str(out)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [f"analysis.report: error: --out {out}: {tmp_path / 'file'} exists and is not a folder"]
    assert (tmp_path / "file").read_text() == "keep"


def test_a_failing_report_leaves_its_out_folder_as_it_was(sweep: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import analysis.report as R

    fresh, earlier = tmp_path / "fresh", tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "table.md").write_text("earlier")
    (earlier / "notes.txt").write_text("mine")

    def boom(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(R, "table", boom)  # fails after the figures are drawn
    with pytest.raises(RuntimeError):
        R.report(sweep, fresh)
    assert not fresh.exists()
    monkeypatch.undo()
    writes, write = [], R._write

    def write_then_fail(path: Path, content: object) -> None:
        writes.append(path.name)
        if path.name == "table.md":  # the figures and the CSV files are written by then
            raise OSError(28, "No space left on device", str(path))
        write(path, content)

    monkeypatch.setattr(R, "_write", write_then_fail)
    for out in (fresh, earlier):
        with pytest.raises(OSError):
            R.report(sweep, out)
    assert "fig_a_time.png" in writes and not fresh.exists()
    assert sorted(p.name for p in earlier.iterdir()) == ["notes.txt", "table.md"]
    assert (earlier / "table.md").read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    monkeypatch.undo()
    R.report(sweep, earlier)  # a report that runs through replaces its own files and leaves the others
    assert (earlier / "notes.txt").read_text() == "mine" and (earlier / "fig_a_time.png").exists()
    assert (earlier / "table.md").read_text().startswith(f"# {sweep.name}")


def test_a_root_of_several_figure_families_is_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep_b(tmp_path / "b")
    assert report_main([str(tmp_path / "b"), "--out", str(tmp_path / "out_b")]) == 0
    assert capsys.readouterr().err == ""  # one family: nothing to say
    sweep_d(tmp_path / "b")  # Figure D's jobs into Figure B's root
    assert report_main([str(tmp_path / "b"), "--out", str(tmp_path / "out_bd")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "several figure families (figure = B, D)" in err[0] and str(tmp_path / "b") in err[0]


def test_analysis_leaves_the_backend_to_the_caller() -> None:
    import os
    import subprocess
    import sys

    code = "import matplotlib, analysis.figures, analysis.report; print(matplotlib.get_backend())"
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "svg", out.stderr[-2000:]  # importing picks no backend
    assert 'matplotlib.use("Agg")' in (ROOT / "analysis" / "report.py").read_text()  # the command picks Agg


# ----------------------------------------------------------------------------------- the notebook


@pytest.mark.slow
def test_notebook_executes_top_to_bottom_and_draws(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat  # the test extra brings nbclient, nbformat and ipykernel
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "analysis" / "walkthrough.ipynb", as_version=4)
    monkeypatch.setenv("DETOX_SWEEP", str(sweep))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    # the kernel starts in analysis/, as Jupyter starts it for this notebook
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "analysis")}}
                   ).execute()
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 7  # fig_a twice, fig_b, fig_c, fig_d, fig_e, fig_theory
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


# ----------------------------------------------------------------------------------- robust timing records


def test_window_medians_ignore_a_preempted_step() -> None:
    class G:
        losses = [1.0]

    w = _Window()
    for t in (0.010, 0.011, 0.009, 0.500, 0.010):  # one step descheduled for half a second
        w.add({"t_compute": t, "t_comm": 0.0, "t_vote": 0.001, "t_aggregate": 0.002, "t_update": 0.0}, G())
    m = w.means()
    assert m["t_compute"] == pytest.approx(0.108)  # the mean keeps its meaning
    assert m["t_compute_median"] == pytest.approx(0.010)
    assert w.robust_step() == pytest.approx(0.013)
    # step totals 0.012, 0.013, 0.013, 0.014, 0.503: the 10th percentile interpolates 0.012 -> 0.013
    assert m["t_step_p10"] == pytest.approx(0.0124) and m["t_step_p90"] > 0.3
    assert set(ROBUST_KEYS) - {"cluster_time_median"} <= set(m)


def test_runs_record_the_median_clock(tmp_path: Path) -> None:
    run_job([*TINY, "max_steps=6", "eval_freq=3"], tmp_path)
    records = read_metrics(tmp_path)
    assert records[0]["cluster_time_median"] == 0.0 and records[0]["t_compute_median"] is None
    for prev, rec in itertools.pairwise(records):
        step = sum(rec[f"{k}_median"] for k in ("t_compute", "t_comm", "t_vote", "t_aggregate", "t_update"))
        assert rec["cluster_time_median"] == pytest.approx(prev["cluster_time_median"] + 3 * step)
        assert rec["t_step_p10"] <= rec["t_step_p90"]

    # the CPU clock: one value per window, accumulated the same way; with threads=1 (torch and numba) about the
    # wall clock's at most (the bound allows for other threads of the test process)
    cpu = ("t_compute_cpu", "t_vote_cpu", "t_aggregate_cpu", "t_update_cpu")
    assert records[0]["cluster_time_cpu"] == 0.0
    for prev, rec in itertools.pairwise(records):
        step = sum(rec[f"{k}_median"] for k in cpu)
        assert rec["cluster_time_cpu"] == pytest.approx(prev["cluster_time_cpu"] + 3 * step)
        wall = sum(rec[f"{k}_median"] for k in ("t_compute", "t_vote", "t_aggregate", "t_update"))
        assert 0 < step <= 1.5 * wall + 2e-3


def test_the_cpu_clock_leaves_out_time_spent_off_the_cpu() -> None:
    # what a preempted or descheduled phase looks like to the process: time passes, no CPU is used
    diag = Timer().stop({}, "t_phase")
    timer = Timer()
    time.sleep(0.2)
    timer.stop(diag, "t_phase")
    assert diag["t_phase"] >= 0.2 and diag["t_phase_cpu"] < 0.1  # (other threads of this process may add a little)
    timer = Timer()
    while timer.elapsed()[1] < 0.05 and timer.elapsed()[0] < 30:  # busy: the CPU clock advances (slowly if loaded)
        pass
    timer.stop(diag, "t_phase")
    assert diag["t_phase_cpu"] >= 0.05 and diag["t_phase"] >= diag["t_phase_cpu"] - 0.01


def test_a_window_without_cpu_times_has_no_cpu_clock() -> None:
    class G:
        losses = [1.0]

    w = _Window()
    step = {"t_compute": 0.01, "t_comm": 0.002, "t_vote": 0.001, "t_aggregate": 0.002, "t_update": 0.0}
    cpu = {"t_compute_cpu": 0.01, "t_vote_cpu": 0.001, "t_aggregate_cpu": 0.002, "t_update_cpu": 0.0}
    w.add({**step, **cpu}, G())
    assert w.cpu_step() == pytest.approx(0.013)
    w.add({**step, **cpu, "t_compute_cpu": None}, G())  # engine=mpi: the workers' compute is wall-clock only
    assert w.cpu_step() is None and w.means()["t_compute_cpu_median"] is None


def test_time_column_uses_one_clock_for_every_job() -> None:
    frame = pd.DataFrame({"job": [0, 0, 1, 1], "cluster_time": [0.0, 9.0, 0.0, 8.0],
                          "cluster_time_median": [0.0, 3.0, 0.0, 2.0], "cluster_time_cpu": [0.0, 1.0, 0.0, 1.5]})
    assert time_column(frame) == "cluster_time_cpu"
    frame.loc[3, "cluster_time_cpu"] = np.nan  # job 1 ran on MPI: no CPU clock
    assert time_column(frame) == "cluster_time_median"
    assert time_column(frame.drop(columns=["cluster_time_median", "cluster_time_cpu"])) == "cluster_time"


# ----------------------------------------------------------------------------------- the sweep configs


def _sweep_params(name: str) -> dict[str, list[str]]:
    raw = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    return {k: str(v).split(",") for k, v in raw["hydra"]["sweeper"]["params"].items()}


@pytest.mark.parametrize("name", SWEEP_PARAMS)
def test_every_sweep_job_composes_and_validates(name: str) -> None:
    params = _sweep_params(name)
    figure_sweep = name.startswith("fig_")  # not the tuning sweeps (tune_lr_*: one seed, no figure; test_tune.py)
    if figure_sweep and name.endswith(("_cpu", "_full")):  # (issue #11: every point a mean over >= 3 seeds)
        assert len(params.get("seed", [])) >= 3, "every figure sweep runs at least 3 seeds"
        # seeds vary slowest: a seed's vanilla X and DETOX-X run back to back (Hydra runs the product in order)
        assert list(params)[0] == "seed"
    if "seed" in params:
        params["seed"] = params["seed"][:1]  # the seed changes no composition: one is enough to validate
    if "lr" in params:  # nor does the lr (the tuning sweeps' 8 values; test_tune.py checks each is one)
        params["lr"] = params["lr"][:1]
    keys = list(params)
    jobs = [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in itertools.product(*params.values())]
    assert jobs
    with initialize_config_dir(version_base="1.3", config_dir=str(SWEEPS)):
        for overrides in jobs:
            cfg = compose(name, overrides=[*overrides, f"hydra.searchpath=[file://{CONF}]"])
            validate(cfg)
            method = next(o for o in overrides if o.startswith("method="))
            assert method == f"method={cfg.method}"
            assert cfg.figure == (name.split("_")[1].upper() if figure_sweep else None)


def test_sweeps_come_in_two_sizes() -> None:
    for letter in "abcde":
        assert {f"fig_{letter}_cpu", f"fig_{letter}_full"} <= set(SWEEP_FILES)


@pytest.mark.slow
def test_tiny_sweep_end_to_end_and_rerun_trains_nothing(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    args = ["-m", "--config-dir", "sweeps", "--config-name", "fig_a_cpu", f"hydra.sweep.dir={root}",
            # command-line sweeps take precedence over the config's sweeper params
            "task=fc-digits", "err_mode=rev_grad", "method=vanilla-coord-median,detox-coord-median", "seed=0,1",
            "max_steps=4", "eval_freq=2"]
    proc = cli(args, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (root / "summary.jsonl").read_text().splitlines()]
    assert [(x["job"], x["status"]) for x in lines] == [
        (f"err_mode=rev_grad,eval_freq=2,max_steps=4,method={m}-coord-median,seed={s},task=fc-digits", "completed")
        for m in ("detox", "vanilla") for s in (0, 1)]
    out = tmp_path / "report"
    assert report_main([str(root), "--out", str(out)]) == 0
    assert (out / "fig_a_time.png").exists()
    md = (out / "table.md").read_text()
    assert md.count("2 completed") == 2 and "(n=2)" in md  # two configurations of two seeds each

    before = {p: p.stat().st_mtime_ns for p in root.glob("*/metrics.jsonl")}
    again = cli(args, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/metrics.jsonl")} == before
    assert (again.stdout + again.stderr).count("skipping") == 4
