"""Sweep outputs -> pandas DataFrames, the paper's figures and tables (``python -m analysis.report``)."""
