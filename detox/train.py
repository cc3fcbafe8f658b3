"""Entry point: ``python -m detox.train [group=option ...] [key=value ...]`` (Hydra; ``-m`` for sweeps)."""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from detox.config import ConfigError, validate
from detox.data import DataUnavailable
from detox.engines import ENGINES
from detox.errors import HandlerError, signalled
from detox.results import (
    JobBusy,
    base_summary,
    config_difference,
    finished_summary,
    foreign_run,
    holds_run,
    job_lock,
    model_dir,
    model_dir_owner,
    only_hydra_files,
    record_refusal,
    same_config_elsewhere,
    save_resolved_config,
    write_json,
)
from detox.tuning import DIGEST_KEY, pin_lr_picks

log = logging.getLogger("detox")

# errors the user can fix from the message alone: one line, no traceback
USER_ERRORS = (ConfigError, DataUnavailable)


def refuse(err: Exception) -> None:
    """One line on stderr (the full traceback only when asked for with HYDRA_FULL_ERROR=1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exc()
    print(f"detox: error: {err}", file=sys.stderr)


# a full or read-only disk, a quota or a file-size limit: the output cannot be written; one line and exit 1, never a
# traceback
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def disk_problem(err: BaseException, out_dir: Path | None) -> str | None:
    """The one line for an error of the disk the output goes to, or None for any other error."""
    if not (isinstance(err, OSError) and err.errno in DISK_ERRNOS):
        return None
    # a write that fills the disk fails at write or close, where the error names no file
    where = err.filename or (f"the run's output in {out_dir}" if out_dir is not None else "the run's output")
    return (f"cannot write {where}: {err.strerror}; the run stopped (make room, then the same command again resumes "
            f"or redoes it)")


def _failed_summary(cfg: DictConfig, out_dir: Path | None, err: BaseException) -> dict:
    """The failed job's summary, written where it can be: a disk that is full may take it or not."""
    summary = {**base_summary(cfg), "status": "failed", "error": f"{type(err).__name__}: {err}"}
    if out_dir is not None:
        try:
            write_json(out_dir / "summary.json", summary)
        except OSError as write_err:
            if disk_problem(write_err, out_dir) is None:  # a full disk refusing it too is what the error says
                log.error("cannot record the failure in %s: %s", out_dir / "summary.json",
                          write_err.strerror or write_err)
    return summary


def run(cfg: DictConfig, out_dir: Path | None, multirun: bool = False) -> dict:
    """Validate, train with the chosen engine, and leave a summary.json whatever happens.

    Order matters: nothing is written before the whole config is valid; a job folder is locked while this
    process owns it; a folder holding another config's run is never written into."""
    save = out_dir is not None and bool(cfg.save)
    try:
        plan = validate(cfg)
        if multirun and out_dir is not None:  # a picks file rewritten while the sweep runs: refused, never mixed
            pin_lr_picks(cfg, out_dir.parent)
    except ConfigError as err:
        refuse(err)
        summary = {"status": "failed", "error": f"ConfigError: {err}"}
        if not multirun:
            sys.exit(2)
        if save and not holds_run(out_dir):
            write_json(out_dir / "summary.json", summary)  # the sweep's table shows the refusal
        elif save:
            record_refusal(out_dir, summary["error"])  # that folder is another run's: nothing is written into it
        return summary
    if not save:
        summary = _train(cfg, plan, None, multirun)
        if multirun and out_dir is not None:  # the job's folder Hydra made, empty (save=false writes nothing)
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        return summary
    if foreign_run(cfg, out_dir):  # also when that run is still going: another config, not a second copy of it
        return _refuse_foreign(cfg, out_dir, multirun)
    try:
        with job_lock(out_dir):
            return _run_locked(cfg, plan, out_dir, multirun)
    except JobBusy as err:
        log.warning("skipping: %s", err)
        return {"status": "skipped", "error": str(err)}
    except OSError as err:  # before training (the lock file, resolved_config.yaml): _train handles its own
        if (why := disk_problem(err, out_dir)) is None:
            raise
        summary = _failed_summary(cfg, out_dir, err)
        print(f"detox: error: {why}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(1)
        return summary


def _refuse_foreign(cfg: DictConfig, out_dir: Path, multirun: bool) -> dict:
    diff = config_difference(cfg, out_dir)
    why = f": {diff}" if diff else ""
    if diff and diff.startswith(f"{DIGEST_KEY}="):
        why += f" (lr_picks={cfg.get('lr_picks')} holds other content than the file that run read)"
    err = ConfigError(f"{out_dir} holds a run of a different config (see its resolved_config.yaml{why}); "
                      f"nothing was written: choose another hydra.sweep.dir or hydra.run.dir")
    refuse(err)
    if not multirun:
        sys.exit(2)
    record_refusal(out_dir, f"ConfigError: {err}")
    return {"status": "failed", "error": f"ConfigError: {err}"}


def _run_locked(cfg: DictConfig, plan, out_dir: Path, multirun: bool) -> dict:
    if foreign_run(cfg, out_dir):  # checked again under the lock: no other run is writing the folder now
        return _refuse_foreign(cfg, out_dir, multirun)
    if (done := finished_summary(cfg, out_dir)) is not None:
        log.info("skipping: %s already holds a %s run of this exact config (delete its summary.json to rerun)",
                 out_dir, done["status"])
        return done
    if multirun and (twin := same_config_elsewhere(cfg, out_dir)) is not None:
        log.info("skipping: %s already holds a finished run of this exact config (the same config, its overrides "
                 "spelled differently)", twin)
        if only_hydra_files(out_dir):  # the folder Hydra just made for it: the config has one folder, the twin's
            shutil.rmtree(out_dir, ignore_errors=True)
        return finished_summary(cfg, twin) or {"status": "skipped"}
    if (owner := model_dir_owner(cfg, out_dir)) is not None:
        err = ConfigError(f"model_dir={model_dir(cfg, out_dir)} holds the weights files of {owner}; every run needs "
                          f"its own (model_dir=null: <job folder>/models)")
        refuse(err)
        summary = {**base_summary(cfg), "status": "failed", "error": f"ConfigError: {err}"}
        write_json(out_dir / "summary.json", summary)
        if not multirun:
            sys.exit(2)
        return summary
    # an unfinished earlier attempt: its summary is stale; metrics.jsonl is rewritten by the trainer
    # (kept up to the checkpoint it resumes from, if any)
    (out_dir / "summary.json").unlink(missing_ok=True)
    save_resolved_config(cfg, out_dir)
    return _train(cfg, plan, out_dir, multirun)


@contextlib.contextmanager
def submitit_signals() -> Iterator[bool]:
    """Under submitit (a Slurm job), while the job trains: SIGCONT gets back its default action and the USR2
    handler's errors are carried as HandlerError; yields whether this is such a job.

    submitit's SIGCONT handler only logs, and Slurm sends SIGCONT with the time limit's USR2. A USR2 handled while
    that logging call runs raised submitit's "timed-out" error inside it, where logging's error handler swallowed
    it: the job then trained on until Slurm killed it and left no result for submitit (seen in CI,
    tests/test_slurm.py). SIGCONT's default action is all a running process needs. Any other ``except Exception``
    the signal lands in would swallow that error too: carried as a BaseException it cannot be, and ``_train``
    records the error itself. The handler is put back afterwards, where Hydra records an error as a failed job."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
        yield False
        return
    signal.signal(signal.SIGCONT, signal.SIG_DFL)
    usr2 = signal.getsignal(signal.SIGUSR2)
    if callable(usr2):
        def carried(signum: int, frame: object) -> None:
            try:
                usr2(signum, frame)
            except Exception as err:
                raise HandlerError(err) from err

        signal.signal(signal.SIGUSR2, carried)
    try:
        yield True
    finally:
        if callable(usr2):
            signal.signal(signal.SIGUSR2, usr2)


def _train(cfg: DictConfig, plan, out_dir: Path | None, multirun: bool) -> dict:
    try:
        with submitit_signals():
            summary = ENGINES[cfg.engine.name](cfg, plan, out_dir)
    except (Exception, HandlerError) as caught:
        err = signalled(caught)
        if not isinstance(err, Exception):  # Ctrl-C, submitit's requeue: not this job's failure
            raise err from None
        summary = _failed_summary(cfg, out_dir, err)
        why = disk_problem(err, out_dir)
        if isinstance(err, USER_ERRORS):
            refuse(err)
        elif why is not None:
            print(f"detox: error: {why}", file=sys.stderr, flush=True)
        else:
            log.error("job failed:\n%s", traceback.format_exc())
        if multirun:  # record it and let the sweep go on
            return summary
        if isinstance(err, USER_ERRORS):
            sys.exit(2)
        if why is not None:
            sys.exit(1)
        if err is caught:
            raise
        raise err from None
    if not multirun:
        acc = summary.get("final_test_acc")
        print(f"detox: {summary['status']}: final test accuracy "
              f"{'-' if acc is None else f'{acc:.4f}'} after {summary.get('steps', '-')} steps; "
              f"output in {out_dir if out_dir is not None else '(save=false: nothing written)'}")
    if summary["status"] == "failed" and not multirun:  # e.g. an MPI rank died: the job did not run through
        sys.exit(1)
    return summary


def check_output_folder(config: DictConfig, key: str) -> None:
    """``hydra.run.dir`` / ``hydra.sweep.dir`` must name a folder Hydra can make: resolvable, not empty (that would
    write the run's files into the current folder), no control characters, no file on the way."""
    try:
        value = OmegaConf.select(config, key, throw_on_resolution_failure=True)
    except Exception as err:  # an interpolation that does not resolve
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    text = "" if value is None else str(value)
    if not text.strip():
        raise ConfigError(f"{key}={text!r}: empty; give the folder for the run's output")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ConfigError(f"{key}={text!r}: control characters are not allowed in a folder name")
    path = Path(text).absolute()
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise ConfigError(f"{key}={text}: {folder} is {'a file' if folder.is_file() else 'not a folder'}; "
                                  f"give a folder (existing or new)")
            # (access() says no to root too on a read-only mount: Hydra's own mkdir was a traceback there)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}={text}: {folder} is not writable (read-only, or not yours); give a "
                                  f"folder the run can write")
            break


class ValidateFirst(Callback):
    """Hydra callback: a single run's config is checked before Hydra creates its output folder, so a refused
    config leaves nothing behind (a sweep's jobs are checked in ``run``, each recorded in its own folder); a
    sweep's root folder is checked before Hydra makes it."""

    made: Path | None = None  # save=false: the first folder of hydra.run.dir that Hydra is about to make

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_output_folder(config, "hydra.run.dir")
            # a copy: Hydra deep-copies this config into the job's, which ``run`` validates again; what validate
            # adds (lr_picks_sha256, a key the schema does not take as a setting) must not be in it then
            validate(copy.deepcopy(config))
        except ConfigError as err:
            refuse(err)
            sys.exit(2)
        if config.get("save") is False:  # (${now:...} is cached: the folder run_job will make)
            run_dir = Path(str(config.hydra.run.dir)).absolute()
            self.made = next((p for p in [*reversed(run_dir.parents), run_dir] if not p.exists()), None)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        """save=false writes nothing (no .hydra/, the job log to the null device): the empty folders Hydra made for
        the run go too (outputs/<date>/<time>/, and outputs/<date>/ if this run made it)."""
        if self.made is None:
            return
        path = Path(str(config.hydra.run.dir)).absolute()
        while path == self.made or self.made in path.parents:
            try:
                path.rmdir()  # only while empty: nothing that anyone wrote is removed
            except OSError:
                return
            path = path.parent

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_output_folder(config, "hydra.sweep.dir")
            check_slurm_launcher(config)
        except ConfigError as err:
            refuse(err)
            sys.exit(2)


SLURM_LAUNCHER = ("submitit_launcher.SlurmLauncher", "detox_launcher.SlurmLauncher")
# hydra.launcher keys of submitit_slurm that are counts (null: submitit's default)
SLURM_COUNTS = ("timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "nodes", "mem_gb",
                "array_parallelism")
SLURM_NAME = r"[A-Za-z0-9_.,-]+"


def check_slurm_launcher(config: DictConfig) -> None:
    """``hydra/launcher=slurm``: refuse, before the sweep's folder is made, a machine that cannot submit (no sbatch
    or srun: submitit's traceback otherwise) and settings sbatch would refuse only after the sweep started."""
    import re

    launcher = config.hydra.launcher
    if not str(launcher.get("_target_", "")).endswith(SLURM_LAUNCHER):
        return
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"hydra/launcher=slurm: {' and '.join(missing)} not found on PATH: this machine cannot "
                          f"submit Slurm jobs (run the sweep on a Slurm login node, or use "
                          f"hydra/launcher=local_parallel)")
    for key in SLURM_COUNTS:
        value = launcher.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"hydra.launcher.{key}={value!r}: must be a whole number >= 1 (or null for "
                              f"submitit's default)")
    for key in ("partition", "account", "qos"):
        value = launcher.get(key)
        if value is not None and not re.fullmatch(SLURM_NAME, str(value)):
            raise ConfigError(f"hydra.launcher.{key}={value!r}: not a Slurm name (letters, digits, _ . , -)")
    for key in ("nodes", "tasks_per_node"):  # submitit runs one copy of the job per task: N copies of one run
        value = launcher.get(key)
        if value is not None and value != 1:
            raise ConfigError(f"hydra.launcher.{key}={value!r}: must be 1 (one Hydra job per Slurm job; engine=mpi "
                              f"jobs start their own ranks with mpiexec)")


# an absolute path: a console script (detox-train) would make Hydra read "../conf" as a Python package
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    summary = run(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN)
    return summary.get("final_test_acc")


def _one_line(err: Exception) -> str:
    """Hydra's composition errors span several lines (options one per line, the search path): fold them."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines[: next((i for i, x in enumerate(lines) if x.startswith("Config search path")),
                                           len(lines))] if not line.startswith("Set the environment variable")]
    head, rest = (lines[0], lines[1:]) if lines else (type(err).__name__, [])
    if rest and rest[0].endswith(":"):  # "Available options in 'mode':" then one option per line
        return f"{head}; {rest[0][:-1].lower()}: {', '.join(rest[1:])}"
    return " ".join([head, *rest])


def _hydra_errors_in_one_line(prog: str = "detox") -> None:
    """A bad override (unknown option or key, an unparsable value) gets one line and exit 2 like every other
    refusal, instead of Hydra's multi-line report and exit 1 (HYDRA_FULL_ERROR=1 keeps Hydra's own)."""
    import importlib

    from hydra._internal import utils as hydra_utils
    from hydra.errors import (
        ConfigCompositionException,
        InstantiationException,
        MissingConfigException,
        OverrideParseException,
        SearchPathException,
    )

    original = hydra_utils.run_and_report

    def run_and_report(func):  # noqa: ANN001, ANN202 - Hydra's own signature
        def guarded():  # noqa: ANN202
            try:
                return func()
            except (ConfigCompositionException, MissingConfigException, OverrideParseException,
                    InstantiationException, SearchPathException) as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                # a launcher or callback refusing its settings (hydra.launcher.n_jobs=0): its own message
                cause = err.__cause__ if isinstance(err, InstantiationException) else None
                print(f"{prog}: error: {cause if isinstance(cause, ValueError) else _one_line(err)}",
                      file=sys.stderr)
                raise SystemExit(2) from None
            except KeyboardInterrupt:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                # Ctrl-C is not a failure of the job: no summary.json is written, so a rerun resumes or redoes it
                print(f"{prog}: interrupted (Ctrl-C); the same command again skips finished jobs and resumes an "
                      f"interrupted run from its last checkpoint (checkpoint.every), or starts it over",
                      file=sys.stderr, flush=True)
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # die of SIGINT, as a shell loop expects
                os.kill(os.getpid(), signal.SIGINT)
                raise SystemExit(130) from None
            except OSError as err:  # Hydra's own writes (.hydra/, a sweep's job folders) on a full disk
                if (why := disk_problem(err, None)) is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"{prog}: error: {why}", file=sys.stderr)
                raise SystemExit(1) from None
            except Exception as err:
                # hydra/launcher=slurm: sbatch refused a job (submitit's FailedJobError holds sbatch's stderr)
                if (type(err).__name__ != "FailedJobError" or "sbatch" not in str(err)
                        or os.environ.get("HYDRA_FULL_ERROR") == "1"):
                    raise
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                print(f"{prog}: error: sbatch refused the sweep: {lines[-1] if lines else type(err).__name__}",
                      file=sys.stderr)
                raise SystemExit(2) from None
        return original(guarded)

    hydra_utils.run_and_report = run_and_report

    def flags_checked(original_call):  # noqa: ANN001, ANN202 - Hydra's own functions
        """Hydra checks its flags (two of -m/--cfg/--info, --resolve without --cfg, a missing rerun file) outside
        ``run_and_report``, raising ValueError: a traceback and exit 1."""
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            try:
                return original_call(*args, **kwargs)
            except ValueError as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"{prog}: error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
        return call

    hydra_main = importlib.import_module("hydra.main")  # the module (``hydra.main`` the attribute is the decorator)
    hydra_main._run_hydra = flags_checked(hydra_main._run_hydra)
    hydra_main._get_rerun_conf = flags_checked(hydra_main._get_rerun_conf)


def cli() -> None:
    """``python -m detox.train`` and the ``detox-train`` console script."""
    _hydra_errors_in_one_line()
    # a log file on a full disk: logging's default prints a traceback for every line that cannot be written
    logging.raiseExceptions = False
    main()


if __name__ == "__main__":
    cli()
