"""The classroom experiment: NTP and NITP side by side, `python train.py --compare [--seeds N]`.

For each seed, the NTP run and the NITP run start from the same initial weights (the backbone is built
before the NITP head, from the same seed) and see the same batches in the same order (one batch generator,
seeded the same). Only the NITP loss differs. While the NITP run trains, each evaluation is printed beside
the NTP run's at the same step. The summary gives the final NITP − NTP deltas, their mean ± std over seeds,
and whether each is larger than the seed-to-seed spread (the larger of the metric's std across the NTP runs
and the delta's own std across seeds).

Everything lands in OUT_DIR: seed<S>-ntp/ and seed<S>-nitp/ (metrics.jsonl, ckpt.pt each), compare.json,
and compare.png when matplotlib is installed.
"""
import argparse
import json
import statistics
from pathlib import Path

import probe
from data import labelled_sections

# --compare trains longer than a plain run: at the 600 steps of train.py's defaults NITP has not yet moved
# the effective rank beyond the seed-to-seed spread; at 1,500 it has (README, "Results at toy scale").
COMPARE_STEPS = 1500


def compare_schedule(args: argparse.Namespace) -> None:
    """--compare's schedule, for each of these flags the command line leaves unset: COMPARE_STEPS steps, a
    tenth of them warm-up and an evaluation every sixth of them (1,500 / 150 / 250), as train.py's own
    defaults are (600 / 60 / 100)."""
    if "max_iters" not in args.explicit:
        args.max_iters = COMPARE_STEPS
    if "warmup_iters" not in args.explicit:
        args.warmup_iters = args.max_iters // 10
    if "eval_interval" not in args.explicit:
        args.eval_interval = max(1, args.max_iters // 6)

METRICS = [("val_lm", "val loss", "{:.4f}"), ("val_nitp", "NITP loss", "{:.4f}"), ("erank", "eff. rank", "{:.2f}"),
           ("anisotropy", "anisotropy", "{:.4f}"), ("ms_per_iter", "ms/iter", "{:.0f}"),
           ("probe_acc", "probe acc", "{:.3f}"), ("retrieval_recall@1", "recall@1", "{:.3f}"),
           ("retrieval_mrr", "MRR", "{:.3f}")]


def fmt(value, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def print_side_by_side(ntp: dict, nitp: dict) -> None:
    print(f"  {'step ' + str(nitp['step']):12s} {'NTP':>10s} {'NITP':>10s} {'delta':>10s}")
    for key, label, pattern in METRICS:
        if key not in ntp and key not in nitp:
            continue
        a, b = ntp.get(key), nitp.get(key)
        delta = fmt(b - a, "{:+" + pattern[2:]) if a is not None and b is not None else "–"
        print(f"  {label:12s} {fmt(a, pattern):>10s} {fmt(b, pattern):>10s} {delta:>10s}")


def plus_minus(mean: float, std: float | None, pattern: str, mean_pattern: str | None = None) -> str:
    return fmt(mean, mean_pattern or pattern) + ("" if std is None else " ± " + fmt(std, pattern))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(finals: list[dict]) -> dict:
    """finals: per seed, {"NTP": final eval record, "NITP": ...}. Prints and returns the summary."""
    n = len(finals)
    print(f"\nsummary: final evaluation, NITP − NTP, over {n} seed{'s' * (n > 1)}")
    print(f"  {'metric':12s} {'NTP':>16s} {'NITP':>16s} {'delta':>17s} {'seed spread':>12s}  delta > spread?")
    summary = {}
    for key, label, pattern in METRICS:
        if any(f["NTP"].get(key) is None or f["NITP"].get(key) is None for f in finals):
            continue  # the NITP loss does not exist for an NTP run
        ntp, nitp = ([f[run][key] for f in finals] for run in ("NTP", "NITP"))
        delta = [b - a for a, b in zip(ntp, nitp)]
        (ntp_mean, ntp_std), (nitp_mean, nitp_std), (d_mean, d_std) = map(mean_std, (ntp, nitp, delta))
        # The seed-to-seed spread: how much the metric moves between seeds (the NTP runs' std) or the delta
        # does (its std over seeds), whichever is larger. A delta inside it could be the seed, not NITP.
        spread = None if ntp_std is None else max(ntp_std, d_std)
        verdict = "n/a (one seed)" if spread is None else ("yes" if abs(d_mean) > spread else "no")
        signed = "{:+" + pattern[2:]
        print(f"  {label:12s} {plus_minus(ntp_mean, ntp_std, pattern):>16s} "
              f"{plus_minus(nitp_mean, nitp_std, pattern):>16s} {plus_minus(d_mean, d_std, pattern, signed):>17s} "
              f"{fmt(spread, pattern):>12s}  {verdict}")
        summary[key] = {"ntp": ntp, "nitp": nitp, "delta_mean": d_mean, "delta_std": d_std,
                        "spread": spread, "larger_than_spread": None if spread is None else abs(d_mean) > spread}
    return summary


def plot(out_dir: Path, seed: int) -> None:
    """One PNG like the paper's Figures 1 and 5: effective rank, anisotropy, NITP loss, val loss over steps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: `pip install matplotlib` to get compare.png (everything else is in compare.json)")
        return
    runs = {name: [json.loads(line) for line in (out_dir / f"seed{seed}-{name.lower()}" / "metrics.jsonl").open()]
            for name in ("NTP", "NITP")}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, title in zip(axes, ("erank", "anisotropy", "nitp", "val_lm"),
                              ("effective rank (last layer)", "anisotropy (last layer)",
                               "NITP training loss", "validation LM loss")):
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            if points:
                ax.plot(*zip(*points), label=name, lw=1 if key == "nitp" else 1.8,
                        color="C0" if name == "NTP" else "C1")  # each run keeps its colour in every panel
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=80)
    print(f"plot: {out_dir / 'compare.png'}")


def compare(args: argparse.Namespace, setup, train) -> None:
    """Run NTP and NITP for args.seeds seeds starting at args.seed; setup/train are train.py's."""
    out_dir = Path(args.out_dir)
    finals, baselines = [], []
    for seed in range(args.seed, args.seed + args.seeds):
        results, models = {}, {}
        for name, use_nitp in (("NTP", False), ("NITP", True)):
            print(f"\n=== seed {seed}: {name} ===")
            run_args = argparse.Namespace(**{**vars(args), "nitp": use_nitp, "seed": seed,
                                             "out_dir": str(out_dir / f"seed{seed}-{name.lower()}")})
            ntp_by_step = {r["step"]: r for r in results.get("NTP", [])}
            show = (lambda r: print_side_by_side(ntp_by_step[r["step"]], r)) if use_nitp else None
            run = setup(run_args)
            results[name], models[name] = train(run, on_eval=show), run["model"]
        # The frozen-representation tasks (probe.py), on each final model, beside the sanity baselines.
        print(f"\n=== seed {seed}: frozen representations ===")
        sections = labelled_sections(args.data, run["dataset"].tokenizer)
        rows = probe.report(models, sections, args.block_size, seed)
        baselines.append({k: v for k, v in rows.items() if k not in models})
        finals.append({name: {**results[name][-1], **rows[name]} for name in models})
    summary = summarize(finals)
    (out_dir / "compare.json").write_text(json.dumps(
        {"seeds": list(range(args.seed, args.seed + args.seeds)), "summary": summary,
         "finals": finals, "probe_baselines": baselines, "args": {k: v for k, v in vars(args).items() if k != "explicit"}}, indent=1))
    print(f"summary: {out_dir / 'compare.json'}")
    plot(out_dir, args.seed)
