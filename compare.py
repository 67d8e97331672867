"""The classroom experiment: NTP and NITP side by side, `python compare.py [--seeds N] [--equal-compute]`.

For each seed, the NTP run and the NITP run start from the same initial weights (the backbone is built
before the NITP head, from the same seed) and see the same batches in the same order (one batch generator,
seeded the same). Only the NITP loss differs. Both use train.py's own defaults: `python train.py --nitp` is
the NITP half of seed 1337. While the NITP run trains, each evaluation is printed beside the NTP run's at the
same step.

NITP's step costs more than NTP's (its head: 6·12d² FLOPs per token, +22% on the classroom model), so
"equal steps" is not "equal compute". --equal-compute adds a third run per seed: NTP trained for NITP's
training FLOPs, i.e. max_iters × (1 + the analytic overhead) steps on the same batches, with its warm-up and
evaluation interval stretched alike. Its wall-clock time is shown beside, since measured time need not follow
the FLOP count. --paper-overhead adds NITP with a head at the paper's +2.3% of FLOPs, NTP at that run's compute,
and a control: NITP's head and loss with the target of a random other position (nitp.py's shuffled target),
whose difference to NITP is what the target's content does. ablations.py uses the same machinery for the paper's
ablations.

The summary gives each final NITP − baseline difference paired by seed: its mean with a 95% confidence interval,
and the verdict that follows from the interval (stats.py: "as the paper says", "the opposite", "not settled by N
seeds"; the validation loss against a margin, +0.01). The probe score's interval holds the variance of the text
it is scored on as well as the seeds' (probe.py's resamples), and the eleven probe targets are read one by one
only through Holm's correction. The seed spread, the t test's and the sign test's p-values stand beside it, to
describe; it also says how large a difference its number of seeds can settle. compare.json is written as soon as
the runs are trained, before anything is summarized.

What does NITP's geometry cost, λ by λ? `python compare.py --lambdas 0.1,0.3,1,3` adds NITP at each other λ
(seed<S>-nitp-lambda-0.3/; the λ of --nitp-lambda, 1, is the run NITP), from the same weights on the same batches.
Each λ gets its NITP(λ) − NTP summary (val loss, effective rank, anisotropy, probe score, with their verdicts),
the table "by λ" gathers them, and lambdas.png puts each λ at its loss difference (x) and rank difference (y).

Seeds from separate invocations pool: `python compare.py --pool OUT_DIR [OUT_DIR ...]` reads their compare.json
files and gives one summary over all their seeds (pooled.json), if they trained the same setting; it summarizes
the comparisons whose runs every seed has.

A run already finished in its folder (its checkpoint at the last step, trained with the same settings but for
--device, --compile, --deterministic and --log-interval) is not trained again: it is rebuilt from its checkpoint
and its metrics.jsonl is read, so that an invocation stopped midway, run again, loses at most one run, and
`--lambdas` over the folder of a plain compare.py trains only the new λ arms.

Everything lands in OUT_DIR: seed<S>-<run>/ (metrics.jsonl, ckpt.pt each), compare.json, and compare.png (and
lambdas.png) when matplotlib is installed.
"""
import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import probe
import stats
import train
from data import get_tokenizer
from machinery import check_out_dir, fail, make_parser, say
from machinery import load as load_checkpoint
from machinery import parse_args as train_parse_args
from machinery import printable_output
from model import GPT, flops_per_token
from nitp import NITP, NITPConfig, target_layer

# key in the eval records, label, format, and which direction the paper says NITP moves it (None: no claim)
METRICS = [("val_lm", "val loss", "{:.4f}", "not worse"), ("val_nitp", "NITP loss", "{:.4f}", None),
           ("erank", "eff. rank", "{:.2f}", "higher"), ("anisotropy", "anisotropy", "{:.4f}", "lower"),
           ("probe_mean", "probe score", "{:.4f}", "higher"), ("ms_per_iter", "ms/iter", "{:.0f}", None)]


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


def interval(paired: dict, pattern: str) -> str:
    """"+1.32 [+1.17, +1.47]": the mean difference and its 95% interval (stats.paired's dict)."""
    if paired["ci"] is None:
        return fmt(paired["mean"], signed(pattern))
    low, high = (fmt(v, signed(pattern)) for v in paired["ci"])
    return f"{fmt(paired['mean'], signed(pattern))} [{low}, {high}]"


def plain_words(label: str, claim: str, paired: dict, pattern: str, arm: str = "NITP",
                agree: str = "as the paper says") -> str:
    """One line: "eff. rank: +1.32 [+1.17, +1.47], NITP higher in 3 of 3 seeds: as the paper says"."""
    counted = (f"{arm} higher in {paired['higher']} of {paired['n']} seeds" if claim == "higher"
               else f"{arm} lower in {paired['lower']} of {paired['n']} seeds")
    words = stats.verdict(claim, paired, agree=agree)
    if paired["shared_var"]:  # more seeds shrink the seeds' share of the interval, never the text's
        words += f" (the interval holds the text's variance, ±{1.96 * paired['shared_var'] ** 0.5:.4f} of it alone)"
    elif words.startswith("not settled"):
        needed = stats.seeds_to_settle(paired["mean"], paired["std"], claim)
        if needed is not None and needed > paired["n"]:
            words += f" (a difference of this size needs about {needed} seeds, at 80% power)"
    return f"{label}: {interval(paired, pattern)}, {counted}: {words}"


def resampled_probe(record: dict, target: str | None) -> np.ndarray | None:
    """A run's probe score on each resample of the scoring text (probe.py): one target's, or (None) the mean over
    the targets probed. None for a record without them (a compare.json older than the resamples)."""
    resampled = record.get("probe_resampled")
    if resampled is None or (target is not None and resampled.get(target) is None):
        return None
    if target is not None:
        return np.asarray(resampled[target], dtype=np.float64)
    return np.mean([resampled[name] for name in probe.TARGETS if resampled.get(name) is not None], axis=0)


def text_variance(finals: list[dict], arm: str, baseline: str, target: str | None = None) -> float | None:
    """The variance, over the resamples of the scoring text, of the seed-mean probe difference arm − baseline (one
    target's, or the mean's): the text's share of the interval. Every seed's models are scored on the same text,
    so this error is common to all of them and does not average out over seeds. None where a run lacks them."""
    runs = [(resampled_probe(f[arm], target), resampled_probe(f[baseline], target)) for f in finals]
    if any(a is None or b is None or len(a) != len(b) for a, b in runs) or len({len(a) for a, _ in runs}) != 1:
        return None
    seed_mean = np.mean([a - b for a, b in runs], axis=0)  # (resamples,): the seed-mean difference, per resample
    return float(np.var(seed_mean, ddof=1))


def summarize(finals: list[dict], arm: str = "NITP", baseline: str = "NTP", prefix: str = "",
              agree: str = "as the paper says") -> dict:
    """finals: per seed, {run name: its final eval record}. Prints and returns the summary of arm − baseline, paired
    over seeds; prefix goes before each plain-words line ("at equal compute: "); agree: the words for the paper's
    direction. NaN or identical differences give no verdict, in words (stats.paired), never an exception."""
    n = len(finals)
    seeds = [f[baseline].get("seed") for f in finals]
    print(f"\nsummary: final evaluation, {arm} − {baseline}, paired over {n} seed{'s' * (n > 1)}"
          + (f" ({seed_list(seeds)})" if None not in seeds else ""))
    print(f"  {'metric':12s} {baseline:>18s} {arm:>18s} {arm + ' − ' + baseline + ' [95% interval]':>34s} "
          f"{'seed spread':>12s}  t test p  sign p")
    summary, lines, widths = {}, [], []
    for key, label, pattern, claim in METRICS:
        if any(f[baseline].get(key) is None or f[arm].get(key) is None for f in finals):
            continue  # the NITP loss does not exist for an NTP run
        base, ours = ([f[run][key] for f in finals] for run in (baseline, arm))
        delta = [b - a for a, b in zip(base, ours)]
        (base_mean, base_std), (ours_mean, ours_std) = stats.mean_std(base), stats.mean_std(ours)
        paired = stats.paired(delta, shared_var=text_variance(finals, arm, baseline) if key == "probe_mean" else None,
                              seeds=None if None in seeds else seeds, what=f"{label} ({arm} − {baseline})")
        # The seed spread describes how much the metric moves between seeds (the baseline runs' std) or the delta
        # does (its std over seeds), whichever is larger. It is not the verdict: the interval is.
        spread = None if base_std is None or paired["std"] is None else max(base_std, paired["std"])
        print(f"  {label:12s} {plus_minus(base_mean, base_std, pattern):>18s} "
              f"{plus_minus(ours_mean, ours_std, pattern):>18s} {interval(paired, pattern):>34s} "
              f"{fmt(spread, pattern):>12s}  {fmt(paired['t_test_p'], '{:.3f}'):>8s}  "
              f"{fmt(paired['sign_test_p'], '{:.3f}'):>6s}")
        summary[key] = {"baseline": base, "arm": ours, "delta": delta, **paired, "spread": spread}
        if claim is not None:
            summary[key]["verdict"] = stats.verdict(claim, paired, agree=agree)
            lines.append(prefix + plain_words(label, claim, paired, pattern, arm, agree))
            if paired["half_width"] is not None:
                widths.append(f"{label} ±{fmt(paired['half_width'], pattern)}")
    probes = summarize_probe_targets(finals, arm, baseline, agree)
    if probes:
        summary["probes"], counted = probes
        lines.append(prefix + counted)
    print(f"\nin plain words (the verdict follows from the 95% interval of the paired difference over seeds; the "
          f"validation loss is 'not worse' when the interval lies below the margin +{stats.LOSS_MARGIN:g}; the "
          f"probe score's interval holds the text's variance too):")
    for line in lines:
        print("  " + line)
    if widths:
        settles = (f"what {n} seeds can settle: a mean difference farther than the interval's half-width from the "
                   f"claim's boundary (0; the margin +{stats.LOSS_MARGIN:g} for the val loss), here "
                   + ", ".join(widths))
        print("  " + settles)
        summary["what the seeds can settle"] = settles
    summary["verdicts"] = lines
    return summary


def summarize_probe_targets(finals: list[dict], arm: str, baseline: str, agree: str) -> tuple[dict, str] | None:
    """Each probe target's arm − baseline (its interval with the text's variance, as the probe score's), with Holm's
    correction over the targets: a target moves only when its corrected p is below 5%. Printed; returns the rows
    and the plain-words line, or None without probe scores."""
    targets = [name for name in probe.TARGETS if all(f[run].get(f"probe:{name}") is not None
                                                      for f in finals for run in (arm, baseline))]
    if not targets:
        return None
    rows = {}
    for name in targets:
        delta = [f[arm][f"probe:{name}"] - f[baseline][f"probe:{name}"] for f in finals]
        rows[name] = {"delta": delta, **stats.paired(delta, shared_var=text_variance(finals, arm, baseline, name))}
    for row, corrected in zip(rows.values(), stats.holm([row["t_test_p"] for row in rows.values()])):
        row["holm_p"] = corrected
        row["verdict"] = (row["refused"] or "no p-value" if corrected is None else
                          f"not settled after Holm's correction over {len(targets)} targets" if corrected >= 0.05 else
                          agree if row["mean"] > 0 else "the opposite")
    print(f"  frozen-state probes, balanced accuracy, {arm} − {baseline} [95% interval], p, Holm-corrected p:")
    for name, row in rows.items():
        print(f"    {name:10s} {interval(row, '{:.4f}'):>34s}  {fmt(row['t_test_p'], '{:.3f}'):>6s}  "
              f"{fmt(row['holm_p'], '{:.3f}'):>6s}  {row['verdict']}")
    higher, lower = (sum(row["verdict"] == words for row in rows.values()) for words in (agree, "the opposite"))
    return rows, (f"probe targets, one by one (Holm's correction over the {len(targets)}): {arm} higher on {higher}, "
                  f"lower on {lower}, not settled on the rest")


def seed_list(seeds: list[int]) -> str:
    """"1337-1339" for a run of consecutive seeds, "1337-1339, 2000-2009" for several."""
    runs = []
    for seed in seeds:
        if runs and seed == runs[-1][1] + 1:
            runs[-1][1] = seed
        else:
            runs.append([seed, seed])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


COLORS = {"NTP": "C0", "NITP": "C1", "NTP, equal compute": "C2"}


def plot(out_dir: Path, seeds: list[int], nitp_layer: int, summary: dict, costs: dict[str, float]) -> None:
    """One PNG with every seed, like the paper's Figures 1 and 5 plus one panel of our own: effective rank,
    anisotropy, NITP loss and validation loss over training, and effective rank by layer at the end. Thin
    lines are seeds, bold lines their mean; the title gives the final deltas. costs: each run's cost of a step,
    in NTP steps; with the equal-compute run the x axis is compute, in NTP steps, so that equal x means equal
    FLOPs."""
    plt = pyplot("compare.png", "compare.json")
    if plt is None:
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
        if name not in ("at equal steps", "at equal compute"):  # the plot draws NTP, NITP and NTP at its compute
            continue
        deltas = [f"{label} {interval(part[key], pattern)}"
                  for key in ("erank", "anisotropy", "val_lm") for k, label, pattern, _ in METRICS if k == key]
        titles.append(f"{name}: " + "; ".join(deltas))
    fig.suptitle(f"NITP − NTP at the end [95% interval], {len(seeds)} seed{'s' * (len(seeds) > 1)}. "
                 + "\n".join(titles),
                 fontsize=10 if len(titles) > 1 else 11)
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=80)
    print(f"plot: {out_dir / 'compare.png'}")


def pyplot(png: str, json_file: str):
    """matplotlib's pyplot, drawing to files; None without matplotlib, after one line that says so."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: `pip install matplotlib` to get {png} (everything else is in {json_file})")
        return None
    return plt


def slug(name: str) -> str:
    """A run's folder name: "NTP" -> ntp, "NTP, equal compute" -> ntp-equal-compute, "λ = 1.4" -> lambda-1.4."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower().replace("λ", "lambda")).strip("-")


def flops(args: argparse.Namespace, nitp: bool) -> float:
    """Training FLOPs per token of the run that args describe, with or without its NITP head, counted like
    bench.py (on the meta device: no memory, no arithmetic)."""
    with torch.device("meta"):
        model = GPT(train.model_config(args, get_tokenizer(args.tokenizer).n_vocab))
        head = NITP(train.nitp_config(argparse.Namespace(**{**vars(args), "nitp": True})), args.n_layer,
                    args.n_embd) if nitp else None
    return flops_per_token(model, head)


def nitp_overhead(args: argparse.Namespace) -> float:
    """NITP's extra training FLOPs per token, as a fraction of NTP's."""
    return flops(args, nitp=True) / flops(args, nitp=False) - 1


# The paper's NITP head costs +2.3% training FLOPs at 9B parameters; on the 4-block classroom model the same
# d -> 4d -> d head costs +22%. --paper-overhead sizes the SwiGLU head's hidden width to the paper's share.
PAPER_OVERHEAD = 0.023


def paper_head_width(args: argparse.Namespace) -> int:
    """The SwiGLU hidden width w whose head (3·d·w weights, 6 FLOPs per weight and token) adds PAPER_OVERHEAD to
    NTP's training FLOPs: 53 on the classroom model (d = 128), against the method's 4d = 512."""
    return max(1, round(PAPER_OVERHEAD * flops(args, nitp=False) / (6 * 3 * args.n_embd)))


def stretched(args: argparse.Namespace, factor: float) -> dict:
    """The schedule of a run `factor` times as long: the steps, the warm-up and the evaluation interval."""
    names = ("max_iters", "warmup_iters", "eval_interval")
    return {name: max(1, round(getattr(args, name) * factor)) for name in names}


def arm_changes(args: argparse.Namespace) -> dict[str, dict]:
    """The runs of one seed, by name, as changes to train.py's flags: NTP and NITP; with --lambdas, NITP at each
    other λ; with --equal-compute, NTP for NITP's FLOPs; with --paper-overhead, NITP with a head of the paper's
    relative cost, NTP for that run's FLOPs, and NITP (the full head) with a shuffled target: the form of NITP
    without its content."""
    changes = {"NTP": {"nitp": False}, "NITP": {"nitp": True}}
    for lam in args.lambdas or []:  # NITP's own λ (--nitp-lambda, 1 by default) is the run "NITP"
        if lam != args.nitp_lambda:
            changes[lambda_arm(lam)] = {"nitp": True, "nitp_lambda": lam}
    if args.equal_compute:
        changes["NTP, equal compute"] = {"nitp": False, **stretched(args, 1 + nitp_overhead(args))}
    if args.paper_overhead:
        small = {"nitp": True, "nitp_head_width": paper_head_width(args)}
        small_overhead = flops(argparse.Namespace(**{**vars(args), **small}), nitp=True) / flops(args, nitp=False) - 1
        changes["NITP, small head"] = small
        changes["NTP, small head's compute"] = {"nitp": False, **stretched(args, 1 + small_overhead)}
        changes["NITP, shuffled target"] = {"nitp": True, "nitp_shuffled_target": True}
    return changes


def lambda_text(lam: float) -> str:
    """λ as a run's name shows it: "0.3", "3", "1e-05"; all its digits where fewer would name another λ."""
    short = f"{lam:g}"
    return short if float(short) == lam else repr(lam)


def lambda_arm(lam: float) -> str:
    """The NITP run at a λ other than its own: "NITP, λ=0.3", in the folder seed<S>-nitp-lambda-0.3."""
    return f"NITP, λ={lambda_text(lam)}"


def lambda_arms(names) -> dict[str, float]:
    """The λ arms among these run names (lambda_arm's), and their λ."""
    found = (re.fullmatch(r"NITP, λ=(.+)", name) for name in names)
    return {match[0]: float(match[1]) for match in found if match}


def arms(args: argparse.Namespace, seed: int, changes: dict[str, dict]) -> dict[str, argparse.Namespace]:
    """Each run's own train.py settings (the experiment's flags left out), in its own folder OUT_DIR/seed<S>-<name>."""
    own = {name: value for name, value in vars(args).items() if name in TRAIN_FLAGS}
    return {name: argparse.Namespace(**{**own, "seed": seed, **change,
                                        "out_dir": str(Path(args.out_dir) / f"seed{seed}-{slug(name)}")})
            for name, change in changes.items()}


def train_seeds(args: argparse.Namespace, changes: dict[str, dict], probe_them: bool, on_eval=None) -> tuple:
    """Train every run of every seed, from args.seed on. Returns the final evaluation of each (per seed, by run
    name: the finals), the probe baselines and the seconds spent probing. on_eval(name, seed, record), if given,
    sees each evaluation as it happens (the notebook draws them)."""
    seeds = list(range(args.seed, args.seed + args.seeds))
    finals, baselines, probe_s, probes = [], [], 0.0, None
    for seed in seeds:
        results, models, reused = {}, {}, set()
        for name, settings in arms(args, seed, changes).items():
            print(f"\n=== seed {seed}: {name} ===")
            ntp_by_step = {r["step"]: r for r in results.get("NTP", [])}

            def show(record: dict) -> None:  # called by train() during this run only
                if name == "NITP" and record["step"] in ntp_by_step:
                    print_side_by_side(ntp_by_step[record["step"]], record)
                if on_eval is not None:
                    on_eval(name, seed, record)

            run, results[name], was_reused = train_or_reuse(settings, f"seed {seed}: {name}", show)
            models[name] = run.model
            if was_reused:
                reused.add(name)
                for record in results[name] if on_eval is not None else []:  # the notebook draws its curve too
                    on_eval(name, seed, record)
        rows = {}
        if probe_them:  # probe.py's frozen-state probes on each final model, and the baselines for this seed
            print(f"\n=== seed {seed}: frozen-state probes ===")
            t0 = time.perf_counter()
            probes = probes or probe.Probes(np.asarray(run.dataset.val), run.dataset.val_starts, args.block_size)
            scores = {name: probes.of_model(model, depth=args.probe_depth) for name, model in models.items()}
            baselines.append(probes.baselines(models["NTP"], seed))
            probe.print_table({**scores, **baselines[-1]}, probe.chance(probes))
            rows = {name: flat(score) for name, score in scores.items()}
            probe_s += time.perf_counter() - t0
        finals.append({})
        for name in models:  # ms/iter over the whole run (an eval record holds only the steps since the last)
            ms = [r["ms"] for r in read_metrics(Path(args.out_dir) / f"seed{seed}-{slug(name)}") if not r.get("eval")]
            finals[-1][name] = {"seed": seed, **results[name][-1], **rows.get(name, {}),
                                "ms_per_iter": statistics.mean(ms), "train_s": sum(ms) / 1000,
                                **({"reused": True} if name in reused else {})}
    return finals, baselines, probe_s


def train_or_reuse(settings: argparse.Namespace, what: str, show) -> tuple[train.Run, list[dict], bool]:
    """Train one run into its folder, or, where the folder already holds this run finished (finished_run), rebuild it
    from its checkpoint and read its evaluations from its metrics.jsonl: a stopped study loses at most the run it was
    training. Returns the run, its evaluation records and whether it was reused; show(record) sees each evaluation
    of a run trained now."""
    ckpt, why_not = finished_run(settings)
    if ckpt is not None:
        run = train.setup(settings, ckpt)  # the weights restored: the probes run on them as on a fresh run's
        records = [r for r in read_metrics(Path(settings.out_dir)) if r.get("eval")]
        print(f"{what} already trained in {settings.out_dir}, reused")
        return run, records, True
    if why_not is not None:
        print(f"{what}: {settings.out_dir} holds a checkpoint, but {why_not}: trained again from the start")
    if settings.compile:  # each run compiles its own model, and its ms/iter includes that, as on its own
        torch._dynamo.reset()
    run = train.setup(settings)
    return run, train.train(run, on_eval=show, sample=False), False


# Flags that change neither what a run trains nor what it measures: a finished run that differs from the one asked
# for only in these is reused (compare.py's own flags never reach a run's settings).
NOT_CHANGING_A_RUN = {"out_dir", "device", "compile", "deterministic", "log_interval", "resume"}


def finished_run(settings: argparse.Namespace) -> tuple[dict | None, str | None]:
    """The checkpoint in settings.out_dir if it is this run, finished: saved at step max_iters with the same settings
    (but NOT_CHANGING_A_RUN), its metrics.jsonl holding the final evaluation. Else None, and why not in words (None
    too where the folder holds no checkpoint)."""
    folder = Path(settings.out_dir)
    if not (folder / "ckpt.pt").is_file():
        return None, None
    try:
        ckpt = load_checkpoint(settings.out_dir)
    except ValueError:
        return None, "it cannot be read"
    if ckpt["step"] != settings.max_iters:
        return None, f"it is at step {ckpt['step']}, not {settings.max_iters}"
    saved, wanted = ckpt["args"], vars(settings)
    differ = sorted(name for name in (saved.keys() | wanted.keys()) - NOT_CHANGING_A_RUN
                    if saved.get(name) != wanted.get(name))
    if differ:
        flag = differ[0]
        return None, f"it was trained with --{flag.replace('_', '-')} {saved.get(flag)}, not {wanted.get(flag)}"
    try:
        final = [r for r in read_metrics(folder) if r.get("eval")][-1:]
    except (OSError, ValueError):  # no metrics.jsonl, or a line cut short
        final = []
    if not final or final[0]["step"] != settings.max_iters:
        return None, "its metrics.jsonl lacks the final evaluation"
    return ckpt, None


def flat(scores: dict) -> dict:
    """A model's probe scores (Probes.of_model) as keys of its final record: probe:<target> for each target."""
    return {"probe_mean": scores["probe_mean"], **{f"probe:{name}": v for name, v in scores["probe"].items()},
            "probe_resampled": scores["probe_resampled"],
            **({"probe_by_layer": scores["probe_by_layer"]} if "probe_by_layer" in scores else {})}


def account(args: argparse.Namespace, finals: list[dict], started: float, **seconds: float) -> dict:
    """Where the time went: training steps and evaluations from the runs' own logs (those trained now: a reused
    run's were spent before), the rest (given, or left over) measured by the caller. Printed, and returned for
    compare.json."""
    records = [r for final in finals for name in final if not final[name].get("reused")
               for r in read_metrics(Path(args.out_dir) / f"seed{final[name]['seed']}-{slug(name)}")]
    seconds = {"training steps": sum(r["ms"] for r in records if not r.get("eval")) / 1000,
               "evaluations": sum(r["eval_s"] for r in records if r.get("eval")), **seconds}
    seconds["other (set-up, checkpoints, summary)"] = time.perf_counter() - started - sum(seconds.values())
    total = sum(seconds.values())
    print(f"time: {total:.0f} s = " + ", ".join(f"{k} {v:.1f} s ({v / total:.0%})" for k, v in seconds.items()))
    return seconds


def save(args: argparse.Namespace, finals: list[dict], quiet: bool = False, **results) -> None:
    """OUT_DIR/compare.json: every run's final evaluation, the summaries, the settings; what --pool reads."""
    path = Path(args.out_dir) / "compare.json"
    seeds = [final["NTP"]["seed"] for final in finals]
    path.write_text(json.dumps({"seeds": seeds, **results, "finals": finals, "args": vars(args)}, indent=1))
    if not quiet:
        print(f"summary: {path}")


# The comparisons a summary makes, where both runs are there: (arm, baseline, what the difference measures, and
# the words for the direction the paper claims for NITP over NTP: the paper makes the first four comparisons;
# the last two it does not, and their verdicts name the direction instead).
COMPARISONS = [("NITP", "NTP", "at equal steps", "as the paper says"),
               ("NITP", "NTP, equal compute", "at equal compute", "as the paper says"),
               ("NITP, small head", "NTP", "small head, at equal steps", "as the paper says"),
               ("NITP, small head", "NTP, small head's compute", "small head, at equal compute", "as the paper says"),
               ("NITP, small head", "NITP", "small head against the full head", "in NITP's direction over NTP"),
               ("NITP", "NITP, shuffled target", "the objective's content", "in NITP's direction over NTP")]


def lambda_words(lam: float) -> str:
    """The comparison of NITP at another λ with NTP, in the summaries: "λ = 0.3"."""
    return f"λ = {lambda_text(lam)}"


def comparisons(present: set[str]) -> list[tuple[str, str, str, str]]:
    """The comparisons of COMPARISONS whose two runs are present, then each λ arm against NTP, by λ."""
    lambdas = sorted(lambda_arms(present).items(), key=lambda item: item[1])
    return ([comparison for comparison in COMPARISONS if set(comparison[:2]) <= present]
            + [(name, "NTP", lambda_words(lam), "as the paper says") for name, lam in lambdas])


def summaries(finals: list[dict]) -> dict[str, dict]:
    """Every comparison whose two runs every seed has (comparisons()), summarized (and printed)."""
    wanted = comparisons(runs_of_every_seed(finals))
    return {words: summarize(finals, arm, baseline, prefix=f"{words}: " if len(wanted) > 1 else "", agree=agree)
            for arm, baseline, words, agree in wanted}


def runs_of_every_seed(finals: list[dict]) -> set[str]:
    return set.intersection(*(set(final) for final in finals))


# ----------------------------------------------------------------------------------------------------
# --lambdas: what NITP's geometry costs at each λ

STUDIED = ["val_lm", "erank", "anisotropy", "probe_mean"]  # the metrics of the λ study, as METRICS names them


def lambda_study(summary: dict[str, dict], present: set[str], nitp_lambda: float) -> list[dict]:
    """One row per λ, from the summaries: NITP(λ) − NTP for each metric of STUDIED (its mean, 95% interval and
    verdict), the run "NITP" at its own λ among them. Empty without λ arms."""
    points = lambda_arms(present)
    if not points:
        return []
    points["NITP"] = nitp_lambda
    rows = []
    for name, lam in sorted(points.items(), key=lambda item: item[1]):
        part = summary["at equal steps" if name == "NITP" else lambda_words(lam)]
        rows.append({"lambda": lam, "arm": name, **{key: {field: part[key].get(field) for field in
                                                          ("n", "mean", "ci", "half_width", "verdict")}
                                                    for key in STUDIED if key in part}})
    return rows


def print_lambda_study(rows: list[dict]) -> None:
    """The λ study's rows: each λ's difference to NTP per metric, with its interval and verdict."""
    n = rows[0]["val_lm"]["n"]
    print(f"\nNITP(λ) − NTP at the end, by λ: mean [95% interval] over {n} seed{'s' * (n > 1)}, and the verdict")
    for row in rows:
        for i, key in enumerate(key for key in STUDIED if key in row):
            label, pattern = next((label, pattern) for k, label, pattern, _ in METRICS if k == key)
            head = f"λ = {lambda_text(row['lambda'])} ({row['arm']})" if i == 0 else ""
            print(f"  {head:22s} {label:12s} {interval(row[key], pattern):>28s}  {row[key]['verdict']}")


def plot_lambdas(rows: list[dict], out_dir: Path) -> None:
    """OUT_DIR/lambdas.png: each λ a point, NITP(λ) − NTP in validation loss (x) against effective rank (y), with
    both 95% intervals as error bars (none with one seed), the loss margin dashed: the geometry bought, and its
    price. A point whose difference is NaN is left out."""
    plt = pyplot("lambdas.png", "compare.json")
    if plt is None:
        return
    n = rows[0]["val_lm"]["n"]
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for row in rows:
        loss, rank = row["val_lm"], row["erank"]
        if loss["mean"] is None or rank["mean"] is None:
            continue
        ax.errorbar(loss["mean"], rank["mean"], xerr=loss["half_width"], yerr=rank["half_width"], fmt="o",
                    color="C1" if row["arm"] == "NITP" else "C3", capsize=3)
        ax.annotate(f"λ = {lambda_text(row['lambda'])}", (loss["mean"], rank["mean"]), textcoords="offset points",
                    xytext=(-5, 5), ha="right", fontsize=9)  # up and left: the bars of a larger λ lie up and right
    ax.axvline(stats.LOSS_MARGIN, color="gray", ls="--", lw=1, label=f"loss margin +{stats.LOSS_MARGIN:g}")
    ax.axvline(0, color="black", lw=0.6, zorder=0)
    ax.axhline(0, color="black", lw=0.6, zorder=0)
    ax.text(0.98, 0.12, "a free λ: its rank bar wholly above 0, its loss bar wholly left of the margin",
            transform=ax.transAxes, ha="right", fontsize=8)
    ax.set_xlabel("validation loss, NITP − NTP (nats per byte)")
    ax.set_ylabel("effective rank, NITP − NTP")
    ax.legend(fontsize=8)
    ax.set_title("each point: NITP at one λ − NTP, final evaluation, "
                 + (f"mean of {n} seeds with 95% intervals" if n > 1 else "one seed (no interval)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "lambdas.png", dpi=80)
    plt.close(fig)
    print(f"plot: {out_dir / 'lambdas.png'}")


def compare(args: argparse.Namespace, on_eval=None) -> None:
    """Train every run of arm_changes() for args.seeds seeds starting at args.seed; probe, summarize, plot, save."""
    started = time.perf_counter()
    changes = arm_changes(args)
    finals, baselines, probe_s = train_seeds(args, changes, probe_them=True, on_eval=on_eval)
    # the runs' results first: whatever the summary meets, they stay
    save(args, finals, quiet=True, probe_baselines=baselines)
    summary = summaries(finals)
    costs = {"NTP": 1.0, "NITP": 1 + nitp_overhead(args)}
    if args.equal_compute:
        costs["NTP, equal compute"] = 1.0
        print_wall_clock(finals, costs)
    lambdas = lambda_study(summary, set(changes), args.nitp_lambda)
    if lambdas:
        print_lambda_study(lambdas)
    t0 = time.perf_counter()
    nitp_layer = target_layer(NITPConfig(layer=args.nitp_layer), args.n_layer)
    plot(Path(args.out_dir), [f["NTP"]["seed"] for f in finals], nitp_layer, summary, costs)
    if lambdas:
        plot_lambdas(lambdas, Path(args.out_dir))
    seconds = account(args, finals, started, probes=probe_s, plot=time.perf_counter() - t0)
    save(args, finals, summary=summary["at equal steps"], summary_equal_compute=summary.get("at equal compute"),
         summaries=summary, nitp_flop_overhead=costs["NITP"] - 1, probe_baselines=baselines, seconds=seconds,
         **({"lambdas": lambdas} if lambdas else {}))


def print_wall_clock(finals: list[dict], costs: dict[str, float]) -> None:
    """Equal FLOPs need not be equal time: each run's steps, FLOPs and training seconds, beside each other."""
    print("\nequal compute, checked against the clock (training steps only, mean over seeds):")
    for name in ("NTP", "NITP", "NTP, equal compute"):
        steps = statistics.mean(f[name]["step"] for f in finals)
        seconds = statistics.mean(f[name]["train_s"] for f in finals)
        print(f"  {name:20s} {steps:6.0f} steps x {costs[name]:.3f} NTP steps of FLOPs = {steps * costs[name]:6.0f}"
              f" | {seconds:6.1f} s")


# ----------------------------------------------------------------------------------------------------
# Seeds of several invocations, pooled

# Flags that do not change what a run trains or how it is measured: invocations that differ only in these pool.
# Beyond a run's own (NOT_CHANGING_A_RUN): the seeds, compare.py's flags, and the evaluation interval, which
# changes a run's curve but not its final evaluation.
NOT_TRAINING = NOT_CHANGING_A_RUN | {"seed", "seeds", "pool", "equal_compute", "paper_overhead", "lambdas",
                                     "probe_depth", "eval_interval",
                                     "compare", "ablations", "probe"}  # the last three: train.py's flags, once


def pool(dirs: list[str], out_dir: str) -> dict:
    """One summary over the seeds of several compare.py (or ablations.py) invocations, read from the compare.json
    in each of `dirs`: NITP − NTP, and each other comparison whose runs all of them trained. They must have trained the
    same setting, on different seeds. Writes OUT_DIR/pooled.json. Raises ValueError with what to do."""
    results = []
    for folder in dirs:
        path = Path(folder) / "compare.json"
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} ({type(e).__name__}); pass the --out-dir of a finished "
                             f"compare.py or ablations.py") from None
    settings = results[0]["args"]
    for folder, result in zip(dirs, results):
        for name in sorted((set(settings) | set(result["args"])) - NOT_TRAINING):
            if result["args"].get(name) != settings.get(name):
                raise ValueError(f"{folder} trained with --{name.replace('_', '-')} {result['args'].get(name)}, "
                                 f"{dirs[0]} with {settings.get(name)}: only runs of one setting pool")
    seeds = [seed for result in results for seed in result["seeds"]]
    if len(set(seeds)) < len(seeds):
        twice = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        raise ValueError(f"seed{'s' * (len(twice) > 1)} {', '.join(map(str, twice))} appear{'s' * (len(twice) == 1)} "
                         f"in more than one of these folders: pool each seed once")
    finals = [{name: {"seed": seed, **record} for name, record in final.items()}  # older files lack "seed"
              for result in results for seed, final in zip(result["seeds"], result["finals"])]
    print(f"pooled: {len(seeds)} seeds from {len(dirs)} invocations: "
          + "; ".join(f"{folder} ({len(result['seeds'])})" for folder, result in zip(dirs, results)))
    present = runs_of_every_seed(finals)
    left_out = sorted(set().union(*finals) - present)
    if left_out:
        print(f"left out, trained for some of these seeds only: {', '.join(left_out)}")
    summary = summaries(finals)
    lambdas = lambda_study(summary, present, settings["nitp_lambda"])
    if lambdas:
        print_lambda_study(lambdas)
    pooled = {"dirs": dirs, "seeds": seeds, "summary": summary["at equal steps"],
              "summary_equal_compute": summary.get("at equal compute"), "summaries": summary,
              **({"lambdas": lambdas} if lambdas else {})}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if lambdas:
        plot_lambdas(lambdas, Path(out_dir))
    (Path(out_dir) / "pooled.json").write_text(json.dumps({**pooled, "finals": finals, "args": settings}, indent=1))
    print(f"pooled summary: {Path(out_dir) / 'pooled.json'}")
    return pooled


# ----------------------------------------------------------------------------------------------------
# The command line: train.py's flags, for every run, and the experiment's own

TRAIN_FLAGS = set(vars(make_parser().parse_args([])))


def make_experiment_parser(description: str, program: str) -> argparse.ArgumentParser:
    """train.py's parser, every flag of which reaches each run, and --seeds."""
    parser = make_parser()
    parser.prog, parser.description = program, description
    group = parser.add_argument_group("the experiment")
    group.add_argument("--seeds", type=int, default=3, help="this many seeds, from --seed")
    return parser


def lambda_list(text: str) -> list[float]:
    """--lambdas 0.1,0.3,1,3: positive finite numbers, each once. argparse turns an error into one line."""
    lambdas = []
    for part in text.split(","):
        try:
            lam = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a number: give positive numbers separated "
                                             f"by commas, e.g. 0.1,0.3,1,3") from None
        if not (math.isfinite(lam) and lam > 0):
            raise argparse.ArgumentTypeError(f"λ must be a positive finite number, got {part.strip()}")
        if lam in lambdas:
            raise argparse.ArgumentTypeError(f"λ {lambda_text(lam)} is given twice")
        lambdas.append(lam)
    return lambdas


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """compare.py's command line (or ablations.py's, whose parser is passed): checked, before anything runs."""
    if parser is None:
        parser = make_experiment_parser("NTP and NITP side by side over seeds, from the same weights on the same "
                                        "batches; or --pool several finished comparisons.", "compare.py")
        group = parser.add_argument_group("compare.py")
        group.add_argument("--equal-compute", action="store_true",
                           help="also train NTP for NITP's training FLOPs (more steps, the schedule stretched)")
        group.add_argument("--paper-overhead", action="store_true",
                           help="also train NITP with its head at the paper's +2.3%% of FLOPs, NTP for that run's "
                                "FLOPs, and NITP with a shuffled target (the control: NITP's form, no content)")
        group.add_argument("--lambdas", type=lambda_list, metavar="λ,λ,...",
                           help="also train NITP at each of these weights λ (positive, comma-separated; the one "
                                "equal to --nitp-lambda is the run NITP): NITP(λ) − NTP by λ, and lambdas.png")
        group.add_argument("--probe-depth", action="store_true",
                           help="probe every block's output too, not only the final hidden state (the depth "
                                "picture; a few seconds more per model)")
        group.add_argument("--pool", nargs="+", metavar="OUT_DIR",
                           help="train nothing: summarize the seeds of these finished comparisons together")
    args = train_parse_args(argv, parser=parser)
    if "RANK" in os.environ:
        parser.error(f"{parser.prog} trains its runs one after another in one process: start it with python, "
                     f"not torchrun")
    if args.resume:
        parser.error(f"{parser.prog} starts fresh runs: drop --resume (resume one run with train.py --resume)")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        check_out_dir(args.out_dir)
        if args.pool:
            pool(args.pool, args.out_dir)
            return
        for settings in arms(args, args.seed, arm_changes(args)).values():  # every run checked before the first
            train.setup(settings)
    except ValueError as e:
        fail(str(e), program="compare.py")
    run_or_exit(compare, args, "compare.py")


def run_or_exit(experiment, args: argparse.Namespace, program: str) -> None:
    """Run the experiment; a run that diverges exits with status 3, Ctrl-C with 130, as train.py does."""
    try:
        experiment(args)
    except train.Diverged as e:
        fail(str(e), status=3, program=program)
    except train.Interrupted as e:
        say(str(e), sys.stdout)
        sys.exit(130)


if __name__ == "__main__":
    printable_output()  # before anything prints: a console that cannot hold a character must not crash
    main()
