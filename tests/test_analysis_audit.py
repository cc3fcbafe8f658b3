"""Hostile inputs to the analysis (``analysis.load``, ``analysis.report``, ``analysis.figures``, ``analysis.labels``):
a value no run writes is one warning naming its file, never a traceback or a silently wrong number."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the tests only draw into objects and files

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from test_analysis import _curve, _two_jobs, sweep_b, write_job  # noqa: E402

from analysis import figures as F  # noqa: E402
from analysis.labels import group_default, preset  # noqa: E402
from analysis.load import load_metrics, load_runs, time_column, time_to_target  # noqa: E402
from analysis.report import main as report_main  # noqa: E402
from analysis.report import publish, table, to_markdown  # noqa: E402


def _warnings(capsys: pytest.CaptureFixture) -> list[str]:
    lines = capsys.readouterr().err.splitlines()
    assert all(x.startswith("analysis: warning: ") for x in lines), lines
    return lines


# ----------------------------------------------------------------------------------- numbers no run writes


@pytest.mark.parametrize("line", [
    b'{"step": 10, "test_acc": NaN}', b'{"step": 10, "cluster_time_median": Infinity}',
    b'{"step": 10, "cluster_time_median": 1e400}', b'{"step": 10, "cluster_time_median": 1' + b"0" * 400 + b"}",
    b'{"step": 100000000000000000000000}', b'{"step": 10, "test_acc": 85}', b'{"step": 10, "t_compute_median": -1}'],
    ids=["nan", "infinity", "1e400", "int-past-float", "step-past-int64", "acc-in-percent", "negative-time"])
def test_a_record_number_no_run_writes_is_one_warning(tmp_path: Path, line: bytes,
                                                      capsys: pytest.CaptureFixture) -> None:
    job = _two_jobs(tmp_path)
    (job / "metrics.jsonl").write_bytes(b'{"step": 0, "test_acc": 0.1, "cluster_time_median": 0.0}\n' + line + b"\n")
    runs = load_runs(tmp_path)  # (an int past float range or int64 raised here)
    err = _warnings(capsys)
    assert len(err) == 1 and str(job / "metrics.jsonl") in err[0] and "line 2" in err[0]
    assert job.name not in set(load_metrics(tmp_path, runs)["job"])  # no curve from it (85 reached any target)
    assert pd.isna(runs.loc[job.name, "cluster_time_median"])


@pytest.mark.parametrize("change", [{"final_test_acc": float("nan")}, {"best_test_acc": float("inf")},
                                    {"final_test_acc": 85}, {"final_test_acc": 10**400}, {"wall_time": -3.0},
                                    {"status": "Completed"}],
                         ids=["nan", "inf", "percent", "int-past-float", "negative-time", "unknown-status"])
def test_a_summary_number_or_status_no_run_writes_is_one_warning(tmp_path: Path, change: dict,
                                                                 capsys: pytest.CaptureFixture) -> None:
    job = _two_jobs(tmp_path)
    summary = json.loads((job / "summary.json").read_text())
    (job / "summary.json").write_text(json.dumps({**summary, **change}))
    runs = load_runs(tmp_path)
    err = _warnings(capsys)
    assert len(err) == 1 and str(job / "summary.json") in err[0] and "counts as missing" in err[0]
    assert runs.loc[job.name, "status"] == "missing" and pd.isna(runs.loc[job.name, "final_test_acc"])


@pytest.mark.parametrize("content", [b"seed: 0\nnote: caf\xe9\n", b"{{{: :\n", b"- 1\n- 2\n", b"1: a\nb: c\n",
                                     b"a: &x [*x]\n"],
                         ids=["not-utf8", "not-yaml", "list", "mixed-key-types", "self-alias"])
def test_a_config_that_is_no_run_config_is_one_warning(tmp_path: Path, content: bytes,
                                                       capsys: pytest.CaptureFixture) -> None:
    job = _two_jobs(tmp_path)
    (job / "resolved_config.yaml").write_bytes(content)
    runs = load_runs(tmp_path)  # (not UTF-8, mixed keys and a self-alias raised here; the others were silent)
    err = _warnings(capsys)
    assert len(err) == 1 and str(job / "resolved_config.yaml") in err[0]
    assert runs.loc[job.name, "label"] == "vanilla-bulyan"  # from its summary
    assert runs.loc[job.name, "final_test_acc"] == pytest.approx(0.869)


def test_option_names_that_are_no_names_read_no_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert preset("../method/detox-bulyan") is None and preset("detox\0bulyan") is None
    assert group_default("approach", "../approach/draco-lite") == {}
    assert preset("detox-bulyan") is not None
    job = _two_jobs(tmp_path)
    summary = json.loads((job / "summary.json").read_text())
    summary["choices"]["method"] = "vanilla\0bulyan"  # open() refuses a NUL byte with ValueError
    (job / "summary.json").write_text(json.dumps(summary))
    assert load_runs(tmp_path).loc[job.name, "label"].startswith("baseline/bulyan")  # no preset: from its config


# ----------------------------------------------------------------------------------- silently wrong numbers


def test_a_repeated_seed_counts_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = sweep_b(tmp_path / "b")
    seed0 = next(root.glob("*method=vanilla-bulyan,seed=0,*"))
    copy = root / f"{seed0.name},lr=0.05"  # the same config spelled another way, or a root merged into another
    shutil.copytree(seed0, copy)
    runs = load_runs(root)
    err = _warnings(capsys)
    assert len(err) == 1 and str(copy) in err[0] and seed0.name in err[0]
    assert runs.loc[copy.name, "status"] == "duplicate"
    metrics = load_metrics(root, runs)
    row = table(runs, metrics, 0.85).set_index("label").loc["vanilla-bulyan"]
    assert row["final_test_acc_n"] == 3 and row["status"] == "3 completed, 1 duplicate"
    sp = F.speedups(runs, metrics, 0.85).set_index("rule").loc["bulyan"]
    assert (sp["vanilla_seeds"], sp["speedup_n"]) == (3, 3)


def test_numbered_looking_folders_keep_their_own_rows(tmp_path: Path) -> None:
    vanilla, detox = _two_jobs(tmp_path), next(p for p in tmp_path.iterdir() if "detox" in p.name)
    vanilla.rename(tmp_path / "7")
    detox.rename(tmp_path / "007")  # job id 7 as well, once: one row of the times to target for both
    runs = load_runs(tmp_path)
    assert list(runs["job"]) == [7, "007"]
    ttt = time_to_target(load_metrics(tmp_path, runs), 0.85)
    assert (ttt[7], ttt["007"]) == pytest.approx((50 * 0.03, 50 * 0.01))  # 0.857, 0.859 at step 50
    (tmp_path / "007").rename(tmp_path / "²")  # a digit int() refuses
    assert list(load_runs(tmp_path)["job"]) == [7, "²"]


def test_a_job_without_the_median_clock_keeps_its_time_to_target(tmp_path: Path) -> None:
    root = sweep_b(tmp_path / "b")
    older = next(root.glob("*method=vanilla-bulyan,seed=0,*"))  # a run from before the median clock
    records = [json.loads(x) for x in (older / "metrics.jsonl").read_text().splitlines()]
    (older / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if "median" not in k})
                                                 + "\n" for r in records))
    runs = load_runs(root)
    metrics = load_metrics(root, runs)
    assert time_column(metrics) == "cluster_time"  # one clock for every job
    assert time_to_target(metrics, 0.85)[older.name] == pytest.approx(50 * 0.03)
    assert F.speedups(runs, metrics, 0.85).set_index("rule").loc["bulyan", "vanilla_reached"] == 3


def test_a_target_reached_before_training_gives_no_speedup(tmp_path: Path) -> None:
    root = tmp_path / "b"
    for defence in ("vanilla", "detox"):
        write_job(root, f"{defence}-bulyan", "rev_grad", 0, _curve(defence, 0), figure="B")
    runs = load_runs(root)
    metrics = load_metrics(root, runs)
    sp = F.speedups(runs, metrics, 0.05).iloc[0]  # step 0 (time 0) is at 0.1 already: 0 / 0 raised
    assert (sp["vanilla_time"], sp["detox_time"]) == (0.0, 0.0) and np.isnan(sp["speedup"])
    texts = [t.get_text() for t in F.fig_b(runs, metrics, 0.05).axes[0].texts]
    assert "no ratio:\nreached at time 0" in texts and not any("never" in t for t in texts)
    assert report_main([str(root), "--out", str(tmp_path / "out"), "--target", "0.05"]) == 0


# ----------------------------------------------------------------------------------- what the report writes


def test_a_line_break_in_a_cell_keeps_the_markdown_row_whole() -> None:
    md = to_markdown(pd.DataFrame({"label": ["a\nb|c", "d"], "n": [1, 2]}))
    assert md.splitlines() == ["| label | n |", "|---|---|", "| a b/c | 1 |", "| d | 2 |"]


def test_two_reports_into_one_new_out_both_land(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    rename = Path.rename

    def other_report_first(self: Path, target: Path) -> Path:
        if Path(target) == out and not out.exists():  # the other report moved its folder in a moment earlier
            out.mkdir()
            (out / "table.md").write_text("other")
            (out / "notes.txt").write_text("other")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", other_report_first)
    publish(out, {"table.md": "mine", "table.csv": "mine"})
    assert {p.name: p.read_text() for p in out.iterdir()} == {"table.md": "mine", "table.csv": "mine",
                                                              "notes.txt": "other"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
