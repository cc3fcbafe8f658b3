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
"""

from __future__ import annotations

import fcntl
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
    writes_models,
)
from detox.schema import DEVICE, PATH, Bool, Int, Num, Str, check

# the evaluation fields of a metrics.jsonl record (detox.trainer.METRIC_KEYS), in that order
EVAL_KEYS = ("step", "epoch", "eval_time", "samples", "test_loss", "test_acc", "test_acc5")
# the statuses summary.json holds once a run has ended (detox.train writes it on every way out)
ENDED = ("completed", "diverged", "failed")

# the longest line a record can be (seven keys and numbers: about 200 bytes)
RECORD_BYTES = 4096
# files of the run folder that are never a records file (out= pointing at one would append into it)
RUN_FILES = ("metrics.jsonl", "summary.json", "resolved_config.yaml", "checkpoint.pt", "train.log", ".lock",
             "model.pt", "mpi.log", "summary.jsonl")

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


def _path(value: Any) -> Path | None:
    return None if value is None else Path(str(value)).expanduser()


def _run_config(run_dir: Path, cfg: DictConfig) -> DictConfig | None:
    """The run's resolved config; None while it does not exist yet (follow: the run has not started). Raises
    EvalError when the folder cannot be a run folder."""
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
    return run_cfg


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
    run_cfg = _run_config(run_dir, cfg)
    if run_cfg is None:
        return None
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
    return Target(run_dir, run_cfg, models, out)


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


class Records:
    """The records file, held under an OS lock (``flock``) while this evaluator writes it: a second evaluator on
    the same file is refused (it would evaluate and record every step again), and the lock goes with the process
    however it ends. ``done`` holds the steps already recorded."""

    def __init__(self, out: Path) -> None:
        self.out, self.created = out, not out.exists()
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
            self.done = self._read()
        except EvalError:
            self.close()
            raise

    def _read(self) -> set[int]:
        """The steps recorded; read line by line, so that a file that is not a records file (out= given a data set
        of GBs) is refused at its first line, not after reading it all into memory."""
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
        if torn and _is_record(torn):  # whole but for its newline: kept
            steps.add(json.loads(torn)["step"])
            os.write(self.fd, b"\n")
        elif torn:  # its step is evaluated again
            say(f"dropping the torn last line of {self.out} (an evaluator killed while writing it)")
            os.ftruncate(self.fd, size - len(rest))
        return steps

    def _text(self, line: bytes) -> str:
        try:
            return line.decode()
        except UnicodeDecodeError:
            raise EvalError(f"out={self.out}: not a records file (not UTF-8 text); move it aside or give another "
                            f"out=") from None

    def append(self, rec: dict) -> None:
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
        if self.created and os.fstat(self.fd).st_size == 0:  # nothing recorded: leave no empty file behind
            self.out.unlink(missing_ok=True)
        os.close(self.fd)  # releases the lock


def evaluation_config(t: Target, cfg: DictConfig) -> tuple[DictConfig, Plan]:
    """The run's config with this command's overrides, checked as the trainer checks it (types and ranges: an
    eval_batch_size of 0 or an unknown network is one line, not a traceback after the data set is loaded)."""
    run_cfg = OmegaConf.merge(t.run_cfg, {k: cfg[k] for k in ("eval_batch_size", "device", "threads")
                                              if cfg[k] is not None})
    from detox.config import device_problem

    if (why := device_problem(str(run_cfg.device))) is not None:
        raise EvalError(f"device={run_cfg.device}: {why}")
    where = t.run_dir / "resolved_config.yaml"
    try:
        check(run_cfg)
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
    records = Records(t.out)  # and that before the data set is loaded
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
