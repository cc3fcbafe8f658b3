"""Entry point: ``python -m detox.train [group=option ...] [key=value ...]`` (Hydra; ``-m`` for sweeps)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from detox.config import ConfigError, validate
from detox.data import DataUnavailable
from detox.engines import ENGINES
from detox.results import base_summary, finished_summary, save_resolved_config, write_json

log = logging.getLogger("detox")

# errors the user can fix from the message alone: one line, no traceback
USER_ERRORS = (ConfigError, DataUnavailable)


def run(cfg: DictConfig, out_dir: Path | None, multirun: bool = False) -> dict:
    """Validate, train with the chosen engine, and leave a summary.json whatever happens."""
    save = out_dir is not None and bool(cfg.save)
    if save and (done := finished_summary(cfg, out_dir)) is not None:
        log.info("skipping: %s already holds a %s run of this exact config (delete its summary.json to rerun)",
                 out_dir, done["status"])
        return done
    if save:
        # an unfinished earlier attempt: its summary is stale; metrics.jsonl is rewritten by the trainer
        # (kept up to the checkpoint it resumes from, if any)
        (out_dir / "summary.json").unlink(missing_ok=True)
        save_resolved_config(cfg, out_dir)
    try:
        plan = validate(cfg)
        summary = ENGINES[cfg.engine.name](cfg, plan, out_dir)
    except Exception as err:
        summary = {**base_summary(cfg), "status": "failed", "error": f"{type(err).__name__}: {err}"}
        if save:
            write_json(out_dir / "summary.json", summary)
        if isinstance(err, USER_ERRORS) and os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()  # asked for the full story
        if isinstance(err, USER_ERRORS):
            print(f"detox: error: {err}", file=sys.stderr)
        else:
            log.error("job failed:\n%s", traceback.format_exc())
        if multirun:  # record it and let the sweep go on
            return summary
        if isinstance(err, USER_ERRORS):
            sys.exit(2)
        raise
    if summary["status"] == "failed" and not multirun:  # e.g. an MPI rank died: the job did not run through
        sys.exit(1)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    summary = run(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN)
    return summary.get("final_test_acc")


if __name__ == "__main__":
    main()
