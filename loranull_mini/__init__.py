"""Plumbing for loranull-mini: checkpoint formats, tokenizers, asset fetching, datasets."""
import os

# Imported before torch by the scripts (their first import is from this package): spinning
# OpenMP threads slow everything down on a busy machine, and OpenMP reads this when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
