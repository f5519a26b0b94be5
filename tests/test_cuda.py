"""The same model and adapters on a CUDA device (skipped where there is none)."""
import pytest
import torch

import lora
import nullspace
from model import generate
from tests.conftest import random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3], [40, 41, 42, 43]]


def test_cuda_float32_logits_equal_cpu():
    model = random_model(std=0.3)
    idx = torch.randint(0, 97, (3, 20))
    pad_mask = torch.ones(3, 20, dtype=torch.bool)
    pad_mask[1, :5] = False
    ref, _ = model(idx, pad_mask=pad_mask)
    out, _ = model.cuda()(idx.cuda(), pad_mask=pad_mask.cuda())
    torch.testing.assert_close(out.cpu(), ref, atol=2e-4, rtol=2e-4)


def test_cuda_bfloat16_autocast_is_close_to_float32():
    model = random_model().cuda()
    idx = torch.randint(0, 97, (2, 32), device="cuda")
    ref, _ = model(idx)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = model(idx)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_cuda_generation_with_cache_equals_recomputation():
    model = random_model(std=0.3).cuda()
    assert generate(model, PROMPTS, 16) == generate(model, PROMPTS, 16, use_cache=False)


def test_cuda_lora_null_init_preserves_logits_and_trains_only_adapters():
    model = random_model(std=0.3).cuda()
    idx = torch.randint(0, 97, (4, 32), device="cuda")
    ref, _ = model(idx)
    covs = nullspace.collect_covariances(model, [idx])
    nullspace.inject_adapters(model, r=4, alpha=8, init="null", covariances=covs)
    out, _ = model(idx)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
