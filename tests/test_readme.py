"""Every command in README.md's code blocks works (issue #12): each is exercised by a test below.

A rule table maps each command to the test that exercises it and how; a command no rule covers, or a rule no command
needs, fails ``test_every_readme_command_is_covered``. Commands run as typed in a private folder (Hydra's outputs,
multirun/ and hosts_address land there; sweeps/ is linked in) with a private data root, and with small arguments
appended where the README's sizes take minutes (``max_steps=2 eval_freq=2``, a small benchmark). Only what needs a
cluster (Slurm, multi-host MPI) runs with ``--help``, its configs validated; the install lines are CI's (.ci/run runs
them word for word). The quick check that no README config is refused is ``test_readme_train_configs_are_accepted``;
the runs are ``slow``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

import detox.train  # noqa: F401 - registers the config resolvers validate() needs
from detox.config import validate

README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
VENV_BIN = Path(sys.executable).parent
SHORT = ["max_steps=2", "eval_freq=2"]
SMALL_BENCH = ["--n", "15", "--d", "1e4", "--repeats", "1"]
TRAIN = re.compile(r"^(python -m detox\.train|detox-train)(\s|$)")


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def readme_commands() -> list[str]:
    """Every command line of the bash blocks, in README order, comments dropped (a `&&` chain is one command)."""
    commands = []
    for lang, text in readme_blocks():
        if lang != "bash":
            continue
        for line in text.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex matched at the start of a command; the first matching rule covers it
    test: str  # the test in this module that exercises the commands the rule covers
    how: str  # what that test does with them


RULES = [
    Rule(r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install ", "test_ci_runs_the_readme_set_up_lines",
         "not run here (GBs of wheels, minutes): .ci/run runs it word for word from a clean clone"),
    Rule(r"apt-get install ", "test_ci_runs_the_readme_set_up_lines",
         "not run here (a system package, as root): .ci/run runs it; the data tests fail without the package"),
    Rule(r"\.venv/bin/python -m pytest$", "test_ci_runs_the_readme_set_up_lines",
         "the suite itself: .ci/run runs it word for word"),
    Rule(r'\.venv/bin/python -m pytest -m "not slow"$', "test_quick_subset_deselects_the_slow_tests",
         "the suite itself: collected with --collect-only, not run"),
    Rule(r"python -m detox\.data ", "test_readme_data_commands_run", "run as typed into a private data root"),
    Rule(r"eval \"\$\(detox-train -sc install=bash\)\"$", "test_console_script_and_completion",
         "run in bash: completion is registered for detox-train and answers a query"),
    Rule(r"python -m detox\.train .*engine\.hostfile=", "test_readme_cluster_commands",
         "--help (needs ssh hosts); its config validated against the hostfile `hosts` wrote from the moto server"),
    Rule(r"python -m detox\.train .*hydra/launcher=slurm", "test_readme_cluster_commands",
         "not run (needs a Slurm cluster; Hydra's --help refuses sweep values): its launcher settings composed with "
         "--cfg hydra, every job's config validated by test_readme_train_configs_are_accepted"),
    Rule(r"python -m detox\.cluster\.ec2 ", "test_readme_cluster_commands", "run as typed against a local moto server"),
    Rule(r"cat hosts_address$", "test_readme_cluster_commands", "run after `hosts` wrote the file"),
    Rule(r"python -m detox\.train .*engine=mpi", "test_readme_mpi_commands_run", "run with max_steps=2 eval_freq=2"),
    Rule(r"python -m detox\.evaluate ", "test_readme_evaluator_commands_run",
         "in README order in one folder: the follow=true evaluator in the background, then the run, then the rerun"),
    Rule(r"python -m detox\.train .*evaluation=external", "test_readme_evaluator_commands_run",
         "run with max_steps=2 eval_freq=2 while the follow=true evaluator waits for it"),
    Rule(r"python -m detox\.train -m --config-dir sweeps ", "test_readme_paper_sweep_commands_run",
         "run in README order with max_steps=2 eval_freq=2, on the prepared Fashion-MNIST"),
    Rule(r"python -m analysis\.report ", "test_readme_paper_sweep_commands_run", "run on the sweep it reports"),
    Rule(r"(python -m detox\.train|detox-train)(\s|$)", "test_readme_experiment_commands_run",
         "run with max_steps=2 eval_freq=2 (and `python -m detox.train` also as typed: test_readme_main_job_as_typed)"),
    Rule(r"python -m detox\.bench", "test_readme_bench_commands_run",
         "run with --n 15 --d 1e4 --repeats 1 --out <tmp> appended (the README's sizes take minutes and GBs)"),
]


def rule_for(command: str) -> Rule | None:
    return next((r for r in RULES if re.match(r.pattern, command)), None)


def commands_for(test: str) -> list[str]:
    found = [c for c in readme_commands() if (r := rule_for(c)) is not None and r.test == test]
    assert found, f"no README command is covered by {test}: update RULES"
    return found


def test_every_readme_command_is_covered() -> None:
    commands = readme_commands()
    assert len(commands) >= 20, "README.md's bash blocks were not found"
    uncovered = [c for c in commands if rule_for(c) is None]
    assert not uncovered, f"README commands no test exercises (add a rule to tests/test_readme.py): {uncovered}"
    tests = {name for name in globals() if name.startswith("test_")}
    assert {r.test for r in RULES} <= tests
    unused = [r.pattern for r in RULES if not any(rule_for(c) is r for c in commands)]
    assert not unused, f"rules that cover no README command (stale): {unused}"
    # a fenced block is either commands (bash: all covered above) or plain text (the layout), never untagged
    assert {lang for lang, _ in readme_blocks()} <= {"bash", "text"}


def test_ci_runs_the_readme_set_up_lines() -> None:
    ci_lines = {line.strip() for line in CI.read_text().splitlines()}
    for command in commands_for("test_ci_runs_the_readme_set_up_lines"):
        if command.startswith("apt-get"):  # CI adds the non-interactive fallback around it
            assert any(command in line for line in ci_lines), f".ci/run does not run {command!r}"
        else:
            assert command in ci_lines, f".ci/run does not run the README's {command!r} word for word"
    assert "python -m detox.data prepare fashion_mnist" in ci_lines


# --- every README job's config is accepted: quick, in-process, and what issue #12 was about ----------------------

def _jobs(command: str) -> list[tuple[str | None, list[str]]]:
    """(sweep config name or None, overrides) of every job the command would run."""
    words = shlex.split(command)[1:] if command.startswith("detox-train") else shlex.split(command)[3:]
    name = None
    if "--config-name" in words:
        name = words[words.index("--config-name") + 1]
    args = [w for i, w in enumerate(words) if "=" in w and words[i - 1] not in ("--config-dir", "--config-name")]
    job_args = [a for a in args if not a.startswith(("hydra.", "hydra/"))]  # the launcher's, not the job's
    parsed = OverridesParser.create().parse_overrides(job_args)
    axes = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
            for o in parsed]
    return [(name, list(combo)) for combo in itertools.product(*axes)]


def _compose(name: str | None, overrides: list[str]):  # noqa: ANN202 - a DictConfig
    if name is None:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            return [compose("config", overrides=overrides)]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "sweeps")):
        extra = [f"hydra.searchpath=[file://{ROOT / 'conf'}]"]
        params = compose(name, overrides=extra + overrides, return_hydra_config=True).hydra.sweeper.params or {}
        given = {o.split("=")[0] for o in overrides}
        axes = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items() if k not in given]
        return [compose(name, overrides=extra + overrides + list(combo)) for combo in itertools.product(*axes)]


def write_hostfile_like_ec2(path: Path, workers: int) -> None:
    path.write_text("".join(f"10.0.0.{i + 1} slots=1\n" for i in range(workers + 1)))


@pytest.mark.slow
def test_readme_train_configs_are_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_hostfile_like_ec2(tmp_path / "hosts_address", 15)  # what the README's ec2 `hosts` line writes
    checked = 0
    for command in [c for c in readme_commands() if TRAIN.match(c)]:
        for name, overrides in _jobs(command):
            for cfg in _compose(name, overrides):
                validate(cfg)  # a refusal raises ConfigError naming the command's problem
                checked += 1
    assert checked >= 30  # the sweeps expand: fig_a_cpu alone has 12 jobs


# --- running them ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's working folder: sweeps/ linked in, a private data root; outputs land here."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "sweeps").symlink_to(ROOT / "sweeps")
    (folder / "data").mkdir()
    return folder


def shell(command: str, cwd: Path, extra_env: dict[str, str] | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """The command in bash as a user with the venv activated types it."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV":
           str(VENV_BIN.parent), "PYTHONUNBUFFERED": "1", "DETOX_DATA": str(cwd / "data"), **(extra_env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 0, f"README command failed ({proc.returncode}): {command}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout


def with_args(command: str, args: list[str]) -> str:
    return f"{command} {' '.join(args)}"


def _summaries(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in folder.rglob("summary.json")]


@pytest.fixture(scope="module")
def prepared(sandbox: Path) -> Path:
    """The README's data commands, run once for the module (the paper sweeps need Fashion-MNIST)."""
    for command in commands_for("test_readme_data_commands_run"):
        ok(shell(command, sandbox), command)
    return sandbox


@pytest.mark.slow
def test_readme_data_commands_run(prepared: Path) -> None:
    raw = prepared / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                                                     "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


@pytest.mark.slow
def test_readme_main_job_as_typed(tmp_path: Path) -> None:
    """The first thing a user runs, exactly as typed: completes with the accuracy the README states (≈ 0.96)."""
    assert "python -m detox.train" in readme_commands()
    out = ok(shell("python -m detox.train", tmp_path), "python -m detox.train")
    summary = _summaries(tmp_path / "outputs")
    assert len(summary) == 1 and summary[0]["status"] == "completed" and summary[0]["steps"] == 300
    assert summary[0]["final_test_acc"] >= 0.93, out


@pytest.mark.slow
@pytest.mark.parametrize("command", commands_for("test_readme_experiment_commands_run"))
def test_readme_experiment_commands_run(command: str, tmp_path: Path) -> None:
    ok(shell(with_args(command, SHORT), tmp_path), command)
    summaries = _summaries(tmp_path)
    jobs = len(_jobs(command))
    assert len(summaries) == jobs and all(s["status"] in ("completed", "diverged") for s in summaries), summaries
    assert all(s["steps"] == 2 for s in summaries if s["status"] == "completed")


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("command", commands_for("test_readme_mpi_commands_run"))
def test_readme_mpi_commands_run(command: str, tmp_path: Path) -> None:
    ok(shell(with_args(command, SHORT), tmp_path), command)
    summaries = _summaries(tmp_path)
    assert len(summaries) == len(_jobs(command)) and all(s["status"] == "completed" for s in summaries), summaries
    assert all(s["workers"] == 15 for s in summaries)


@pytest.mark.slow
def test_readme_evaluator_commands_run(tmp_path: Path) -> None:
    """The separate evaluator's workflow as typed: it waits for the run, follows it to its end, and a later run of
    the plain command finds every step done."""
    follow, train, after = commands_for("test_readme_evaluator_commands_run")
    assert "follow=true" in follow and "follow" not in after
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    waiting = subprocess.Popen(["bash", "-c", f"{follow} timeout=300"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ok(shell(with_args(train, SHORT), tmp_path), train)
        out, _ = waiting.communicate(timeout=300)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, out
    run = tmp_path / "runs" / "exp1"
    records = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2] and all(0 <= r["test_acc"] <= 1 for r in records), out
    assert sum(" | test_acc " in line for line in out.splitlines()) == 2, out
    again = ok(shell(after, tmp_path), after)
    assert "2 steps already there" in again and "evaluated 0 steps" in again, again
    (run / "eval.jsonl").unlink()
    ok(shell(after, tmp_path), after)
    untimed = [{k: v for k, v in r.items() if k != "eval_time"} for r in records]
    assert [{k: v for k, v in json.loads(line).items() if k != "eval_time"}
            for line in (run / "eval.jsonl").read_text().splitlines()] == untimed


@pytest.mark.slow
def test_readme_paper_sweep_commands_run(prepared: Path) -> None:
    sweep, report, narrow = commands_for("test_readme_paper_sweep_commands_run")
    ok(shell(with_args(sweep, SHORT), prepared), sweep)
    root = prepared / "multirun" / "fig_a_cpu"
    first = [json.loads(line) for line in (root / "summary.jsonl").read_text().splitlines()]
    expected = sum(len(_compose(name, overrides)) for name, overrides in _jobs(sweep))  # the sweep file's grid
    assert len(first) == expected and all(s["status"] in ("completed", "diverged") for s in first), first
    ok(shell(report, prepared), report)
    made = {p.name for p in (prepared / "docs" / "results" / "fig_a_cpu").iterdir()}
    assert {"table.md", "table.csv"} <= made and any(n.endswith(".png") for n in made), made
    ok(shell(with_args(narrow, SHORT), prepared), narrow)
    added = sum(len(_compose(name, overrides)) for name, overrides in _jobs(narrow))
    jobs = {p.parent.name for p in root.glob("*/summary.json")}
    assert len(jobs) == expected + added, jobs
    assert any({"err_mode=alie", "method=detox-bulyan"} <= set(j.split(",")) for j in jobs), jobs


@pytest.mark.slow
def test_readme_bench_commands_run(tmp_path: Path) -> None:
    for i, command in enumerate(commands_for("test_readme_bench_commands_run")):
        out = tmp_path / f"bench{i}.json"
        ok(shell(with_args(command, [*SMALL_BENCH, "--out", str(out)]), tmp_path), command)
        assert json.loads(out.read_text())


@pytest.mark.slow
def test_console_script_and_completion(tmp_path: Path) -> None:
    (install,) = commands_for("test_console_script_and_completion")
    proc = ok(shell(f"{install} && complete -p detox-train", tmp_path), install)
    assert "-F hydra_bash_completion detox-train" in proc
    query = shell("detox-train -sc query=bash", tmp_path, {"COMP_LINE": "detox-train mode=bu", "COMP_POINT": "19"})
    assert "mode=bulyan" in ok(query, "detox-train -sc query=bash").split()


@pytest.mark.slow
def test_quick_subset_deselects_the_slow_tests(tmp_path: Path) -> None:
    (quick,) = commands_for("test_quick_subset_deselects_the_slow_tests")
    collected = shell(f"cd {shlex.quote(str(ROOT))} && {quick} --collect-only -q -p no:cacheprovider", tmp_path)
    out = ok(collected, quick)
    assert re.search(r"\d+/\d+ tests collected \(\d+ deselected\)", out), out[-2000:]
    assert "tests/test_readme.py::test_readme_main_job_as_typed" not in out
    assert "tests/test_readme.py::test_every_readme_command_is_covered" in out


# --- the cluster lines: EC2 against a local moto server, Slurm and multi-host with --help ----------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A moto EC2 server in its own process, which knows the README's AMI id; the env pointing boto3 at it (dummy
    credentials, no profile or config file: nothing can reach real AWS)."""
    from moto.ec2.models.amis import AMIS

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)

    linux = next(a for a in AMIS if not a.get("platform"))
    amis = tmp_path / "amis.json"
    amis.write_text(json.dumps([{**linux, "ami_id": "ami-0123456789abcdef0"}]))
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    port = _free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_CONFIG_FILE": str(empty),
           "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **env, "MOTO_AMIS_PATH": str(amis)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the moto server did not start"
                time.sleep(0.2)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_readme_cluster_commands(moto_server: dict[str, str], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    commands = commands_for("test_readme_cluster_commands")
    ec2 = boto3.client("ec2", region_name="us-west-2", endpoint_url=moto_server["AWS_ENDPOINT_URL"],
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    ec2.create_key_pair(KeyName="mykey")  # the README's key_name; a real account has it already
    ec2_lines = [c for c in commands if c.startswith("python -m detox.cluster.ec2 ")]
    verbs = [shlex.split(c)[3] for c in ec2_lines]
    assert verbs == ["launch", "hosts", "status", "terminate"], verbs
    outputs = {}
    for command, verb in zip(ec2_lines[:3], verbs, strict=False):  # launch, hosts, status
        outputs[verb] = ok(shell(command, tmp_path, moto_server), command)
    hosts = ok(shell("cat hosts_address", tmp_path), "cat hosts_address").splitlines()
    assert len(hosts) == 16 and hosts[0].endswith("slots=1")  # the PS, then the 15 workers
    assert len(outputs["status"].strip().splitlines()) >= 16

    for command in [c for c in commands if TRAIN.match(c)]:
        words = shlex.split(command)
        if "-m" not in words[3:]:  # -m after "python -m detox.train": a sweep
            help_out = ok(shell(with_args(command, ["--help"]), tmp_path), command)
            assert "== Configuration groups ==" in help_out and "== Config ==" in help_out, help_out[-2000:]
        else:  # Hydra's --help refuses sweep values: compose the line's launcher settings as the sweep would
            launcher = [w for w in words if w.startswith(("hydra/launcher=", "hydra.launcher."))]
            shown = ok(shell(shlex.join(["python", "-m", "detox.train", *launcher, "--cfg", "hydra", "-p",
                                         "hydra.launcher"]), tmp_path), command)
            assert "_target_: hydra_plugins.detox_launcher.SlurmLauncher" in shown
            for key, value in (w.removeprefix("hydra.launcher.").split("=", 1) for w in launcher if "." in w):
                assert f"{key}: {value}" in shown.splitlines()
        if "engine.hostfile=" in command:  # the real hostfile from `hosts`: the job would be accepted
            monkeypatch.chdir(tmp_path)
            for name, overrides in _jobs(command):
                for cfg in _compose(name, overrides):
                    validate(cfg)

    ok(shell(ec2_lines[3], tmp_path, moto_server), ec2_lines[3])  # terminate
    alive = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
             if i["State"]["Name"] not in ("terminated", "shutting-down")]
    assert not alive
