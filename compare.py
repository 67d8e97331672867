"""The classroom experiment: NTP and NITP side by side, `python train.py --compare [--seeds N]`.

For each seed, the NTP run and the NITP run start from the same initial weights (the backbone is built
before the NITP head, from the same seed) and see the same batches in the same order (one batch generator,
seeded the same). Only the NITP loss differs. Both use train.py's own defaults: `python train.py --nitp` is
the NITP half of seed 1337. While the NITP run trains, each evaluation is printed beside the NTP run's at the
same step. The summary gives the final NITP − NTP deltas, their mean ± std over seeds, and whether each is
larger than the seed-to-seed spread (the larger of the metric's std across the NTP runs and the delta's own
std across seeds), then one line in plain words per claim.

Everything lands in OUT_DIR: seed<S>-ntp/ and seed<S>-nitp/ (metrics.jsonl, ckpt.pt each), compare.json,
and compare.png when matplotlib is installed.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import probe
import train
from data import labelled_sections

# key in the eval records, label, format, and which direction the paper says NITP moves it (None: no claim)
METRICS = [("val_lm", "val loss", "{:.4f}", "not worse"), ("val_nitp", "NITP loss", "{:.4f}", None),
           ("erank", "eff. rank", "{:.2f}", "higher"), ("anisotropy", "anisotropy", "{:.4f}", "lower"),
           ("ms_per_iter", "ms/iter", "{:.0f}", None), ("probe_acc", "probe acc", "{:.3f}", "higher"),
           ("retrieval_recall@1", "recall@1", "{:.3f}", "higher"), ("retrieval_mrr", "MRR", "{:.3f}", "higher")]


def fmt(value, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def signed(pattern: str) -> str:
    return "{:+" + pattern[2:]


def print_side_by_side(ntp: dict, nitp: dict) -> None:
    print(f"  {'step ' + str(nitp['step']):12s} {'NTP':>10s} {'NITP':>10s} {'delta':>10s}")
    for key, label, pattern, _ in METRICS:
        if key not in ntp and key not in nitp:
            continue
        a, b = ntp.get(key), nitp.get(key)
        delta = fmt(b - a, signed(pattern)) if a is not None and b is not None else "–"
        print(f"  {label:12s} {fmt(a, pattern):>10s} {fmt(b, pattern):>10s} {delta:>10s}")


def plus_minus(mean: float, std: float | None, pattern: str, mean_pattern: str | None = None) -> str:
    return fmt(mean, mean_pattern or pattern) + ("" if std is None else " ± " + fmt(std, pattern))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def verdict(label: str, claim: str, delta: list[float], d_mean: float, d_std: float | None,
            spread: float | None, pattern: str) -> str:
    """One line in plain words: "eff. rank: NITP higher in 3 of 3 seeds, +4.78 ± 1.59, 3.0× the seed spread: as
    the paper says". claim: "higher" or "lower" (the paper's direction), or "not worse" for a loss."""
    n, higher, lower = len(delta), sum(d > 0 for d in delta), sum(d < 0 for d in delta)
    counted = f"NITP higher in {higher} of {n} seeds" if claim == "higher" else f"NITP lower in {lower} of {n} seeds"
    size = plus_minus(d_mean, d_std, pattern, signed(pattern))
    if spread is None:
        return f"{label}: {counted}, {size} (one seed: no spread to compare with)"
    ratio = abs(d_mean) / spread if spread > 0 else float("inf")
    against = f"{ratio:.1f}× the seed spread" if ratio >= 1 else f"within the seed spread ({fmt(spread, pattern)})"
    if claim == "not worse":
        return f"{label}: {counted}, {size}, {against}: NITP {'not worse' if d_mean <= 0 or ratio < 1 else 'WORSE'}"
    held = (d_mean > 0 if claim == "higher" else d_mean < 0) and ratio >= 1
    return f"{label}: {counted}, {size}, {against}: {'as the paper says' if held else 'not shown here'}"


def summarize(finals: list[dict]) -> dict:
    """finals: per seed, {"NTP": final eval record, "NITP": ...}. Prints and returns the summary."""
    n = len(finals)
    print(f"\nsummary: final evaluation, NITP − NTP, over {n} seed{'s' * (n > 1)}")
    print(f"  {'metric':12s} {'NTP':>16s} {'NITP':>16s} {'delta':>17s} {'seed spread':>12s}  delta > spread?")
    summary, lines = {}, []
    for key, label, pattern, claim in METRICS:
        if any(f["NTP"].get(key) is None or f["NITP"].get(key) is None for f in finals):
            continue  # the NITP loss does not exist for an NTP run
        ntp, nitp = ([f[run][key] for f in finals] for run in ("NTP", "NITP"))
        delta = [b - a for a, b in zip(ntp, nitp)]
        (ntp_mean, ntp_std), (nitp_mean, nitp_std), (d_mean, d_std) = map(mean_std, (ntp, nitp, delta))
        # The seed-to-seed spread: how much the metric moves between seeds (the NTP runs' std) or the delta
        # does (its std over seeds), whichever is larger. A delta inside it could be the seed, not NITP.
        spread = None if ntp_std is None else max(ntp_std, d_std)
        beyond = "n/a (one seed)" if spread is None else ("yes" if abs(d_mean) > spread else "no")
        print(f"  {label:12s} {plus_minus(ntp_mean, ntp_std, pattern):>16s} "
              f"{plus_minus(nitp_mean, nitp_std, pattern):>16s} {plus_minus(d_mean, d_std, pattern, signed(pattern)):>17s} "
              f"{fmt(spread, pattern):>12s}  {beyond}")
        summary[key] = {"ntp": ntp, "nitp": nitp, "delta_mean": d_mean, "delta_std": d_std,
                        "spread": spread, "larger_than_spread": None if spread is None else abs(d_mean) > spread}
        if claim is not None:
            lines.append(verdict(label, claim, delta, d_mean, d_std, spread, pattern))
    print("\nin plain words:")
    for line in lines:
        print("  " + line)
    summary["verdicts"] = lines
    return summary


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def plot(out_dir: Path, seeds: list[int], nitp_layer: int, summary: dict) -> None:
    """One PNG with every seed, like the paper's Figures 1 and 5 plus one panel of our own: effective rank,
    anisotropy, NITP loss and validation loss over the steps, and effective rank by layer at the end. Thin
    lines are seeds, bold lines their mean; the title gives the final deltas."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: `pip install matplotlib` to get compare.png (everything else is in compare.json)")
        return
    runs = {name: [read_metrics(out_dir / f"seed{seed}-{name.lower()}") for seed in seeds] for name in ("NTP", "NITP")}
    last_step = max(r["step"] for r in runs["NTP"][0])
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.9))
    panels = [("erank", "effective rank (last layer)", True), ("anisotropy", "anisotropy (last layer)", True),
              ("nitp", "NITP training loss", False), ("val_lm", "validation LM loss", True)]
    for ax, (key, title, at_evals) in zip(axes, panels):
        for name, color in (("NTP", "C0"), ("NITP", "C1")):
            curves = [[(r["step"], r[key]) for r in records if bool(r.get("eval")) == at_evals
                       and r.get(key) is not None and (key != "val_lm" or r["step"] >= last_step * 0.3)]
                      for records in runs[name]]  # the loss from 30% on: earlier values would hide the gap
            if not curves[0]:
                continue
            for curve in curves:
                ax.plot(*zip(*curve), color=color, lw=0.6, alpha=0.5)
            steps = [s for s, _ in curves[0]]
            mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, color=color, lw=2, label=f"{name} (mean of {len(curves)})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    ax = axes[-1]  # where in the depth: effective rank of each block's output at the final evaluation
    for name, color in (("NTP", "C0"), ("NITP", "C1")):
        finals = [[r for r in records if r.get("eval")][-1] for records in runs[name]]
        by_layer = [f["erank_by_layer"] + [f["erank"]] for f in finals]  # embeddings, blocks 1..n, after ln_f
        for values in by_layer:
            ax.plot(values, color=color, lw=0.6, alpha=0.5, marker=".")
        ax.plot([statistics.mean(v) for v in zip(*by_layer)], color=color, lw=2, marker="o", label=name)
    n_layer = len(by_layer[0]) - 2
    ax.axvline(nitp_layer, color="gray", ls="--", lw=1)
    ax.text(nitp_layer, ax.get_ylim()[1], " NITP target", fontsize=8, va="top", color="gray")
    ax.set_xticks(range(n_layer + 2), ["emb"] + [str(i) for i in range(1, n_layer + 1)] + ["ln_f"])
    ax.set_title("effective rank by layer (final step)", fontsize=10)
    ax.set_xlabel("block output")
    ax.legend(fontsize=8, loc="lower right")
    deltas = [f"{label} {plus_minus(summary[key]['delta_mean'], summary[key]['delta_std'], pattern, signed(pattern))}"
              + ("" if not summary[key]["spread"] else f" ({abs(summary[key]['delta_mean']) / summary[key]['spread']:.1f}× the seed spread)")
              for key in ("erank", "anisotropy", "val_lm") for k, label, pattern, _ in METRICS if k == key]
    fig.suptitle(f"NITP − NTP at the last step, {len(seeds)} seed{'s' * (len(seeds) > 1)}: " + "; ".join(deltas),
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=80)
    print(f"plot: {out_dir / 'compare.png'}")


def run_args(args: argparse.Namespace, seed: int) -> dict[str, argparse.Namespace]:
    """The settings of one seed's runs, by name: train.py's own, with NITP off and on, each in its folder."""
    return {name: argparse.Namespace(**{**vars(args), "nitp": use_nitp, "seed": seed, "compare": False,
                                        "out_dir": str(Path(args.out_dir) / f"seed{seed}-{name.lower()}")})
            for name, use_nitp in (("NTP", False), ("NITP", True))}


def compare(args: argparse.Namespace) -> None:
    """Run NTP and NITP for args.seeds seeds starting at args.seed."""
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    seeds = list(range(args.seed, args.seed + args.seeds))
    finals, baselines, probe_s = [], [], 0.0
    for seed in seeds:
        results, models = {}, {}
        for name, settings in run_args(args, seed).items():
            print(f"\n=== seed {seed}: {name} ===")
            ntp_by_step = {r["step"]: r for r in results.get("NTP", [])}
            show = (lambda r: print_side_by_side(ntp_by_step[r["step"]], r)) if settings.nitp else None
            if args.compile:  # each run compiles its own model, and its ms/iter includes that, as on its own
                torch._dynamo.reset()
            run = train.setup(settings)
            results[name], models[name] = train.train(run, on_eval=show, sample=False), run.model
        # The frozen-representation tasks (probe.py), on each final model, beside the sanity baselines.
        print(f"\n=== seed {seed}: frozen representations ===")
        t0 = time.perf_counter()
        sections = labelled_sections(args.data, run.dataset.tokenizer)
        # the baselines (a random network, a bag of tokens) tell the same story for every seed: once is enough
        rows = probe.report(models, sections, args.block_size, seed, baselines=seed == seeds[0])
        probe_s += time.perf_counter() - t0
        baselines.append({k: v for k, v in rows.items() if k not in models})
        # ms/iter over the whole run (an eval record holds only the steps since the evaluation before it)
        finals.append({name: {**results[name][-1], **rows[name], "ms_per_iter": statistics.mean(
            r["ms"] for r in read_metrics(out_dir / f"seed{seed}-{name.lower()}") if not r.get("eval"))}
            for name in models})
    summary = summarize(finals)
    t0 = time.perf_counter()
    plot(out_dir, seeds, run.nitp.layer, summary)  # run: the last NITP run
    # Where the time went: training steps and evaluations from the runs' own logs, the rest measured here
    records = [r for seed in seeds for name in ("ntp", "nitp") for r in read_metrics(out_dir / f"seed{seed}-{name}")]
    seconds = {"training steps": sum(r["ms"] for r in records if not r.get("eval")) / 1000,
               "evaluations": sum(r["eval_s"] for r in records if r.get("eval")), "probes": probe_s,
               "plot": time.perf_counter() - t0}
    seconds["other (set-up, checkpoints, summary)"] = time.perf_counter() - started - sum(seconds.values())
    total = sum(seconds.values())
    print(f"time: {total:.0f} s = " + ", ".join(f"{k} {v:.1f} s ({v / total:.0%})" for k, v in seconds.items()))
    (out_dir / "compare.json").write_text(json.dumps(
        {"seeds": seeds, "summary": summary, "finals": finals, "probe_baselines": baselines,
         "seconds": seconds, "args": vars(args)}, indent=1))
    print(f"summary: {out_dir / 'compare.json'}")
