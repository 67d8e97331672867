"""Holm over the 16 tests of RESULTS.md section 5 (four λ, four metrics each: the validation loss one-sided against
the +0.01 margin, the rest two-sided paired t tests against 0, the probe score's with the text's variance), and the
free-λ test (rank above 0 and loss below the margin, both after Holm): python results/lambda/holm_lambda.py POOLED_JSON."""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for stats.py
import stats

pooled = json.load(open(sys.argv[1]))
rows, ps = [], []
for row in pooled["lambdas"]:
    part = pooled["summaries"]["at equal steps" if row["arm"] == "NITP" else f"λ = {row['lambda']:g}"]
    for key in ("val_lm", "erank", "anisotropy", "probe_mean"):
        s = part[key]
        se = math.sqrt(s["std"] ** 2 / s["n"] + (s.get("shared_var") or 0.0))
        if key == "val_lm":  # one-sided: H0 mean >= margin
            t = (s["mean"] - stats.LOSS_MARGIN) / se
            two = stats.t_two_sided_p(t, s["n"] - 1)
            p = two / 2 if t < 0 else 1 - two / 2
        else:
            p = stats.t_two_sided_p(s["mean"] / se, s["n"] - 1)
        ps.append(p)
        rows.append((row["lambda"], key, s["mean"], s["ci"], s["n"], s.get("verdict")))
adjusted = stats.holm(ps)
holds = {}
for (lam, key, mean, ci, n, verdict), p, adj in zip(rows, ps, adjusted):
    holds[lam, key] = adj < 0.05 and (key == "val_lm" or mean != 0)
    what = "below the margin" if key == "val_lm" else ("above 0" if mean > 0 else "below 0")
    print(f"λ = {lam:<4g} {key:10s} {mean:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] n {n}  p {p:.2g}  Holm {adj:.2g}  "
          f"{what + ' after Holm' if adj < 0.05 else 'not settled after Holm'}  ({verdict})")
free = [lam for lam, key, mean, *_ in rows if key == "erank" and mean > 0 and holds[lam, "erank"] and holds[lam, "val_lm"]]
print("free λ (rank above 0 and loss below the margin, both after Holm over 16):",
      ", ".join(f"{lam:g}" for lam in free) or "none")
