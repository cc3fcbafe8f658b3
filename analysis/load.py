"""Turn a multirun root (one folder per job, named by its overrides; DESIGN §4) into pandas DataFrames.

``load_runs(root)``    — one row per job: config choices as columns, the summary's numbers, the label of the
                         config it actually ran (``analysis.labels``), ``seed``, ``config`` (the same for jobs that
                         differ only in their seed: what ``analysis.stats`` aggregates over) and per-step time
                         split means and medians computed from ``metrics.jsonl``.
``load_metrics(root)`` — one row per evaluation of every job, with the job's choices as columns.
A run with ``evaluation=external`` leaves its metrics.jsonl's test fields empty and ``python -m detox.evaluate``
writes them to ``eval.jsonl``: both tables fill them (and the summary's accuracies) from it (``run_records``).
Jobs are ordered as ``detox.results.job_dirs`` lists them (numbered folders by number, then by name). A job without
a readable summary is a row with status ``missing`` (``running`` while another process holds its job lock); a
failed job keeps its ``error``. Only finished jobs (``completed`` or ``diverged``: ``FINISHED``) carry numbers: the
records a killed, failed or running job left behind are partial, and would enter the means over seeds as if it had
run through. A file that cannot be read as a run wrote it (not UTF-8, a line that is no JSON object with an integer
``step``, a number that is not finite or out of its range, a summary that is no object or has an unknown status, a
config that is no mapping) gets one warning line naming it, and the job counts as having no such file. A file that is
no regular file (a fifo, /dev/zero), larger than a run writes (a summary or config over 1 MiB, records over 256 MiB),
a config with YAML aliases (an alias bomb) or a value nested thousands deep is such a file as well. A finished
job that repeats the config and seed of an earlier one is ``duplicate``, with one warning: a seed counts once.
Configurations that would look alike in every figure and table (the same label, attack and q; a sweep over two tasks,
two sweeps in one root) get a ``variant``, the settings that tell them apart, in their label:
``vanilla-bulyan [task=vgg13-cifar100]`` (``_name_variants``).
Relative roots are found from the repository root (where the sweeps write ``multirun/...``) when they are not under
the current folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import sys
from numbers import Real
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.labels import attack_label, labels
from detox.results import FINISHED, flat_settings, has_yaml_aliases, job_dirs, job_id, read_small, read_summary

REPO = Path(__file__).resolve().parents[1]
CHOICES = ("network", "dataset", "mode", "approach", "err_mode", "engine", "task", "method")
PHASES = ("t_compute", "t_comm", "t_vote", "t_aggregate", "t_update")
# robust per-step statistics of metrics.jsonl (extra keys next to DESIGN §4's): per-window phase medians and the
# 10th/90th percentile of a step's time; older runs lack them and the analysis falls back to the means
MEDIAN_PHASES = tuple(f"{k}_median" for k in PHASES)
STEP_SPREAD = ("t_step_p10", "t_step_p90")
# the CPU clock (detox.timing, engine=local): per-window CPU medians of the phases that work, and the cluster time
# built from them, which a loaded machine leaves alone; MPI runs lack it
CPU_MEDIAN_PHASES = tuple(f"{k}_cpu_median" for k in ("t_compute", "t_vote", "t_aggregate", "t_update"))
# summary keys copied into the runs table
SUMMARY_KEYS = ("status", "error", "figure", "workers", "worker_fail", "group_size", "batch_size", "lr", "seed",
                "max_steps", "placement", "target_acc", "steps", "final_test_acc", "best_test_acc",
                "final_test_loss", "wall_time", "cluster_time", "time_to_target", "malformed_messages")
# settings that make two jobs the same configuration up to the seed, for runs without resolved_config.yaml
CONFIG_KEYS = ("label", "err_mode", "worker_fail", "workers", "group_size", "batch_size", "lr", "max_steps", "task",
               "network", "dataset", "engine", "placement", "figure", "target_acc")
# resolved-config keys that do not make a different configuration: the seed (aggregated over) and where files go
NOT_CONFIG = ("seed", "data_root", "save", "save_model", "checkpoint", "model_dir")
# the evaluation fields python -m detox.evaluate records per step in eval.jsonl (detox.evaluate.EVAL_KEYS)
EVAL_FIELDS = ("test_loss", "test_acc", "test_acc5", "eval_time")
# record and summary fields the analysis computes with: a number or null, or the file is not one a run wrote
RECORD_NUMBERS = ("test_acc", "test_loss", "wall_time", "cluster_time", "cluster_time_median", "cluster_time_cpu",
                  *PHASES, *MEDIAN_PHASES, *STEP_SPREAD, *CPU_MEDIAN_PHASES, "corrupted_groups")
SUMMARY_NUMBERS = ("workers", "worker_fail", "group_size", "batch_size", "lr", "seed", "max_steps", "target_acc",
                   "steps", "final_test_acc", "best_test_acc", "final_test_loss", "wall_time", "cluster_time",
                   "time_to_target", "malformed_messages")
# what a run's records and summary hold: accuracies are fractions, every other number a time, loss or count (never
# negative); a run writes null for a value that is not finite (detox.results.clean_json), so NaN, Infinity or an
# integer past float range (json reads 1e400 as inf and 1000…0 as an int) is no run's
ACCURACIES = ("test_acc", "test_acc5", "final_test_acc", "best_test_acc")
NON_NEGATIVE = (*RECORD_NUMBERS, "wall_time", "cluster_time", "time_to_target", "final_test_loss",
                "malformed_messages")
# the most bytes of a metrics.jsonl or eval.jsonl the analysis reads (a record is about 1.3 KB: 200,000 evaluations);
# a larger file, a fifo or /dev/zero is no run's records (detox.results.read_small)
RECORDS_FILE = 256 << 20
STEP_MAX = 2**63 - 1  # pandas holds steps as int64: a larger one would make the column one of Python objects
# what summary.json's status can say (detox.train, detox.launcher; ``running`` while a run, or one that died, owns it)
STATUSES = (*FINISHED, "failed", "running")
# the metrics frame's columns that come from the job (also those of an empty frame, so that code that sorts or
# groups by them needs no special case)
JOB_FIELDS = ("job", *CHOICES, "label", "variant", "defence", "rule", "attack", "config", "seed", "worker_fail",
              "status", "figure")


SURROGATE = re.compile("[\ud800-\udfff]")


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` on one line: a line break or other control character (in a folder's name) as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def warn(message: str) -> None:
    """One line on stderr: a problem with one job's files that leaves the rest of the sweep reportable."""
    print(f"analysis: warning: {one_line(message)}", file=sys.stderr, flush=True)


def repo_root() -> Path:
    """The repository this package lives in (its ``multirun/`` is where the sweeps write)."""
    return REPO


def sweep_root(path: str | Path) -> Path:
    """``path`` itself when absolute or present under the current folder, else under the repository root (a
    notebook kernel starts in ``analysis/``, so ``multirun/fig_a_cpu`` means the repository's)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO / path


def _is_number(value: object) -> bool:
    """A finite number (or null) that fits a float: ``_number_problem`` says why a value is not what a run writes."""
    if value is None:
        return True
    if not isinstance(value, Real):  # (JSON's false counts as 0, as Python's does)
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float range
        return False


def _number_problem(obj: dict, keys: tuple[str, ...]) -> str | None:
    """Why one of ``keys`` of a record or summary is not a number a run writes there, or None."""
    for k in keys:
        value = obj.get(k)
        if not _is_number(value):
            shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:40]}…"
            return f"{k} {shown} is not a finite number"
        if value is None:
            continue
        if k in ACCURACIES and not 0 <= value <= 1:
            return f"{k} {value!r} is not an accuracy in [0, 1]"
        if k in NON_NEGATIVE and value < 0:
            return f"{k} {value!r} is negative"
    return None


def _record_problem(record: object) -> str | None:
    """Why a metrics.jsonl or eval.jsonl line is not a record a run writes, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= STEP_MAX:
        shown = repr(step) if len(repr(step)) <= 40 else f"{repr(step)[:40]}…"
        return f"step {shown} is not a step number"
    return _number_problem(record, (*RECORD_NUMBERS, "test_acc5"))


def read_jsonl(path: Path) -> tuple[list[dict], str | None]:
    """The records of a metrics.jsonl or eval.jsonl file and, where it is not a file a run writes, why (naming the
    file and the first bad line): then no records, since one bad line puts every other in doubt. A missing file has
    no records and no problem; so has a torn last line (no newline: a run killed mid-write leaves one)."""
    try:
        text = read_small(path, RECORDS_FILE)
    except FileNotFoundError:
        return [], None
    except (OSError, ValueError) as err:
        return [], f"{path}: unreadable ({type(err).__name__}: {err})"
    lines = text.split("\n")  # the last item is "" after a final newline, else a torn line
    out = []
    for number, line in enumerate(lines, 1):
        torn = number == len(lines)
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # (a value nested thousands deep is no record either)
            if torn:
                break
            return [], f"{path}: line {number} is not JSON"
        if (problem := _record_problem(record)) is not None:
            return [], f"{path}: line {number}: {problem}"
        out.append(record)
    return out, None


def read_config(job: Path) -> tuple[dict | None, str | None]:
    """The job's resolved_config.yaml and, where it exists but is not one a run writes (not UTF-8, not YAML, not a
    mapping, or one that is no JSON: a key of another type next to names, an alias that contains itself), why:
    then no config, and the job is described by its summary. A missing file (older runs) is no problem."""
    path = job / "resolved_config.yaml"
    try:
        text = read_small(path)  # a regular file of a config's size: a fifo or /dev/zero would never end the read
        if has_yaml_aliases(text):  # a run writes none; nested ones (a 'billion laughs') expand to 10^9 entries
            raise ValueError("uses YAML aliases (*name), which no run writes")
        out = yaml.safe_load(text)
        # what config_key does with it; and text that a figure can draw and a table hold (a "\ud800" escape gives
        # a lone surrogate, which no UTF-8 file or font takes)
        json.dumps(out, sort_keys=True, default=str, ensure_ascii=False).encode()
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, TypeError, RecursionError, yaml.YAMLError) as err:
        why = str(err).strip().splitlines()
        return None, f"{path}: unreadable ({type(err).__name__}{': ' + why[0] if why else ''})"
    if not isinstance(out, dict):
        return None, f"{path}: not a mapping of config keys"
    return out, None


def read_run_records(job: Path) -> tuple[list[dict], list[str]]:
    """``run_records`` and the problems of the files it read (one line each, naming the file)."""
    records, problem = read_jsonl(job / "metrics.jsonl")
    evaluated, eval_problem = read_jsonl(job / "eval.jsonl")
    problems = [p for p in (problem, eval_problem) if p is not None]
    if any(b["step"] <= a["step"] for a, b in itertools.pairwise(records)):  # a run appends them in step order
        problems.append(f"{job / 'metrics.jsonl'}: steps do not increase")
        records = []
    evals = {r["step"]: r for r in evaluated}
    if not records:
        return sorted(evals.values(), key=lambda r: r["step"]), problems
    for r in records:
        ev = evals.get(r["step"])
        if ev is not None and r.get("test_acc") is None:
            r.update({k: ev.get(k) for k in EVAL_FIELDS})
    return records, problems


def run_records(job: Path) -> list[dict]:
    """The job's metrics.jsonl records, their evaluation fields filled from eval.jsonl (the separate evaluator's,
    by step) where the run did not evaluate in-loop; a job with only eval.jsonl gives its records. A file that is
    not a run's (``read_jsonl``) gives none."""
    return read_run_records(job)[0]


def _fill_summary(row: dict, records: list[dict]) -> None:
    """A run evaluated externally ends with no accuracy in its summary: take them from the evaluator's records."""
    evaluated = [r for r in records if r.get("test_acc") is not None]
    if row.get("final_test_acc") is not None or not evaluated:
        return
    last = records[-1]
    row["final_test_acc"], row["final_test_loss"] = last.get("test_acc"), last.get("test_loss")
    row["best_test_acc"] = max(r["test_acc"] for r in evaluated)
    target = row.get("target_acc")
    if target is not None and row.get("time_to_target") is None:
        row["time_to_target"] = next((r.get("wall_time") for r in evaluated if r["test_acc"] >= target), None)


def step_weighted(records: list[dict], keys: tuple[str, ...] = PHASES) -> dict[str, float]:
    """Mean per step of each key over a run: records hold one value per window since the previous record (a
    mean or a median of that window), so each is weighted by its window's steps."""
    out = {}
    prev = 0
    weights = []
    for r in records:
        weights.append(r["step"] - prev)
        prev = r["step"]
    for k in keys:
        vals = [(w, r[k]) for w, r in zip(weights, records, strict=True) if r.get(k) is not None]
        total = sum(w for w, _ in vals)
        out[k] = sum(w * v for w, v in vals) / total if total else np.nan
    return out


def step_weighted_phases(records: list[dict]) -> dict[str, float]:
    """Mean per-step seconds of each phase (means and, where recorded, medians), the spread of a step's time
    and corrupted groups per step over a run."""
    out = step_weighted(records, (*PHASES, *MEDIAN_PHASES, *STEP_SPREAD, *CPU_MEDIAN_PHASES))
    out["corrupted_per_step"] = step_weighted(records, ("corrupted_groups",))["corrupted_groups"]
    last = records[-1] if records else {}
    for k in ("cluster_time_median", "cluster_time_cpu"):
        out[k] = np.nan if last.get(k) is None else last[k]
    return out


def config_key(config: dict | None, row: dict) -> str:
    """A short id shared by exactly the jobs whose configs differ only in the seed."""
    if config:
        rest = {k: v for k, v in config.items() if k not in NOT_CONFIG}
        text = json.dumps(rest, sort_keys=True, default=str)
    else:  # an older run without resolved_config.yaml: the settings the summary holds
        text = json.dumps([row.get(k) for k in CONFIG_KEYS], default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _summary_problem(summary: dict) -> str | None:
    """Why a summary.json object is not one a run writes, or None."""
    if not isinstance(summary.get("status"), str):
        return f"status {summary.get('status')!r} is not a string"
    choices = summary.get("choices")
    if choices is not None and not (isinstance(choices, dict) and all(
            v is None or isinstance(v, str) for v in choices.values())):
        return "choices is not an object of option names"
    if not (summary.get("figure") is None or isinstance(summary["figure"], str)):
        return f"figure {summary['figure']!r} is not a string"
    if summary["status"] not in STATUSES:
        return f"status {summary['status']!r} is not one a run writes ({', '.join(STATUSES)})"
    return _number_problem(summary, SUMMARY_NUMBERS)


def job_summary(job: Path) -> tuple[dict, str | None]:
    """The job's summary and, where its summary.json exists but is not a run's, why. A job without one is
    ``missing``, or ``running`` while a process holds its job lock (``detox.results.read_summary`` decides)."""
    path = job / "summary.json"
    problem = None
    try:
        # a regular file of a summary's size: a fifo, /dev/zero or a huge file would hang the read or fill memory
        summary = json.loads(read_small(path))
    except FileNotFoundError:
        summary = read_summary(job)  # (running while a process holds the job lock)
        return (summary if summary["status"] == "running" else
                {"status": "missing", "error": "no summary.json"}), None
    except (OSError, ValueError, RecursionError) as err:  # (RecursionError: nested thousands deep)
        why = str(err).strip().splitlines()
        problem = f"not a readable JSON object ({type(err).__name__}{': ' + why[0][:80] if why else ''})"
    else:
        if not isinstance(summary, dict):
            problem = "not a readable JSON object (not an object)"
        elif (why := _summary_problem(summary)) is not None:
            problem = why
        elif SURROGATE.search(json.dumps(summary, ensure_ascii=False)):  # a "\ud800" escape: no text a run writes
            problem = "a string holds a lone surrogate (a \\ud800-style escape), which no run writes"
    if problem is None:
        return summary, None
    return ({"status": "missing", "error": f"unreadable summary.json: {problem}"},
            f"{path}: {problem}; the job counts as missing")


def _section(config: dict | None, key: str) -> dict:
    value = (config or {}).get(key)
    return value if isinstance(value, dict) else {}


def _num_classes(config: dict | None) -> int:
    n = _section(config, "dataset").get("num_classes")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 10


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per job folder of ``root`` (module docstring); prints one warning line per unreadable file."""
    rows: list[dict] = []
    settings: list[tuple[bool, dict[str, str]]] = []
    for job in job_dirs(sweep_root(root)):
        summary, problem = job_summary(job)
        if problem is not None:
            warn(problem)
        config, config_problem = read_config(job)
        if config_problem is not None:
            warn(f"{config_problem}; the job is described by its summary.json")
        row: dict = {"job": job_id(job), "dir": str(job)}
        choices = summary.get("choices") or {}
        row.update({k: choices.get(k) for k in CHOICES})
        row.update({k: summary.get(k) for k in SUMMARY_KEYS})
        if row["method"] or row["approach"] or config:
            row["label"], row["defence"], row["rule"] = labels(row["method"], row["approach"], row["mode"], config)
        else:  # nothing says what ran (a job killed before writing): name it by its folder
            row["label"], row["defence"], row["rule"] = str(row["job"]), "other", None
        row["attack"] = attack_label(config, row["err_mode"])
        row["num_classes"] = _num_classes(config)
        row["config"] = config_key(config, row)
        settings.append(_settings(config, row))
        records, problems = read_run_records(job)
        for p in problems:
            warn(f"{p}; the file's records are left out")
        if row["status"] in FINISHED:
            if not records and not problems:
                warn(f"{job / 'metrics.jsonl'}: no records; the job has no curve and no time split")
            _fill_summary(row, records)
            row.update(step_weighted_phases(records))
        else:  # killed, failed or still running: its records stop part-way, its numbers are not a run's
            row.update(step_weighted_phases([]))
        rows.append(row)
    _drop_repeated_seeds(rows)
    _name_variants(rows, settings)
    cols = ["job", "dir", *CHOICES, "label", "variant", "defence", "rule", "attack", "config", "num_classes",
            *SUMMARY_KEYS,
            "cluster_time_median", "cluster_time_cpu", *PHASES, *MEDIAN_PHASES, *STEP_SPREAD, *CPU_MEDIAN_PHASES,
            "corrupted_per_step"]
    return pd.DataFrame(rows, columns=cols).set_index("job", drop=False).rename_axis(None)


def _settings(config: dict | None, row: dict) -> tuple[bool, dict[str, str]]:
    """Whether the job has a resolved config, and what config_key tells configurations apart by, flat
    (``approach.buckets``), each value as JSON text."""
    flat = flat_settings({k: v for k, v in config.items() if k not in NOT_CONFIG}) if config else \
        {k: row.get(k) for k in CONFIG_KEYS if k != "label"}
    return bool(config), {k: json.dumps(v, sort_keys=True, default=str) for k, v in flat.items()}


def _variant_text(flat: dict[str, str], keys: list[str]) -> str:
    """``lr=0.5, batch_size=64`` (strings bare, other values as JSON, ``absent`` for a key the config lacks)."""
    def value(k: str) -> str:
        if k not in flat:
            return "absent"
        v = json.loads(flat[k])
        return v if isinstance(v, str) else flat[k]

    return ", ".join(f"{k}={value(k)}" for k in keys[:3]) + (", …" if len(keys) > 3 else "")


def _name_variants(rows: list[dict], settings: list[tuple[bool, dict[str, str]]]) -> None:
    """Configurations that every figure and table would show alike (the same label, attack and q) but that differ
    (a sweep over two tasks, two sweeps in one root) each get ``variant``, the settings that tell them apart
    (``task=vgg13-cifar100``: a task decides the rest; else up to three differing keys, sorted; ``config <id>``
    where those do not tell them apart; ``no resolved config`` for a job described by its summary alone), and their
    label says it: ``vanilla-bulyan [task=vgg13-cifar100]``. Means, lines and speedup pairs are never taken across
    them. Only configurations with a finished job are compared (a job that failed before it wrote its resolved
    config would otherwise rename its finished siblings)."""
    groups: dict[tuple, dict[str, tuple[bool, dict[str, str]]]] = {}
    for row, (resolved, flat) in zip(rows, settings, strict=True):
        row["variant"] = ""
        if row["status"] in FINISHED:
            key = (row["label"], str(row["err_mode"]), str(row["worker_fail"]))
            groups.setdefault(key, {}).setdefault(row["config"], (resolved, flat))
    names: dict[tuple, str] = {}
    for key, configs in groups.items():
        if len(configs) < 2:
            continue
        texts = {}
        # a job without a readable resolved config is described by its summary's settings: those of the others
        # would differ from them in every key
        for resolved in (True, False):
            some = {config: flat for config, (r, flat) in configs.items() if r == resolved}
            keys = sorted(set().union(*some.values()))
            differ = [k for k in keys if len({flat.get(k) for flat in some.values()}) > 1]
            shown = ["task"] if "task" in differ else differ
            for config, flat in some.items():
                text = _variant_text(flat, shown)
                texts[config] = text if resolved else ", ".join(["no resolved config", *[text] * bool(text)])
        if len(set(texts.values())) < len(texts):
            texts = {config: f"config {config}" for config in configs}
        names.update({(key, config): t for config, t in texts.items() if t})
    for row in rows:
        variant = names.get(((row["label"], str(row["err_mode"]), str(row["worker_fail"])), row["config"]))
        if variant is not None:
            row["variant"] = variant
            row["label"] = f"{row['label']} [{variant}]"


def _drop_repeated_seeds(rows: list[dict]) -> None:
    """A finished job that repeats the config and seed of an earlier one (two roots merged, a folder copied) would
    count one seed twice in every mean and narrow its interval: it becomes ``duplicate`` (no numbers), one warning
    each."""
    first: dict[tuple, object] = {}
    for row in rows:
        if row["status"] not in FINISHED or row["seed"] is None:
            continue
        key = (row["config"], row["seed"])
        if key in first:
            warn(f"{row['dir']}: the same config and seed ({row['seed']}) as job {first[key]}; left out of the "
                 f"numbers")
            row.update({"status": "duplicate", "error": f"the same config and seed as job {first[key]}"})
            row.update(step_weighted_phases([]))
        else:
            first[key] = row["job"]


def load_metrics(root: str | Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per evaluation of every finished job of ``runs`` (default: ``load_runs(root)``), with the job's
    choices as columns; a killed, failed or running job's records stop part-way and are left out."""
    runs = load_runs(root) if runs is None else runs
    frames = []
    for job, run in runs[runs["status"].isin(FINISHED)].iterrows():
        records = run_records(Path(run["dir"]))  # quiet: load_runs has named its bad files
        if not records:
            continue
        df = pd.DataFrame(records)
        for k in JOB_FIELDS:
            df[k] = run[k] if k != "job" else job
        frames.append(df)
    # frames are in job_dirs order, each in step order (job ids may mix numbers and names: no sort by id); every
    # value the figures use is a column, NaN where no record has it
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(JOB_FIELDS))
    missing = [k for k in ("step", *RECORD_NUMBERS) if k not in out.columns]
    return pd.concat([out, pd.DataFrame(np.nan, index=out.index, columns=missing)], axis=1) if missing else out


def time_column(df: pd.DataFrame) -> str:
    """The clock to compare approaches on: ``cluster_time_cpu`` (per-phase CPU medians: what a loaded machine
    leaves alone) where every record has it, else ``cluster_time_median`` (per-phase wall-clock medians, robust to
    load spikes) where every record has that, else ``cluster_time`` (per-phase means; older runs)."""
    def recorded(col: str) -> bool:
        return col in df.columns and bool((df[col] > 0).any())

    # never one clock for some jobs only: a job without it would have no time, and count as never reaching a target
    # (records without any clock, eval.jsonl's alone, have no time on any)
    clocks = [c for c in ("cluster_time_cpu", "cluster_time_median", "cluster_time") if c in df.columns]
    timed = df[clocks].notna().any(axis=1) if clocks else pd.Series(False, index=df.index)
    for col in ("cluster_time_cpu", "cluster_time_median"):
        if recorded(col) and df.loc[timed, col].notna().all():
            return col
    return "cluster_time"


def time_to_target(metrics: pd.DataFrame, target: float, x: str | None = None) -> pd.Series:
    """Per job, the first ``x`` (default: ``time_column``) at which test accuracy reached ``target`` (NaN if
    never)."""
    x = x or time_column(metrics)
    if x not in metrics.columns:  # records without that clock (eval.jsonl alone): no time to give
        return pd.Series(np.nan, index=metrics["job"].unique(), dtype=float)
    hit = metrics[pd.to_numeric(metrics["test_acc"]) >= target].groupby("job")[x].min()
    return hit.reindex(metrics["job"].unique())
