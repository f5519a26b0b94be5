"""Statistics of a study: retention at a matched task loss, with bootstrap intervals.

Each training run leaves points (task loss, retention cost) along its way: one per
evaluated checkpoint, for every learning rate, plus the base model (its task loss, cost 0).
A method's trade-off curve is the lower-left frontier of its points: the least cost seen at
or before reaching each task loss. The headline number is the cost on that curve at a task
loss fixed before the study (linear interpolation between frontier points; NaN when the
method never reached the target).

Uncertainty: a percentile bootstrap over seeds (runs differ in adapter init, data order
and calibration sample) and over evaluation items (the task items behind the loss, the
passages behind the cost), resampled together, the same draws for every method so that
differences between methods are paired.
"""
from __future__ import annotations

import math

import numpy as np


def best_lr(mean_loss: dict[float, float]) -> float | None:
    """The learning rate with the lowest mean loss over seeds (ties to the smaller one);
    None when every one diverged (infinite)."""
    finite = {lr: v for lr, v in mean_loss.items() if math.isfinite(v)}
    return min(finite, key=lambda lr: (finite[lr], lr)) if finite else None


def frontier(losses, costs) -> tuple[np.ndarray, np.ndarray]:
    """The points no other point beats in both loss and cost, by ascending loss (costs then
    strictly decrease)."""
    order = np.lexsort((np.asarray(costs, float), np.asarray(losses, float)))
    xs, ys, best = [], [], math.inf
    for i in order:
        if costs[i] < best:
            xs.append(float(losses[i]))
            ys.append(float(costs[i]))
            best = costs[i]
    return np.array(xs), np.array(ys)


def cost_at(losses, costs, target: float) -> float:
    """The frontier's cost at task loss `target`, linearly interpolated; NaN if no point
    reaches a loss <= target."""
    xs, ys = frontier(losses, costs)
    if len(xs) == 0 or target < xs[0]:
        return math.nan
    if target >= xs[-1]:
        return float(ys[-1])
    return float(np.interp(target, xs, ys))


def item_weights(n_items: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_items) counts of each item in a bootstrap resample (multinomial, sum n_items)."""
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_boot).astype(float)


def bootstrap_mean_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of a mean over items."""
    values = np.asarray(values, float)
    w = item_weights(len(values), n_boot, np.random.default_rng(seed))
    replicates = w @ values / len(values)
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def matched_costs(curves: dict, target: float, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Cost at the target loss for every method, and its bootstrap interval.

    curves: {method: [one entry per seed: {"loss_sum": (P, Nv), "loss_tokens": (Nv,),
              "cost_sum": (P, Nw), "cost_tokens": (Nw,)}]}: P points of that seed (base
             included), per item the summed task NLL and its tokens (Nv items), the summed
             cost (e.g. KL) and its tokens (Nw items). The items and seeds are the same for
             every method (a seed index means the same seed everywhere).
    Returns {method: {"value", "low", "high", "reached" (share of replicates not NaN),
    "replicates" (n_boot,)}}; the replicates of two methods are paired draws.
    """
    rng = np.random.default_rng(seed)
    any_curve = next(iter(curves.values()))[0]
    n_seeds = min(len(seeds) for seeds in curves.values())
    wv = item_weights(len(any_curve["loss_tokens"]), n_boot, rng)
    ww = item_weights(len(any_curve["cost_tokens"]), n_boot, rng)
    seed_draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    out = {}
    for method, seeds in curves.items():
        full = np.array([_cost_at_weights(c, target, np.ones(len(c["loss_tokens"]))[None],
                                          np.ones(len(c["cost_tokens"]))[None])[0] for c in seeds[:n_seeds]])
        per_seed = np.stack([_cost_at_weights(c, target, wv, ww) for c in seeds[:n_seeds]], axis=1)  # (B, S)
        replicates = np.take_along_axis(per_seed, seed_draws, axis=1).mean(axis=1)                   # (B,)
        ok = replicates[~np.isnan(replicates)]
        low, high = (np.quantile(ok, [(1 - level) / 2, (1 + level) / 2]) if len(ok) else (math.nan, math.nan))
        out[method] = {"value": float(full.mean()), "low": float(low), "high": float(high),
                       "reached": float(len(ok) / n_boot), "replicates": replicates}
    return out


def difference(a: dict, b: dict, level: float = 0.95) -> dict:
    """a - b at the matched loss, from paired replicates of matched_costs."""
    d = a["replicates"] - b["replicates"]
    ok = d[~np.isnan(d)]
    low, high = np.quantile(ok, [(1 - level) / 2, (1 + level) / 2]) if len(ok) else (math.nan, math.nan)
    return {"value": a["value"] - b["value"], "low": float(low), "high": float(high),
            "reached": float(len(ok) / len(d))}


def _cost_at_weights(curve: dict, target: float, wv: np.ndarray, ww: np.ndarray) -> np.ndarray:
    """cost_at for each row of item weights: (B,)."""
    losses = (np.asarray(curve["loss_sum"]) @ wv.T) / (np.asarray(curve["loss_tokens"]) @ wv.T)  # (P, B)
    costs = (np.asarray(curve["cost_sum"]) @ ww.T) / (np.asarray(curve["cost_tokens"]) @ ww.T)   # (P, B)
    return np.array([cost_at(losses[:, b], costs[:, b], target) for b in range(losses.shape[1])])
