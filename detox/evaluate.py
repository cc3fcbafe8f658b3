"""The separate evaluator: ``python -m detox.evaluate run_dir=<job folder> [follow=true]`` (conf/evaluate.yaml).

The original DETOX ran its evaluator (``distributed_evaluator.py``) on a node of its own: the training side saved the
model every ``eval_freq`` steps as ``model_step_<t>`` and the evaluator loaded each file as it appeared, so evaluation
never slowed training. Here a run with ``evaluation=external`` writes those files (atomically: a temporary name, then
a rename) and evaluates nothing itself; this command evaluates each file with the run's own network, data set and
evaluation settings (``resolved_config.yaml``) and the same code as in-loop evaluation (``detox.trainer.evaluate``,
BatchNorm statistics recalibrated from the same training batches), so the numbers are the ones in-loop evaluation
gives. One record per step goes to ``eval.jsonl``, with the evaluation keys of ``metrics.jsonl``; ``analysis.load``
fills a run's accuracies from it.

``follow=true`` keeps watching the weights folder (every ``poll`` seconds) and stops once the run's ``summary.json``
says it ended and every file is evaluated, or once the run it watched dies without one (exit 1); without it, the
files present are evaluated and the command ends. A bad request (no such folder, not a run folder, no weights
files, weights of a run of another config (``models/.detox_run`` names their run), an ``out=`` that is not a records
file or is being written by another evaluator, a run config this code cannot evaluate, a CUDA device this machine
lacks) is one line and exit 2, before any work. A weights file is read only if it can be one the trainer wrote (a
regular file, not a link; an uncompressed torch archive no larger than the network's tensors need; a step within the
run's max_steps); any other is skipped with one line. A disk that fills is one line and exit 1, the records before
it kept whole; Ctrl-C keeps them too.

The records file is held under an OS lock while an evaluator writes it (two evaluators never record a step twice);
a last line torn by a killed evaluator is dropped before anything is appended (appending after it would fuse the
next record into it, a line analysis rejects), and a file with any other line that is not a record is refused, never
appended to.

One records file holds the numbers of one run under one set of evaluation settings: ``eval_batch_size`` (it also
sizes the BatchNorm calibration batches), ``device`` and ``threads`` (1 and 2 threads differ in the last bits) can
each change the numbers. They are kept next to the records, in ``<out>.settings.json`` (``eval.jsonl.settings.json``:
those three and ``run_config_sha256``, the SHA-256 of the run's resolved_config.yaml), written before the first record
is appended. An evaluation whose settings differ from the ones of the records already in the file, or of another run,
is refused in one line naming each setting with both values (exit 2, the file untouched); a file without records takes
the new settings. Records of an older evaluator carry no settings: they are taken as made with the run's own, so
adding to them with the run's own settings works (said in one line) and with any other is refused. An ``out=`` in the
folder of another run (analysis reads ``<folder>/eval.jsonl`` as that run's) is refused too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import stat
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from detox.approaches import Plan, plan_from_cfg
from detox.data import DataUnavailable
from detox.errors import ConfigError
from detox.results import (
    MODEL_OWNER,
    MODEL_PREFIX,
    clean_json,
    has_yaml_aliases,
    lock_held,
    model_dir,
    model_files,
    read_small,
    write_text_atomic,
    writes_models,
)
from detox.schema import DEVICE, PATH, Bool, Int, Num, Str, check
from detox.tuning import DIGEST_KEY

# the evaluation fields of a metrics.jsonl record (detox.trainer.METRIC_KEYS), in that order
EVAL_KEYS = ("step", "epoch", "eval_time", "samples", "test_loss", "test_acc", "test_acc5")
# the statuses summary.json holds once a run has ended (detox.train writes it on every way out)
ENDED = ("completed", "diverged", "failed")

# the longest line a record can be (seven keys and numbers: about 200 bytes)
RECORD_BYTES = 4096
# files of the run folder that are never a records file (out= pointing at one would append into it)
RUN_FILES = ("metrics.jsonl", "summary.json", "resolved_config.yaml", "checkpoint.pt", "train.log", ".lock",
             "model.pt", "mpi.log", "summary.jsonl")

# the evaluation settings that can change the numbers (one records file holds one setting of each), and the file next
# to the records that says which (Records)
EVAL_SETTINGS = ("eval_batch_size", "device", "threads")
RUN_DIGEST = "run_config_sha256"
SETTINGS_SUFFIX = ".settings.json"
# keys of a run's resolved config that record what it read rather than set anything (detox.tuning)
RECORD_KEYS = (DIGEST_KEY,)

OPT_PATH = Str(pattern=PATH.pattern, null=True)
SCHEMA: dict[str, Any] = {
    "run_dir": OPT_PATH,
    "model_dir": OPT_PATH,
    "follow": Bool(),
    "poll": Num(lo=0.0, hi=86400.0, open_lo=True),  # time.sleep overflows past ~1e9 s
    "timeout": Num(lo=0.0, open_lo=True, null=True),
    "out": OPT_PATH,
    "eval_batch_size": Int(lo=1, null=True),
    "device": Str(pattern=DEVICE.pattern, null=True),
    "threads": Int(lo=1, hi=4096, null=True),
}


class EvalError(RuntimeError):
    """A request the evaluator cannot serve; the message is the one line the user sees."""


class WriteFailed(RuntimeError):
    """The records file stopped taking records (a full disk): one line, exit 1; the records written so far stay."""


def say(message: str) -> None:
    print(f"detox.evaluate: {message}", flush=True)


@dataclass
class Target:
    """What to evaluate: the run's folder and config, where its weights are, where the records go."""

    run_dir: Path
    run_cfg: DictConfig
    models: Path
    out: Path
    run_digest: str = ""  # SHA-256 of the run's resolved_config.yaml, as read


def settings_path(out: Path) -> Path:
    """Where the evaluation settings of ``out``'s records are kept: ``<out>.settings.json``."""
    return out.with_name(out.name + SETTINGS_SUFFIX)


def _path(value: Any) -> Path | None:
    return None if value is None else Path(str(value)).expanduser()


def _run_config(run_dir: Path, cfg: DictConfig) -> tuple[DictConfig, str] | None:
    """The run's resolved config and the SHA-256 of its text; None while it does not exist yet (follow: the run has
    not started). Raises EvalError when the folder cannot be a run folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise EvalError(f"run_dir={run_dir}: not a folder (give the run's job folder, which holds "
                        f"resolved_config.yaml)")
    path = run_dir / "resolved_config.yaml"
    if not path.is_file():
        if cfg.follow:
            return None
        what = "no such folder" if not run_dir.exists() else "no resolved_config.yaml there: not a detox run folder"
        raise EvalError(f"run_dir={run_dir}: {what} (give the job folder a run wrote, or follow=true to wait "
                        f"for a run that has not started)")
    try:
        text = read_small(path)
        if has_yaml_aliases(text):
            raise ValueError("YAML aliases (*name), which no run writes")
        run_cfg = OmegaConf.create(text)
        run_cfg.network.name, run_cfg.dataset.name, run_cfg.eval_batch_size  # noqa: B018 - the keys it needs
    except Exception as err:
        raise EvalError(f"{path}: not a detox run config ({type(err).__name__}: {err})") from None
    return run_cfg, hashlib.sha256(text.encode()).hexdigest()


def target(cfg: DictConfig, wait: float = 0.0) -> Target | None:
    """Resolve the request into a Target; None if following a run that has not written its config yet."""
    run_dir, models = _path(cfg.run_dir), _path(cfg.model_dir)
    if run_dir is None and models is None:
        raise EvalError("give run_dir=<the run's job folder> (or model_dir=<its weights folder>, whose parent is "
                        "the run's folder)")
    if models is not None and models.exists() and not models.is_dir():
        raise EvalError(f"model_dir={models}: not a folder")
    if run_dir is None:
        run_dir = models.parent  # type: ignore[union-attr]  # the default layout: <job folder>/models
    found = _run_config(run_dir, cfg)
    if found is None:
        return None
    run_cfg, run_digest = found
    if models is None:
        models = model_dir(run_cfg, run_dir)
        if not writes_models(run_cfg) and not models.is_dir():
            raise EvalError(f"run_dir={run_dir}: the run used evaluation={run_cfg.get('evaluation', 'inloop')} "
                            f"without a model_dir, so it writes no weights files (its metrics.jsonl holds the "
                            f"accuracies); start it with evaluation=external")
    if (owner := foreign_weights(run_dir, models, run_cfg)) is not None:
        raise EvalError(f"model_dir={models} holds the weights files of {owner}, a run of another config than "
                        f"run_dir={run_dir} (their resolved_config.yaml differ): its numbers would be recorded as "
                        f"this run's; give that run's folder as run_dir")
    if not cfg.follow and (not models.is_dir() or not model_files(models)):
        raise EvalError(f"model_dir={models}: no {MODEL_PREFIX}<t> files "
                        f"({'no such folder' if not models.exists() else 'empty'}); follow=true waits for them")
    out = _path(cfg.out) or run_dir / "eval.jsonl"
    check_out(out, run_dir, models)
    _check_out_folder(out, run_dir, run_digest)
    return Target(run_dir, run_cfg, models, out, run_digest)


def _check_out_folder(out: Path, run_dir: Path, run_digest: str) -> None:
    """Records put into the folder of another run are read as that run's (analysis.load reads its eval.jsonl):
    refused, unless that folder holds a run of this same config (a copy: the same numbers)."""
    folder = Path(os.path.realpath(out)).parent  # where the records land, through any link
    config = folder / "resolved_config.yaml"
    if folder == run_dir.resolve() or not config.is_file():
        return
    try:
        same = hashlib.sha256(read_small(config).encode()).hexdigest() == run_digest
    except (OSError, ValueError):
        same = False
    if not same:
        raise EvalError(f"out={out}: in the folder of another run ({config} differs from run_dir={run_dir}'s): "
                        f"analysis would read its records as that run's; give another out=")


def foreign_weights(run_dir: Path, models: Path, run_cfg: DictConfig) -> str | None:
    """The job folder of another run whose weights ``models`` holds, or None. The trainer claims a weights folder
    for its job folder (``models/.detox_run``); a folder claimed by another job folder is that run's unless the
    other folder holds a run of this same config (a copy: the same weights). The default layout of a run without
    model_dir, ``<run_dir>/models``, travels with its folder (a moved or copied run) and is always the run's."""
    if run_cfg.get("model_dir") is None and models.resolve() == (run_dir / "models").resolve():
        return None
    try:
        owner = Path(read_small(models / MODEL_OWNER).strip())
    except (OSError, ValueError):  # unclaimed (written by older code, or the run has not started yet)
        return None
    if not str(owner) or owner.resolve() == run_dir.resolve():
        return None
    try:
        same = read_small(owner / "resolved_config.yaml") == read_small(run_dir / "resolved_config.yaml")
    except (OSError, ValueError):  # the owner's folder is gone (moved): nothing says the config differs
        return None
    return None if same else str(owner)


def check_out(out: Path, run_dir: Path | None, models: Path | None) -> None:
    """Refuse an ``out=`` the records cannot go to (before any work): a folder, a missing or read-only folder, or a
    file of the run itself."""
    if out.exists() and not out.is_file():
        raise EvalError(f"out={out}: not a file (give the file for the records, e.g. <run_dir>/eval.jsonl)")
    if not out.parent.is_dir():
        raise EvalError(f"out={out}: its folder {out.parent} does not exist")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise EvalError(f"out={out}: not writable here")
    where = out.resolve()
    if where.name.endswith(SETTINGS_SUFFIX):
        raise EvalError(f"out={out}: the settings file kept next to a records file, not a records file (the "
                        f"default is <run_dir>/eval.jsonl)")
    run_file = where.name in RUN_FILES or where.name == MODEL_OWNER or where.name.startswith(MODEL_PREFIX)
    in_run = run_dir is not None and where.parent == run_dir.resolve()
    # the weights folder holds nothing else, unless it is the run's folder itself (model_dir=<its job folder>)
    in_models = models is not None and where.parent == models.resolve()
    if (in_run and run_file) or (in_models and (run_file or not in_run)):
        raise EvalError(f"out={out}: a file of the run itself, not a records file (the default is "
                        f"<run_dir>/eval.jsonl)")


def run_ended(run_dir: Path) -> bool:
    """The run wrote its final summary (detox.train writes one however it ends, a kill -9 aside: see ``timeout``)."""
    try:
        return json.loads(read_small(run_dir / "summary.json")).get("status") in ENDED
    except (OSError, ValueError, AttributeError):
        return False


def _is_record(line: str) -> bool:
    """A line this evaluator writes: a JSON object of exactly the evaluation keys, with a step number."""
    try:
        rec = json.loads(line)
    except ValueError:
        return False
    return (isinstance(rec, dict) and set(rec) == set(EVAL_KEYS) and isinstance(rec["step"], int)
            and not isinstance(rec["step"], bool) and rec["step"] >= 0)


def _shown_settings(values: Mapping[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={'null' if values.get(k) is None else values.get(k)}" for k in keys)


def _settings_problem(values: object) -> str | None:
    """Why the content of a settings file is not one this evaluator writes, or None."""
    if not isinstance(values, dict) or set(values) != {*EVAL_SETTINGS, RUN_DIGEST}:
        return f"no object of {', '.join([*EVAL_SETTINGS, RUN_DIGEST])}"
    batch, device, threads, digest = (values[k] for k in (*EVAL_SETTINGS, RUN_DIGEST))
    if (SCHEMA["eval_batch_size"].error(batch) or SCHEMA["device"].error(device)
            or (threads is not None and SCHEMA["threads"].error(threads))  # null: the run's threads=null
            or not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest))):
        return "a value of another type or form than this evaluator writes"
    return None


class Records:
    """The records file, held under an OS lock (``flock``) while this evaluator writes it: a second evaluator on
    the same file is refused (it would evaluate and record every step again), and the lock goes with the process
    however it ends. ``done`` holds the steps already recorded.

    ``settings``: what this evaluation uses (``EVAL_SETTINGS`` and ``RUN_DIGEST``), kept in ``<out>.settings.json``
    before the first record is appended; records already in the file that were made with other settings (or of
    another run) refuse the file (EvalError, one line naming each setting and both values), before anything in it
    changes. ``own``: the run's own settings, which records of an older evaluator (no settings file) are taken to
    have. Without ``settings`` (None) nothing is compared or kept."""

    def __init__(self, out: Path, settings: Mapping[str, Any] | None = None,
                 own: Mapping[str, Any] | None = None) -> None:
        self.out, self.created = out, not out.exists()
        # the real file's name: two names of one records file (a link) share its settings file as they share its lock
        self.side = settings_path(Path(os.path.realpath(out)))
        self.settings = dict(settings) if settings is not None else None
        self.unsaved, self.saved = False, False  # the settings file: still to write before a record / written here
        try:  # non-blocking: a fifo swapped in after check_out's look opens at once, and is refused below
            self.fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o644)
        except OSError as err:
            raise EvalError(f"out={out}: cannot be opened ({err.strerror})") from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise EvalError(f"out={out}: not a file (give the file for the records, e.g. <run_dir>/eval.jsonl)")
        os.set_blocking(self.fd, True)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise EvalError(f"out={out}: another evaluator is recording into it now (each step once: let it "
                            f"finish, or give another out=)") from None
        try:
            self.done, count, mend = self._read()
            if self.settings is not None:
                self.unsaved = self._check_settings(count, own)
            mend()  # only once the file is known to be one this evaluation adds to: a refusal leaves it as it was
        except EvalError:
            self.close()
            raise

    def _read(self) -> tuple[set[int], int, Any]:
        """The steps recorded, the number of records, and what mends a torn last line; read line by line, so that a
        file that is not a records file (out= given a data set of GBs) is refused at its first line, not after
        reading it all into memory."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        steps: set[int] = set()
        number, size, rest = 0, 0, b""
        while chunk := os.read(self.fd, 1 << 20):
            size += len(chunk)
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                number += 1
                if not _is_record(self._text(line)):
                    raise EvalError(f"out={self.out}: line {number} is not a record of detox.evaluate; move the "
                                    f"file aside or give another out=")
                steps.add(json.loads(line)["step"])
            if len(rest) > RECORD_BYTES:  # no record is that long
                raise EvalError(f"out={self.out}: line {number + 1} is not a record of detox.evaluate; move the "
                                f"file aside or give another out=")
        torn = self._text(rest)  # no final newline: what an evaluator killed mid-write leaves

        def mend() -> None:
            if torn and _is_record(torn):  # whole but for its newline: kept
                os.write(self.fd, b"\n")
            elif torn:  # its step is evaluated again
                say(f"dropping the torn last line of {self.out} (an evaluator killed while writing it)")
                os.ftruncate(self.fd, size - len(rest))

        if torn and _is_record(torn):
            steps.add(json.loads(torn)["step"])
            number += 1
        return steps, number, mend

    def _check_settings(self, count: int, own: Mapping[str, Any] | None) -> bool:
        """Refuse (EvalError) records made with other settings or of another run; True when the settings file is
        to be (re)written before this evaluation's first record."""
        assert self.settings is not None
        if not count:  # no record to mix with: whatever settings file is there describes nothing
            return True
        its = "its record" if count == 1 else f"its {count} records"
        carry, are, were = ("carries", "is", "was") if count == 1 else ("carry", "are", "were")
        side, theirs, problem = self.side, None, None
        try:
            theirs = json.loads(read_small(side))
            problem = _settings_problem(theirs)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as err:  # a fifo, a folder, a huge file, not UTF-8, not JSON
            problem = f"unreadable ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''})"
        if problem is not None:
            raise EvalError(f"out={self.out}: its settings file {side} is {problem}: the settings of {its} {are} "
                            f"unknown; move both files aside, or give another out=")
        if theirs is None:  # records of an older evaluator: made with the run's own settings unless overridden
            base = dict(own) if own is not None else self.settings
            differ = [k for k in EVAL_SETTINGS if base.get(k) != self.settings.get(k)]
            if differ:
                raise EvalError(f"out={self.out}: {its} {carry} no settings (an older detox.evaluate wrote them, or "
                                f"{side.name} was removed), so they count as made with the run's own "
                                f"{_shown_settings(base, differ)}; this evaluation uses "
                                f"{_shown_settings(self.settings, differ)}, which can change the numbers: give "
                                f"another out= for it")
            say(f"{self.out}: {its} {carry} no settings (an older detox.evaluate wrote them): taken as made with the "
                f"run's own {_shown_settings(base, list(EVAL_SETTINGS))}, which this evaluation uses")
            return True
        if theirs[RUN_DIGEST] != self.settings[RUN_DIGEST]:
            raise EvalError(f"out={self.out}: {its} {are} of another run (its settings file {side} names a "
                            f"resolved_config.yaml of sha256 {theirs[RUN_DIGEST][:12]}, this run's is "
                            f"{str(self.settings[RUN_DIGEST])[:12]}): one run's records per file; give another out=")
        differ = [k for k in EVAL_SETTINGS if theirs[k] != self.settings[k]]
        if differ:
            raise EvalError(f"out={self.out}: {its} {were} made with {_shown_settings(theirs, differ)} ({side}); "
                            f"this evaluation uses {_shown_settings(self.settings, differ)}, which can change the "
                            f"numbers: give {_shown_settings(theirs, differ).replace(', ', ' ')} to add to them, or "
                            f"another out= for these settings")
        return False

    def _text(self, line: bytes) -> str:
        try:
            return line.decode()
        except UnicodeDecodeError:
            raise EvalError(f"out={self.out}: not a records file (not UTF-8 text); move it aside or give another "
                            f"out=") from None

    def _save_settings(self, step: int) -> None:
        try:
            write_text_atomic(self.side, json.dumps(self.settings, indent=2) + "\n")
        except OSError as err:
            raise WriteFailed(f"out={self.out}: cannot write its settings file {self.side} before the record of "
                              f"step {step} ({err.strerror}); the records before it are kept: the same command "
                              f"again evaluates the rest") from None
        self.unsaved, self.saved = False, True

    def append(self, rec: dict) -> None:
        if self.unsaved:  # no record without the settings it was made with
            self._save_settings(rec["step"])
        data = (json.dumps(clean_json(rec)) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            while data:  # O_APPEND: each write lands at the end
                data = data[os.write(self.fd, data):]
        except OSError as err:  # a full disk: no part of the record stays, the records before it do
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                pass  # a torn last line is dropped by the next evaluator
            raise WriteFailed(f"out={self.out}: cannot write the record of step {rec['step']} ({err.strerror}); "
                              f"the records before it are kept: the same command again evaluates the rest") \
                from None

    def close(self) -> None:
        empty = os.fstat(self.fd).st_size == 0
        if self.created and empty:  # nothing recorded: leave no empty file behind
            self.out.unlink(missing_ok=True)
        if self.saved and empty:  # written for a record that never made it
            self.side.unlink(missing_ok=True)
        os.close(self.fd)  # releases the lock


def evaluation_config(t: Target, cfg: DictConfig) -> tuple[DictConfig, Plan]:
    """The run's config with this command's overrides, checked as the trainer checks it (types and ranges: an
    eval_batch_size of 0 or an unknown network is one line, not a traceback after the data set is loaded)."""
    run_cfg = OmegaConf.merge(t.run_cfg, {k: cfg[k] for k in EVAL_SETTINGS if cfg[k] is not None})
    from detox.config import device_problem

    if (why := device_problem(str(run_cfg.device))) is not None:
        raise EvalError(f"device={run_cfg.device}: {why}")
    where = t.run_dir / "resolved_config.yaml"
    try:
        # what the run recorded of what it read (lr_picks_sha256) is no setting: the schema has none of those
        check(OmegaConf.masked_copy(run_cfg, [k for k in run_cfg if k not in RECORD_KEYS]))
        plan = plan_from_cfg(run_cfg)
    except ConfigError as err:
        raise EvalError(f"{where}: {err}") from None
    except Exception as err:
        raise EvalError(f"{where}: not a config this code can evaluate ({type(err).__name__}: {err})") from None
    return run_cfg, plan


class Evaluator:
    """The run's network and data, built once; evaluates one weights file at a time into ``records``."""

    def __init__(self, t: Target, run_cfg: DictConfig, plan: Plan, records: Records) -> None:
        from detox.trainer import setup

        self.t, self.s, self.records = t, setup(run_cfg, plan), records
        self.samples_per_step = plan.units * int(run_cfg.batch_size)  # as the trainer counts them
        state = self.s.model.state_dict()
        self.expected = {k: (v.shape, v.dtype) for k, v in state.items()}
        # a weights file holds these tensors and a little pickle; anything much larger is not one (load_torch_file)
        self.limit = 2 * sum(v.numel() * v.element_size() for v in state.values()) + (1 << 20)

    def _check_state(self, state: object) -> None:
        """Exactly the state_dict the trainer writes for this network: the same keys, shapes and dtypes (a float64
        or int copy would load, converted, and give numbers the run never had)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"a {type(state).__name__}, not a state_dict")
        if set(state) != set(self.expected):
            missing, extra = sorted(set(self.expected) - set(state)), sorted(set(state) - set(self.expected))
            raise ValueError(f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})")
        for k, (shape, dtype) in self.expected.items():
            v = state[k]
            if not isinstance(v, torch.Tensor) or v.shape != shape or v.dtype != dtype:
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{k}: {got}, expected {dtype} {tuple(shape)}")

    def evaluate(self, step: int, path: Path) -> dict | None:
        """The record of one weights file (also appended to eval.jsonl), or None if the file cannot be read."""
        from detox.trainer import evaluate, load_torch_file

        try:
            with warnings.catch_warnings():  # torch warns about some pickle protocols: the one line below says it
                warnings.simplefilter("ignore")
                # weights_only: loading runs no code from the file, whatever it holds; a link (to another run's
                # file, to /dev/zero), a fifo or a compressed archive is refused unread
                state = load_torch_file(path, self.limit, self.s.cfg.device, follow_symlinks=False)
            self._check_state(state)
            if step > int(self.s.cfg.max_steps):  # weights of this network, but never written by this run
                raise ValueError(f"step {step} is past the run's max_steps={self.s.cfg.max_steps}: not its file")
            self.s.model.load_state_dict(state)
        except Exception as err:
            reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            print(f"detox.evaluate: skipping {path}: not weights of network={self.s.cfg.network.name} "
                  f"({type(err).__name__}: {reason})", file=sys.stderr, flush=True)
            return None
        t0 = time.perf_counter()
        ev = evaluate(self.s)
        n_train = len(self.s.data.train_y)
        rec = {"step": step, "epoch": step * self.samples_per_step / n_train, "eval_time": time.perf_counter() - t0,
               "samples": step * self.samples_per_step, **ev}
        rec = {k: rec[k] for k in EVAL_KEYS}
        self.records.append(rec)
        say(f"step {step:5d} | test_loss {rec['test_loss']:.4f} | test_acc {rec['test_acc']:.4f} | "
            f"test_acc5 {rec['test_acc5']:.4f} | {rec['eval_time']:.1f}s")
        return rec


def evaluate_run(cfg: DictConfig) -> int:
    """Evaluate the run's weights files (following it if asked); the exit status: 0, or 1 when a file could not be
    read or ``timeout`` passed without a new file. Raises EvalError / ConfigError for a bad request."""
    check(cfg, SCHEMA)
    if cfg.out is not None:  # an out= that cannot take the records is refused at once, also before a run starts
        check_out(_path(cfg.out), None, None)  # type: ignore[arg-type]
    t = target(cfg)
    start = time.monotonic()
    if t is None:  # following a run that has not started: wait for its config
        run_dir = _path(cfg.run_dir) or _path(cfg.model_dir).parent  # type: ignore[union-attr]
        say(f"waiting for {run_dir / 'resolved_config.yaml'} (the run has not started)")
        while (t := target(cfg)) is None:
            if cfg.timeout is not None and time.monotonic() - start > cfg.timeout:
                say(f"no run appeared in {run_dir} within timeout={cfg.timeout:g} s; giving up")
                return 1
            time.sleep(_nap(cfg, start))
    run_cfg, plan = evaluation_config(t, cfg)  # checked before the records file is touched
    settings = {**{k: run_cfg.get(k) for k in EVAL_SETTINGS}, RUN_DIGEST: t.run_digest}
    own = {k: t.run_cfg.get(k) for k in EVAL_SETTINGS}
    records = Records(t.out, settings, own)  # and that before the data set is loaded
    try:
        return _evaluate_files(cfg, t, Evaluator(t, run_cfg, plan, records), records.done)
    finally:
        records.close()


def _nap(cfg: DictConfig, since: float) -> float:
    """Seconds to sleep before the next look: ``poll``, but never past ``timeout``."""
    if cfg.timeout is None:
        return float(cfg.poll)
    return max(0.0, min(float(cfg.poll), float(cfg.timeout) - (time.monotonic() - since)) + 0.001)


def _evaluate_files(cfg: DictConfig, t: Target, ev: Evaluator, done: set[int]) -> int:
    say(f"run {t.run_dir} (network={t.run_cfg.network.name}, dataset={t.run_cfg.dataset.name}): weights from "
        f"{t.models}, records to {t.out}" + (f"; {len(done)} steps already there" if done else ""))
    evaluated, failed, idle_since, killed, seen_running = 0, 0, time.monotonic(), False, False
    while True:
        # the summary is read before the folder is listed: every file the run wrote before it ended is then seen.
        # A run killed outright writes none, but the OS releases its job lock: once this evaluator has seen the lock
        # held, a free lock and still no summary (read again: a run that ends writes it before letting go) is a
        # killed run
        ended = cfg.follow and run_ended(t.run_dir)
        if cfg.follow and not ended:
            held = lock_held(t.run_dir)
            seen_running = seen_running or held is True
            ended = killed = seen_running and held is False and not run_ended(t.run_dir)
        files = model_files(t.models) if t.models.is_dir() else {}
        for step, path in files.items():
            if step in done:
                continue
            done.add(step)  # an unreadable file is reported once, not retried every poll
            if ev.evaluate(step, path) is None:
                failed += 1
            else:
                evaluated += 1
            idle_since = time.monotonic()
        if not cfg.follow or ended:
            break
        if cfg.timeout is not None and time.monotonic() - idle_since > cfg.timeout:
            say(f"no new weights file in {t.models} for timeout={cfg.timeout:g} s and the run has not ended; "
                f"giving up")
            return 1
        time.sleep(_nap(cfg, idle_since))
    if killed:
        say(f"the run in {t.run_dir} stopped without a summary (no process holds its .lock: killed?); stopping "
            f"(follow it again if it resumes)")
    say(f"evaluated {evaluated} steps" + (f", skipped {failed} unreadable files" if failed else "") +
        f"; records in {t.out}")
    return 1 if failed or killed else 0


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"),
            config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        code = evaluate_run(cfg)
    except (EvalError, ConfigError, DataUnavailable) as err:
        print(f"detox.evaluate: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except WriteFailed as err:
        print(f"detox.evaluate: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print("detox.evaluate: interrupted (Ctrl-C); the records so far are kept: the same command again "
              "evaluates only the steps not yet recorded", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # die of SIGINT, as a shell loop expects
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(130)
    sys.exit(code)


# Hydra reads ``key=a,b`` as a sweep and ``=``/spaces as syntax; a job folder of a sweep is named like
# ``err_mode=alie,method=detox-bulyan``. A path argument is quoted for Hydra, so every folder name works as typed.
_PATH_ARG = re.compile(r"^(\+{0,2})(run_dir|model_dir|out)=(.*)$", re.S)


def _quote_paths(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        m = _PATH_ARG.match(arg)
        quoted = len(m.group(3)) > 1 and m.group(3)[0] == m.group(3)[-1] and m.group(3)[0] in "'\"" if m else True
        if m and m.group(3) and m.group(3) != "null" and not quoted:
            value = m.group(3).replace("\\", "\\\\").replace("'", "\\'")
            arg = f"{m.group(1)}{m.group(2)}='{value}'"
        out.append(arg)
    return out


def cli() -> None:
    """``python -m detox.evaluate``: Hydra's composition errors as one line and exit 2, like detox.train."""
    from detox.train import _hydra_errors_in_one_line

    _hydra_errors_in_one_line("detox.evaluate")
    sys.argv = [sys.argv[0], *_quote_paths(sys.argv[1:])]
    main()


if __name__ == "__main__":
    cli()
