"""Holm over the 16 secondary tests of RESULTS.md section 1 (four comparisons of --paper-overhead, four metrics
each; two-sided paired t tests against 0, the probe score's with the text's variance):
python results/heldout-S/holm_secondary.py POOLED_JSON."""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for stats.py
import stats

summaries = json.load(open(sys.argv[1]))["summaries"]
names = [name for name in summaries if name != "at equal steps"]
rows, ps = [], []
for name in names:
    for key in ("val_lm", "erank", "anisotropy", "probe_mean"):
        s = summaries[name][key]
        se = math.sqrt(s["std"] ** 2 / s["n"] + (s.get("shared_var") or 0.0))
        ps.append(stats.t_two_sided_p(s["mean"] / se, s["n"] - 1))
        rows.append((name, key, s["mean"], s["ci"], s["n"], s.get("verdict")))
for (name, key, mean, ci, n, verdict), p, adjusted in zip(rows, ps, stats.holm(ps)):
    print(f"{name[:40]:40s} {key:10s} {mean:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] n {n}  p {p:.2g}  Holm {adjusted:.2g}"
          f"  {'holds' if adjusted < 0.05 else 'not settled after Holm'}  ({verdict})")
