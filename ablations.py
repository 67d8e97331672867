"""The paper's ablation table at toy scale: `python ablations.py [--seeds N] [train.py's flags]`.

Every run of one seed starts from the same weights and sees the same batches (compare.py runs them): NTP, NITP,
and NITP with one piece changed. The table gives each run's final difference to NTP, paired by seed, as a mean
with its 95% interval, beside the paper's average downstream score for the same change (its 3B MoE model: NTP
21.10, NITP 23.58); a second table gives each ablation's difference to NITP itself. Our numbers are geometry and
loss, not downstream scores: the paper's column says which way each change went there, not what ours should
equal. A table tests many differences at once (30 cells against NTP, 27 against NITP), so each table's cells are
read through Holm's correction over its cells: a cell marked * keeps its direction after it; the others are
description only, whatever their own interval says.

One ablation the paper may report we do not have: a cosine regularizer on h that predicts nothing. We could not
read from the paper what exactly it was (which pairs, which sign, which weight), so it is left out.

Writes OUT_DIR/seed<S>-<run>/ for every run, OUT_DIR/compare.json (the runs' final evaluations, as compare.py
writes it), OUT_DIR/ablations.json and, with matplotlib, OUT_DIR/ablations.png.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import compare
import stats
import train
from machinery import check_out_dir, fail
from machinery import printable_output

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
def changes(args: argparse.Namespace) -> dict[str, dict]:
    """The runs of one seed, as changes to train.py's flags: NTP, NITP, and NITP with each ablation switch."""
    return {"NTP": {"nitp": False}, "NITP": {"nitp": True},
            **{name: {"nitp": True, **switch(args)} for name, (switch, _) in ABLATIONS.items()}}


PAPER = {"NTP": 21.10, "NITP": 23.58, **{name: paper for name, (_, paper) in ABLATIONS.items()}}
COLUMNS = [("val_lm", "val loss", "{:.4f}"), ("erank", "eff. rank", "{:.2f}"), ("anisotropy", "anisotropy", "{:.4f}")]


def report(finals: list[dict], seeds: list[int], out_dir: Path) -> dict:
    """finals: per seed, {run name: its final eval record}. Prints the table, saves it as JSON and a plot.

    Each row holds, per metric, the run's paired difference to NTP and, for the ablations, to NITP, each with its
    95% interval over seeds: "the same-position target raises the rank more than NITP" is a sentence only when the
    interval of (same-position − NITP) excludes 0."""
    table = {}
    for name in finals[0]:
        if name == "NTP":
            continue
        row = {"val_nitp": statistics.mean(f[name]["val_nitp"] for f in finals), "paper": PAPER[name]}
        for key, _, _ in COLUMNS:
            row[key] = {"delta": [f[name][key] - f["NTP"][key] for f in finals]}
            row[key].update(stats.paired(row[key]["delta"]))
            if name != "NITP":
                against = [f[name][key] - f["NITP"][key] for f in finals]
                row[key]["vs_nitp"] = {"delta": against, **stats.paired(against)}
        table[name] = row
    correct_cells(table)
    n = len(seeds)
    for against, title in (("NTP", "run − NTP"), ("NITP", "ablation − NITP")):
        print(f"\nablations: final evaluation, {title}, mean [95% interval] over {n} seed{'s' * (n > 1)} "
              f"({compare.seed_list(seeds)})")
        print(f"  {'run':22s}" + "".join(f" {label:>28s}" for _, label, _ in COLUMNS)
              + (f" {'NITP loss':>10s}  paper's avg score (NTP {PAPER['NTP']:.2f})" if against == "NTP" else ""))
        for name, row in table.items():
            if against == "NITP" and name == "NITP":
                continue
            cells = [cell(row[key] if against == "NTP" else row[key]["vs_nitp"], pattern)
                     for key, _, pattern in COLUMNS]
            print(f"  {name:22s}" + "".join(f" {text:>28s}" for text in cells)
                  + (f" {row['val_nitp']:10.4f}  {row['paper']}" if against == "NTP" else ""))
    print("  (* the cell's direction survives Holm's correction over its table's cells, at 5%; the other cells "
          "describe, they do not settle)")
    (out_dir / "ablations.json").write_text(json.dumps({"seeds": seeds, "table": table}, indent=1))
    plot(table, n, out_dir)
    return table


def correct_cells(table: dict) -> None:
    """Holm's correction over the cells of each table (run − NTP; ablation − NITP): each cell gets its corrected p
    ("holm_p") and whether its direction survives it at 5% ("survives")."""
    for against in ("NTP", "NITP"):
        cells = [row[key] if against == "NTP" else row[key]["vs_nitp"] for name, row in table.items()
                 for key, _, _ in COLUMNS if against == "NTP" or name != "NITP"]
        for found, corrected in zip(cells, stats.holm([found["t_test_p"] for found in cells])):
            found["holm_p"], found["survives"] = corrected, corrected is not None and corrected < 0.05


def cell(found: dict, pattern: str) -> str:
    """"+1.32 [+1.17, +1.47] *": the mean and its interval, starred when its direction survives Holm's correction."""
    return compare.interval(found, pattern) + (" *" if found["survives"] else "  ")


def plot(table: dict, n_seeds: int, out_dir: Path) -> None:
    """One bar per run and metric: the mean difference to NTP, with its 95% interval over seeds as the error bar."""
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
        means = [table[name][key]["mean"] if table[name][key]["mean"] is not None else float("nan") for name in names]
        errors = [table[name][key]["half_width"] or 0 for name in names]
        ax.barh(names, means, xerr=errors, color=["C1" if name == "NITP" else "C7" for name in names])
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{label}: run − NTP", fontsize=10)
    axes[0].invert_yaxis()
    fig.suptitle(f"ablations, final evaluation, {n_seeds} seed{'s' * (n_seeds > 1)} (bars: mean, lines: 95% interval)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out_dir / "ablations.png", dpi=80)
    print(f"plot: {out_dir / 'ablations.png'}")


def ablations(args: argparse.Namespace) -> None:
    """Train every run for args.seeds seeds; the summary of NITP − NTP, the table, the plot, compare.json."""
    started = time.perf_counter()
    finals, _, _ = compare.train_seeds(args, changes(args), probe_them=False)
    summary = compare.summarize(finals)
    t0 = time.perf_counter()
    table = report(finals, [final["NTP"]["seed"] for final in finals], Path(args.out_dir))
    seconds = compare.account(args, finals, started, plot=time.perf_counter() - t0)
    compare.save(args, finals, summary=summary, ablations=table, seconds=seconds)


def main(argv: list[str] | None = None) -> None:
    parser = compare.make_experiment_parser("The paper's ablation table: NTP, NITP and NITP with each ablation "
                                            "switch, over seeds.", "ablations.py")
    args = compare.parse_args(argv, parser)
    try:
        check_out_dir(args.out_dir)
        for settings in compare.arms(args, args.seed, changes(args)).values():  # every run checked before the first
            train.setup(settings)
    except ValueError as e:
        fail(str(e), program="ablations.py")
    compare.run_or_exit(ablations, args, "ablations.py")


if __name__ == "__main__":
    printable_output()  # before anything prints: a console that cannot hold a character must not crash
    main()
