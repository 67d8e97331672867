"""The device check: everything this project can run on your GPU or Mac, in about 5 minutes, in one report.

    python device_check.py                 # the best device here: CUDA, then MPS, then the CPU
    python device_check.py --device cpu    # any one device

It runs, one after the other, each with a time limit:
  1. the test suite (`python -m pytest`), whose device cases run on this device too;
  2. bench.py in each precision the device trains in;
  3. about 300 steps of `compare.py --seeds 1`;
  4. `--compile` with NITP, and with NITP on an MoE model (not on MPS, which refuses --compile);
  5. DDP under torchrun over nccl, where there are 2 or more GPUs.
and writes device_report.md: the device, the torch build, and each command with its exit status, its time
and the lines that carry its figures. Send that file back, and we can fill in the README's table.
"""
import argparse
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from machinery import pick_device

HERE = Path(__file__).resolve().parent


def precisions(device: torch.device) -> list[str]:
    """The precisions train.py runs in on this device (on the CPU, bf16 only as a GPU's stand-in: its fp16
    matmuls are emulated, and too slow to time here)."""
    if device.type == "mps":
        return ["float32"]
    if device.type == "cpu":
        return ["float32", "bfloat16"]
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return ["float32", "float16"]  # no native bfloat16: refused
    return ["float32", "bfloat16", "float16"]


def checks(device: torch.device, out: Path) -> list[tuple[str, list[str], int, str]]:
    """(what, command, time limit in seconds, the output lines that carry the figures: those that match a regular
    expression, or with "from:" all the lines from the first that matches)."""
    py, dev = sys.executable, ["--device", str(device)]
    todo = [("the test suite", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], 150,
             r"passed|failed|skipped|Error|FAILED")]
    for dtype in precisions(device):
        todo.append((f"bench.py, {dtype}", [py, "bench.py", *dev, "--dtype", dtype, "--rounds", "3",
                                           "--steps-per-round", "3"], 60,
                     r"device|variant|NTP|NITP|MoE|overhead"))
    todo.append(("300 steps of compare.py --seeds 1", [py, "compare.py", "--seeds", "1", *dev,
                                                      "--max-iters", "300", "--out-dir", str(out / "compare")], 120,
                 "from:^summary"))
    if device.type != "mps":
        for what, flags in (("--compile, NITP", []), ("--compile, NITP on MoE", ["--n-expert", "4", "--top-k", "2"])):
            todo.append((what, [py, "train.py", "--nitp", "--compile", *flags, *dev, "--max-iters", "100",
                                "--eval-interval", "50", "--out-dir", str(out / what.split(", ")[1].replace(" ", "-"))],
                         120, r"^model|^step +100|^eval step +100"))
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        todo.append(("DDP, torchrun over nccl, 2 GPUs",
                     [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--nitp",
                      "--max-iters", "100", "--eval-interval", "50", "--out-dir", str(out / "ddp")], 90,
                     r"^model|^step +100|^eval step +100"))
    return todo


def describe(device: torch.device) -> list[str]:
    lines = [f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}",
             f"- device: {device}, {torch.get_num_threads()} CPU threads"]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        lines += [f"- GPU: {torch.cuda.get_device_name(device)}, compute capability {major}.{minor}, "
                  f"{torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}, "
                  f"built for {' '.join(torch.cuda.get_arch_list())}"]
    elif device.type == "mps":
        lines += [f"- Apple MPS, macOS {platform.mac_ver()[0]}"]
    else:
        lines += [f"- CPU: {platform.processor() or platform.machine()}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), or a torch device")
    parser.add_argument("--report", default="device_report.md", help="where the report goes")
    args = parser.parse_args()
    try:
        device = pick_device(args.device)
    except ValueError as e:
        sys.exit(f"device_check.py: error: {e}")
    report = ["# Device check", "", *describe(device), ""]
    started, failed = time.perf_counter(), 0
    with tempfile.TemporaryDirectory() as tmp:
        for what, command, limit, figures in checks(device, Path(tmp)):
            print(f"== {what}: {' '.join(Path(c).name if c == sys.executable else c for c in command)}", flush=True)
            t0 = time.perf_counter()
            try:
                done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=limit)
                status, output = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as e:
                status, output = f"stopped after {limit} s", (e.stdout or b"").decode(errors="replace")
            failed += status != 0
            seconds = time.perf_counter() - t0
            lines = output.splitlines()
            if figures.startswith("from:"):
                first = next((i for i, line in enumerate(lines) if re.search(figures[5:], line)), len(lines))
                shown = lines[first:]
            else:
                shown = [line for line in lines if re.search(figures, line)]
            if status != 0:
                shown += ["(last lines)", *lines[-15:]]
            report += [f"## {what}: {'ok' if status == 0 else 'FAILED, exit ' + str(status)}, {seconds:.0f} s", "",
                       "```", "$ " + " ".join(command[1:]), *shown, "```", ""]
            print(f"   {'ok' if status == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
    report.insert(5, f"{failed} of the checks below failed; {time.perf_counter() - started:.0f} s in all.")
    report.insert(6, "")
    Path(args.report).write_text("\n".join(report) + "\n")
    print(f"report: {args.report}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
