"""Holm over the 16 secondary tests of RESULTS.md section 1 (four comparisons of --paper-overhead, four metrics
each; paired()'s two-sided t tests against 0, the probe score's with the text's variance):
python results/heldout-S/holm_secondary.py POOLED_JSON."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for stats.py
import stats

summaries = json.load(open(sys.argv[1]))["summaries"]
rows = [(name, key, summaries[name][key]) for name in summaries if name != "at equal steps"
        for key in ("val_lm", "erank", "anisotropy", "probe_mean")]
ps = [s["t_test_p"] for _, _, s in rows]
for (name, key, s), p, adjusted in zip(rows, ps, stats.holm(ps)):
    print(f"{name[:40]:40s} {key:10s} {s['mean']:+.4f} [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}] n {s['n']}  p {p:.2g}"
          f"  Holm {adjusted:.2g}  {'holds' if adjusted < 0.05 else 'not settled after Holm'}  ({s['verdict']})")
