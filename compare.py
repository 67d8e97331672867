"""The classroom experiment: NTP and NITP side by side, `python train.py --compare [--seeds N] [--equal-compute]`.

For each seed, the NTP run and the NITP run start from the same initial weights (the backbone is built
before the NITP head, from the same seed) and see the same batches in the same order (one batch generator,
seeded the same). Only the NITP loss differs. Both use train.py's own defaults: `python train.py --nitp` is
the NITP half of seed 1337. While the NITP run trains, each evaluation is printed beside the NTP run's at the
same step.

NITP's step costs more than NTP's (its head: 6·12d² FLOPs per token, +22% on the classroom model), so
"equal steps" is not "equal compute". --equal-compute adds a third run per seed: NTP trained for NITP's
training FLOPs, i.e. max_iters × (1 + the analytic overhead) steps on the same batches, with its warm-up and
evaluation interval stretched alike. Its wall-clock time is shown beside, since measured time need not follow
the FLOP count. --ablations (ablations.py) uses the same machinery for the paper's ablations.

The summary gives each final NITP − baseline delta, its mean ± std over seeds, and whether it is larger than
the seed-to-seed spread (the larger of the metric's std across the baseline runs and the delta's own std
across seeds): the verdict's rule, as pre-registered in RESULTS.md. Beside it, the paired statistics over
seeds: a paired t test and an exact sign test, two-sided p-values; with 3 seeds both are weak.

Everything lands in OUT_DIR: seed<S>-<run>/ (metrics.jsonl, ckpt.pt each), compare.json, and compare.png when
matplotlib is installed.
"""
import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

import torch

import ablations
import probe
import train
from data import get_tokenizer, labelled_sections
from evaluate import flops_per_token
from model import GPT
from nitp import NITP

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


def t_test_p(deltas: list[float]) -> float | None:
    """Two-sided p-value of the paired t test that the mean delta is 0 (Student's t with n - 1 degrees of
    freedom, in closed form for an integer df: Abramowitz & Stegun 26.7.3-4). None below 2 seeds."""
    n = len(deltas)
    if n < 2:
        return None
    mean, std = statistics.mean(deltas), statistics.stdev(deltas)
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    df, t = n - 1, abs(mean) / (std / math.sqrt(n))
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    term, series = 1.0, 1.0  # the finite series in cos²θ that A&S give; A(t) = P(|T| < t)
    if df % 2 == 1:
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c * c
            series += term
        inside = 2 / math.pi * (theta + (s * c * series if df > 1 else 0.0))
    else:
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c * c
            series += term
        inside = s * series
    return max(0.0, 1.0 - inside)


def sign_test_p(deltas: list[float]) -> float | None:
    """Two-sided p-value of the exact sign test: how likely this many seeds (or more) agree in sign by chance.
    Zero deltas are dropped. With n seeds it cannot go below 2 / 2^n: 0.25 at 3 seeds."""
    signs = [d > 0 for d in deltas if d != 0]
    n = len(signs)
    if n == 0:
        return None
    fewer = min(sum(signs), n - sum(signs))
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(fewer + 1)) / 2 ** n)


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


def summarize(finals: list[dict], arm: str = "NITP", baseline: str = "NTP", prefix: str = "") -> dict:
    """finals: per seed, {run name: its final eval record}. Prints and returns the summary of arm − baseline;
    prefix goes before each plain-words line ("at equal compute: ")."""
    n = len(finals)
    print(f"\nsummary: final evaluation, {arm} − {baseline}, over {n} seed{'s' * (n > 1)}")
    print(f"  {'metric':12s} {baseline:>18s} {arm:>18s} {'delta':>17s} {'seed spread':>12s}  "
          f"delta > spread?  paired t p  sign p")
    summary, lines = {}, []
    for key, label, pattern, claim in METRICS:
        if any(f[baseline].get(key) is None or f[arm].get(key) is None for f in finals):
            continue  # the NITP loss does not exist for an NTP run
        base, ours = ([f[run][key] for f in finals] for run in (baseline, arm))
        delta = [b - a for a, b in zip(base, ours)]
        (base_mean, base_std), (ours_mean, ours_std), (d_mean, d_std) = map(mean_std, (base, ours, delta))
        # The seed-to-seed spread: how much the metric moves between seeds (the baseline runs' std) or the delta
        # does (its std over seeds), whichever is larger. A delta inside it could be the seed, not NITP.
        spread = None if base_std is None else max(base_std, d_std)
        beyond = "n/a (one seed)" if spread is None else ("yes" if abs(d_mean) > spread else "no")
        t_p, sign_p = t_test_p(delta), sign_test_p(delta)
        print(f"  {label:12s} {plus_minus(base_mean, base_std, pattern):>18s} "
              f"{plus_minus(ours_mean, ours_std, pattern):>18s} {plus_minus(d_mean, d_std, pattern, signed(pattern)):>17s} "
              f"{fmt(spread, pattern):>12s}  {beyond:15s}  {fmt(t_p, '{:.3f}'):>10s}  {fmt(sign_p, '{:.3f}'):>6s}")
        summary[key] = {"baseline": base, "arm": ours, "delta_mean": d_mean, "delta_std": d_std, "spread": spread,
                        "larger_than_spread": None if spread is None else abs(d_mean) > spread,
                        "t_test_p": t_p, "sign_test_p": sign_p}
        if claim is not None:
            lines.append(prefix + verdict(label, claim, delta, d_mean, d_std, spread, pattern))
    print("\nin plain words (the verdict is the seed-spread rule; the p-values are beside it"
          + (f"; with {n} seeds the sign test cannot go below {2 / 2 ** n:.2f} and the t test has {n - 1} "
             f"degree{'s' * (n > 2)} of freedom: weak either way):" if n > 1 else "):"))
    for line in lines:
        print("  " + line)
    summary["verdicts"] = lines
    return summary


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


COLORS = {"NTP": "C0", "NITP": "C1", "NTP, equal compute": "C2"}


def plot(out_dir: Path, seeds: list[int], nitp_layer: int, summary: dict, costs: dict[str, float]) -> None:
    """One PNG with every seed, like the paper's Figures 1 and 5 plus one panel of our own: effective rank,
    anisotropy, NITP loss and validation loss over training, and effective rank by layer at the end. Thin
    lines are seeds, bold lines their mean; the title gives the final deltas. costs: each run's cost of a step,
    in NTP steps; with the equal-compute run the x axis is compute, in NTP steps, so that equal x means equal
    FLOPs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: `pip install matplotlib` to get compare.png (everything else is in compare.json)")
        return
    runs = {name: [read_metrics(out_dir / f"seed{seed}-{slug(name)}") for seed in seeds] for name in costs}
    by_compute = len(costs) > 2
    last = max(r["step"] for r in runs["NTP"][0])
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.9))
    panels = [("erank", "effective rank (last layer)", True), ("anisotropy", "anisotropy (last layer)", True),
              ("nitp", "NITP training loss", False), ("val_lm", "validation LM loss", True)]
    for ax, (key, title, at_evals) in zip(axes, panels):
        for name, cost in costs.items():
            x = cost if by_compute else 1.0
            curves = [[(r["step"] * x, r[key]) for r in records if bool(r.get("eval")) == at_evals
                       and r.get(key) is not None and (key != "val_lm" or r["step"] * x >= last * 0.3)]
                      for records in runs[name]]  # the loss from 30% on: earlier values would hide the gap
            if not curves[0]:
                continue
            for curve in curves:
                ax.plot(*zip(*curve), color=COLORS[name], lw=0.6, alpha=0.5)
            steps = [s for s, _ in curves[0]]
            mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, color=COLORS[name], lw=2, label=f"{name} (mean of {len(curves)})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training compute, in NTP steps" if by_compute else "step")
        ax.legend(fontsize=8)
    ax = axes[-1]  # where in the depth: effective rank of each block's output at the final evaluation
    for name in costs:
        finals = [[r for r in records if r.get("eval")][-1] for records in runs[name]]
        by_layer = [f["erank_by_layer"] + [f["erank"]] for f in finals]  # embeddings, blocks 1..n, after ln_f
        for values in by_layer:
            ax.plot(values, color=COLORS[name], lw=0.6, alpha=0.5, marker=".")
        ax.plot([statistics.mean(v) for v in zip(*by_layer)], color=COLORS[name], lw=2, marker="o", label=name)
    n_layer = len(by_layer[0]) - 2
    ax.axvline(nitp_layer, color="gray", ls="--", lw=1)
    ax.text(nitp_layer, ax.get_ylim()[1], " NITP target", fontsize=8, va="top", color="gray")
    ax.set_xticks(range(n_layer + 2), ["emb"] + [str(i) for i in range(1, n_layer + 1)] + ["ln_f"])
    ax.set_title("effective rank by layer (final step)", fontsize=10)
    ax.set_xlabel("block output")
    ax.legend(fontsize=8, loc="lower right")
    titles = []
    for name, part in summary.items():
        deltas = [f"{label} {plus_minus(part[key]['delta_mean'], part[key]['delta_std'], pattern, signed(pattern))}"
                  + ("" if not part[key]["spread"] else f" ({abs(part[key]['delta_mean']) / part[key]['spread']:.1f}× spread)")
                  for key in ("erank", "anisotropy", "val_lm") for k, label, pattern, _ in METRICS if k == key]
        titles.append(f"{name}: " + "; ".join(deltas))
    fig.suptitle(f"NITP − NTP at the end, {len(seeds)} seed{'s' * (len(seeds) > 1)}. " + "\n".join(titles),
                 fontsize=10 if len(titles) > 1 else 11)
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=80)
    print(f"plot: {out_dir / 'compare.png'}")


def slug(name: str) -> str:
    """A run's folder name: "NTP" -> ntp, "NTP, equal compute" -> ntp-equal-compute, "λ = 1.4" -> lambda-1.4."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower().replace("λ", "lambda")).strip("-")


def nitp_overhead(args: argparse.Namespace) -> float:
    """NITP's extra training FLOPs per token, as a fraction of NTP's, counted like bench.py (on the meta device:
    no memory, no arithmetic)."""
    with torch.device("meta"):
        model = GPT(train.model_config(args, get_tokenizer(args.tokenizer).n_vocab))
        nitp = NITP(train.nitp_config(argparse.Namespace(**{**vars(args), "nitp": True})), args.n_layer, args.n_embd)
    return flops_per_token(model, nitp) / flops_per_token(model, None) - 1


def stretched(args: argparse.Namespace, factor: float) -> dict:
    """The schedule of a run `factor` times as long: the steps, the warm-up and the evaluation interval."""
    names = ("max_iters", "warmup_iters", "eval_interval")
    return {name: max(1, round(getattr(args, name) * factor)) for name in names}


def arms(args: argparse.Namespace, seed: int) -> dict[str, argparse.Namespace]:
    """The settings of one seed's runs, by name: train.py's own, with NITP off and on; NTP for NITP's compute
    with --equal-compute; each ablation with --ablations. Each run has its own folder in OUT_DIR."""
    changes = {"NTP": {"nitp": False}, "NITP": {"nitp": True}}
    if args.equal_compute:
        changes["NTP, equal compute"] = {"nitp": False, **stretched(args, 1 + nitp_overhead(args))}
    if args.ablations:
        changes.update({name: {"nitp": True, **flags(args)} for name, (flags, _) in ablations.ABLATIONS.items()})
    common = {**vars(args), "seed": seed, "compare": False, "equal_compute": False, "ablations": False}
    folder = Path(args.out_dir)
    return {name: argparse.Namespace(**{**common, **change, "out_dir": str(folder / f"seed{seed}-{slug(name)}")})
            for name, change in changes.items()}


def compare(args: argparse.Namespace, on_eval=None) -> None:
    """Train every run of arms() for args.seeds seeds starting at args.seed; summarize, plot, save.
    on_eval(name, seed, record), if given, sees each evaluation as it happens (the notebook draws them)."""
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    seeds = list(range(args.seed, args.seed + args.seeds))
    finals, baselines, probe_s = [], [], 0.0
    for seed in seeds:
        results, models = {}, {}
        for name, settings in arms(args, seed).items():
            print(f"\n=== seed {seed}: {name} ===")
            ntp_by_step = {r["step"]: r for r in results.get("NTP", [])}

            def show(record: dict) -> None:  # called by train() during this run only
                if name == "NITP":
                    print_side_by_side(ntp_by_step[record["step"]], record)
                if on_eval is not None:
                    on_eval(name, seed, record)

            if args.compile:  # each run compiles its own model, and its ms/iter includes that, as on its own
                torch._dynamo.reset()
            run = train.setup(settings)
            results[name], models[name] = train.train(run, on_eval=show, sample=False), run.model
            if name == "NITP":
                nitp_layer = run.nitp.layer
        rows = {}
        if not args.ablations:  # the frozen-representation tasks (probe.py) on each final model, with baselines
            print(f"\n=== seed {seed}: frozen representations ===")
            t0 = time.perf_counter()
            sections = labelled_sections(args.data, run.dataset.tokenizer)
            # the baselines (a random network, a bag of tokens) tell the same story for every seed: once is enough
            rows = probe.report(models, sections, args.block_size, seed, baselines=seed == seeds[0])
            probe_s += time.perf_counter() - t0
            baselines.append({k: v for k, v in rows.items() if k not in models})
        finals.append({})
        for name in models:  # ms/iter over the whole run (an eval record holds only the steps since the last)
            ms = [r["ms"] for r in read_metrics(out_dir / f"seed{seed}-{slug(name)}") if not r.get("eval")]
            finals[-1][name] = {**results[name][-1], **rows.get(name, {}), "ms_per_iter": statistics.mean(ms),
                                "train_s": sum(ms) / 1000}
    summary = {"at equal steps": summarize(finals, prefix="at equal steps: " if args.equal_compute else "")}
    costs = {"NTP": 1.0, "NITP": 1 + nitp_overhead(args)}
    if args.equal_compute:
        summary["at equal compute"] = summarize(finals, baseline="NTP, equal compute", prefix="at equal compute: ")
        costs["NTP, equal compute"] = 1.0
        print_wall_clock(finals, costs)
    t0 = time.perf_counter()
    if args.ablations:
        summary["ablations"] = ablations.report(finals, seeds, out_dir)
    else:
        plot(out_dir, seeds, nitp_layer, summary, costs)
    # Where the time went: training steps and evaluations from the runs' own logs, the rest measured here
    records = [r for seed in seeds for name in finals[0] for r in read_metrics(out_dir / f"seed{seed}-{slug(name)}")]
    seconds = {"training steps": sum(r["ms"] for r in records if not r.get("eval")) / 1000,
               "evaluations": sum(r["eval_s"] for r in records if r.get("eval")), "probes": probe_s,
               "plot": time.perf_counter() - t0}
    seconds["other (set-up, checkpoints, summary)"] = time.perf_counter() - started - sum(seconds.values())
    total = sum(seconds.values())
    print(f"time: {total:.0f} s = " + ", ".join(f"{k} {v:.1f} s ({v / total:.0%})" for k, v in seconds.items()))
    (out_dir / "compare.json").write_text(json.dumps(
        {"seeds": seeds, "summary": summary["at equal steps"], "summary_equal_compute": summary.get("at equal compute"),
         "ablations": summary.get("ablations"), "nitp_flop_overhead": costs["NITP"] - 1, "finals": finals,
         "probe_baselines": baselines, "seconds": seconds, "args": vars(args)}, indent=1))
    print(f"summary: {out_dir / 'compare.json'}")


def print_wall_clock(finals: list[dict], costs: dict[str, float]) -> None:
    """Equal FLOPs need not be equal time: each run's steps, FLOPs and training seconds, beside each other."""
    print("\nequal compute, checked against the clock (training steps only, mean over seeds):")
    for name in ("NTP", "NITP", "NTP, equal compute"):
        steps = statistics.mean(f[name]["step"] for f in finals)
        seconds = statistics.mean(f[name]["train_s"] for f in finals)
        print(f"  {name:20s} {steps:6.0f} steps x {costs[name]:.3f} NTP steps of FLOPs = {steps * costs[name]:6.0f}"
              f" | {seconds:6.1f} s")
