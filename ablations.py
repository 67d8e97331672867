"""The paper's ablation table at toy scale: `python train.py --ablations [--seeds N]`.

Every run of one seed starts from the same weights and sees the same batches (compare.py runs them): NTP, NITP,
and NITP with one piece changed. The table gives each run's final delta against NTP, mean ± std over seeds with
the paired t test's p-value, beside the paper's average downstream score for the same change (its 3B MoE
model: NTP 21.10, NITP 23.58). Our numbers are geometry and loss, not downstream scores: the paper's
column says which way each change went there, not what ours should equal.

One ablation the paper may report we do not have: a cosine regularizer on h that predicts nothing. We could not
read from the paper what exactly it was (which pairs, which sign, which weight), so it is left out.

Writes OUT_DIR/ablations.json and, with matplotlib, OUT_DIR/ablations.png.
"""
import json
import statistics
from pathlib import Path

import compare

# name: (the flags that make the run, from the command line's; the paper's average score for it, or a note)
ABLATIONS = {
    "no stop-gradient": (lambda args: {"nitp_no_stopgrad": True}, 18.23),
    "same-position target": (lambda args: {"nitp_shift": 0}, 18.75),
    "no head": (lambda args: {"nitp_head": "none"}, 20.64),
    "linear head": (lambda args: {"nitp_head": "linear"}, "not in the paper"),
    "MSE loss": (lambda args: {"nitp_loss": "mse"}, 19.38),
    "smooth L1 loss": (lambda args: {"nitp_loss": "smooth_l1"}, "not in the paper"),
    "embedding target": (lambda args: {"nitp_layer": 0}, 20.72),
    # the paper starts NITP late and finds it worse, without saying how late here: we start at half-way
    "start half-way": (lambda args: {"nitp_start": args.max_iters // 2}, "worse than NITP"),
    "λ = 1.4": (lambda args: {"nitp_lambda": 1.4}, "below NTP"),
}
PAPER = {"NTP": 21.10, "NITP": 23.58, **{name: paper for name, (_, paper) in ABLATIONS.items()}}
COLUMNS = [("val_lm", "val loss", "{:.4f}"), ("erank", "eff. rank", "{:.2f}"), ("anisotropy", "anisotropy", "{:.4f}")]


def report(finals: list[dict], seeds: list[int], out_dir: Path) -> dict:
    """finals: per seed, {run name: its final eval record}. Prints the table, saves it as JSON and a plot."""
    table = {}
    for name in finals[0]:
        if name == "NTP":
            continue
        row = {"val_nitp": statistics.mean(f[name]["val_nitp"] for f in finals), "paper": PAPER[name]}
        for key, _, _ in COLUMNS:
            delta = [f[name][key] - f["NTP"][key] for f in finals]
            mean, std = compare.mean_std(delta)
            row[key] = {"delta": delta, "mean": mean, "std": std, "t_test_p": compare.t_test_p(delta),
                        "sign_test_p": compare.sign_test_p(delta)}
        table[name] = row
    n = len(seeds)
    print(f"\nablations: final evaluation, run − NTP, mean ± std over {n} seed{'s' * (n > 1)} ({seeds[0]}-{seeds[-1]}),"
          f" (paired t p)")
    print(f"  {'run':22s}" + "".join(f" {label:>26s}" for _, label, _ in COLUMNS)
          + f" {'NITP loss':>10s}  paper's avg score (NTP {PAPER['NTP']:.2f})")
    for name, row in table.items():
        cells = [compare.plus_minus(row[key]["mean"], row[key]["std"], pattern, compare.signed(pattern))
                 + f" ({compare.fmt(row[key]['t_test_p'], '{:.2f}')})" for key, _, pattern in COLUMNS]
        print(f"  {name:22s}" + "".join(f" {cell:>26s}" for cell in cells) + f" {row['val_nitp']:10.4f}  {row['paper']}")
    (out_dir / "ablations.json").write_text(json.dumps({"seeds": seeds, "table": table}, indent=1))
    plot(table, n, out_dir)
    return table


def plot(table: dict, n_seeds: int, out_dir: Path) -> None:
    """One bar per run and metric: the mean delta against NTP, with the std over seeds as its error bar."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: `pip install matplotlib` to get ablations.png (everything else is in ablations.json)")
        return
    names = list(table)
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(15, 0.45 * len(names) + 1.5), sharey=True)
    for ax, (key, label, _) in zip(axes, COLUMNS):
        means = [table[name][key]["mean"] for name in names]
        errors = [table[name][key]["std"] or 0 for name in names]
        ax.barh(names, means, xerr=errors, color=["C1" if name == "NITP" else "C7" for name in names])
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{label}: run − NTP", fontsize=10)
    axes[0].invert_yaxis()
    fig.suptitle(f"ablations, final evaluation, {n_seeds} seed{'s' * (n_seeds > 1)} (bars: mean, lines: std)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out_dir / "ablations.png", dpi=80)
    print(f"plot: {out_dir / 'ablations.png'}")
