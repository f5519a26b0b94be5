"""Shared fixtures: a tiny random LLaMA with grouped-query attention."""
import os

# Before torch loads: spinning OpenMP threads slow everything down on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import pytest
import torch

from model import ModelConfig, Transformer

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=128, max_seq_len=64)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def random_model(seed: int = 0, std: float = 0.02, **overrides) -> Transformer:
    """A tiny model with random weights; a larger std gives less repetitive greedy text."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides))
    if std != 0.02:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, std)
    return model.eval()


@pytest.fixture
def tiny_model():
    return random_model()
