"""Output files of a run (DESIGN §4): metrics.jsonl, summary.json, resolved_config.yaml, summary.jsonl."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# the config groups whose chosen option goes into summary.json's "choices"
GROUPS = ("network", "dataset", "mode", "approach", "err_mode", "engine")
# preset groups whose label is recorded next to the group choices
PRESETS = ("task", "method")
# numeric/top-level settings copied into summary.json
SETTINGS = ("workers", "worker_fail", "group_size", "batch_size", "lr", "momentum", "weight_decay",
            "max_steps", "eval_freq", "seed", "target_acc", "device", "figure", "evaluation",
            # where lr came from: the picks file and the SHA-256 of the bytes read (detox.tuning); null without one
            "lr_picks", "lr_picks_sha256")


def clean_json(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def _private_tmp(path: Path) -> Path:
    """A temporary name next to ``path`` that no other process or thread uses, hidden (dot) and ending in .tmp,
    so nothing that lists the folder for finished files mistakes it for one."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


# the most bytes read from a small text file a run or an analysis writes (resolved_config.yaml, summary.json,
# models/.detox_run, lr_picks.yaml): anything larger is not one
SMALL_FILE = 1 << 20


def read_small(path: Path, limit: int = SMALL_FILE) -> str:
    """The text of a small file, read only if it is a regular file of at most ``limit`` bytes: a fifo put in its
    place (or swapped in after a look) would block the read forever, /dev/zero never end it, a huge file fill the
    memory. Raises OSError (FileNotFoundError when absent, IsADirectoryError for a folder) or ValueError (also for
    text that is not UTF-8)."""
    return read_small_bytes(path, limit).decode()


def read_small_bytes(path: Path, limit: int = SMALL_FILE) -> bytes:
    """``read_small``'s bytes, undecoded (what a digest of the file is taken of)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: a fifo with no writer opens at once
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(str(path))
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{info.st_size} bytes, more than such a file holds ({limit})")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew after the look
        raise ValueError(f"more than {limit} bytes, more than such a file holds")
    return data


def has_yaml_aliases(text: str) -> bool:
    """Whether YAML ``text`` uses aliases (``*name``). Nothing this code writes has any: one comes only from a hand
    edit, and nested ones (a 'billion laughs') expand a few KB into 10^9 entries (OmegaConf takes hours)."""
    import yaml

    return any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.SafeLoader))


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` into a temporary file of this process, then rename it to ``path``: a reader (or a concurrent
    writer) never sees half a file, and a failure (a full disk) leaves no temporary file behind."""
    tmp = _private_tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def save_torch_atomic(path: Path, obj: Any) -> None:
    """``torch.save`` atomically: a reader (the evaluator) never sees half a file. Serialised in memory first and
    written by Python: torch's own writer turns a full disk into a RuntimeError ("unexpected pos ...") that names
    neither the disk nor the file; written here it is the OSError (ENOSPC) the run reports in one line."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, lambda tmp: tmp.write_bytes(buf.getbuffer()))


# --- weights files for the separate evaluator (python -m detox.evaluate), named as the original's ------------------

MODEL_PREFIX = "model_step_"
# the trainer's names only: model_step_01 or model_step_\u0663 would be a second file for an existing step
_MODEL_FILE = re.compile(r"model_step_(0|[1-9][0-9]*)")


def writes_models(cfg: DictConfig) -> bool:
    """Whether a run writes a weights file at every evaluation step: with evaluation=external, or a model_dir set."""
    return cfg.get("evaluation") == "external" or cfg.get("model_dir") is not None


def model_dir(cfg: DictConfig, out_dir: Path) -> Path:
    """The run's weights folder: ``model_dir`` (``~`` expanded; relative to where the run was started), else
    ``<job folder>/models``."""
    return Path(str(cfg.model_dir)).expanduser() if cfg.get("model_dir") is not None else out_dir / "models"


MODEL_OWNER = ".detox_run"


def model_dir_owner(cfg: DictConfig, out_dir: Path) -> str | None:
    """Claim the run's weights folder for the job folder ``out_dir``; return the job folder that already owns it,
    if another does. A folder holds one run's ``model_step_<t>`` files: jobs of a sweep given one ``model_dir``
    would overwrite each other's weights (the owner file is created exclusively: two jobs cannot both claim it)."""
    if not writes_models(cfg):
        return None
    folder, me = model_dir(cfg, out_dir), str(out_dir.resolve())
    folder.mkdir(parents=True, exist_ok=True)
    owner = folder / MODEL_OWNER
    try:
        fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        other = owner.read_text(errors="replace").strip()
        return None if other == me else other or "another run (claiming it now)"
    with os.fdopen(fd, "w") as f:
        f.write(me + "\n")
    return None


def model_path(folder: Path, step: int) -> Path:
    """The original's name, ``model_step_<t>``, without a suffix (its evaluator reads exactly that)."""
    return folder / f"{MODEL_PREFIX}{step}"


def model_files(folder: Path) -> dict[int, Path]:
    """step -> path of every finished weights file in ``folder``, by step. Only exact ``model_step_<t>`` names
    count: a file being written has a temporary name (``.model_step_<t>.<pid>.<thread>.tmp``) until it is whole."""
    found = {}
    for p in folder.iterdir():
        m = _MODEL_FILE.fullmatch(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (a crash never leaves half a summary)."""
    write_text_atomic(path, json.dumps(clean_json(obj), indent=2) + "\n")


def append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(clean_json(obj)) + "\n")


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, str]:
    import hydra
    import numpy
    import torch

    from detox import __version__

    return {"detox": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "hydra": hydra.__version__}


def choices(cfg: DictConfig) -> dict[str, str | None]:
    """The chosen option of every config group, plus the preset labels (task, method) when set."""
    out: dict[str, str | None] = {g: str(cfg[g].name) for g in GROUPS if g in cfg}
    out.update({k: cfg.get(k) for k in PRESETS})
    return out


def settings(cfg: DictConfig) -> dict[str, Any]:
    values = OmegaConf.to_container(cfg, resolve=True)
    out = {k: values.get(k) for k in SETTINGS}
    out["placement"] = cfg.adversary.placement
    return out


def base_summary(cfg: DictConfig) -> dict[str, Any]:
    return {"status": "running", "choices": choices(cfg), **settings(cfg), "versions": versions(),
            "git_commit": git_commit()}


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_resolved_config(cfg: DictConfig, out_dir: Path) -> None:
    write_text_atomic(out_dir / "resolved_config.yaml", resolved_yaml(cfg))


FINISHED = ("completed", "diverged")


def finished_summary(cfg: DictConfig, out_dir: Path) -> dict | None:
    """The summary of a finished run of exactly this config in ``out_dir`` (a rerun sweep skips it), else None."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
        same = (out_dir / "resolved_config.yaml").read_text() == resolved_yaml(cfg)
    except (OSError, ValueError):
        return None
    return summary if same and summary.get("status") in FINISHED else None


# ------------------------------------------------------------------------------------- job folders of a sweep

_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@%-]")
NAME_MAX = 150  # bytes of a readable folder name before it is shortened (file systems allow 255)


def job_dir_name(override_dirname: str) -> str:
    """A sweep job's folder, named by its overrides (``err_mode=alie,method=detox-bulyan``): the same config
    always lands in the same folder, and a different one never does. Characters a shell or a file system would
    trip on become ``_``; a long or altered name keeps a short hash of the full overrides so names stay unique."""
    if not override_dirname:
        return "default"
    name = _UNSAFE.sub("_", override_dirname)
    if name != override_dirname or len(name) > NAME_MAX or name in (".", ".."):
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
        name = f"{name[:NAME_MAX]}-{digest}"
    return name


OmegaConf.register_new_resolver("detox.job_dir", job_dir_name, replace=True)


def job_dirs(root: str | Path) -> list[Path]:
    """The job folders of a multirun root (any folder a job wrote its config or summary into), in a stable order:
    numbered folders by number, then the rest by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder (expected a multirun root with one folder per job)")
    jobs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and any((p / f).exists() for f in ("summary.json", "resolved_config.yaml", ".hydra"))]
    return sorted(jobs, key=lambda p: (0, i, "") if isinstance(i := job_id(p), int) else (1, 0, p.name))


def job_id(job: Path) -> int | str:
    """A numbered folder's number (Hydra's default job folders ``0``, ``1``, ...), else its name. Only the number as
    Python writes it counts: ``007`` or ``٣`` would share an id with ``7`` or ``3`` (and their jobs one row of every
    per-job table), and ``²`` is a digit that int() refuses."""
    name = job.name
    return int(name) if name.isascii() and name.isdigit() and str(int(name)) == name else name


class JobBusy(RuntimeError):
    """Another process is running this job (it holds the folder's lock)."""


@contextlib.contextmanager
def job_lock(out_dir: Path) -> Iterator[None]:
    """Hold an OS lock on the job folder while a run owns it; the OS releases it on any exit, kill included.
    Raises JobBusy at once if another process holds it."""
    path = out_dir / ".lock"
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise JobBusy(f"{out_dir} is being run by another process (pid {holder})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def lock_held(out_dir: Path) -> bool | None:
    """Whether some process holds ``out_dir``'s job lock now, read from /proc/locks without taking the lock (taking
    it, even for a moment, could make a run starting then skip its folder); None where /proc/locks is unreadable."""
    try:
        inode = (out_dir / ".lock").stat().st_ino
    except FileNotFoundError:
        return False
    try:
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2148173 0 EOF": the file is major:minor:inode
    return any(f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(inode)
               for f in (line.split() for line in locks.splitlines()) if len(f) > 5)


RUN_OUTPUT = ("summary.json", "metrics.jsonl", "checkpoint.pt")


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a run's output (finished or not)."""
    return any((out_dir / f).exists() for f in RUN_OUTPUT)


def foreign_run(cfg: DictConfig, out_dir: Path) -> bool:
    """True when ``out_dir`` holds output of a run of a different config (never mix two configs in a folder)."""
    try:
        theirs = (out_dir / "resolved_config.yaml").read_text()
    except OSError:
        return False
    return holds_run(out_dir) and theirs != resolved_yaml(cfg)


def flat_settings(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``approach.buckets``); an empty mapping stays a value of its own key."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(flat_settings(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_difference(cfg: DictConfig, out_dir: Path) -> str | None:
    """The first setting (dotted, in sorted order) where ``out_dir``'s resolved_config.yaml and ``cfg`` differ, as
    ``key=<theirs> there, <ours> here`` (``absent`` for a key one of them lacks); None if it cannot tell."""
    import yaml

    try:
        text = read_small(out_dir / "resolved_config.yaml")
        if has_yaml_aliases(text):
            return None
        theirs = yaml.safe_load(text)
        mine = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # unreadable, or not YAML: the refusal still names the file
        return None
    if not isinstance(theirs, dict) or not isinstance(mine, dict):
        return None
    a, b = flat_settings(theirs), flat_settings(mine)
    missing = object()
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y or type(x) is not type(y):
            def shown(v: Any) -> str:
                text = "absent" if v is missing else json.dumps(v, default=str)
                return text if len(text) <= 70 else text[:67] + "..."
            return f"{key}={shown(x)} there, {shown(y)} here"
    return None


def same_config_elsewhere(cfg: DictConfig, out_dir: Path) -> Path | None:
    """Another job folder of ``out_dir``'s sweep root that holds a finished run of exactly this config. Folders are
    named by the overrides as typed, so one config can be spelled into two names (``lr=0.05`` where 0.05 is the
    default, or a value quoted two ways): the sweep must still run it once."""
    try:
        siblings = [p for p in job_dirs(out_dir.parent) if p.name != out_dir.name]
    except OSError:
        return None
    mine = resolved_yaml(cfg)  # once: a figure's sweep has ~100 siblings

    def same(p: Path) -> bool:
        try:
            return (p / "resolved_config.yaml").read_text() == mine
        except OSError:
            return False

    return next((p for p in siblings if same(p) and finished_summary(cfg, p) is not None), None)


def only_hydra_files(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds nothing but what Hydra and the job lock put there before a run starts."""
    return all(p.name in (".hydra", ".lock") or p.suffix == ".log" for p in out_dir.iterdir())


# --- Hydra's own files (.hydra/, the job's log) stay out of a folder that holds another run (README Guarantees) -----

def _runtime_dir(root: DictConfig) -> Path | None:
    try:
        return Path(str(root.hydra.runtime.output_dir))
    except Exception:  # not set yet (composition), or no hydra node: Hydra writes nothing then either
        return None


def _hydra_subdir(*_: Any, _root_: DictConfig) -> str | None:
    """``hydra.output_subdir``: ``.hydra`` for a fresh folder, None (Hydra then writes no ``.hydra/``) for one that
    holds a run already (a finished one keeps the files it was run with, a foreign one is refused untouched) or with
    save=false."""
    if _root_.get("save") is False:  # all file output hangs on save: Hydra's record of the run too
        return None
    out = _runtime_dir(_root_)
    return None if out is not None and holds_run(out) else ".hydra"


def _job_log(path: str, *, _root_: DictConfig) -> str:
    """The job log's file: ``path``, or the null device with save=false or when the folder holds a run of another
    config (which this job will refuse: its lines must not land in that run's log)."""
    if _root_.get("save") is False:
        return os.devnull
    out = _runtime_dir(_root_)
    if out is None or not holds_run(out):
        return path
    try:
        task = OmegaConf.masked_copy(_root_, [k for k in _root_ if k != "hydra"])
        if task.get("lr_picks") is not None:  # the config as the run will have it: lr picked, the file's digest
            from detox.tuning import apply_lr_picks

            apply_lr_picks(task)
        same = (out / "resolved_config.yaml").read_text() == resolved_yaml(task)
    except Exception:  # unresolvable: refused before it trains, so nothing of it belongs in that folder either
        same = False
    return path if same else os.devnull


OmegaConf.register_new_resolver("detox.hydra_subdir", _hydra_subdir, replace=True)
OmegaConf.register_new_resolver("detox.job_log", _job_log, replace=True)


# A job refused because its folder holds another config's run writes nothing there, so that folder's summary still
# reads as the other run's: the refusal is noted under the root for this sweep's report (one folder per sweep,
# named by an id its jobs inherit through the environment: forked, or submitted to Slurm).
SWEEP_ID_ENV = "DETOX_SWEEP_ID"
REFUSED = ".refused"


# pins of the picks files a running sweep's jobs read (detox.tuning.pin_lr_picks): <root>/.lr_picks/<sweep id>/
PINS = ".lr_picks"


def sweep_folder_name(sweep: str) -> str:
    """The sweep id as a folder name: the id SweepSummary sets is one already; any other (set by hand in the
    environment) is hashed, so that no id can name a path outside the root."""
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", sweep) and len(sweep) <= NAME_MAX:
        return sweep
    return "sweep-" + hashlib.sha1(sweep.encode()).hexdigest()[:16]


def drop_pins(root: Path, sweep: str) -> None:
    """The sweep's picks pins go when it ends; the folder of pins too once no other sweep into the root has any."""
    if not sweep:
        return
    shutil.rmtree(root / PINS / sweep_folder_name(sweep), ignore_errors=True)
    with contextlib.suppress(OSError):
        (root / PINS).rmdir()


def record_refusal(out_dir: Path, error: str) -> None:
    """Note that this sweep's job for ``out_dir`` was refused without writing into it."""
    sweep = os.environ.get(SWEEP_ID_ENV)
    if sweep:
        folder = out_dir.parent / REFUSED / sweep_folder_name(sweep)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / out_dir.name, error)


def take_refusals(root: Path, sweep: str) -> dict[str, str]:
    """Job folder name -> error of this sweep's refused jobs; the notes are removed once read."""
    folder = root / REFUSED / sweep_folder_name(sweep)
    if not folder.is_dir():
        return {}
    refused = {p.name: p.read_text(errors="replace") for p in folder.iterdir() if not p.name.startswith(".")}
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # only when no other sweep into this root has notes there
    return refused


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, ``summary.jsonl`` at its root, one line per job folder."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_ID_ENV] = f"{os.getpid()}-{time.time_ns()}"

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        sweep = os.environ.pop(SWEEP_ID_ENV, "")
        if not root.is_dir():
            return
        drop_pins(root, sweep)
        refused = take_refusals(root, sweep)
        if config.get("save") is False:  # the jobs wrote no summary.json: there is nothing to read, nothing failed
            print(f"detox: sweep {root}: save=false: its jobs wrote no results (each job's lines above say how it "
                  f"ended); no summary.jsonl", flush=True)
            return
        path = write_sweep_summary(root)
        counts = report_sweep(root, path, refused)
        if counts and not (counts.get("completed", 0) + counts.get("diverged", 0)):
            raise SystemExit(1)  # nothing ran through: a script calling the sweep must see it


def report_sweep(root: Path, path: Path, refused: dict[str, str] | None = None) -> dict[str, int]:
    """The end of a sweep in a few lines: how many jobs completed, diverged or failed, where summary.jsonl is,
    and the first error line of each failed job. Returns the counts per status. ``refused``: this sweep's jobs
    refused for a folder holding another config's run (the folder's own summary is that run's, not this job's)."""
    refused = refused or {}
    rows = [(job, {"status": "refused", "error": refused[job.name]} if job.name in refused else read_summary(job))
            for job in job_dirs(root)]
    counts: dict[str, int] = {}
    for _, summary in rows:
        counts[str(summary.get("status"))] = counts.get(str(summary.get("status")), 0) + 1
    order = ["completed", "diverged", "failed", *sorted(set(counts) - {"completed", "diverged", "failed"})]
    parts = ", ".join(f"{counts.get(k, 0)} {k}" for k in order if k in counts or k in ("completed", "failed"))
    lines = [f"detox: sweep {root}: {len(rows)} jobs: {parts}; table: {path}"]
    for job, summary in rows:
        if summary.get("status") not in FINISHED:
            error = str(summary.get("error") or "no error recorded").strip().splitlines()
            lines.append(f"  {summary.get('status')}: {job.name}: {error[0] if error else ''}")
    print("\n".join(lines), flush=True)
    return counts


def read_summary(job: Path) -> dict:
    try:
        summary = json.loads((job / "summary.json").read_text())
        if not isinstance(summary, dict):
            raise ValueError("not an object")
        return summary
    except (OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError) and lock_held(job):  # another sweep into this root is running it
            return {"status": "running", "error": "running in another process (it holds the folder's lock)"}
        return {"status": "failed", "error": f"no readable summary.json ({type(err).__name__})"}


def write_sweep_summary(root: Path) -> Path:
    """``summary.jsonl``: every job folder of the root exactly once, written atomically."""
    lines = [json.dumps(clean_json({"job": job_id(job), "dir": str(job), **read_summary(job)}))
             for job in job_dirs(root)]
    out = root / "summary.jsonl"
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    return out
