"""Tests of what breaks on a learner's machine that is not ours, each on this CPU: a stand-in for a GPU that has no
float64 (MPS), consoles that cannot print every character (Windows), a suite run in any order on CUDA, and
--compile, fp16, TF32 and the kernel message with the device or the toolchain mocked (DEVICES.md)."""
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

import data
import device_check
import machinery
import nitp
import probe
import train
from conftest import HERE, TINY, read_metrics, tiny_model, tiny_nitp, tokens

CUDA, CPU = torch.device("cuda"), torch.device("cpu")

# ---------------------------------------------------------------------------------------------------- a GPU without float64


class OnTheDevice(torch.Tensor):
    """A stand-in for a tensor on an Apple GPU (MPS), for what MPS lacks: float64. An op whose result would be a
    float64 tensor while "on the device" raises, as MPS does (torch <= 2.13; later versions give zeros or another
    error), .to("cpu", torch.float64) included, since that casts on the device before the copy. .cpu() and
    .to("cpu") (with a dtype MPS has, or none) bring it back as a plain CPU tensor; every other op keeps it on
    the "device", as ops on an MPS tensor do."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and moves_to_the_cpu(args[1:], kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*args, **kwargs).as_subclass(torch.Tensor)
        else:
            result = super().__torch_function__(func, types, args, kwargs)
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves(result)):
            raise TypeError(f"{func.__name__}: Cannot convert a float64 Tensor to MPS as the MPS framework doesn't "
                            f"support float64 (the stand-in for a GPU without float64)")
        return result


def moves_to_the_cpu(args: tuple, kwargs: dict) -> bool:
    """Is Tensor.to(*args, **kwargs) a move to the CPU (with or without a dtype)?"""
    return str(kwargs.get("device", args[0] if args else None)) == "cpu" and not isinstance(args[0], torch.Tensor)


def on_the_device(model: torch.nn.Module) -> torch.nn.Module:
    """model's inputs, and so everything it computes from them, become OnTheDevice tensors."""
    model.register_forward_pre_hook(lambda module, args: (args[0].as_subclass(OnTheDevice), *args[1:]))
    return model


def test_the_stand_in_refuses_float64_on_the_device_and_allows_it_on_the_cpu():
    """What the tests below rely on: the stand-in fails where MPS fails, and only there."""
    states = torch.randn(4, 3).as_subclass(OnTheDevice)
    for cast in (lambda t: t.to("cpu", torch.float64), lambda t: t.double(), lambda t: t.to(torch.float64),
                 lambda t: t.sum(dtype=torch.float64)):
        with pytest.raises(TypeError, match="float64"):
            cast(states)
    assert type(states * 2) is OnTheDevice and type(states.to("cpu")) is torch.Tensor
    assert type(states.cpu().double()) is torch.Tensor and states.cpu().dtype == torch.float32
    assert type(states.to("cpu", torch.float16)) is torch.Tensor


def test_the_metrics_of_states_on_a_gpu_without_float64_equal_those_on_the_cpu():
    """nitp.effective_rank and nitp.anisotropy (the pip module's) copy the states to the CPU before float64."""
    states = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(0))
    device_states = states.as_subclass(OnTheDevice)
    assert nitp.effective_rank(device_states) == nitp.effective_rank(states)
    assert nitp.anisotropy(device_states) == nitp.anisotropy(states)
    geometry = nitp.Geometry().add(device_states).add(device_states[:2])
    assert geometry.effective_rank() == nitp.Geometry().add(states).add(states[:2]).effective_rank()


@pytest.mark.parametrize("flags", [[], ["--n-expert", "4", "--top-k", "2"]], ids=["dense", "moe"])
def test_the_evaluation_runs_on_a_gpu_without_float64(flags, tmp_path):
    """train.evaluate (losses, the geometry of every layer, the NITP diagnostics' gradients) of a model whose
    outputs stand in for MPS tensors gives the numbers of the same evaluation on the CPU."""
    run = train.setup(machinery.parse_args(TINY + flags + ["--nitp", "--out-dir", str(tmp_path)]))
    batches = train.validation_batches(run.dataset.val, 4, 16, run.device, 2)
    on_cpu = train.evaluate(run, train.training_loss(run), batches)
    on_the_device(run.model)
    assert train.evaluate(run, train.training_loss(run), batches) == on_cpu


def test_the_probes_collect_states_on_a_gpu_without_float64():
    """probe.states brings a model's states to the CPU in fp32 whatever device computed them."""
    model, windows = tiny_model(), tokens(B=5, T=16)
    expected = probe.states(model, windows, batch_size=2)
    collected = probe.states(on_the_device(model), windows, batch_size=2)
    assert all(type(s) is torch.Tensor and torch.equal(s, e) for s, e in zip(collected, expected, strict=True))


# ---------------------------------------------------------------------------------------------------- fp16 diagnostics


def test_fp16_diagnostics_scale_the_losses_as_training_does():
    """Under float16 autocast a small λ·L_NITP has gradients below float16's range: taken unscaled they are 0.
    With the scaler's scale (what train.evaluate passes) they match float32's; a scale that overflows is halved."""
    model, head, x, y = tiny_model(), tiny_nitp(lam=1e-6), tokens(), tokens(seed=1)
    fp16 = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    reference = nitp.diagnostics(model, head, x, y, contextlib.nullcontext())
    assert nitp.diagnostics(model, head, x, y, fp16())["grad_nitp"] == 0.0  # what an unscaled backward gives
    scaled = nitp.diagnostics(model, head, x, y, fp16(), loss_scale=2.0 ** 16)
    assert scaled["grad_nitp"] == pytest.approx(reference["grad_nitp"], rel=1e-3)
    assert scaled["grad_cos"] == pytest.approx(reference["grad_cos"], abs=1e-3)
    head.config.lam = 1.0
    overflowing = nitp.diagnostics(model, head, x, y, fp16(), loss_scale=2.0 ** 40)
    assert overflowing["grad_lm"] == pytest.approx(nitp.diagnostics(model, head, x, y, contextlib.nullcontext())["grad_lm"],
                                                   rel=1e-3)


def test_the_evaluation_hands_the_diagnostics_the_gradient_scale(tmp_path):
    """A --dtype float16 run with a tiny λ: the evaluation's NITP gradient is float32's, not float16's 0."""
    records = {}
    for dtype in ("float32", "float16"):
        train.main(TINY + ["--nitp", "--nitp-lambda", "1e-6", "--dtype", dtype, "--max-iters", "1",
                           "--out-dir", str(tmp_path / dtype)])
        records[dtype] = [r for r in read_metrics(tmp_path / dtype) if r.get("eval")][0]  # step 0: same weights
    assert records["float16"]["grad_nitp"] == pytest.approx(records["float32"]["grad_nitp"], rel=1e-2)


# ---------------------------------------------------------------------------------------------------- CUDA: TF32, kernels


def test_float32_on_cuda_multiplies_in_tf32_and_says_so(monkeypatch):
    """The choice nanoGPT makes: TF32 matmuls on CUDA. The CPU's float32 is left alone (bit-identical runs)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # put back by conftest
    machinery.Precision(CPU, torch.float32)
    assert not torch.backends.cuda.matmul.allow_tf32
    machinery.Precision(CUDA, torch.float32)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert "TF32" in machinery.make_parser().format_help()


# torch 2.13.0's torch.cuda.PYTORCH_RELEASES_CODE_CC: planted, so that the test does not depend on the installed
# torch's list (2.14.1's starts at 13.0 for Blackwell, and its message names cu130 there, rightly).
TORCH_2_13_BUILDS = {"12.6": {"x86_64": {50, 60, 70, 75, 80, 86, 90}, "aarch64": {80, 90}},
                     "12.9": {"x86_64": {75, 80, 86, 90, 100, 120}, "aarch64": {80, 90, 100, 120}},
                     "13.0": {"x86_64": {75, 80, 86, 90, 100, 120}, "aarch64": {80, 90, 100, 110, 120}},
                     "13.2": {"x86_64": {75, 80, 86, 90, 100, 120}, "aarch64": {80, 90, 100, 110, 120}}}


@pytest.mark.parametrize("capability,build", [((12, 0), "cu129"), ((10, 0), "cu129"), ((8, 6), "cu126"),
                                              ((7, 0), "cu126"), ((6, 1), "cu126"), ((3, 7), None)],
                         ids=["rtx50", "b200", "rtx30", "v100", "gtx10", "k80"])
@pytest.mark.parametrize("torch_lists_builds", [True, False], ids=["torch's-list", "ours"])
def test_the_missing_kernels_message_names_a_build_for_the_gpus_compute_capability(capability, build,
                                                                                  torch_lists_builds, monkeypatch):
    """A Blackwell card (10.x, 12.x) needs a CUDA 12.8+ build (12.9 is the oldest in torch 2.13's list), a V100 or
    a GTX 10xx the 12.6 one; a Kepler card none. From torch's own list where it has one (here torch 2.13's,
    planted), else ours."""
    if torch_lists_builds:
        monkeypatch.setattr(torch.cuda, "PYTORCH_RELEASES_CODE_CC", TORCH_2_13_BUILDS, raising=False)
    else:
        monkeypatch.delattr(torch.cuda, "PYTORCH_RELEASES_CODE_CC", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "some GPU")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    message = machinery.missing_kernels(CUDA)
    assert "\n" not in message and f"{capability[0]}.{capability[1]}" in message and "--device cpu" in message
    if build:
        assert f"whl/{build} " in message and message.count("whl/") == 1
    else:
        assert "whl/" not in message and "no CUDA build" in message


# ---------------------------------------------------------------------------------------------------- --compile


def one_line_and_exit_2(argv, capsys, expected: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_compile_without_dynamo_triton_or_a_compiler_gives_one_line(tmp_path, monkeypatch, capsys):
    """What torch.compile needs, each missing in turn (mocked): dynamo for this Python (none for 3.15 in torch
    2.13), Triton on CUDA (not in the Windows CUDA wheels), a C++ compiler on the CPU (no MSVC on Windows)."""
    import torch._dynamo
    import torch._inductor.cpp_builder
    import torch.utils._triton
    argv = TINY + ["--compile", "--max-iters", "1", "--out-dir", str(tmp_path / "out")]
    with monkeypatch.context() as m:
        m.setattr(torch._dynamo.eval_frame, "is_dynamo_supported", lambda: False)
        one_line_and_exit_2(argv + ["--device", "cpu"], capsys, "has no torch.compile for Python")

    def no_compiler():
        raise torch._inductor.exc.InvalidCxxCompiler()

    with monkeypatch.context() as m:
        m.setattr(torch._inductor.cpp_builder, "get_cpp_compiler", no_compiler)
        one_line_and_exit_2(argv + ["--device", "cpu"], capsys, "no C++ compiler")
    with monkeypatch.context() as m:  # a T4 with a wheel that has no Triton
        m.setattr(machinery, "pick_device", lambda name: CUDA)
        m.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
        m.setattr(torch.utils._triton, "has_triton", lambda: False)
        one_line_and_exit_2(argv, capsys, "Triton")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- the suite on CUDA


def test_the_suite_resets_deterministic_mode_after_each_test_and_sets_the_workspace_at_import(tmp_path):
    """Two tests in a pytest of their own, with this conftest: the first finds CUBLAS_WORKSPACE_CONFIG set before
    it runs a kernel (unset in the environment) and turns deterministic mode and TF32 on; the second, run after
    it, finds both off again. Without conftest's fixture, the second fails."""
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_order.py").write_text(
        "import os\nimport torch\n\n\n"
        "def test_1_switches_on():\n"
        "    assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'\n"
        "    torch.use_deterministic_algorithms(True)\n"
        "    torch.backends.cuda.matmul.allow_tf32 = True\n\n\n"
        "def test_2_finds_it_off():\n"
        "    assert not torch.are_deterministic_algorithms_enabled()\n"
        "    assert not torch.backends.cuda.matmul.allow_tf32\n")
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    env.update(PYTHONPATH=str(HERE), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_order.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------- Windows consoles


def test_the_device_check_keeps_its_report_whatever_a_timed_out_child_printed(monkeypatch):
    """After a timeout, subprocess.run hands back bytes on Linux and macOS but str on Windows, or None."""
    for output in (b"caf\xc3\xa9 \xff", "café", None):
        def timing_out(*args, output=output, **kw):
            raise subprocess.TimeoutExpired(args[0], 5, output=output, stderr=None)

        monkeypatch.setattr(subprocess, "run", timing_out)
        status, text = device_check.run_check(["anything"], 5)
        assert status == "stopped after 5 s" and text in ("café \ufffd", "café", "")


def test_the_device_checks_fit_a_ten_minute_job(monkeypatch, tmp_path):
    """The time limits of the longest plan (CUDA with 2 GPUs) add up to the budget or less, under 9 minutes."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    longest = device_check.checks(CUDA, tmp_path)
    assert len(longest) == 8 and sum(limit for _, _, limit, _ in longest) <= device_check.BUDGET <= 540


def entry_point(tmp_path, *argv: str) -> tuple[int, str]:
    """`python ARGV` as on Windows with its output redirected: stdout and stderr to a file in cp1252, which stops
    at the first character it lacks unless told otherwise. Returns the exit status and the output."""
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "OMP_NUM_THREADS": "1", "NITP_CACHE_DIR": str(data.CACHE_DIR)}
    log = tmp_path / f"{Path(argv[0]).stem}.log"
    with open(log, "wb") as out:
        status = subprocess.run([sys.executable, *argv], cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=300).returncode
    return status, log.read_bytes().decode("cp1252")


ENTRY_POINTS = ["train.py", "compare.py", "ablations.py", "probe.py", "bench.py", "device_check.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_prints_on_a_console_that_lacks_its_characters(script, tmp_path):
    status, output = entry_point(tmp_path, script, "--help")
    assert status == 0 and "usage:" in output and "Traceback" not in output, output[-2000:]


SHAPE = TINY[:TINY.index("--eval-iters")]


@pytest.mark.slow
def test_every_entry_point_finishes_on_a_console_that_lacks_its_characters(tmp_path):
    """train.py (its sample may hold U+FFFD), probe.py, compare.py and ablations.py (their summaries print "−"),
    bench.py and device_check.py --quick, on tiny settings: each exits 0 and writes its files."""
    run, tiny = tmp_path / "train", TINY + ["--max-iters", "4", "--eval-interval", "2"]
    steps = {"train.py": [*tiny, "--nitp", "--out-dir", str(run)],
             "probe.py": ["--out-dir", str(run)],
             "compare.py": [*tiny, "--seeds", "1", "--out-dir", str(tmp_path / "compare")],
             "ablations.py": [*tiny, "--max-iters", "2", "--seeds", "1", "--out-dir", str(tmp_path / "ablations")],
             "bench.py": [*SHAPE, "--rounds", "1", "--steps-per-round", "1"],
             "device_check.py": ["--quick", "--device", "cpu", "--report", str(tmp_path / "report.md")]}
    assert list(steps) == ENTRY_POINTS[:1] + ["probe.py"] + ENTRY_POINTS[1:3] + ENTRY_POINTS[4:]
    outputs = {}
    for script, argv in steps.items():
        status, outputs[script] = entry_point(tmp_path, script, *argv)
        assert status == 0 and "Traceback" not in outputs[script], (script, outputs[script][-3000:])
    assert (run / "metrics.jsonl").exists() and (run / "ckpt.pt").exists() and "sample:" in outputs["train.py"]
    assert (run / "probe.json").exists()
    assert (tmp_path / "compare" / "compare.json").exists() and "summary:" in outputs["compare.py"]
    assert (tmp_path / "ablations" / "ablations.json").exists()
    assert "NITP overhead" in outputs["bench.py"]
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "0 of the checks below failed" in report, report
