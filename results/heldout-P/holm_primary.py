"""Holm over the four primary claims of RESULTS.md section 1: python results/heldout-P/holm_primary.py POOLED_JSON.
The loss one-sided against the margin (stats.below_margin_p), the rest paired()'s two-sided t test against 0."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for stats.py
import stats
summary = json.load(open(sys.argv[1]))["summaries"]["at equal steps"]
rows = [(key, summary[key]) for key in ("val_lm", "erank", "anisotropy", "probe_mean")]
ps = [stats.below_margin_p(s) if key == "val_lm" else s["t_test_p"] for key, s in rows]
for (key, s), p, adj in zip(rows, ps, stats.holm(ps)):
    print(f"{key:11s} {s['mean']:+.4f} [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}]  p {p:.2g}  Holm {adj:.2g}  "
          f"{s['verdict']}")
