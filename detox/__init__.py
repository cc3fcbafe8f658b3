"""detox: Byzantine-resilient distributed SGD — DETOX and robust aggregation, with Hydra sweeps."""

__version__ = "0.1.0"
