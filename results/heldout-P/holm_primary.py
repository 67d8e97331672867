"""Holm over the four primary claims of RESULTS.md section 1: python results/heldout-P/holm_primary.py POOLED_JSON."""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for stats.py
import stats
summary = json.load(open(sys.argv[1]))["summaries"]["at equal steps"]
ps, rows = [], []
for key, claim in (("val_lm", "not worse"), ("erank", "higher"), ("anisotropy", "lower"), ("probe_mean", "higher")):
    s = summary[key]
    n = s["n"]; se = math.sqrt(s["std"] ** 2 / n + (s.get("shared_var") or 0.0))
    if claim == "not worse":   # one-sided: H0 mean >= margin
        t = (s["mean"] - stats.LOSS_MARGIN) / se
    else:                      # two-sided against 0
        t = s["mean"] / se
    two = stats.t_two_sided_p(t, n - 1)
    p = (two / 2 if t < 0 else 1 - two / 2) if claim == "not worse" else two
    ps.append(p); rows.append((key, s["mean"], s["ci"], p, s.get("verdict")))
for (key, mean, ci, p, verdict), adj in zip(rows, stats.holm(ps)):
    print(f"{key:11s} {mean:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]  p {p:.2g}  Holm {adj:.2g}  {verdict}")
