"""Plumbing for loranull-mini: checkpoint formats, tokenizers, asset fetching, datasets."""
