"""Sweeps in sweeps/ and the analysis package: loader, figures, report command, resumable sweeps."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from conftest import CONF, ROOT, cli
from hydra import compose, initialize_config_dir

from analysis import figures as F
from analysis.load import load_metrics, load_runs, time_to_target
from analysis.report import main as report_main
from detox.config import validate

SWEEPS = ROOT / "sweeps"
SWEEP_FILES = sorted(p.stem for p in SWEEPS.glob("*.yaml"))

# ----------------------------------------------------------------------------------- a synthetic multirun


def _write_job(root: Path, job: int, method: str, attack: str, q: int, accs: list[float], status: str = "completed",
               figure: str = "A") -> None:
    d = root / str(job)
    d.mkdir(parents=True)
    defence, rule = method.split("-", 1)
    approach = "baseline" if defence == "vanilla" else "draco-lite"
    summary = {"status": status, "choices": {"network": "fc", "dataset": "digits", "mode": rule, "approach": approach,
                                             "err_mode": attack, "engine": "local", "task": None, "method": method},
               "workers": 45, "worker_fail": q, "group_size": 3, "placement": "random", "figure": figure,
               "target_acc": 0.5}
    if status == "failed":
        summary["error"] = "RuntimeError: boom"
        (d / "summary.json").write_text(json.dumps(summary))
        return
    records = []
    for i, acc in enumerate(accs):
        step = 10 * i
        timed = None if i == 0 else 1.0
        records.append({"step": step, "cluster_time": step * (0.1 if defence == "detox" else 0.3),
                        "wall_time": step * 0.2, "test_acc": acc, "t_compute": timed and 0.01,
                        "t_comm": timed and 0.0, "t_vote": timed and (0.001 if defence == "detox" else 0.0),
                        "t_aggregate": timed and (0.002 if defence == "detox" else 0.02), "t_update": timed and 1e-4,
                        "corrupted_groups": None if i == 0 else (0.4 if defence == "detox" else q)})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary.update({"final_test_acc": accs[-1], "best_test_acc": max(accs), "steps": 10 * (len(accs) - 1)})
    (d / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    job = 0
    for attack in ("rev_grad", "constant"):
        for rule in ("multi-krum", "coord-median"):
            _write_job(root, job, f"vanilla-{rule}", attack, 5, [0.1, 0.3, 0.45, 0.6])
            _write_job(root, job + 1, f"detox-{rule}", attack, 5, [0.1, 0.5, 0.7, 0.8])
            job += 2
    _write_job(root, job, "vanilla-bulyan", "rev_grad", 5, [], status="failed")  # job 8
    _write_job(root, job + 1, "detox-bulyan", "rev_grad", 5, [0.1, 0.2, 0.3, 0.4])  # 9
    _write_job(root, job + 2, "detox-bulyan", "constant", 5, [0.1, 0.2, 0.3, 0.9])  # 10
    (root / str(job + 3) / ".hydra").mkdir(parents=True)  # 11: a job killed before it wrote anything
    (root / "report-notes").mkdir()  # not a job folder
    return root


def test_loader_orders_jobs_numerically_and_keeps_failures(sweep: Path) -> None:
    runs = load_runs(sweep)
    assert list(runs["job"]) == list(range(12))
    assert runs.loc[8, "status"] == "failed" and runs.loc[8, "error"] == "RuntimeError: boom"
    assert runs.loc[11, "status"] == "missing"
    assert runs.loc[10, ["label", "defence", "rule", "err_mode"]].tolist() == ["detox-bulyan", "detox", "bulyan",
                                                                               "constant"]
    assert runs.loc[1, "t_aggregate"] == pytest.approx(0.002) and runs.loc[0, "corrupted_per_step"] == 5
    metrics = load_metrics(sweep, runs)
    assert len(metrics) == 10 * 4  # 10 jobs with 4 evaluations each
    assert list(metrics["job"].unique()) == [j for j in range(11) if j != 8]
    assert set(metrics.columns) >= {"step", "test_acc", "label", "err_mode", "approach", "worker_fail"}


def test_time_to_target_and_speedup(sweep: Path) -> None:
    runs, metrics = load_runs(sweep), None
    metrics = load_metrics(sweep, runs)
    ttt = time_to_target(metrics, 0.5)
    assert ttt[0] == pytest.approx(30 * 0.3) and ttt[1] == pytest.approx(10 * 0.1) and np.isnan(ttt[9])
    sp = F.speedups(runs, metrics, 0.5)
    row = sp[(sp["rule"] == "multi-krum") & (sp["err_mode"] == "rev_grad")].iloc[0]
    assert row["speedup"] == pytest.approx(9.0)


def test_every_plotting_function_draws(sweep: Path) -> None:
    runs = load_runs(sweep)
    metrics = load_metrics(sweep, runs)
    fig = F.fig_a(metrics, "cluster_time")
    assert len(fig.axes) == 2 * 3  # attacks x rules
    assert len(fig.axes[0].get_lines()) == 2  # vanilla and DETOX
    for fig in (F.fig_a(metrics, "step"), F.fig_b(runs, metrics, 0.5), F.fig_c(runs), F.fig_d(runs), F.fig_e(runs),
                F.fig_theory(runs)):
        assert fig.axes and any(ax.has_data() for ax in fig.axes)
        plt.close(fig)
    theory = F.fig_theory(runs)
    expected = theory.axes[0].get_lines()[-1].get_ydata()
    assert expected[5] == pytest.approx(0.433, abs=1e-3)  # P=45, q=5, r=3


def test_report_command_writes_figures_and_tables(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    for name in ("fig_a_time", "fig_a_iter"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.pdf").exists()
    md = (out / "table.md").read_text()
    assert "detox-bulyan" in md and "failed" in md
    assert report_main([str(tmp_path / "nowhere")]) == 2


# ----------------------------------------------------------------------------------- the sweep configs


def _sweep_jobs(name: str) -> list[list[str]]:
    raw = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    params = raw["hydra"]["sweeper"]["params"]
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in itertools.product(*values)]


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_every_sweep_job_composes_and_validates(name: str) -> None:
    jobs = _sweep_jobs(name)
    assert jobs
    with initialize_config_dir(version_base="1.3", config_dir=str(SWEEPS)):
        for overrides in jobs:
            cfg = compose(name, overrides=[*overrides, f"hydra.searchpath=[file://{CONF}]"])
            validate(cfg)
            assert cfg.figure == name.split("_")[1].upper() and cfg.method in overrides[1]


def test_sweeps_come_in_two_sizes() -> None:
    for letter in "abcde":
        assert {f"fig_{letter}_cpu", f"fig_{letter}_full"} <= set(SWEEP_FILES)


def test_tiny_sweep_end_to_end_and_rerun_trains_nothing(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    args = ["-m", "--config-dir", "sweeps", "--config-name", "fig_a_cpu", f"hydra.sweep.dir={root}",
            # command-line sweeps take precedence over the config's sweeper params
            "task=fc-digits", "err_mode=rev_grad", "method=vanilla-coord-median,detox-coord-median", "max_steps=4",
            "eval_freq=2"]
    proc = cli(args, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (root / "summary.jsonl").read_text().splitlines()]
    assert [(x["job"], x["status"], x["choices"]["method"]) for x in lines] == [
        ("err_mode=rev_grad,eval_freq=2,max_steps=4,method=detox-coord-median,task=fc-digits", "completed",
         "detox-coord-median"),
        ("err_mode=rev_grad,eval_freq=2,max_steps=4,method=vanilla-coord-median,task=fc-digits", "completed",
         "vanilla-coord-median")]
    out = tmp_path / "report"
    assert report_main([str(root), "--out", str(out)]) == 0
    assert (out / "fig_a_time.png").exists() and (out / "table.csv").exists()

    before = {p: p.stat().st_mtime_ns for p in root.glob("*/metrics.jsonl")}
    again = cli(args, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/metrics.jsonl")} == before
    assert (again.stdout + again.stderr).count("skipping") == 2


def test_notebook_runs_on_a_sweep(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = json.loads((ROOT / "analysis" / "walkthrough.ipynb").read_text())
    monkeypatch.setenv("DETOX_SWEEP", str(sweep))
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec("".join(cell["source"]), scope)  # noqa: S102 - our own notebook
    assert len(scope["runs"]) == 12
    plt.close("all")
