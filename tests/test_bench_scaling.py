"""detox.bench_scaling: the PS step's cost vs P from the presets (tiny sizes) and Figure C's split from a sweep."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_cfg

from detox.approaches import Plan
from detox.bench_scaling import (
    SCALING_COLUMNS,
    SPLIT_COLUMNS,
    bench_iteration,
    bench_scaling,
    fill,
    fit_exponents,
    largest_d,
    main,
    peak_bytes,
    preset_plan,
    read_split,
    read_splits,
    savings,
    scale_layers,
    write_split,
)
from detox.config import validate

# methods whose presets run at both P = 9 and P = 18 (DETOX-Bulyan needs q = 1 at P = 18), and one that the
# preset refuses at P = 9 (5 buckets of 3 groups)
TINY_METHODS = ("vanilla-multi-krum", "vanilla-coord-median", "detox-bulyan", "detox-coord-median")


@pytest.fixture(scope="module")
def tiny() -> tuple[list[dict], dict]:
    return bench_scaling([9, 18], d=1000, methods=TINY_METHODS, repeats=3, warmup=1, extra=(), log=False)


def test_scaling_rows_have_the_columns_and_finite_positive_times(tiny: tuple[list[dict], dict]) -> None:
    rows, setting = tiny
    assert setting["d"] == 1000 and setting["d_note"] == "as asked"
    assert [(r["workers"], r["method"]) for r in rows] == [(p, m) for p in (9, 18) for m in TINY_METHODS]
    for r in rows:
        assert set(r) == set(SCALING_COLUMNS)
        if (r["workers"], r["method"]) == (9, "detox-coord-median"):
            assert r["t_step"] is None and r["note"].startswith("refused")
            continue
        for k in ("t_step", "t_step_min", "t_aggregate", "t_update"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["method"], r["workers"], k)
        assert r["t_step_min"] <= r["t_step"]
        # each phase is part of every timed step, so its median is at most the step's
        assert max(r["t_vote"], r["t_aggregate"], r["t_update"]) <= r["t_step"]
        assert (r["t_vote"] > 0) == r["method"].startswith("detox")


def test_scaling_plans_are_the_presets(tiny: tuple[list[dict], dict]) -> None:
    at = {(r["workers"], r["method"]): r for r in tiny[0]}
    # vanilla: every worker is an input, f = q = floor(P / 9)
    assert (at[9, "vanilla-multi-krum"]["rule_inputs"], at[9, "vanilla-multi-krum"]["f"]) == (9, 1)
    assert (at[18, "vanilla-multi-krum"]["rule_inputs"], at[18, "vanilla-multi-krum"]["byzantine"]) == (18, 2)
    # DETOX-median: the preset's 5 buckets; DETOX-Bulyan: one input per group, q lowered to what the preset takes
    assert at[18, "detox-coord-median"]["rule_inputs"] == 5 and at[18, "detox-coord-median"]["approach"] == \
        "draco-lite"
    assert at[18, "detox-bulyan"]["rule_inputs"] == 6 and at[18, "detox-bulyan"]["byzantine"] == 1
    assert "largest q that fits" in at[18, "detox-bulyan"]["note"]
    plan, _, _ = preset_plan("detox-multi-krum", 45)
    assert plan is not None and (plan.buckets, plan.inner, plan.mode, plan.vote, plan.f) == (
        2, "multi-krum", "mean", "boyer-moore", 2)
    assert plan.inner_params == {"m": "original", "neighbours": "original"}
    # setting workers on the composed preset is what the override does; a refused q falls to the largest that fits
    plan, _, note = preset_plan("detox-coord-median", 60)
    assert plan == validate(make_cfg(["method=detox-coord-median", "workers=60", "worker_fail=5"]))
    assert "q=6 refused" in note
    plan, _, note = preset_plan("vanilla-bulyan", 90)
    assert plan == validate(make_cfg(["method=vanilla-bulyan", "workers=90"])) and plan.f == 10 and not note
    assert preset_plan("detox-multi-krum", 15)[0] is None  # 2 buckets of 3 and 2 winners: no q fits


def test_fitted_exponents(tiny: tuple[list[dict], dict]) -> None:
    fits = fit_exponents(tiny[0])
    for m in ("vanilla-multi-krum", "vanilla-coord-median", "detox-bulyan"):
        assert fits[m]["points"] == 2 and math.isfinite(fits[m]["b"])
    assert fits["detox-coord-median"]["points"] == 1 and math.isnan(fits["detox-coord-median"]["b"])
    # the fit recovers a known power law
    rows = [{"method": "m", "workers": p, "t_step": 0.01 * p**1.7} for p in (15, 30, 45, 60, 90)]
    fit = fit_exponents(rows)["m"]
    assert fit["b"] == pytest.approx(1.7) and math.exp(fit["a"]) == pytest.approx(0.01)
    assert fit["r2"] == pytest.approx(1.0) and fit["b_se"] == pytest.approx(0.0, abs=1e-9)
    noisy = fit_exponents([{**r, "t_step": r["t_step"] * (1.2 if i % 2 else 0.8)} for i, r in enumerate(rows)])
    assert 0 < noisy["m"]["b_se"] < 1 and noisy["m"]["r2"] < 1


def test_scaling_command_writes_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    assert main(["scaling", "--workers", "9", "18", "--d", "1000", "--repeats", "3", "--override",
                 "--methods", "vanilla-coord-median", "vanilla-bulyan", "--out", str(out)]) == 0
    with open(out / "scaling.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == SCALING_COLUMNS and len(rows) == 4
    md = (out / "scaling.md").read_text()
    assert "fitted exponent b" in md and "--workers 9 18" in md
    assert json.loads((out / "scaling.json").read_text())["fits"]["vanilla-bulyan"]["points"] == 2
    assert (out / "scaling.png").stat().st_size > 10_000 and (out / "scaling.pdf").exists()


def test_iteration_alternates_compute_and_ps_step(tmp_path: Path) -> None:
    rows, setting = bench_iteration(9, ("vanilla-bulyan", "detox-bulyan", "detox-coord-median"), repeats=2,
                                    extra=("dataset=synthetic",), log=False)
    assert setting["workers"] == 9 and setting["d"] > 0
    by = {r["method"]: r for r in rows}
    assert by["detox-coord-median"]["status"] == "refused" and by["detox-coord-median"]["t_step"] is None
    for m in ("vanilla-bulyan", "detox-bulyan"):
        r = by[m]
        assert set(r) == set(SPLIT_COLUMNS) and r["run"] == "bench" and r["t_compute"] > 0
        assert r["t_step"] == pytest.approx(sum(r[k] for k in ("t_compute", "t_vote", "t_aggregate", "t_update")))
        assert 0 < r["aggregate_share"] <= r["ps_share"] < 1
    assert by["detox-bulyan"]["t_vote"] > 0 == by["vanilla-bulyan"]["t_vote"]
    out = tmp_path / "it"
    assert main(["iteration", "--workers", "9", "--repeats", "1", "--override", "dataset=synthetic", "--methods",
                 "vanilla-coord-median", "--out", str(out)]) == 0
    assert "| bench | vanilla-coord-median | completed | 1 |" in (out / "iteration.md").read_text()
    assert (out / "fig_c_iteration.png").stat().st_size > 10_000


def test_fill_holds_group_gradients_and_the_attack() -> None:
    cfg = make_cfg(["method=detox-bulyan", "workers=9", "worker_fail=1"])
    plan = Plan(approach="draco-lite", workers=9, group_size=3, byzantine=1, mode="bulyan", f=0)
    groups = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5) + 1
    work = torch.empty(9, 5)
    byz = np.zeros(9, dtype=bool)
    byz[4] = True
    fill(work, groups, plan, byz, cfg, 0)
    honest = np.flatnonzero(~byz)
    assert torch.equal(work[honest], groups[honest // 3])
    assert torch.equal(work[4], -float(cfg.err_mode.scale) * groups[1])  # rev_grad of its group's gradient
    # baseline: every worker has its own batch, so no two rows are equal
    base = Plan(approach="baseline", workers=9, group_size=3, byzantine=1, mode="bulyan", f=1)
    fill(work, groups, base, np.zeros(9, dtype=bool), cfg, 0)
    assert len({tuple(r.tolist()) for r in work}) == 9


def test_memory_budget_picks_the_largest_d() -> None:
    assert largest_d(90, 3, 11_173_962, 8 * 2**30) == 11_173_962  # ResNet-18 fits 8 GiB at P = 90
    d = largest_d(90, 3, 11_173_962, 4 * 2**30)
    assert d < 11_173_962 and peak_bytes(90, 3, d) <= 4 * 2**30 < peak_bytes(90, 3, d + 1000)
    sizes = (1728, 64, 64, 36864, 640, 10)
    scaled = scale_layers(sizes, 10_000)
    assert sum(scaled) == 10_000 and len(scaled) == len(sizes) and min(scaled) >= 1
    assert scale_layers(sizes, sum(sizes)) == sizes


# ------------------------------------------------------------------------------------------------- split


def _job(root: Path, method: str, phases: dict[str, float], status: str = "completed") -> None:
    job = root / f"method={method}"
    job.mkdir(parents=True)
    (job / "summary.json").write_text(json.dumps({"status": status, "steps": 3, "choices": {"method": method}}))
    first = {"step": 0, **dict.fromkeys(phases, None)}
    last = {"step": 3, **{k: 99.0 for k in phases}, **{f"{k}_median": v for k, v in phases.items()}}
    (job / "metrics.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(last) + "\n")


def test_split_reads_medians_and_computes_savings(tmp_path: Path) -> None:
    root = tmp_path / "fig_c_paper"
    _job(root, "detox-bulyan", {"t_compute": 1.0, "t_comm": 0.0, "t_vote": 0.2, "t_aggregate": 0.3,
                                "t_update": 0.05})
    _job(root, "vanilla-bulyan", {"t_compute": 1.0, "t_comm": 0.0, "t_vote": 0.0, "t_aggregate": 1.5,
                                  "t_update": 0.05})
    rows = read_split(root)
    assert [r["method"] for r in rows] == ["vanilla-bulyan", "detox-bulyan"]  # the paper's order, not by name
    v, t = rows
    assert v["t_step"] == pytest.approx(2.55) and v["aggregate_share"] == pytest.approx(1.5 / 2.55)
    assert t["ps_share"] == pytest.approx(0.55 / 1.55)
    (s,) = savings(rows)
    assert s["rule"] == "bulyan" and s["saved_per_step"] == pytest.approx(1.0)
    assert s["ps_speedup"] == pytest.approx(1.55 / 0.55) and s["step_speedup"] == pytest.approx(2.55 / 1.55)
    out = tmp_path / "out"
    assert main(["split", str(root), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert "| fig_c_paper | vanilla-bulyan | completed | 3 | 1.000 | 0.000 | 1.500 | 0.050 | 2.550 | 59 % |" in md
    assert (out / "fig_c_paper.png").stat().st_size > 10_000
    with pytest.raises(SystemExit) as err:
        main(["split", str(tmp_path / "nowhere")])
    assert err.value.code == 2
    # repeated runs: rows of a method together, savings per run
    rerun = tmp_path / "again"
    _job(rerun, "vanilla-bulyan", {"t_compute": 2.0, "t_comm": 0.0, "t_vote": 0.0, "t_aggregate": 3.0,
                                   "t_update": 0.05})
    _job(rerun, "detox-bulyan", {"t_compute": 2.0, "t_comm": 0.0, "t_vote": 0.2, "t_aggregate": 0.3,
                                 "t_update": 0.05})
    both = read_splits([root, rerun])
    assert [(r["method"], r["run"]) for r in both] == [("vanilla-bulyan", "fig_c_paper"), ("vanilla-bulyan", "again"),
                                                       ("detox-bulyan", "fig_c_paper"), ("detox-bulyan", "again")]
    assert [s["saved_per_step"] for s in savings(both)] == pytest.approx([1.0, 2.5])
    assert main(["split", str(root), str(rerun), "--out", str(out)]) == 0
    assert (out / "table.md").read_text().count("| again |") == 3


# every argument that cannot run is refused in one line (exit 2) before any allocation or measurement; before,
# each failed with a traceback (--workers 16 after the first measurements, --d 1e12 --max-gib 1e6 asking for 4 TB)
SCALING = ["scaling", "--methods", "vanilla-coord-median", "--repeats", "1", "--override", "--workers", "15"]


@pytest.mark.parametrize(("args", "message"), [
    ([*SCALING, "16"], "--workers 16: workers come in groups of group_size = 3"),
    ([*SCALING, "--d", "nan"], "--d nan: give a number of coordinates >= 1"),
    ([*SCALING, "--d", "0"], "--d 0.0: give a number of coordinates >= 1"),
    ([*SCALING, "--d", "-5"], "--d -5.0: give a number of coordinates >= 1"),
    ([*SCALING, "--d", "1e12", "--max-gib", "1e6"], "--workers 15: the benchmark needs about"),
    ([*SCALING, "--max-gib", "nan"], "--max-gib nan: give a memory budget in GiB > 0"),
    ([*SCALING, "--max-gib", "-1"], "--max-gib -1.0: give a memory budget in GiB > 0"),
    ([*SCALING, "--warmup", "-1"], "--warmup -1: must be >= 0"),
    # before: measured twice and fitted as two points
    ([*SCALING, "30", "15"], "--workers 15 30 15: each P once"),
    # before: each "vanilla-coord-median" row measured Krum (or refused every other preset) under the preset's name
    ([*SCALING, "--override", "mode=krum"], "--override mode=krum: mode is set by each method's preset"),
    ([*SCALING, "--override", "+approach.buckets=2"], "--override +approach.buckets=2: approach is set by"),
    ([*SCALING, "--override", "worker_fail=1"], "--override worker_fail=1: worker_fail is set by"),
    (["iteration", "--workers", "16", "--methods", "vanilla-coord-median", "--override"],
     "--workers 16: workers come in groups of group_size = 3"),
    (["iteration", "--workers", "15", "--warmup", "-2", "--override"], "--warmup -2: must be >= 0"),
])
def test_bench_scaling_refuses_what_cannot_run_before_measuring(args: list[str], message: str,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import detox.bench_scaling as bs

    measured = []
    monkeypatch.setattr(bs, "bench_scaling", lambda *a, **k: measured.append(a))
    monkeypatch.setattr(bs, "bench_iteration", lambda *a, **k: measured.append(a))
    with pytest.raises(SystemExit) as err:
        main(args)
    stderr = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and stderr[-1].startswith(f"python -m detox.bench_scaling: error: {message}"), stderr
    assert not measured


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_bench_scaling_refuses_an_out_it_cannot_make_before_measuring(where: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import detox.bench_scaling as bs

    measured = []
    monkeypatch.setattr(bs, "bench_scaling", lambda *a, **k: measured.append(a))
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "sub" / "deeper"
    with pytest.raises(SystemExit) as err:
        main([*SCALING, "--d", "1000", "--out", str(out)])
    assert err.value.code == 2 and f"error: --out {out}: " in capsys.readouterr().err
    assert not measured and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_replot_of_a_folder_without_results_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["replot", str(tmp_path / "nowhere")])
    assert err.value.code == 2
    assert f"error: replot {tmp_path / 'nowhere'}: no readable scaling.json there" in capsys.readouterr().err


def test_replot_of_a_foreign_or_edited_scaling_json_is_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a KeyError, TypeError or numpy casting traceback, after some of the files were rewritten."""
    good = json.loads((Path(__file__).resolve().parents[1] / "docs/results/fig_c_paper/scaling.json").read_text())
    edited = json.loads(json.dumps(good))
    edited["rows"][0]["t_step"] = "abc"
    lacking = json.loads(json.dumps(good))
    del lacking["rows"][1]["method"]
    for saved, why in (({}, "expected an object with a non-empty list of rows"), ([1], "expected an object"),
                       ({"rows": [], "setting": {}, "command": "x"}, "non-empty list of rows"),
                       (lacking, "a row lacks 'method'"), (edited, "TypeError")):
        (tmp_path / "scaling.json").write_text(json.dumps(saved))
        with pytest.raises(SystemExit) as err:
            main(["replot", str(tmp_path)])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.value.code == 2 and f"error: replot {tmp_path / 'scaling.json'}: not one `scaling` writes" in line
        assert why in line, line
        assert [p.name for p in tmp_path.iterdir()] == ["scaling.json"]
    (tmp_path / "scaling.json").write_text(json.dumps(good))
    assert main(["replot", str(tmp_path)]) == 0
    assert {"scaling.md", "scaling.png", "scaling.pdf", "scaling.csv"} <= {p.name for p in tmp_path.iterdir()}


def test_split_skips_jobs_that_are_not_runs_and_refuses_a_root_without_any(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a summary.json or metrics.jsonl a run does not write (a list, a step that is a string) was a
    TypeError traceback, and a folder with no job (``split /etc``) printed an empty table with exit 0."""
    root = tmp_path / "fig_c_paper"
    _job(root, "vanilla-bulyan", {"t_compute": 1.0, "t_comm": 0.0, "t_vote": 0.0, "t_aggregate": 1.5,
                                  "t_update": 0.05})
    for name, summary, record in (("7", '{"choices": []}', '{"step": "x"}'), ("8", "[]", "[1]")):
        (root / name).mkdir()
        (root / name / "summary.json").write_text(summary)
        (root / name / "metrics.jsonl").write_text(record + "\n")
    assert [r["method"] for r in read_split(root)] == ["vanilla-bulyan"]
    err = capsys.readouterr().err
    assert f"{root / '7'}: skipped" in err and f"{root / '8'}: skipped" in err
    for bad in ("7", "8"):
        (root / bad / "summary.json").unlink()
    (root / "method=vanilla-bulyan" / "summary.json").write_text("[]")
    with pytest.raises(SystemExit) as exit_:
        main(["split", str(root), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and f"error: split {root}: no job of a sweep there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["split", str(root), "--out", str(root / "7" / "metrics.jsonl")])
    assert exit_.value.code == 2 and "error: split --out" in capsys.readouterr().err


def test_a_failed_write_leaves_the_previous_outputs_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The split's files were written in place one after another: a failure midway (a full disk) left a truncated
    figure where the previous one had been. Now each is written to a temporary file and renamed."""
    import matplotlib.figure

    root = tmp_path / "fig_c_paper"
    for method, t_vote in (("detox-bulyan", 0.2), ("vanilla-bulyan", 0.0)):
        _job(root, method, {"t_compute": 1.0, "t_comm": 0.0, "t_vote": t_vote, "t_aggregate": 0.3, "t_update": 0.05})
    out = tmp_path / "out"
    assert main(["split", str(root), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"table.csv", "table.md", "fig_c_paper.png", "fig_c_paper.pdf"} <= set(before)

    def half_then_full_disk(self: matplotlib.figure.Figure, fname: Any, **kwargs: Any) -> None:
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_full_disk)
    with pytest.raises(OSError, match="No space"):
        write_split(read_split(root), out, "again")
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after["fig_c_paper.png"] == before["fig_c_paper.png"]  # the previous figure, whole
    assert set(after) == set(before)  # no temporary file left behind
