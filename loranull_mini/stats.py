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


# ----------------------------------------------------------------------------- curves of measured points
def matched_cost(steps, losses, costs, target: float) -> float:
    """One run's retention cost where its task loss first reaches `target`, linearly
    interpolated between the two measured checkpoints that bracket it; NaN ("not measured
    near the target") when no two consecutive checkpoints bracket it.

    steps, losses, costs: the run's evaluated checkpoints (step >= 1), in any order. The base
    model (step 0) is not a measured point of the run: a segment from it would be a chord
    from cost 0, so it is refused.
    """
    if any(s <= 0 for s in steps):
        raise ValueError("the base model (step 0) cannot be an end of an interpolated segment: "
                         "pass the run's evaluated checkpoints only")
    order = np.argsort(np.asarray(steps))
    x, y = np.asarray(losses, float)[order], np.asarray(costs, float)[order]
    for i in range(len(x) - 1):
        lo, hi = sorted((x[i], x[i + 1]))
        if lo <= target <= hi:
            if x[i] == x[i + 1]:
                return float(y[i])
            t = (x[i] - target) / (x[i] - x[i + 1])
            return float(y[i] + t * (y[i + 1] - y[i]))
    return math.nan


def _matched_cost_rows(losses: np.ndarray, costs: np.ndarray, target: float) -> np.ndarray:
    """matched_cost for each column of (P, B) losses and costs (checkpoints in step order): (B,)."""
    a, b = losses[:-1], losses[1:]                                        # (P-1, B) segment ends
    hit = ((a - target) * (b - target) <= 0) & np.isfinite(a) & np.isfinite(b)
    first = np.where(hit.any(0), hit.argmax(0), -1)                       # (B,) first bracketing segment
    cols = np.arange(losses.shape[1])
    i = np.clip(first, 0, None)
    x0, x1, y0, y1 = a[i, cols], b[i, cols], costs[:-1][i, cols], costs[1:][i, cols]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(x0 == x1, 0.0, (x0 - target) / (x0 - x1))
    return np.where(first >= 0, y0 + t * (y1 - y0), np.nan)


def seed_costs(seed_curves: list[dict], target: float, n_boot: int, rng: np.random.Generator):
    """Per seed, the matched cost of one method, and its item-resampled replicates.

    seed_curves: per seed {"loss_sum": (P, Nv), "loss_tokens": (Nv,), "cost_sum": (P, Nw),
    "cost_tokens": (Nw,)}, the P evaluated checkpoints in step order (no base point).
    Returns (values (S,), replicates (S, B)); the items are drawn with `rng`, so two methods
    given generators in the same state get the same item draws (paired)."""
    values, replicates = [], []
    for c in seed_curves:
        nv, nw = len(c["loss_tokens"]), len(c["cost_tokens"])
        wv = np.vstack([np.ones(nv), item_weights(nv, n_boot, rng)])      # row 0: the items as measured
        ww = np.vstack([np.ones(nw), item_weights(nw, n_boot, rng)])
        losses = (np.asarray(c["loss_sum"]) @ wv.T) / (np.asarray(c["loss_tokens"]) @ wv.T)  # (P, 1+B)
        costs = (np.asarray(c["cost_sum"]) @ ww.T) / (np.asarray(c["cost_tokens"]) @ ww.T)
        m = _matched_cost_rows(losses, costs, target)
        values.append(m[0])
        replicates.append(m[1:])
    return np.array(values), np.array(replicates)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom (numerical CDF + bisection)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t):
        x = np.linspace(0.0, t, 4001)
        return 0.5 + np.trapezoid(c * (1 + x * x / df) ** (-(df + 1) / 2), x)
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def t_pvalue(t: float, df: int) -> float:
    """Two-sided p-value of a t statistic."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    x = np.linspace(0.0, abs(t), 4001)
    return float(max(0.0, 1 - 2 * np.trapezoid(c * (1 + x * x / df) ** (-(df + 1) / 2), x)))


def seed_interval(per_seed, replicates=None, level: float = 0.95, seed: int = 0) -> dict:
    """The mean over seeds of a per-seed quantity (a matched cost, or a paired difference of
    two methods' matched costs) and its interval, seeds being the experimental unit.

    t: mean +- t_{n-1} sd / sqrt(n). Two-level bootstrap: seeds drawn with replacement, then for
    each drawn seed one of its item-resampled replicates ((S, B), from seed_costs); percentile
    interval. The wider of the two is the interval. NaN where any seed is not measured."""
    v = np.asarray(per_seed, float)
    n = len(v)
    out = {"value": float(v.mean()) if n else math.nan, "n": n}
    if n < 2 or not np.isfinite(v).all():
        return {**out, "low": math.nan, "high": math.nan, "p": math.nan}
    sd = float(v.std(ddof=1))
    half = t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    low, high = out["value"] - half, out["value"] + half
    p = t_pvalue(out["value"] / (sd / math.sqrt(n)), n - 1) if sd > 0 else (0.0 if out["value"] != 0 else 1.0)
    out.update(t_low=low, t_high=high, p=p)
    if replicates is not None:
        r = np.asarray(replicates, float)                                  # (S, B)
        rng = np.random.default_rng(seed)
        s = rng.integers(0, n, size=(r.shape[1], n))                       # seeds, per replicate
        b = rng.integers(0, r.shape[1], size=(r.shape[1], n))              # then items within each seed
        boot = r[s, b].mean(1)
        boot = boot[np.isfinite(boot)]
        if len(boot):
            bl, bh = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
            out.update(boot_low=float(bl), boot_high=float(bh))
            if bh - bl > high - low:
                low, high = float(bl), float(bh)
    return {**out, "low": float(low), "high": float(high)}


def holm_verdicts(comparisons: list[dict], alpha: float = 0.05, interval=None) -> list[str]:
    """Holm's step-down over a report's statements: "yes" (the method's cost is lower), "no"
    (higher), "not shown". comparisons: per statement, its per-seed differences "d" and item
    replicates "replicates" (or None). The i-th smallest p-value is tested at level alpha /
    (k - i), with the wider of its t and bootstrap intervals at that level; once one is not
    shown, every later one is not shown."""
    interval = interval or seed_interval
    k = len(comparisons)
    verdicts = ["not shown"] * k
    tested = [(interval(c["d"], c.get("replicates"))["p"], i) for i, c in enumerate(comparisons)]
    order = sorted((p, i) for p, i in tested if math.isfinite(p))
    for rank, (_, i) in enumerate(order):
        level = 1 - alpha / (k - rank)
        ci = interval(comparisons[i]["d"], comparisons[i].get("replicates"), level=level)
        if ci["high"] < 0:
            verdicts[i] = "yes"
        elif ci["low"] > 0:
            verdicts[i] = "no"
        else:
            break
    return verdicts
