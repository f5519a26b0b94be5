"""Properties of lora.py: the init identities, the adapter layer, injection and training."""
import math

import pytest
import torch

import nullspace
from lora import (LoRALinear, inject_lora, lora_layers, lora_state_dict, merge_lora, milora_init, pissa_init,
                  unload_lora, unmerge_lora, vanilla_init)
from nullspace import INITS, inject_adapters
from tests.conftest import random_model

METHODS = ["vanilla", "pissa", "milora", "corda", "null"]
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def random_weight(m=48, n=32, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) / math.sqrt(n)


def random_covariance(n=32, seed=1):
    X = torch.randn(200, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    X = X * torch.logspace(0, -3, n, dtype=torch.float64)   # an anisotropic input distribution
    return X.T @ X / len(X)


def init(method, W, r, alpha, C=None):
    return INITS[method](W, C, r, alpha)


def calibration_covariances(model, n_tokens=(4, 32), seed=0):
    idx = torch.randint(0, model.config.vocab_size, n_tokens, generator=torch.Generator().manual_seed(seed))
    return nullspace.collect_covariances(model, [idx], ALL)


def random_tokens(shape=(2, 16), seed=7, vocab=97):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def train_steps(model, steps=3, lr=1e-2, seed=3):
    """A few AdamW steps of next-token loss on random tokens, on the trainable parameters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        idx = random_tokens((2, 17), seed=seed + step)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ----------------------------------------------------------------------------------------
# The pure inits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("alpha", [4, 16])
def test_init_residual_plus_scaled_product_equals_weight(method, alpha):
    W, C, r = random_weight(), random_covariance(), 4
    A, B, W_res = init(method, W, r, alpha, C)
    assert A.shape == (r, 32) and B.shape == (48, r) and W_res.shape == W.shape
    torch.testing.assert_close(W_res + (alpha / r) * B @ A, W, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_inits_return_float32_factors_and_the_residual_in_the_weights_dtype(method):
    W = random_weight().to(torch.bfloat16)
    A, B, W_res = init(method, W, 4, 8, random_covariance())
    assert A.dtype == B.dtype == torch.float32          # as PEFT: a bf16 A would leave the null space
    assert W_res.dtype == torch.bfloat16


def test_vanilla_init_is_kaiming_uniform_A_zero_B_unchanged_weight():
    W = random_weight()
    A, B, W_res = vanilla_init(W, 4, 8, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(B) == 0 and torch.equal(W_res, W)
    assert A.abs().max() <= 1 / math.sqrt(W.shape[1])           # Kaiming-uniform a=sqrt(5): +-1/sqrt(in)
    assert A.abs().max() > 0.9 / math.sqrt(W.shape[1])
    A2, _, _ = vanilla_init(W, 4, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(A, A2)                                   # the generator makes it reproducible


@pytest.mark.parametrize("alpha", [4, 16])
def test_pissa_adapter_holds_the_largest_singular_triplets(alpha):
    W, r = random_weight(), 4
    s = alpha / r
    A, B, W_res = pissa_init(W, r, alpha)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    top = (U[:, :r] * S[:r]) @ Vh[:r]
    torch.testing.assert_close((s * B @ A).double(), top, atol=1e-6, rtol=0)
    # the factors are balanced: A A^T = B^T B = diag(S_r / s)
    torch.testing.assert_close((A @ A.T).double(), torch.diag(S[:r] / s), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((B.T @ B).double(), torch.diag(S[:r] / s), atol=1e-5, rtol=1e-5)
    # the residual keeps the other singular values
    torch.testing.assert_close(torch.linalg.svdvals(W_res.double())[: 32 - r], S[r:], atol=1e-5, rtol=0)


def test_milora_adapter_holds_the_smallest_singular_triplets():
    W, r, alpha = random_weight(), 4, 8
    A, B, W_res = milora_init(W, r, alpha)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    bottom = (U[:, -r:] * S[-r:]) @ Vh[-r:]
    torch.testing.assert_close((alpha / r * B @ A).double(), bottom, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(W_res.double())[: 32 - r], S[:-r], atol=1e-5, rtol=0)


def test_randomized_pissa_matches_exact_pissa_given_a_spectral_gap():
    m, n, r = 64, 48, 4
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    S = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0]), 0.01 * torch.rand(n - r, generator=g)])
    W = (U * S) @ V.T
    torch.manual_seed(0)                                        # svd_lowrank draws from the global RNG
    A, B, W_res = pissa_init(W, r, r, niter=4)
    A_exact, B_exact, W_res_exact = pissa_init(W, r, r)
    torch.testing.assert_close(B @ A, B_exact @ A_exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(W_res, W_res_exact, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------
# The adapter layer


def nonzero_adapter(seed=0, m=24, n=16, r=4, alpha=8, **kw):
    torch.manual_seed(seed)
    layer = LoRALinear(torch.nn.Linear(n, m, bias=True), r, alpha, **kw)
    with torch.no_grad():
        layer.A.normal_()                                        # the layer starts at A = 0, B = 0 until an init
        layer.B.normal_()                                        # B = 0 would hide most bugs
    return layer


def test_forward_is_base_plus_scaled_low_rank_update():
    layer = nonzero_adapter()
    x = torch.randn(3, 5, 16)
    expected = x @ layer.base.weight.T + layer.base.bias + 2.0 * (x @ layer.A.T) @ layer.B.T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.B @ layer.A)


def test_merge_then_unmerge_restores_the_weight_and_merging_twice_merges_once():
    layer = nonzero_adapter()
    W = layer.base.weight.clone()
    layer.merge()
    merged = layer.base.weight.clone()
    torch.testing.assert_close(merged, W + layer.delta_weight())
    layer.merge()
    assert torch.equal(layer.base.weight, merged)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W, atol=1e-6, rtol=0)
    assert not layer.merged


def test_merged_and_unmerged_layer_compute_the_same_output():
    layer = nonzero_adapter()
    x = torch.randn(7, 16)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)


def test_dropout_acts_on_the_adapter_input_only():
    layer = nonzero_adapter(dropout=0.5).train()
    x = torch.randn(64, 16)
    torch.manual_seed(0)
    noisy = layer(x)
    # in training, the adapter sees dropout(x): the output equals base(x) + s B A dropout(x)
    torch.manual_seed(0)
    mask_scaled = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    by_hand = layer.base(x) + layer.scaling * (x * mask_scaled) @ layer.A.T @ layer.B.T
    torch.testing.assert_close(noisy, by_hand)
    assert not torch.allclose(noisy, layer.eval()(x))           # dropout did something
    # the frozen base path never sees dropout: with B = 0 the output is exactly base(x)
    with torch.no_grad():
        layer.B.zero_()
    assert torch.equal(layer.train()(x), layer.base(x))


def test_bf16_autocast_forward_runs_and_stays_close():
    layer = nonzero_adapter()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.05)


def test_repr_shows_rank_scaling_and_method():
    text = repr(nonzero_adapter())
    assert "r=4" in text and "scaling=2" in text and "residual=False" in text


# ----------------------------------------------------------------------------------------
# Injection into the model


@pytest.mark.parametrize("method", METHODS)
def test_injecting_any_init_leaves_the_logits_unchanged(method):
    idx = random_tokens()
    reference = logits(random_model(), idx)
    model = random_model()
    covariances = calibration_covariances(model)
    layers = inject_adapters(model, ALL, r=4, alpha=8, init=method, covariances=covariances)
    assert len(layers) == 7 * model.config.n_layers
    assert all(layer.has_residual == (method != "vanilla") for layer in layers.values())
    torch.testing.assert_close(logits(model, idx), reference, atol=1e-5, rtol=0)


def test_injection_targets_only_the_named_projections():
    model = random_model()
    layers = inject_lora(model, ("q", "down"), r=2)
    assert sorted(layers) == ["layers.0.attention.wq", "layers.0.feed_forward.w_down",
                              "layers.1.attention.wq", "layers.1.feed_forward.w_down"]
    assert isinstance(model.layers[1].feed_forward.w_down, LoRALinear)
    assert not isinstance(model.layers[1].attention.wk, LoRALinear)


def test_only_adapter_parameters_are_trainable():
    model = random_model()
    inject_lora(model, ALL, r=4)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".A", ".B")) for name in trainable)
    assert len(trainable) == 2 * 7 * model.config.n_layers


@pytest.mark.parametrize("method", ["vanilla", "pissa"])
def test_adamw_steps_change_the_adapter_but_never_the_base_weights(method):
    model = random_model()
    inject_adapters(model, ALL, r=4, alpha=8, init=method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith((".A", ".B")):
            assert not torch.equal(after[key], value), f"{key} did not train"
        else:
            assert torch.equal(after[key], value), f"{key} changed"


@pytest.mark.filterwarnings("ignore:.*rank-deficient")
@pytest.mark.parametrize("method", list(INITS))
def test_freeze_A_keeps_A_bit_identical_and_trains_B(method):
    model = random_model()
    layers = inject_adapters(model, ALL, r=4, init=method, covariances=calibration_covariances(model), freeze_A=True)
    A_before = {name: layer.A.clone() for name, layer in layers.items()}
    B_before = {name: layer.B.clone() for name, layer in layers.items()}
    train_steps(model)
    for name, layer in layers.items():
        assert not layer.A.requires_grad and torch.equal(layer.A, A_before[name])
        assert not torch.equal(layer.B, B_before[name])


@pytest.mark.filterwarnings("ignore")  # fewer calibration tokens than dimensions: by design here
@pytest.mark.parametrize("freeze_A, unchanged", [(True, True), (False, False)])
def test_loranull_v2_training_leaves_outputs_on_calibration_inputs_unchanged(freeze_A, unchanged):
    # 20 calibration tokens < every input dimension, so C has an exact null space. With A
    # frozen inside it, each layer's update dW = s (B - B0) A maps every calibration input to
    # zero; layer by layer, the model computes exactly what it did on the calibration text.
    model = random_model(std=0.1)
    calibration = random_tokens((1, 20), seed=11)
    covariances = nullspace.collect_covariances(model, [calibration], ALL)
    inject_adapters(model, ALL, r=4, alpha=8, init="null", covariances=covariances, freeze_A=freeze_A)
    before = logits(model, calibration)
    train_steps(model, steps=5, lr=3e-2)
    change = (logits(model, calibration) - before).abs().max().item()
    assert (change < 1e-4) == unchanged, change


def test_merged_model_computes_the_same_logits_and_unmerge_restores_it():
    model = random_model()
    inject_adapters(model, ALL, r=4, alpha=8, init="pissa")
    train_steps(model)
    idx = random_tokens()
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("base.weight")}
    unmerged = logits(model, idx)
    merge_lora(model)
    merge_lora(model)
    torch.testing.assert_close(logits(model, idx), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for key, value in base_weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=0)


def test_unloaded_model_has_plain_layers_with_the_fine_tuned_weights():
    model = random_model()
    inject_adapters(model, ALL, r=4, alpha=8, init="milora")
    train_steps(model)
    idx = random_tokens()
    adapted = logits(model, idx)
    unload_lora(model)
    assert not lora_layers(model)
    assert set(model.state_dict()) == set(random_model().state_dict())
    torch.testing.assert_close(logits(model, idx), adapted, atol=1e-5, rtol=0)


def test_lora_state_dict_holds_A_B_and_starting_factors_of_moved_layers():
    model = random_model()
    inject_adapters(model, ("q",), r=2, init="pissa")
    assert sorted(lora_state_dict(model)) == sorted(
        f"layers.{i}.attention.wq.{t}" for i in range(2) for t in ("A", "B", "A0", "B0"))
    model = random_model()
    inject_adapters(model, ("q",), r=2, init="vanilla")
    assert sorted(lora_state_dict(model)) == sorted(f"layers.{i}.attention.wq.{t}" for i in range(2) for t in "AB")


def test_vanilla_injection_is_reproducible_from_the_seed():
    a, b, c = random_model(), random_model(), random_model()
    inject_lora(a, ALL, seed=1), inject_lora(b, ALL, seed=1), inject_lora(c, ALL, seed=2)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.attention.wq.A"], sc["layers.0.attention.wq.A"])


# ----------------------------------------------------------------------------------------
# Bad input


def test_rank_larger_than_the_layer_is_a_clear_error():
    # wk is (n_kv_heads * head_dim, dim) = (32, 64): r = 33 fits wq but not wk
    with pytest.raises(ValueError, match=r"r=33 is too large for layers\.0\.attention\.wk"):
        inject_lora(random_model(), ("q", "k"), r=33)


def test_unknown_init_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown init 'dora'.*'vanilla', 'pissa', 'milora', 'corda', 'null'"):
        inject_adapters(random_model(), init="dora")


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qkv'\]; valid targets: \['q', 'k'"):
        inject_lora(random_model(), ("q", "qkv"))


@pytest.mark.parametrize("method", ["null", "corda"])
def test_covariance_init_without_covariances_is_a_clear_error(method):
    with pytest.raises(ValueError, match=rf"init '{method}' needs the input covariance.*collect_covariances"):
        inject_adapters(random_model(), init=method)
    partial = calibration_covariances(random_model())
    del partial["layers.1.feed_forward.w_down"]
    with pytest.raises(ValueError, match=r"missing for \['layers\.1\.feed_forward\.w_down'\]"):
        inject_adapters(random_model(), init=method, covariances=partial)


def test_injecting_twice_is_a_clear_error():
    model = random_model()
    inject_lora(model, ("q",))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_lora(model, ("q",))


def test_initialize_uses_the_given_residual_and_refuses_one_off_by_more_than_rounding():
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    A, B, W_res = pissa_init(W, 4, 8)
    layer = LoRALinear(torch.nn.Linear(16, 24, bias=False), 4, 8)
    layer.base.weight.data.copy_(W)
    nudged = W_res + 2 * torch.finfo(W.dtype).eps * W_res.abs().max()  # a rounding's worth: used as given
    layer.initialize(A, B, nudged)
    assert torch.equal(layer.base.weight, nudged) and layer.has_residual
    wrong = LoRALinear(torch.nn.Linear(16, 24, bias=False), 4, 8)
    wrong.base.weight.data.copy_(W)
    with pytest.raises(ValueError, match="more than rounding"):
        wrong.initialize(A, B, W_res + 1e-3)
    assert torch.equal(wrong.base.weight, W) and not wrong.has_residual
