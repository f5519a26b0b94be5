"""The figures of docs/TUTORIAL.md, made on the toy model: python -m loranull_mini.tutorial_figures

    spectrum.png  the eigenvalues of two calibration covariances C = X.T @ X / N, with the r
                  smallest (the null basis LoRA-Null's A is built from) marked
    energy.png    the share of the calibration energy that each init's A reads,
                  trace(P_A C) / trace(C), on one layer, against its least and largest possible values

The toy model ships with the package and its calibration text is the facts of the toy world
(loranull_mini/toy.py), so the figures come out the same on every machine in a few seconds.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads hurt a busy machine
import torch  # noqa: E402

import nullspace  # noqa: E402
from loranull_mini import toy  # noqa: E402
from loranull_mini.data import collate, encode_qa  # noqa: E402
from loranull_mini.files import save_figure  # noqa: E402

METHODS = {"vanilla": "LoRA", "pissa": "PiSSA", "milora": "MiLoRA", "corda": "CorDA-KPA", "null": "LoRA-Null"}
ENERGY_LAYER = "layers.0.attention.wq"                                   # the layer of energy.png
SPECTRUM_LAYERS = ("layers.0.attention.wq", "layers.1.feed_forward.w_down")


def toy_covariances(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The toy model of world `seed` and the input covariance of every projection over its calibration facts."""
    model, tok = toy.load_toy_model(seed, log=lambda *args: None)
    batch = collate([encode_qa(tok, f["question"], f["answer"]) for f in toy.calibration_facts(seed)], tok.pad_id)
    return model, nullspace.collect_covariances(model, [(batch["idx"], batch["pad_mask"])])


def captured_energies(W: torch.Tensor, C: torch.Tensor, r: int, alpha: float, seed: int = 0) -> dict[str, float]:
    """{init: trace(P_A C) / trace(C)} for the A of every init in METHODS."""
    energies = {}
    for method in METHODS:
        A, _, _ = nullspace.INITS[method](W, C, r, alpha, generator=torch.Generator().manual_seed(seed))
        energies[method] = nullspace.captured_energy(A, C)
    return energies


def energy_bounds(C: torch.Tensor, r: int) -> tuple[float, float]:
    """The least and the largest share r directions can read: the sums of C's r smallest and r
    largest eigenvalues over the trace (Ky Fan)."""
    eigenvalues = torch.linalg.eigvalsh(C.double())
    return float(eigenvalues[:r].sum() / eigenvalues.sum()), float(eigenvalues[-r:].sum() / eigenvalues.sum())


def plot_spectrum(covariances: dict, r: int, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SPECTRUM_LAYERS), figsize=(8, 3))
    for ax, name in zip(axes, SPECTRUM_LAYERS):
        eigenvalues = torch.linalg.eigvalsh(covariances[name]).clamp_min(0)       # ascending; rounding's < 0 -> 0
        floor = 1e-16 * float(eigenvalues[-1])                                   # rounding level of float64
        shown = eigenvalues.clamp_min(floor).numpy()
        index = range(1, len(shown) + 1)
        ax.semilogy(index, shown, ".", ms=3, color="tab:blue", label="eigenvalues of C (ascending)")
        ax.semilogy(index[:r], shown[:r], "o", ms=4, color="tab:red", label=f"the {r} smallest: LoRA-Null's U")
        ax.axvspan(0.5, r + 0.5, color="tab:red", alpha=0.12)
        ax.axhline(floor, color="gray", lw=0.6, ls=":")
        exact = int((eigenvalues <= floor).sum())
        kind = (f"{exact} zero eigenvalues: the inputs span {len(shown) - exact} of {len(shown)} directions" if exact
                else "no zero eigenvalue: an approximate null space")
        ax.set_title(f"{name}  (n = {len(shown)})\n{kind}", fontsize=8)
        ax.set_xlabel("eigenvalue index", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("eigenvalue", fontsize=8)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Toy model: calibration covariances C = XᵀX / N (dotted: float64 rounding level, zeros drawn there)",
                 fontsize=9)
    return save_figure(fig, path)


def plot_energy(energies: dict, bounds: tuple[float, float], name: str, r: int, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [METHODS[m] for m in energies]
    values = list(energies.values())
    bars = ax.bar(labels, values, color=["tab:gray", "tab:orange", "tab:purple", "tab:green", "tab:red"])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value * 1.15, f"{value:.1e}", ha="center", fontsize=7)
    ax.axhline(bounds[0], color="tab:red", ls="--", lw=0.8, label=f"least possible (C's {r} smallest eigenvalues)")
    ax.axhline(bounds[1], color="black", ls="--", lw=0.8, label=f"largest possible (C's {r} largest)")
    ax.set_yscale("log")
    ax.set_ylim(bounds[0] / 5, 30)
    ax.set_ylabel("trace(P_A C) / trace(C)", fontsize=8)
    ax.set_title(f"Toy model, {name}, r = {r}: the calibration energy A reads at initialisation", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)
    return save_figure(fig, path)


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m loranull_mini.tutorial_figures",
                                     description="Make the figures of docs/TUTORIAL.md on the toy model.")
    parser.add_argument("--out", type=Path, default=Path("docs/tutorial"), help="output folder (default docs/tutorial)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8, as train.py)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16, as train.py)")
    parser.add_argument("--seed", type=int, default=0, help="toy world and vanilla init seed (default 0)")
    args = parser.parse_args(argv)
    model, covariances = toy_covariances(args.seed)
    C, W = covariances[ENERGY_LAYER], model.get_submodule(ENERGY_LAYER).weight.detach()
    energies = captured_energies(W, C, args.rank, args.alpha, args.seed)
    written = [plot_spectrum(covariances, args.rank, args.out / "spectrum.png"),
               plot_energy(energies, energy_bounds(C, args.rank), ENERGY_LAYER, args.rank, args.out / "energy.png")]
    for path in written:
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return written


if __name__ == "__main__":
    main()
