"""A hostile reviewer's second pass over the analysis: numbers recomputed by hand (scipy), roots that mix sweeps or
hold files no run writes (fifos, /dev/zero, alias bombs, deep nesting, bytes that are not UTF-8), and ``--out`` under
concurrent reports and kills: each bad input is one line (exit 2, or one warning where the rest is reportable), each
odd input the right numbers, and ``--out`` always one whole report."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the tests only draw into objects and files

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from conftest import ROOT  # noqa: E402
from scipy import stats  # noqa: E402
from test_analysis import _curve, _two_jobs, sweep_b, sweep_c, sweep_e, write_job  # noqa: E402

import analysis.report as R  # noqa: E402
from analysis import figures as F  # noqa: E402
from analysis.labels import preset  # noqa: E402
from analysis.load import load_metrics, load_runs  # noqa: E402
from analysis.report import main as report_main  # noqa: E402
from analysis.stats import interval  # noqa: E402


def _errors(capsys: pytest.CaptureFixture) -> list[str]:
    return capsys.readouterr().err.splitlines()


def _edit(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _speedups(root: Path, target: float = 0.85) -> pd.DataFrame:
    runs = load_runs(root)
    return F.speedups(runs, load_metrics(root, runs), target)


# ----------------------------------------------------------------------------------- statistics by hand


@pytest.mark.parametrize("values", [[0.861], [0.861, 0.874], [0.861, 0.874, 0.869], [3.0, 7.0, 5.0, 6.5]])
def test_interval_is_scipys_student_t_for_small_n(values: list[float]) -> None:
    s = interval([*values, None, float("nan"), float("inf")])  # None and non-finite values are no seeds
    n = len(values)
    assert (s.n, s.mean) == (n, np.mean(values))
    if n == 1:
        assert np.isnan(s.sd) and np.isnan(s.lo) and np.isnan(s.hi)
        return
    sd = np.std(values, ddof=1)
    lo, hi = stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=sd / np.sqrt(n))
    assert (s.sd, s.lo, s.hi) == (sd, lo, hi)  # bit for bit
    half = stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)
    assert s.hi - s.mean == pytest.approx(half, rel=1e-12)


def test_interval_of_values_near_the_float_limits() -> None:
    big = interval([1.7e308, 1.5e308])  # a finite time a loader accepts: the sum overflowed to a mean of inf
    assert big.mean == pytest.approx(1.6e308) and big.sd == pytest.approx(np.sqrt(2) * 1e307)
    assert np.isfinite(big.lo)
    tiny = interval([1e-300, 3e-300])  # the squares underflowed to an sd of 0: a zero-width interval
    assert tiny.sd == pytest.approx(np.sqrt(2) * 1e-300) and tiny.lo < tiny.mean < tiny.hi


def _pairs(root: Path, times: dict[str, dict[int, float]], figure: str = "B") -> None:
    """Jobs whose time to 85 % is given per seed: the curve reaches it at step 10 (time = 10 * per_step)."""
    for defence, by_seed in times.items():
        for seed, t in by_seed.items():
            accs = [0.1, 0.9] if np.isfinite(t) else [0.1, 0.5]
            write_job(root, f"{defence}-bulyan", "rev_grad", seed, accs, figure=figure,
                      per_step=(t if np.isfinite(t) else 1.0) / 10)


def test_speedup_pairs_by_seed_not_by_position(tmp_path: Path) -> None:
    # vanilla seeds 0, 1, 2; DETOX seeds 1, 2, 3: position would pair 0-1, 1-2, 2-3
    _pairs(tmp_path, {"vanilla": {0: 9.0, 1: 6.0, 2: 4.0}, "detox": {1: 2.0, 2: 1.0, 3: 5.0}})
    row = _speedups(tmp_path).iloc[0]
    ratios = [6.0 / 2.0, 4.0 / 1.0]
    assert (row["speedup"], row["speedup_n"]) == (pytest.approx(np.mean(ratios)), 2)
    lo, hi = stats.t.interval(0.95, 1, loc=np.mean(ratios), scale=np.std(ratios, ddof=1) / np.sqrt(2))
    assert (row["speedup_lo"], row["speedup_hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert (row["vanilla_time"], row["detox_time"]) == (pytest.approx(19 / 3), pytest.approx(8 / 3))


def test_a_seed_that_never_reached_or_diverged_has_no_ratio(tmp_path: Path) -> None:
    _pairs(tmp_path, {"vanilla": {0: 9.0, 1: float("inf"), 2: 4.0}, "detox": {0: 3.0, 1: 2.0, 2: 2.0}})
    diverged = next(tmp_path.glob("*method=detox-bulyan,seed=2,*"))
    _edit(diverged / "summary.json", status="diverged")  # it reached 85 % before it diverged: a time
    row = _speedups(tmp_path).iloc[0]
    assert (row["speedup"], row["speedup_n"]) == (pytest.approx((3.0 + 2.0) / 2), 2)
    assert (row["vanilla_reached"], row["vanilla_seeds"]) == (2, 3)


def test_a_time_of_0_on_either_side_gives_no_ratio(tmp_path: Path) -> None:
    _pairs(tmp_path, {"vanilla": {0: 6.0, 1: 0.0}, "detox": {0: 2.0, 1: 1.0}})
    row = _speedups(tmp_path).iloc[0]
    # seed 1's X reached 85 % before training (time 0): 0 / 1 is no speedup of 0, nor is 1 / 0 one of inf
    assert (row["speedup"], row["speedup_n"]) == (3.0, 1)


def test_jobs_without_a_seed_are_not_paired_by_position(tmp_path: Path) -> None:
    _pairs(tmp_path, {"vanilla": {0: 6.0, 1: 8.0}, "detox": {0: 2.0, 1: 1.0}})
    for job in tmp_path.iterdir():
        _edit(job / "summary.json", seed=None)
    row = _speedups(tmp_path).iloc[0]
    assert row["speedup_n"] == 0  # nothing says which runs belong together
    assert row["speedup"] == pytest.approx(7.0 / 1.5)  # the ratio of the mean times, unpaired


# ----------------------------------------------------------------------------------- roots that mix sweeps


def _second_task(root: Path, job: Path, task: str = "lenet-fashion") -> Path:
    """A copy of ``job`` run under another task (as sweeps/fig_*_full sweep two tasks in one root)."""
    config = yaml.safe_load((job / "resolved_config.yaml").read_text())
    (job / "resolved_config.yaml").write_text(yaml.safe_dump({**config, "task": "fc-fashion"}))  # as a run writes
    copy = root / job.name.replace("task=fc-fashion", f"task={task}")
    shutil.copytree(job, copy)
    config = yaml.safe_load((copy / "resolved_config.yaml").read_text())
    (copy / "resolved_config.yaml").write_text(yaml.safe_dump({**config, "task": task}))
    summary = json.loads((copy / "summary.json").read_text())
    _edit(copy / "summary.json", choices={**summary["choices"], "task": task})
    return copy


def test_a_sweep_over_two_tasks_pairs_and_draws_each_task_apart(tmp_path: Path) -> None:
    root = tmp_path / "b"
    _pairs(root, {"vanilla": {0: 6.0, 1: 8.0}, "detox": {0: 2.0, 1: 2.0}})
    for job in list(root.iterdir()):
        slower = _second_task(root, job)
        records = [json.loads(x) for x in (slower / "metrics.jsonl").read_text().splitlines()]
        (slower / "metrics.jsonl").write_text("".join(json.dumps({**r, "cluster_time_median": 10 * r[
            "cluster_time_median"]}) + "\n" for r in records))
    sp = _speedups(root).set_index("variant")
    # one row per task (only the first task's was kept), each its own seeds' ratios: 7/2 in both
    assert sorted(sp.index) == ["task=fc-fashion", "task=lenet-fashion"]
    assert list(sp["speedup_n"]) == [2, 2] and list(sp["vanilla_seeds"]) == [2, 2]
    assert sp.loc["task=lenet-fashion", "vanilla_time"] == pytest.approx(70.0)
    assert sp.loc["task=fc-fashion", "speedup"] == pytest.approx(3.5)
    assert report_main([str(root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| vanilla-bulyan [task=lenet-fashion] | rev_grad |" in md and "| bulyan | task=fc-fashion |" in md


def test_figure_e_never_averages_two_tasks_or_two_attacks(tmp_path: Path) -> None:
    root = sweep_e(tmp_path / "e")
    for job in list(root.glob("*method=detox-multi-krum,*")):
        other = _second_task(root, job)
        _edit(other / "summary.json", final_test_acc=0.5)
    runs = load_runs(root)
    left = F.fig_e(runs).axes[0]
    texts = [t.get_text() for t in left.get_legend().get_texts()]
    assert "detox-multi-krum [task=fc-fashion] (n=3)" in texts and "detox-multi-krum [task=lenet-fashion] (n=3)" in \
        texts
    assert not any(t.startswith("detox-multi-krum (") for t in texts)  # a mean of 0.87 and 0.5 drawn as one method
    for job in list(root.glob("*method=vanilla-coord-median,*")):  # the same method under a second attack
        copy = root / job.name.replace("err_mode=rev_grad", "err_mode=alie")
        shutil.copytree(job, copy)
        config = yaml.safe_load((copy / "resolved_config.yaml").read_text())
        (copy / "resolved_config.yaml").write_text(yaml.safe_dump({**config, "err_mode": {"name": "alie", "z": 1.0}}))
        summary = json.loads((copy / "summary.json").read_text())
        _edit(copy / "summary.json", choices={**summary["choices"], "err_mode": "alie"}, final_test_acc=0.2)
    texts = [t.get_text() for t in F.fig_e(load_runs(root)).axes[0].get_legend().get_texts()]
    # one line per attack: not the mean of 0.87 and 0.2 under no name
    assert "vanilla-coord-median — alie (z = 1) (n=3)" in texts and "vanilla-coord-median — rev_grad (n=3)" in texts


def test_two_configurations_on_one_side_of_a_pair_are_refused(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "b"
    _pairs(root, {"vanilla": {0: 6.0}, "detox": {0: 2.0}})
    # the same rule without the preset (another sweep's jobs): a second vanilla Bulyan, which the speedup cannot
    # tell from the first (it paired whichever came first)
    write_job(root, "vanilla-bulyan", "rev_grad", 1, [0.1, 0.9], figure="B", approach_changes={"note": "mine"})
    assert "note" not in preset("vanilla-bulyan")["approach"]  # (write_job changed the cached preset)
    assert any(label.startswith("baseline/bulyan (note=mine, ") for label in load_runs(root)["label"])
    assert report_main([str(root), "--out", str(tmp_path / "out")]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and err[0].startswith("analysis.report: error: jobs ") and "vanilla bulyan" in err[0]
    assert not (tmp_path / "out").exists()


def test_jobs_aiming_at_different_targets_need_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = sweep_b(tmp_path / "b")
    for job in root.glob("*seed=2,*"):  # a rerun of seed 2 aimed at 90 %, merged into the root
        _edit(job / "summary.json", target_acc=0.9)
    assert report_main([str(root), "--out", str(tmp_path / "out")]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "aim at different target accuracies (target_acc 0.85 and 0.9)" in err[0]
    assert not (tmp_path / "out").exists()
    assert report_main([str(root), "--out", str(tmp_path / "out"), "--target", "0.85"]) == 0


# ----------------------------------------------------------------------------------- files no run writes


def _hostile_root(root: Path) -> dict[str, Path]:
    """One job per kind of file that would hang the analysis, fill its memory or crash it; two good jobs."""
    bad: dict[str, Path] = {}
    for k, (name, file) in enumerate([("fifo-summary", "summary.json"), ("fifo-metrics", "metrics.jsonl"),
                                      ("fifo-config", "resolved_config.yaml"), ("zero-eval", "eval.jsonl"),
                                      ("huge-metrics", "metrics.jsonl"), ("bomb-config", "resolved_config.yaml"),
                                      ("deep-summary", "summary.json"), ("deep-metrics", "metrics.jsonl")]):
        d = write_job(root, "detox-bulyan", "rev_grad", 10 + k, _curve("detox", 1))
        target = d / file
        target.unlink(missing_ok=True)
        if name.startswith("fifo"):
            os.mkfifo(target)
        elif name == "zero-eval":
            target.symlink_to("/dev/zero")
        elif name == "huge-metrics":
            with open(target, "wb") as fh:
                fh.truncate(300 << 20)  # sparse: no disk
        elif name == "bomb-config":
            lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
            lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
            target.write_text("\n".join(lines) + "\n")  # 9^10 strings once expanded
        elif name == "deep-summary":
            target.write_text("[" * 100_000 + "]" * 100_000)
        else:
            target.write_text('{"step": 0, "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
        bad[name] = target
    _two_jobs(root)
    return bad


def test_files_that_would_hang_or_crash_the_analysis_are_one_warning_each(tmp_path: Path) -> None:
    root = tmp_path / "m"
    bad = _hostile_root(root)
    try:
        out = subprocess.run([sys.executable, "-m", "analysis.report", str(root), "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, cwd=ROOT, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the report hung on a fifo, /dev/zero or an alias bomb")
    assert out.returncode == 0, out.stderr[-3000:]
    err = out.stderr.splitlines()
    assert all(x.startswith("analysis: warning: ") for x in err), err
    for name, path in bad.items():
        assert sum(str(path) in x for x in err) == 1, (name, err)
    assert len(err) == len(bad)
    assert "| detox-bulyan | rev_grad | 5 |" in (tmp_path / "out" / "table.md").read_text()


def test_a_folder_name_that_is_not_utf8_or_holds_a_line_break(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "m"
    job = _two_jobs(root)
    odd = os.fsencode(root) + b"/seed=0,\xff\xfe"
    os.rename(job, odd)
    assert report_main([str(root), "--out", str(tmp_path / "out")]) == 0  # (UnicodeEncodeError writing jobs.csv)
    jobs = (tmp_path / "out" / "jobs.csv").read_bytes().decode()  # UTF-8, the bytes shown as \xNN
    assert "seed=0,\\xff\\xfe" in jobs
    capsys.readouterr()
    broken = root / "seed=0,a\nb"
    os.rename(odd, broken)
    (broken / "metrics.jsonl").write_text("not json\n")
    assert report_main([str(root), "--out", str(tmp_path / "out")]) == 0
    err = _errors(capsys)
    assert len(err) == 1 and "seed=0,a\\x0ab/metrics.jsonl: line 1 is not JSON" in err[0]  # one line, not two


def test_a_lone_surrogate_in_a_summary_is_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = _two_jobs(tmp_path / "m")
    text = (job / "summary.json").read_text().replace('"err_mode": "rev_grad"', '"err_mode": "rev\\udcffgrad"')
    (job / "summary.json").write_text(text)
    assert report_main([str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 0  # (no font draws \udcff)
    err = _errors(capsys)
    assert len(err) == 1 and str(job / "summary.json") in err[0] and "lone surrogate" in err[0]


@pytest.mark.parametrize("name", ["a$\\frac{$b", "$\\undefinedmacro$", "x$^$"])
def test_a_label_with_dollar_signs_is_drawn_as_typed(tmp_path: Path, name: str) -> None:
    job = _two_jobs(tmp_path / "m")
    summary = json.loads((job / "summary.json").read_text())
    _edit(job / "summary.json", choices={**summary["choices"], "method": None, "approach": name})
    (job / "resolved_config.yaml").unlink()
    assert report_main([str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 0  # (mathtext parse error)
    assert f"| {name}-bulyan | rev_grad |" in (tmp_path / "out" / "table.md").read_text()


# ----------------------------------------------------------------------------------- figure B's odd cases


def test_figure_b_when_no_seed_reached_or_one_side_never_finished(tmp_path: Path) -> None:
    root = tmp_path / "b"
    for defence in ("vanilla", "detox"):
        for seed in (0, 1):
            write_job(root, f"{defence}-bulyan", "rev_grad", seed, [0.1, 0.1], status="diverged", figure="B")
            write_job(root, f"{defence}-coord-median", "rev_grad", seed, [0.1, 0.9], figure="B",
                      status="failed" if defence == "detox" else "completed")
    runs = load_runs(root)
    fig = F.fig_b(runs, load_metrics(root, runs), 0.85)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "neither\nreached it" in texts  # not "DETOX-X never reached it": X never did either
    assert "no finished\nDETOX-X run" in texts and "no run" in texts  # failed: not a run that never reached it
    never = runs[runs["rule"] == "bulyan"]
    assert F.fig_b(never, load_metrics(root, never), 0.85).axes[0].get_ylim() == (0.0, 1.45)  # not 0..1.45e-9


def test_a_method_the_labels_do_not_know_and_single_seeds_draw(tmp_path: Path) -> None:
    for letter in "ABCDE":
        root = tmp_path / letter
        for method in ("vanilla-bulyan", "detox-bulyan"):
            write_job(root, method, "rev_grad", 0, _curve("detox", 0), figure=letter)
        job = write_job(root, "detox-multi-krum", "rev_grad", 0, _curve("detox", 0), figure=letter)
        summary = json.loads((job / "summary.json").read_text())
        _edit(job / "summary.json", choices={**summary["choices"], "method": "my-new-method"})
        assert report_main([str(root), "--out", str(tmp_path / f"out{letter}")]) == 0, letter


# ----------------------------------------------------------------------------------- --out: whole or not at all


def _report_files(out: Path) -> dict[str, str]:
    """Name -> first line (text) or size class of every file in ``out``."""
    return {p.name: (p.read_text().splitlines()[0] if p.suffix in (".md", ".txt") else "file")
            for p in out.iterdir()}


def _whole(out: Path, sweep: str, names: set[str]) -> bool:
    files = _report_files(out)
    return set(files) == names | {"notes.txt"} and files["table.md"] == f"# {sweep}" and \
        files["notes.txt"] == "mine"


def _two_sweeps(tmp_path: Path) -> tuple[Path, Path, set[str], set[str]]:
    """Figure B's sweep (fig_b, speedup.csv) and Figure C's (fig_c), and the files each report writes."""
    b, c = sweep_b(tmp_path / "b"), sweep_c(tmp_path / "c")
    names_b = {"fig_b.png", "fig_b.pdf", "table.md", "table.csv", "jobs.csv", "speedup.csv"}
    names_c = {"fig_c.png", "fig_c.pdf", "table.md", "table.csv", "jobs.csv"}
    return b, c, names_b, names_c


def test_a_report_replaces_an_earlier_reports_files_it_does_not_write(tmp_path: Path) -> None:
    b, c, names_b, names_c = _two_sweeps(tmp_path)
    out = tmp_path / "out"
    assert report_main([str(b), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert report_main([str(c), "--out", str(out)]) == 0
    # fig_b.png and speedup.csv of the other sweep would sit next to its table as if this sweep had them
    assert _whole(out, "c", names_c), _report_files(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_two_concurrent_reports_into_one_out_leave_one_whole_report(tmp_path: Path) -> None:
    b, c, names_b, names_c = _two_sweeps(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "analysis.report", str(root), "--out", str(out)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for root in (b, c)]
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stderr.read()
        assert _whole(out, "b", names_b) or _whole(out, "c", names_c), _report_files(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_report_waits_for_the_lock_on_its_out(tmp_path: Path) -> None:
    b, c, names_b, names_c = _two_sweeps(tmp_path)
    out = tmp_path / "out"
    assert report_main([str(b), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    done = threading.Event()
    with R.out_lock(out):  # what analysis.tune holds as well: one helper
        thread = threading.Thread(target=lambda: (R.report(c, out), done.set()))
        thread.start()
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".out.") and (p / "table.md").exists() for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        time.sleep(0.3)
        assert not done.is_set() and _whole(out, "b", names_b)  # written aside, waiting for the lock
    thread.join(120)
    assert done.is_set() and _whole(out, "c", names_c)


FS_CALLS = ("replace", "rename", "link", "symlink", "unlink", "remove", "rmdir", "mkdir")


def _kill_at(k: int, root: Path, out: Path) -> int:
    """Run ``report(root, out)`` in a child process that dies (as SIGKILL would: no cleanup) just before its k-th
    call that changes the file system; returns its exit status (137: killed there, 0: ran through)."""
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    try:
        calls = [0]

        def dying(f):  # noqa: ANN001, ANN202
            def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                if calls[0] == k:
                    os._exit(137)
                calls[0] += 1
                return f(*args, **kwargs)
            return call

        for name in FS_CALLS:
            setattr(os, name, dying(getattr(os, name)))
        shutil.rmtree = dying(shutil.rmtree)
        if hasattr(R, "_exchange"):
            R._exchange = dying(R._exchange)
        with open(os.devnull, "w") as null:
            sys.stdout = sys.stderr = null
            R.report(root, out)
        os._exit(0)
    except BaseException:
        os._exit(1)


def test_a_kill_at_any_step_of_writing_leaves_the_old_report_or_the_new(tmp_path: Path) -> None:
    b, c, names_b, names_c = _two_sweeps(tmp_path)
    out, pristine = tmp_path / "out", tmp_path / "pristine"
    assert report_main([str(b), "--out", str(pristine)]) == 0
    (pristine / "notes.txt").write_text("mine")
    for k in range(200):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, out)
        status = _kill_at(k, c, out)
        assert status in (0, 137), status
        # at every step --out is one report, whole: never b's table next to c's figure
        assert _whole(out, "b", names_b) or _whole(out, "c", names_c), (k, _report_files(out))
        if status == 0:
            assert _whole(out, "c", names_c)
            break
    else:
        pytest.fail("the report never ran through")
    assert k > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the killed ones' cleared


def test_real_kills_during_a_report_leave_the_old_report_or_the_new(tmp_path: Path) -> None:
    b, c, names_b, names_c = _two_sweeps(tmp_path)
    out = tmp_path / "out"
    assert report_main([str(b), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    cmd = [sys.executable, "-m", "analysis.report", str(c), "--out", str(out)]
    start = time.monotonic()
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    took = time.monotonic() - start
    shutil.rmtree(out)
    assert report_main([str(b), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    for delay in np.linspace(0.5, 1.0, 4) * took:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(60)
        assert _whole(out, "b", names_b) or _whole(out, "c", names_c), (delay, _report_files(out))
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    assert _whole(out, "c", names_c)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("where", ["root", "above-root", "job", "holds-a-folder"])
def test_an_out_that_is_no_report_folder_is_refused(tmp_path: Path, where: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "runs" / "m"
    job = _two_jobs(root)
    out = {"root": root, "above-root": tmp_path / "runs", "job": job, "holds-a-folder": tmp_path / "mine"}[where]
    (tmp_path / "mine" / "photos").mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert report_main([str(root), "--out", str(out)]) == 2  # (it wrote its tables among the job folders)
    err = _errors(capsys)
    assert len(err) == 1 and err[0].startswith(f"analysis.report: error: --out {out}: ")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_report_names_every_file_a_report_can_write() -> None:
    # what a report replaces in an earlier one's --out: every figure of every family and every table
    drawn = set()
    for letter in "ABCDE":
        runs = pd.DataFrame({"figure": [letter]})
        drawn |= {f"{n}.{e}" for n in R._figures(runs, pd.DataFrame(), 0.85) for e in ("png", "pdf")}
    assert drawn | {"table.md", "table.csv", "jobs.csv", "speedup.csv"} == set(R.REPORT_FILES)
    assert re.fullmatch(r"[a-z_.]+", "".join(sorted(R.REPORT_FILES)))
