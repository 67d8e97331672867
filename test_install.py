"""Tests of the package: `pip install .` gives `import nitp` from any folder, with torch as its only need."""
import subprocess
import sys

import pytest



def test_nitp_imports_from_outside_the_checkout_once_installed(tmp_path):
    """Run from an empty folder, where the checkout is not on sys.path: `import nitp` finds the installed
    module (CI installs the package with `pip install .`) and computes a loss."""
    script = ("import sys, torch, nitp\n"
              "n = nitp.NITP(nitp.NITPConfig(), n_layer=4, n_embd=8)\n"
              "h, z = torch.randn(2, 5, 8), torch.randn(2, 5, 8)\n"
              "print(nitp.__file__, float(n(h, z)), sorted(m for m in ('model', 'data', 'train') if m in sys.modules))\n")
    found = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    if "No module named 'nitp'" in found.stderr:
        pytest.skip("nitp is not pip-installed in this environment (pip install . in the checkout)")
    assert found.returncode == 0, found.stderr
    path, loss, others = found.stdout.split(" ", 2)
    assert path.endswith("nitp.py") and 0 <= float(loss) <= 2
    assert others.strip() == "[]"  # nothing else of the checkout came with it
