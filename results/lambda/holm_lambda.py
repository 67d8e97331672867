"""Holm over the 16 tests of RESULTS.md section 5 (four λ, four metrics each: the validation loss one-sided against
the +0.01 margin, stats.below_margin_p; the rest paired()'s two-sided t tests against 0, the probe score's with the
text's variance), and the free-λ test (rank above 0 and loss below the margin, both after Holm):
python results/lambda/holm_lambda.py POOLED_JSON."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for stats.py and compare.py
import stats
from compare import lambda_words

pooled = json.load(open(sys.argv[1]))
parts = {row["lambda"]: pooled["summaries"]["at equal steps" if row["arm"] == "NITP" else lambda_words(row["lambda"])]
         for row in pooled["lambdas"]}  # λ = 1 is the run NITP, compared in "at equal steps"
rows = [(lam, key, part[key]) for lam, part in parts.items() for key in ("val_lm", "erank", "anisotropy", "probe_mean")]
ps = [stats.below_margin_p(s) if key == "val_lm" else s["t_test_p"] for _, key, s in rows]
holds = {}
for (lam, key, s), p, adj in zip(rows, ps, stats.holm(ps)):
    holds[lam, key] = adj < 0.05
    what = "below the margin" if key == "val_lm" else ("above 0" if s["mean"] > 0 else "below 0")
    print(f"λ = {lam:<4g} {key:10s} {s['mean']:+.4f} [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}] n {s['n']}  p {p:.2g}  "
          f"Holm {adj:.2g}  {what + ' after Holm' if adj < 0.05 else 'not settled after Holm'}  ({s['verdict']})")
free = [lam for lam, part in parts.items()
        if part["erank"]["mean"] > 0 and holds[lam, "erank"] and holds[lam, "val_lm"]]
print("free λ (rank above 0 and loss below the margin, both after Holm over 16):",
      ", ".join(f"{lam:g}" for lam in free) or "none")
