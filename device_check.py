"""The device check: everything this project can run on your GPU or Mac, in about 5 minutes, in one report.

    python device_check.py                 # the best device here: CUDA, then MPS, then the CPU
    python device_check.py --device cpu    # any one device
    python device_check.py --quick         # a tiny version of each check, in about a minute: does it all run?

It runs, one after the other, each with a time limit:
  1. the test suite (`python -m pytest`), whose device cases run on this device too;
  2. bench.py in each precision the device trains in;
  3. about 300 steps of `compare.py --seeds 1`;
  4. `--compile` with NITP, and with NITP on an MoE model (not on MPS, which refuses --compile);
  5. DDP under torchrun over nccl, where there are 2 or more GPUs.
and writes device_report.md: the device, the torch build, and each command with its exit status, its time
and the lines that carry its figures. Send that file back, and we can fill in the README's table. The time limits
add up to less than 9 minutes (BUDGET): the whole check fits in a 10-minute job.
"""
import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from machinery import pick_device, printable_output

HERE = Path(__file__).resolve().parent
BUDGET = 530  # seconds: the most that all the checks may take together, whatever each one's own limit
QUICK_SHAPE = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4"]


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


def checks(device: torch.device, out: Path, quick: bool = False) -> list[tuple[str, list[str], int, str]]:
    """(what, command, time limit in seconds, the output lines that carry the figures: those that match a regular
    expression, or with "from:" all the lines from the first that matches). quick: one test instead of the suite,
    bench.py and compare.py on a tiny model in float32 only, no --compile and no torchrun."""
    py, dev = sys.executable, ["--device", str(device)]
    tiny = QUICK_SHAPE if quick else []
    suite = ["test_devices.py::test_auto_precision_follows_the_device"] if quick else ["-m", "not slow"]
    todo = [("the test suite", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suite], 150,
             r"passed|failed|skipped|Error|FAILED")]
    for dtype in precisions(device)[:1 if quick else None]:
        todo.append((f"bench.py, {dtype}", [py, "bench.py", *dev, *tiny, "--dtype", dtype, "--rounds",
                                           "1" if quick else "3", "--steps-per-round", "1" if quick else "3"], 35,
                     r"device|variant|NTP|NITP|MoE|overhead"))
    steps = "4" if quick else "300"
    todo.append((f"{steps} steps of compare.py --seeds 1", [py, "compare.py", "--seeds", "1", *dev, *tiny,
                                                           *(["--eval-iters", "2"] if quick else []),
                                                           "--max-iters", steps, "--out-dir", str(out / "compare")],
                 75, "from:^summary"))
    if device.type != "mps" and not quick:
        for what, flags in (("--compile, NITP", []), ("--compile, NITP on MoE", ["--n-expert", "4", "--top-k", "2"])):
            todo.append((what, [py, "train.py", "--nitp", "--compile", *flags, *dev, "--max-iters", "100",
                                "--eval-interval", "50", "--out-dir", str(out / what.split(", ")[1].replace(" ", "-"))],
                         70, r"^model|^step +100|^eval step +100"))
    if device.type == "cuda" and torch.cuda.device_count() >= 2 and not quick:
        todo.append(("DDP, torchrun over nccl, 2 GPUs",
                     [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--nitp",
                      "--max-iters", "100", "--eval-interval", "50", "--out-dir", str(out / "ddp")], 60,
                     r"^model|^step +100|^eval step +100"))
    return todo


def run_check(command: list[str], limit: float) -> tuple[int | str, str]:
    """Run one check: (its exit status, or why it was stopped; its output). The child writes UTF-8, whatever
    the console's code page, and whatever still does not decode is replaced: the report is never lost."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    try:
        done = subprocess.run(command, cwd=HERE, capture_output=True, timeout=limit, env=env)
        return done.returncode, decoded(done.stdout) + decoded(done.stderr)
    except subprocess.TimeoutExpired as e:
        return f"stopped after {limit:.0f} s", decoded(e.stdout) + decoded(e.stderr)


def decoded(output: bytes | str | None) -> str:
    """A child's output as text. After a timeout it is bytes on Linux and macOS, but may be str on Windows
    (subprocess.run collects it there with a second communicate()), or None."""
    if isinstance(output, bytes):
        return output.decode("utf-8", errors="replace")
    return output or ""


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
    parser.add_argument("--quick", action="store_true", help="a tiny version of each check (one test, float32 "
                        "only, no --compile or torchrun): does everything run here? No figures worth sending")
    args = parser.parse_args()
    try:
        device = pick_device(args.device)
    except ValueError as e:
        sys.exit(f"device_check.py: error: {e}")
    report = ["# Device check", "", *describe(device), ""]
    started, failed = time.perf_counter(), 0
    with tempfile.TemporaryDirectory() as tmp:
        for what, command, limit, figures in checks(device, Path(tmp), args.quick):
            print(f"== {what}: {' '.join(Path(c).name if c == sys.executable else c for c in command)}", flush=True)
            t0 = time.perf_counter()
            left = BUDGET - (t0 - started)  # a slow check leaves less time to the ones after it
            status, output = run_check(command, min(limit, left)) if left > 1 else ("not run: out of time", "")
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
    Path(args.report).write_text("\n".join(report) + "\n", encoding="utf-8")
    print(f"report: {args.report}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    printable_output()
    main()
