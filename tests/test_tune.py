"""Learning-rate tuning as the original did it (DESIGN §5): the tuning sweeps compose, ``analysis.tune`` picks per
(task, method, err_mode) the lr of the lowest training loss (ties: the smaller lr; a diverged, failed or missing run
never), and ``lr_picks=<file>`` makes a job train with its pick (or refuses it in one line)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import CONF, ROOT, cli, make_cfg, run_job
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import detox.train  # noqa: F401 - registers the config resolvers validate() needs
from analysis.tune import lr_label
from analysis.tune import main as tune_main
from detox.config import ConfigError, validate
from detox.results import job_dir_name
from detox.schema import SCHEMA
from detox.tuning import read_picks

SWEEPS = ROOT / "sweeps"
GRID = [2.0**k for k in range(-10, -2)]  # the original's src/tune.sh: 2^-10 ... 2^-3
METHODS = ["vanilla-multi-krum", "detox-multi-krum", "vanilla-bulyan", "detox-bulyan", "vanilla-coord-median",
           "detox-coord-median"]


# ----------------------------------------------------------------------------------- hand-made tuning roots


def write_job(root: Path, method: str, attack: str, lr: float, loss: float | None = 0.5, *, seed: int = 0,
              status: str = "completed", task: str = "fc-fashion", steps: tuple[int, ...] = (0, 199, 200),
              early: float = 1.0, workers: int = 45) -> Path:
    """A job folder as the tuning sweep writes it: records at ``steps`` whose last train_loss is ``loss`` (the
    ones before it ``early``)."""
    d = root / f"err_mode={attack},lr={lr!r},method={method},seed={seed},task={task}"
    d.mkdir(parents=True)
    config = {"task": task, "method": method, "err_mode": {"name": attack}, "lr": lr, "seed": seed,
              "workers": workers, "max_steps": steps[-1], "eval_freq": steps[1]}
    (d / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    summary = {"status": status, "choices": {"network": "fc", "dataset": "fashion_mnist", "mode": "bulyan",
                                             "approach": "baseline", "err_mode": attack, "engine": "local",
                                             "task": task, "method": method},
               "workers": workers, "worker_fail": 5, "group_size": 3, "lr": lr, "seed": seed, "max_steps": steps[-1],
               "placement": "random", "figure": None}
    if status == "failed":
        (d / "summary.json").write_text(json.dumps({**summary, "error": "RuntimeError: boom"}))
        return d
    records = [{"step": s, "train_loss": None if i == 0 else (loss if i == len(steps) - 1 else early),
                "test_acc": 0.5} for i, s in enumerate(steps)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "summary.json").write_text(json.dumps({**summary, "steps": steps[-1], "final_test_acc": 0.5}))
    return d


def tune(root: Path, out: Path, *extra: str) -> tuple[int, dict | None]:
    """Run the command; (exit code, the picks file's lr table or None)."""
    code = tune_main([str(root), "--out", str(out), *extra])
    picks = out / "lr_picks.yaml"
    return code, (yaml.safe_load(picks.read_text())["lr"] if picks.exists() else None)


def test_lowest_loss_wins_ties_go_to_the_smaller_lr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "tune"
    for lr, loss in zip(GRID[:4], (0.9, 0.4, 0.4, 0.6), strict=True):  # a tie between 2^-9 and 2^-8
        write_job(root, "detox-bulyan", "constant", lr, loss)
    for lr, loss in zip(GRID[:4], (0.9, 0.8, 0.3, 0.6), strict=True):
        write_job(root, "vanilla-bulyan", "constant", lr, loss)
    code, picks = tune(root, tmp_path / "out")
    assert code == 0
    assert picks == {"fc-fashion": {"detox-bulyan": {"constant": GRID[1]}, "vanilla-bulyan": {"constant": GRID[2]}}}
    out = capsys.readouterr().out
    assert "**0.4000**" in out and "| 2^-9 = 0.001953125 |" in out  # the table, the pick in bold
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"table.md", "table.csv", "lr_picks.yaml"}


def test_a_diverged_lr_is_never_picked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "tune"
    write_job(root, "vanilla-mean", "rev_grad", GRID[0], 0.9)
    write_job(root, "vanilla-mean", "rev_grad", GRID[1], 0.7)
    write_job(root, "vanilla-mean", "rev_grad", GRID[2], 0.01, status="diverged")  # the lowest loss, diverged
    write_job(root, "detox-bulyan", "rev_grad", GRID[0], 0.9, status="diverged")
    write_job(root, "detox-bulyan", "rev_grad", GRID[1], 0.9, status="diverged")
    write_job(root, "detox-bulyan", "rev_grad", GRID[2], 0.9, status="diverged")
    code, picks = tune(root, tmp_path / "out")
    assert code == 0 and picks == {"fc-fashion": {"vanilla-mean": {"rev_grad": GRID[1]}}}
    captured = capsys.readouterr()
    assert "| vanilla-mean | rev_grad | 0.9000 | **0.7000** | diverged |" in captured.out
    assert "detox-bulyan/rev_grad: no lr of the grid completed" in captured.err  # no pick: said, not guessed


def test_failed_and_missing_lrs_are_never_picked_and_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "tune"
    for lr in GRID[:3]:
        write_job(root, "vanilla-coord-median", "constant", lr, 0.5 if lr != GRID[1] else 0.8)
    write_job(root, "detox-coord-median", "constant", GRID[0], 0.7)
    write_job(root, "detox-coord-median", "constant", GRID[1], 0.1, status="failed")  # would have won
    # GRID[2] never ran for detox-coord-median: missing from the grid the root ran
    code, picks = tune(root, tmp_path / "out")
    assert code == 0
    assert picks["fc-fashion"]["detox-coord-median"] == {"constant": GRID[0]}
    assert picks["fc-fashion"]["vanilla-coord-median"] == {"constant": GRID[0]}  # 0.5 tie: the smaller lr
    err = capsys.readouterr().err
    assert "detox-coord-median/constant: picked among the lrs that ran; 2^-9 failed, 2^-8 missing" in err
    rows = (tmp_path / "out" / "table.csv").read_text()
    assert "detox-coord-median,constant,0.001953125,1,failed" in rows
    assert "detox-coord-median,constant,0.00390625,0,missing" in rows


def test_seeds_are_averaged_and_an_lr_short_of_a_seed_is_not_picked(tmp_path: Path) -> None:
    root = tmp_path / "tune"
    for seed, losses in ((0, (0.5, 0.2, 0.6)), (1, (0.5, 0.9, None))):
        for lr, loss in zip(GRID[:3], losses, strict=True):
            if loss is not None:
                write_job(root, "detox-multi-krum", "rev_grad", lr, loss, seed=seed)
    # 2^-9: mean 0.55 > 2^-10's 0.5; 2^-8 has the best seed-0 loss but no seed 1
    code, picks = tune(root, tmp_path / "out")
    assert code == 0 and picks == {"fc-fashion": {"detox-multi-krum": {"rev_grad": GRID[0]}}}


def test_loss_final_is_the_last_iteration_and_mean_the_whole_run(tmp_path: Path) -> None:
    root = tmp_path / "tune"
    # 2^-10: 1.0 for steps 1..199, 0.2 at step 200 (final 0.2; mean 0.996); 2^-9: 0.5 then 0.4 (final 0.4; mean 0.4995)
    write_job(root, "detox-bulyan", "constant", GRID[0], 0.2, early=1.0)
    write_job(root, "detox-bulyan", "constant", GRID[1], 0.4, early=0.5)
    assert tune(root, tmp_path / "final")[1]["fc-fashion"]["detox-bulyan"]["constant"] == GRID[0]
    assert tune(root, tmp_path / "mean", "--loss", "mean")[1]["fc-fashion"]["detox-bulyan"]["constant"] == GRID[1]


def _one_line_exit_2(capsys: pytest.CaptureFixture, code: int, says: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("analysis: warning:")]
    assert len(lines) == 1 and lines[0].startswith("analysis.tune: error: ") and says in lines[0], err


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    _one_line_exit_2(capsys, tune_main([str(tmp_path / "nowhere"), "--out", str(out)]), "not a folder")
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(capsys, tune_main([str(tmp_path / "empty"), "--out", str(out)]), "no job folders")
    failed = tmp_path / "failed"
    write_job(failed, "detox-bulyan", "constant", GRID[0], status="failed")
    _one_line_exit_2(capsys, tune_main([str(failed), "--out", str(out)]), "no finished")
    diverged = tmp_path / "diverged"
    write_job(diverged, "detox-bulyan", "constant", GRID[0], status="diverged")
    _one_line_exit_2(capsys, tune_main([str(diverged), "--out", str(out)]), "nothing to pick")
    # a figure sweep's run: its last record averages steps 151..200, not the last iteration (--loss mean takes it)
    coarse = tmp_path / "coarse"
    for lr in GRID[:2]:
        write_job(coarse, "detox-bulyan", "constant", lr, steps=(0, 50, 100, 150, 200))
    _one_line_exit_2(capsys, tune_main([str(coarse), "--out", str(out)]), "steps 151...200")
    assert tune_main([str(coarse), "--out", str(tmp_path / "mean"), "--loss", "mean"]) == 0
    capsys.readouterr()
    _one_line_exit_2(capsys, tune_main([str(coarse), "--out", str(out), "--loss", "median"]), "--loss median")
    # two configs for one (task, method, err_mode, lr): two sweeps mixed in one root
    mixed = tmp_path / "mixed"
    write_job(mixed, "detox-bulyan", "constant", GRID[0])
    write_job(mixed, "detox-bulyan", "constant", GRID[0], seed=1, workers=15)
    _one_line_exit_2(capsys, tune_main([str(mixed), "--out", str(out)]), "with different configs")
    (tmp_path / "file").write_text("")
    _one_line_exit_2(capsys, tune_main([str(coarse), "--out", str(tmp_path / "file"), "--loss", "mean"]),
                     "not a folder")
    assert not out.exists()


# ----------------------------------------------------------------------------------- lr_picks=<file>


def picks_file(tmp_path: Path, table: dict | None = None) -> Path:
    path = tmp_path / "lr_picks.yaml"
    table = table if table is not None else {"fc-digits": {"vanilla-coord-median": {"rev_grad": 0.125}},
                                             "fc-fashion": {"detox-bulyan": {"constant": 0.0078125}}}
    path.write_text(yaml.safe_dump({"source": "/tmp/x", "loss": "final", "lr": table}))
    return path


def test_the_picked_lr_is_used_and_recorded(tmp_path: Path) -> None:
    picks = picks_file(tmp_path)
    cfg = make_cfg(["task=fc-fashion", "method=detox-bulyan", "err_mode=constant", f"lr_picks={picks}"])
    assert cfg.lr == 0.05
    validate(cfg)
    assert cfg.lr == 0.0078125
    summary = run_job(["workers=9", "worker_fail=1", "max_steps=2", "eval_freq=2", "batch_size=8", "task=fc-digits",
                       "method=vanilla-coord-median", f"lr_picks={picks}"], tmp_path / "run")
    assert summary["status"] == "completed" and summary["lr"] == 0.125
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    assert resolved["lr"] == 0.125 and resolved["lr_picks"] == str(picks)


@pytest.mark.parametrize(("task", "lr"), [("fc-fashion", 0.05), ("lenet-fashion", 0.02), (None, 0.05)])
def test_without_a_picks_file_the_tasks_lr_stays(task: str | None, lr: float) -> None:
    cfg = make_cfg([f"task={task}"] if task else [])
    assert cfg.lr_picks is None
    validate(cfg)
    assert cfg.lr == lr


def test_a_job_absent_from_the_picks_is_refused_in_one_line_before_work(tmp_path: Path) -> None:
    picks = picks_file(tmp_path)
    for overrides, says in (
            (["task=fc-fashion", "method=detox-bulyan", "err_mode=rev_grad"],
             "no lr for task=fc-fashion method=detox-bulyan err_mode=rev_grad (it has detox-bulyan/constant"),
            (["task=fc-fashion", "method=vanilla-bulyan", "err_mode=constant"], "method=vanilla-bulyan"),
            (["task=lenet-fashion", "method=detox-bulyan", "err_mode=constant"], "no lr for task=lenet-fashion"),
            (["task=fc-fashion", "err_mode=constant"], "no method preset"),
            (["method=detox-bulyan", "err_mode=constant"], "no task preset")):
        cfg = make_cfg([*overrides, f"lr_picks={picks}"])
        with pytest.raises(ConfigError) as info:
            validate(cfg)
        message = str(info.value)
        assert message.startswith(f"lr_picks={picks}: ") and says in message and "\n" not in message, message
    # as a user types it: exit 2, one line, and no run folder made
    run_dir = tmp_path / "never"
    proc = cli(["task=fc-fashion", "method=detox-bulyan", "err_mode=rev_grad", f"lr_picks={picks}",
                f"hydra.run.dir={run_dir}"], cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"detox: error: lr_picks={picks}: no lr for task=fc-fashion")
    assert not run_dir.exists()


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such file"),
    ("lr: [", "unreadable (ParserError"),
    ("- 1\n", "not a picks file"),
    ("lr: {fc-fashion: {detox-bulyan: {constant: -0.1}}}\n", "lr.fc-fashion.detox-bulyan.constant is -0.1, not"),
    ("lr: {fc-fashion: {detox-bulyan: {constant: .nan}}}\n", "is nan, not a learning rate"),
    ("lr: {fc-fashion: {detox-bulyan: 0.1}}\n", "lr.fc-fashion.detox-bulyan is 0.1, not a learning rate"),
    ("lr: {fc-fashion: 0.1}\n", "lr.fc-fashion is 0.1, not a learning rate"),
])
def test_a_bad_picks_file_is_refused_in_one_line(tmp_path: Path, content: str | None, says: str) -> None:
    path = tmp_path / "picks.yaml"
    if content is not None:
        path.write_text(content)
    cfg = make_cfg(["task=fc-fashion", "method=detox-bulyan", "err_mode=constant", f"lr_picks={path}"])
    with pytest.raises(ConfigError, match=f"^lr_picks={path}: ") as info:
        validate(cfg)
    assert says in str(info.value) and "\n" not in str(info.value)
    folder = make_cfg(["task=fc-fashion", "method=detox-bulyan", "err_mode=constant", f"lr_picks={tmp_path}"])
    with pytest.raises(ConfigError, match="is a folder"):
        validate(folder)


def test_an_lr_typed_next_to_the_picks_is_refused(tmp_path: Path) -> None:
    picks = picks_file(tmp_path)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=["task=fc-fashion", "method=detox-bulyan", "err_mode=constant", "lr=0.01",
                                           f"lr_picks={picks}"], return_hydra_config=True)
    with pytest.raises(ConfigError, match=r"^lr=0\.01: the job also has lr_picks=.*give one of them$"):
        validate(cfg)


def test_picks_written_by_the_analysis_are_read_back_exactly(tmp_path: Path) -> None:
    root = tmp_path / "tune"
    for method in ("detox-bulyan", "vanilla-bulyan"):
        for lr, loss in zip(GRID, (0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.55, 0.65), strict=True):
            write_job(root, method, "constant", lr, loss)
    assert tune_main([str(root), "--out", str(tmp_path / "out")]) == 0
    picks = read_picks(tmp_path / "out" / "lr_picks.yaml")
    assert picks == {"fc-fashion": {"detox-bulyan": {"constant": 2.0**-5}, "vanilla-bulyan": {"constant": 2.0**-5}}}
    cfg = make_cfg(["task=fc-fashion", "method=detox-bulyan", "err_mode=constant",
                    f"lr_picks={tmp_path / 'out' / 'lr_picks.yaml'}"])
    validate(cfg)
    assert cfg.lr == 2.0**-5
    assert [lr_label(x) for x in GRID] == [f"2^{k}" for k in range(-10, -2)] and lr_label(0.05) == "0.05"


# ----------------------------------------------------------------------------------- the tuning sweeps


def _sweep(name: str) -> tuple[dict, dict[str, list[str]]]:
    raw = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    return raw, {k: str(v).split(",") for k, v in raw["hydra"]["sweeper"]["params"].items()}


@pytest.mark.parametrize("name", ["tune_lr_cpu", "tune_lr_full"])
def test_the_tuning_sweeps_run_the_originals_grid(name: str) -> None:
    raw, params = _sweep(name)
    assert [float(v) for v in params["lr"]] == GRID
    assert all(SCHEMA["lr"].error(float(v)) is None for v in params["lr"])
    assert params["method"] == METHODS and params["err_mode"] == ["rev_grad", "constant"]
    assert raw["max_steps"] == 200 and raw["eval_freq"] == raw["max_steps"] - 1  # the last record: step 200 alone
    assert (raw["workers"], raw["worker_fail"], raw["group_size"], raw["batch_size"]) == (45, 5, 3, 32)
    assert raw["hydra"]["sweep"]["dir"] == f"multirun/{name}"
    assert raw["hydra"]["sweep"]["subdir"] == "${detox.job_dir:${hydra.job.override_dirname}}"
    text = (SWEEPS / f"{name}.yaml").read_text()
    assert f"--config-name {name}\n" in text and f"# Analyse: python -m analysis.tune multirun/{name}\n" in text
    if name.endswith("_full"):
        assert params["task"] == ["resnet18-cifar10", "vgg13-cifar100"] and params["engine"] == ["mpi"]
    else:
        assert params["task"] == ["fc-fashion"]


def test_every_tuning_job_composes_and_validates() -> None:
    """Each (method, err_mode) of tune_lr_cpu at one lr (the lr changes no composition: each is checked above)."""
    _, params = _sweep("tune_lr_cpu")
    with initialize_config_dir(version_base="1.3", config_dir=str(SWEEPS)):
        for method in params["method"]:
            for attack in params["err_mode"]:
                cfg = compose("tune_lr_cpu", overrides=[
                    "seed=0", "task=fc-fashion", f"method={method}", f"err_mode={attack}", f"lr={GRID[0]}",
                    f"hydra.searchpath=[file://{CONF}]"])
                validate(cfg)
                assert (cfg.method, cfg.err_mode.name, cfg.lr, cfg.max_steps, cfg.eval_freq) == (
                    method, attack, GRID[0], 200, 199)
                assert cfg.figure is None and cfg.lr_picks is None


def test_a_figure_sweep_takes_the_picks_and_names_its_folders(tmp_path: Path) -> None:
    picks = picks_file(tmp_path, {"fc-fashion": {m: {"rev_grad": 2.0**-(i + 3), "constant": 0.0625}
                                                 for i, m in enumerate(METHODS)}})
    with initialize_config_dir(version_base="1.3", config_dir=str(SWEEPS)):
        for i, method in enumerate(METHODS):
            cfg = compose("fig_a_cpu", overrides=["seed=0", "task=fc-fashion", f"method={method}", "err_mode=rev_grad",
                                                  f"lr_picks={picks}", f"hydra.searchpath=[file://{CONF}]"])
            validate(cfg)
            assert cfg.lr == 2.0**-(i + 3) and cfg.figure == "A"
    name = job_dir_name(f"err_mode=rev_grad,lr_picks={picks},method=detox-bulyan,seed=0,task=fc-fashion")
    assert "lr_picks=" in name and "/" not in name and name != job_dir_name(
        "err_mode=rev_grad,method=detox-bulyan,seed=0,task=fc-fashion")
    assert not math.isnan(read_picks(picks)["fc-fashion"]["detox-bulyan"]["constant"])


# ----------------------------------------------------------------------------------- hostile input (audit)

BOMB = ("t: &t {" + ", ".join(f"e{i}: 0.1" for i in range(30)) + "}\n"
        "m: &m {" + ", ".join(f"m{i}: *t" for i in range(30)) + "}\n"
        "lr: {" + ", ".join(f"k{i}: *m" for i in range(30)) + "}\n")  # 27,000 entries out of 1 KB; 10^9 likewise


@pytest.mark.parametrize(("content", "says"), [
    ("lr: {fc-fashion: {detox-bulyan: {constant: 1" + "0" * 400 + "}}}\n", "constant is 1000"),  # was OverflowError
    ("lr: {fc-fashion: {detox-bulyan: {constant: 1e-3}}}\n", "constant is '1e-3' (a string"),  # YAML 1.1: a string
    ("lr: {fc-fashion: {detox-bulyan: {constant: true}}}\n", "constant is True, not"),
    ("lr: {fc-fashion: {detox-bulyan: {constant: [0.1]}}}\n", "constant is [0.1], not"),
    (BOMB, "YAML aliases"),
    ("lr: {fc-fashion: {detox-bulyan: {constant: 0.1, constant: 0.2}}}\n", "'constant' is given twice"),
    ("lr: {1: {2: {3: 0.1}}, '1': {'2': {'3': 0.2}}}\n", "the key '1' is not a name"),
    ("lr: {fc-fashion: {detox-bulyan: {constant: 0.1}}}\n#" + "x" * (2 << 20) + "\n", "more than such a file holds"),
    (b"lr: {fc-fashion: {detox-bulyan: {constant: 0.1}}}\n# \xff\n", "UnicodeDecodeError"),
])
def test_a_hostile_picks_file_is_one_line_naming_the_value(tmp_path: Path, content: str | bytes, says: str) -> None:
    path = tmp_path / "picks.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    cfg = make_cfg(["task=fc-fashion", "method=detox-bulyan", "err_mode=constant", f"lr_picks={path}"])
    with pytest.raises(ConfigError, match=f"^lr_picks={path}: ") as info:
        validate(cfg)
    message = str(info.value)
    assert says in message and "\n" not in message and len(message) < 400, message


def test_a_fifo_picks_file_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    import os
    import threading
    import time

    fifo = tmp_path / "picks.yaml"
    os.mkfifo(fifo)

    def writer() -> None:  # unblocks a reader that waits for a writer (the old code): the test ends either way
        time.sleep(3)
        with contextlib.suppress(OSError), open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "w") as f:
            f.write("lr: {fc-fashion: {detox-bulyan: {constant: 0.1}}}\n")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    start = time.monotonic()
    with pytest.raises(ConfigError, match="not a regular file"):
        read_picks(fifo)
    assert time.monotonic() - start < 2


def test_a_lone_record_is_the_mean_of_the_whole_run_not_the_last_iteration(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "tune"
    write_job(root, "detox-bulyan", "constant", GRID[0], 0.2, steps=(0, 199, 200))
    write_job(root, "detox-bulyan", "constant", GRID[1], 0.1, steps=(0, 200))  # killed records: steps 1..200 in one
    _one_line_exit_2(capsys, tune_main([str(root), "--out", str(tmp_path / "out")]), "steps 1...200")
    lone = tmp_path / "lone" / "err_mode=constant,lr=0.001953125,method=detox-bulyan,seed=0,task=fc-fashion"
    lone.parent.mkdir()
    (root / lone.name).rename(lone)
    (lone / "metrics.jsonl").write_text(json.dumps({"step": 200, "train_loss": 0.1}) + "\n")  # no step-0 record
    (root / lone.name).mkdir()
    for f in lone.iterdir():
        (root / lone.name / f.name).write_bytes(f.read_bytes())
    _one_line_exit_2(capsys, tune_main([str(root), "--out", str(tmp_path / "out")]), "steps 1...200")
    assert not (tmp_path / "out").exists()


def test_runs_of_other_settings_at_other_lrs_are_not_compared(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "tune"
    write_job(root, "detox-bulyan", "constant", GRID[0], 0.5)
    write_job(root, "detox-bulyan", "constant", GRID[1], 0.1, workers=15)  # another sweep's job, merged in
    _one_line_exit_2(capsys, tune_main([str(root), "--out", str(tmp_path / "out")]),
                     "at lrs 0.000976562 and 0.00195312 with different configs (beyond the lr and the seed)")
    assert not (tmp_path / "out").exists()


def test_a_root_that_compared_no_lrs_is_no_tuning_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "fig"  # a figure sweep: every method at the task's lr (or each at its own pick)
    write_job(root, "detox-bulyan", "constant", 0.05)
    write_job(root, "vanilla-bulyan", "constant", 0.0625)
    _one_line_exit_2(capsys, tune_main([str(root), "--out", str(tmp_path / "out")]),
                     "each (task, method, err_mode) ran one lr (0.05, 2^-4): nothing was compared")
    assert not (tmp_path / "out").exists()


def test_a_root_still_running_is_not_tuned_yet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from detox.results import job_lock

    root = tmp_path / "tune"
    write_job(root, "detox-bulyan", "constant", GRID[0], 0.5)
    write_job(root, "detox-bulyan", "constant", GRID[1], 0.4)
    busy = write_job(root, "detox-bulyan", "constant", GRID[2], 0.1)
    (busy / "summary.json").unlink()  # the best lr, still training
    with job_lock(busy):
        _one_line_exit_2(capsys, tune_main([str(root), "--out", str(tmp_path / "out")]), "1 job(s) still running")
    assert not (tmp_path / "out").exists()


def test_two_runs_into_one_out_leave_one_runs_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import threading

    import analysis.report

    roots = {}
    for name, best in (("a", 0), ("b", 1)):
        roots[name] = tmp_path / name
        for i, lr in enumerate(GRID[:2]):
            write_job(roots[name], "detox-bulyan", "constant", lr, 0.1 if i == best else 0.5)
    replace, moved = os.replace, {"a": 0, "b": 0}
    b_first, a_done = threading.Event(), threading.Event()

    def slow_replace(src: str | Path, dst: str | Path) -> None:
        # unserialised: b moves table.md, a all three, then b the rest: table.md a's, lr_picks.yaml b's. Serialised,
        # the waits time out (the other run waits for the lock) and each moves its three files in turn.
        who = "a" if threading.current_thread().name == "tune-a" else "b"
        moved[who] += 1
        if who == "a":
            b_first.wait(1)
            replace(src, dst)
            if moved["a"] == 3:
                a_done.set()
        else:
            if moved["b"] > 1:
                a_done.wait(1)
            replace(src, dst)
            b_first.set()

    monkeypatch.setattr(analysis.report.os, "replace", slow_replace)
    out = tmp_path / "out"
    out.mkdir()  # (a new --out is one rename: only an existing one takes the files one by one)
    threads = [threading.Thread(target=tune_main, args=([str(roots[n]), "--out", str(out)],), name=f"tune-{n}")
               for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    source = Path(yaml.safe_load((out / "lr_picks.yaml").read_text())["source"]).name
    assert (out / "table.md").read_text().startswith(f"# {source}: ")
    assert f"detox-bulyan,constant,{GRID[0 if source == 'a' else 1]}" in (out / "table.csv").read_text().split(
        "True")[0].splitlines()[-1]


# ----------------------------------------------------------------------------------- what a job read (audit)
# A picks file edited between the jobs of one sweep (or between a run and its rerun) used to let them train with two
# files' picks, nothing in their outputs saying so. Each job now records the SHA-256 of the bytes it read.

PICKED_JOB = ["workers=9", "worker_fail=1", "max_steps=2", "eval_freq=2", "batch_size=8", "task=fc-digits",
              "method=vanilla-coord-median"]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _retuned(picks: Path) -> None:
    """The picks file rewritten with another pick for a job the tests do not run: fc-digits'
    vanilla-coord-median/rev_grad (the job of PICKED_JOB) keeps its lr, the file's bytes change."""
    data = yaml.safe_load(picks.read_text())
    data["lr"]["fc-fashion"]["detox-bulyan"]["constant"] = 0.25
    picks.write_text(yaml.safe_dump(data))


def test_the_digest_of_the_picks_file_is_recorded_with_the_lr(tmp_path: Path) -> None:
    picks = picks_file(tmp_path)
    summary = run_job([*PICKED_JOB, f"lr_picks={picks}"], tmp_path / "run")
    assert summary["status"] == "completed" and summary["lr"] == 0.125
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    assert resolved["lr_picks_sha256"] == _sha256(picks) and resolved["lr"] == 0.125
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (written["lr"], written["lr_picks"], written["lr_picks_sha256"]) == (0.125, str(picks), _sha256(picks))
    # without a picks file nothing is added to the config (older folders still match), and summary.json says null
    plain = run_job(PICKED_JOB, tmp_path / "plain")
    assert plain["lr_picks"] is None and plain["lr_picks_sha256"] is None
    assert "lr_picks_sha256" not in yaml.safe_load((tmp_path / "plain" / "resolved_config.yaml").read_text())
    # it is a record, not a setting: typing it is refused like any unknown key
    with pytest.raises(ConfigError, match=r"^lr_picks_sha256='0+': unknown setting"):
        validate(make_cfg([*PICKED_JOB, f"lr_picks={picks}", f"+lr_picks_sha256='{'0' * 64}'"]))


def test_a_rerun_with_the_picks_file_edited_is_refused_naming_the_digest(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """The job's own lr unchanged, the file's content changed: the same lr would have passed as the same config (the
    rerun skipped as 'already finished', a resume continued): now another config for that folder, refused."""
    picks = picks_file(tmp_path)
    run = tmp_path / "run"
    assert run_job([*PICKED_JOB, f"lr_picks={picks}"], run)["status"] == "completed"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    old = _sha256(picks)
    _retuned(picks)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_job([*PICKED_JOB, f"lr_picks={picks}"], run)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0, err
    assert err.startswith(f"detox: error: {run} holds a run of a different config (see its resolved_config.yaml: "
                          f'lr_picks_sha256="{old}" there, "{_sha256(picks)}" here (lr_picks={picks} holds other '
                          f"content than the file that run read)); nothing was written"), err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # in a sweep: recorded as refused, the folder left as it was
    assert run_job([*PICKED_JOB, f"lr_picks={picks}"], run, multirun=True)["status"] == "failed"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_picks_file_edited_while_a_sweep_runs_refuses_its_later_jobs(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs of one sweep (DETOX_SWEEP_ID, as Hydra's jobs inherit it) with the file rewritten between them: the
    second used to train with the new file's picks next to the first's, silently. The first job to read the file pins
    its digest under the sweep's root; the second is refused in one line naming both digests, and recorded."""
    from detox.results import SweepSummary

    picks = picks_file(tmp_path)
    root = tmp_path / "sweep"
    monkeypatch.setenv("DETOX_SWEEP_ID", "123-456")
    first = run_job([*PICKED_JOB, f"lr_picks={picks}"], root / "a", multirun=True)
    assert first["status"] == "completed"
    old = _sha256(picks)
    _retuned(picks)
    second = run_job([*PICKED_JOB, "seed=1", f"lr_picks={picks}"], root / "b", multirun=True)
    assert second["status"] == "failed", second
    assert second["error"] == (f"ConfigError: lr_picks={picks}: its content changed while this sweep ran (sha256 "
                               f"{old[:12]} when its first job read it, {_sha256(picks)[:12]} now): the jobs of one "
                               f"sweep must train with one picks file; restore it, or run the sweep again into another "
                               f"hydra.sweep.dir")
    assert json.loads((root / "b" / "summary.json").read_text())["status"] == "failed"
    assert not (root / "b" / "metrics.jsonl").exists()
    # the file put back: the sweep's jobs go on with the content they all read
    picks.write_text(yaml.safe_dump({"source": "/tmp/x", "loss": "final", "lr": {
        "fc-digits": {"vanilla-coord-median": {"rev_grad": 0.125}},
        "fc-fashion": {"detox-bulyan": {"constant": 0.0078125}}}}))
    assert _sha256(picks) == old
    assert run_job([*PICKED_JOB, "seed=1", f"lr_picks={picks}"], root / "b", multirun=True)["status"] == "completed"
    # the pins go with the sweep's end
    assert (root / ".lr_picks" / "123-456").is_dir()
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}, "save": True}))
    assert not (root / ".lr_picks").exists()


def test_jobs_starting_together_pin_one_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs of a parallel sweep read the file at the same moment: exactly one digest is pinned, whole, and every job
    that read another is refused. A sweep id that is a path (set by hand) stays a folder name under the root."""
    import threading

    from detox.tuning import pin_lr_picks

    picks = picks_file(tmp_path)
    monkeypatch.setenv("DETOX_SWEEP_ID", "../../escape")
    root = tmp_path / "sweep"
    root.mkdir()
    digests = [f"{i:064x}" for i in range(16)]
    barrier, outcome = threading.Barrier(len(digests)), {}

    def job(digest: str) -> None:
        barrier.wait()
        try:
            pin_lr_picks(OmegaConf.create({"lr_picks": str(picks), "lr_picks_sha256": digest}), root)
            outcome[digest] = "ran"
        except ConfigError as err:
            outcome[digest] = str(err)

    threads = [threading.Thread(target=job, args=(d,)) for d in digests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ran = [d for d, o in outcome.items() if o == "ran"]
    assert len(ran) == 1, outcome
    assert all("its content changed while this sweep ran" in o for d, o in outcome.items() if d != ran[0])
    pins = [p for p in (root / ".lr_picks").rglob("*") if p.is_file()]
    assert len(pins) == 1 and pins[0].read_text() == f"{ran[0]} {picks.resolve()}\n"
    assert pins[0].parent.parent == root / ".lr_picks" and not (tmp_path / "escape").exists()
    # outside a sweep nothing is pinned
    monkeypatch.delenv("DETOX_SWEEP_ID")
    pin_lr_picks(OmegaConf.create({"lr_picks": str(picks), "lr_picks_sha256": "f" * 64}), tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_a_sweep_with_picks_records_one_digest_and_logs_its_reruns(tmp_path: Path) -> None:
    """As typed: a two-job sweep with lr_picks records the file's digest in both jobs and leaves no pins behind. Its
    rerun compared the job folder with the config before the pick (the task's lr): unequal, so the rerun's log lines
    (here: 'skipping', and a resumed run's whole training log) went to /dev/null instead of the job's train.log."""
    picks = picks_file(tmp_path, {"fc-digits": {"vanilla-coord-median": {"rev_grad": 0.125, "constant": 0.0625}}})
    root = tmp_path / "sweep"
    args = ["-m", *PICKED_JOB, "err_mode=rev_grad,constant", f"lr_picks={picks}", f"hydra.sweep.dir={root}"]
    for _ in range(2):
        proc = cli(args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        jobs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        assert len(jobs) == 2
        assert not (root / ".lr_picks").exists() and not (root / ".refused").exists()
    for job in jobs:
        assert "already holds a completed run of this exact config" in (job / "train.log").read_text(), job
        resolved = yaml.safe_load((job / "resolved_config.yaml").read_text())
        assert resolved["lr"] == {"rev_grad": 0.125, "constant": 0.0625}[resolved["err_mode"]["name"]]
        assert resolved["lr_picks_sha256"] == _sha256(picks)
    # a single run's rerun too (its config is now checked as a copy before the folder is made)
    run_dir = tmp_path / "single"
    single = [*PICKED_JOB, f"lr_picks={picks}", f"hydra.run.dir={run_dir}"]
    for _ in range(2):
        proc = cli(single, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert "already holds a completed run of this exact config" in (run_dir / "train.log").read_text()


def test_a_picks_run_is_evaluated_by_the_separate_evaluator(tmp_path: Path) -> None:
    """The run's config holds lr_picks_sha256, which is no setting: the evaluator checks the run's settings and must
    not refuse it (nor need the picks file, removed here)."""
    from test_evaluate import evaluate_in_process, read_jsonl

    picks = picks_file(tmp_path)
    run = tmp_path / "run"
    assert run_job([*PICKED_JOB, "evaluation=external", f"lr_picks={picks}"], run)["status"] == "completed"
    picks.unlink()
    assert evaluate_in_process([f"run_dir={run}"]) == 0
    assert [r["step"] for r in read_jsonl(run / "eval.jsonl")] == [0, 2]


@pytest.mark.slow
def test_an_mpi_run_records_the_digest_its_ps_read_from_the_config(tmp_path: Path) -> None:
    """engine=mpi: the PS writes summary.json from resolved_config.yaml (it never reads the picks file): the digest
    travels with the config, and the evaluator takes the run as it is."""
    from test_evaluate import evaluate_in_process

    picks = picks_file(tmp_path, {"fc-digits": {"vanilla-mean": {"rev_grad": 0.125}}})
    job = ["workers=6", "worker_fail=1", "max_steps=2", "eval_freq=2", "batch_size=8", "task=fc-digits",
           "method=vanilla-mean", "engine=mpi", "evaluation=external", f"lr_picks={picks}"]
    summary = run_job(job, tmp_path / "mpi")
    assert summary["status"] == "completed", summary.get("error")
    assert (summary["lr"], summary["lr_picks_sha256"]) == (0.125, _sha256(picks))
    assert evaluate_in_process([f"run_dir={tmp_path / 'mpi'}"]) == 0


def test_a_killed_picks_job_is_recorded_with_the_lr_it_ran_at(tmp_path: Path) -> None:
    """A job killed mid-run is recorded failed by its launcher, whose config never applied ``lr_picks``: the failed
    summary used to say the task preset's lr (0.05) and no digest. It now keeps what the job's own ``running``
    summary recorded: the picked lr and the file's digest."""
    from detox.launcher import _record_failure
    from detox.results import base_summary, write_json

    picks = picks_file(tmp_path)
    job = [*PICKED_JOB, f"lr_picks={picks}"]
    started = make_cfg(job)
    validate(started)  # what the job did at its start: the pick applied, its running summary written
    out = tmp_path / "job"
    out.mkdir()
    write_json(out / "summary.json", base_summary(started))
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        launcher_cfg = compose("config", overrides=job, return_hydra_config=True)
    assert launcher_cfg.lr != 0.125  # the preset's: what the old record said
    _record_failure(launcher_cfg, out, "job process killed by SIGKILL")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "job process killed by SIGKILL"
    assert summary["lr"] == 0.125 and summary["lr_picks_sha256"] == _sha256(picks)
