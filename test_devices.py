"""Tests of devices and precision (machinery.py): the choices, mocked where the device is absent; autocast on the CPU."""
import sys
import traceback
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

import data
import device_check
import machinery
import train
from conftest import (TINY, exact, poison_the_gradients, poison_the_nitp_loss, poison_training_loss, read_metrics,
                      tiny_model, tokens)
from nitp import anisotropy, effective_rank

# ---------------------------------------------------------------------------------------------------- devices and precision

CUDA, MPS, CPU = torch.device("cuda"), torch.device("mps"), torch.device("cpu")


def gpu_of_capability(monkeypatch, capability: tuple[int, int]) -> None:
    """Stand in for a CUDA GPU of this compute capability: pick_dtype and check_compile ask only this."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("kind,capability,expected", [
    (CUDA, (9, 0), torch.bfloat16), (CUDA, (8, 0), torch.bfloat16),  # H100, A100: native bf16
    (CUDA, (7, 5), torch.float16), (CUDA, (7, 0), torch.float16),    # T4, V100: bf16 only emulated
    (CPU, None, torch.float32), (MPS, None, torch.float32)])
def test_auto_precision_follows_the_device(kind, capability, expected, monkeypatch):
    gpu_of_capability(monkeypatch, capability)
    assert machinery.pick_dtype("auto", kind) == expected


def test_a_precision_the_device_cannot_run_is_refused(monkeypatch):
    gpu_of_capability(monkeypatch, (7, 5))
    with pytest.raises(ValueError, match="compute capability 7.5.*float16"):
        machinery.pick_dtype("bfloat16", CUDA)
    assert machinery.pick_dtype("float16", CUDA) == torch.float16 and machinery.pick_dtype("float32", CUDA) == torch.float32
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match="MPS.*float32"):
            machinery.pick_dtype(dtype, MPS)
    assert [machinery.pick_dtype(d, CPU) for d in ("bfloat16", "float16")] == [torch.bfloat16, torch.float16]


def test_compile_is_refused_where_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="MPS"):
        machinery.check_compile(MPS)
    gpu_of_capability(monkeypatch, (6, 1))  # a GTX 10xx: below Triton's minimum
    with pytest.raises(ValueError, match="7.0"):
        machinery.check_compile(CUDA)
    gpu_of_capability(monkeypatch, (7, 5))
    import torch.utils._triton
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)  # what a T4 with Triton answers
    machinery.check_compile(CUDA)
    machinery.check_compile(CPU)  # this machine's C++ compiler; none missing: test_portability.py


def low_precision(device: str, dtype: str) -> None:
    """Skip where the device cannot train in dtype (or the GPU, without native bf16, refuses it)."""
    if device == "mps":
        pytest.skip("MPS trains in float32 only")
    if device == "cuda" and dtype == "bfloat16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("this GPU has no native bfloat16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_nitp_with_moe_trains_under_autocast_with_the_router_in_fp32(dtype, device, tmp_path, capsys):
    """Under autocast (on the CPU, the stand-in for a GPU's) the matmuls run in the low precision, the router
    stays in fp32, and a few training steps of NITP on an MoE model give finite losses."""
    name = str(dtype).removeprefix("torch.")
    low_precision(device, name)
    model = tiny_model(n_expert=4, experts_per_token=2).to(device)
    router_logits = []
    model.blocks[1].mlp.register_forward_hook(lambda m, i, o: router_logits.append(m.route(i[0].flatten(0, 1))[0]))
    with machinery.autocast_for(torch.device(device), dtype):
        out = model(tokens().to(device), tokens(seed=1).to(device))
    assert out.logits.dtype == dtype and router_logits[0].dtype == torch.float32
    train.main(TINY + ["--nitp", "--device", device, "--n-expert", "4", "--top-k", "2", "--dtype", name,
                       "--max-iters", "4", "--out-dir", str(tmp_path)])
    steps = [r for r in read_metrics(tmp_path) if not r.get("eval")]
    assert len(steps) == 4 and all(np.isfinite([r["lm"], r["nitp"], r["moe_aux"]]).all() for r in steps)
    # fp16's scaler starts at 2^16 and may skip the first steps while it finds its scale; bf16 has no scaler.
    assert all(r.get("skipped") or np.isfinite(r["grad_norm"]) for r in steps)
    assert not any(r.get("skipped") for r in steps) or dtype == torch.float16
    assert name in capsys.readouterr().out.splitlines()[0]


def test_under_fp16_inf_gradients_skip_the_step_and_the_run_goes_on(device, tmp_path, monkeypatch):
    """With --dtype float16 the gradient scaler owns overflow: step 6's inf gradients make it skip that update
    and halve its scale, the run finishes, and metrics.jsonl marks the step as skipped. (The scaler may also
    skip a first step or two while it finds its scale: the same ones in a run without the poison.)"""
    low_precision(device, "float16")
    args = TINY + exact(device) + ["--nitp", "--dtype", "float16", "--max-iters", "8", "--eval-interval", "8"]
    train.main(args + ["--out-dir", str(tmp_path / "clean")])
    poison_training_loss(monkeypatch, poison_the_gradients, when=lambda step: step == 6)
    train.main(args + ["--out-dir", str(tmp_path / "poisoned")])
    skipped = [{r["step"] for r in read_metrics(tmp_path / run) if r.get("skipped")} for run in ("clean", "poisoned")]
    assert 6 not in skipped[0] and skipped[1] == skipped[0] | {6}
    steps = [r for r in read_metrics(tmp_path / "poisoned") if not r.get("eval")]
    assert len(steps) == 8 and steps[5]["grad_norm"] is None
    scales = [torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["scaler"]["scale"] for run in ("clean", "poisoned")]
    assert scales[1] == scales[0] / 2


def test_under_fp16_a_nan_loss_still_stops_the_run(device, tmp_path, monkeypatch, capsys):
    low_precision(device, "float16")
    poison_training_loss(monkeypatch, poison_the_nitp_loss, when=lambda step: step == 6)
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--nitp", "--device", device, "--dtype", "float16", "--max-iters", "8",
                           "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 3 and "step 6: the nitp loss is nan" in capsys.readouterr().err


def test_metrics_give_the_same_numbers_for_states_in_any_dtype_on_any_device():
    """Effective rank and anisotropy compute in float64 on the CPU, whatever the states' dtype and device (on a
    GPU without float64 too: test_portability.py's stand-in)."""
    states = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) @ torch.randn(16, 16)
    present = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rounded = states.to(dtype)
        expected = (effective_rank(rounded.float()), anisotropy(rounded.float()))
        for device in present:
            assert (effective_rank(rounded.to(device)), anisotropy(rounded.to(device))) == expected, (dtype, device)


def test_train_py_reads_one_value_per_step(tmp_path, monkeypatch):
    """On a GPU, reading a tensor's value waits for all queued work. A training step reads the device once, in
    train_step: the loss terms, the gradient norm, the NaN/inf guard and the Ctrl-C flag in one transfer, so
    that the log just appends them. This counts only the reads made in train.py and machinery.py, on the CPU; on
    CUDA the next test counts every sync, the ones inside torch included."""
    reads = []
    for method in ("item", "tolist"):
        def reading(self, *args, real=getattr(torch.Tensor, method)):
            caller = sys._getframe(1).f_code
            if caller.co_filename in (train.__file__, machinery.__file__):
                reads.append(caller.co_name)
            return real(self, *args)
        monkeypatch.setattr(torch.Tensor, method, reading)
    train.main(TINY + ["--nitp", "--max-iters", "12", "--log-interval", "4", "--eval-interval", "6",
                       "--out-dir", str(tmp_path)])
    reads = Counter(reads)
    assert reads.pop("train_step") == 12    # one per step
    assert reads.pop("train") == 1          # the sample, after training
    assert reads.pop("run_a_kernel") == 1   # the device check, once before training
    assert set(reads) <= {"evaluate"}       # the evaluations (steps 0, 6, 12) read what they print
    assert [r["step"] for r in read_metrics(tmp_path) if not r.get("eval")] == list(range(1, 13))


def test_sampling_never_picks_a_token_outside_the_top_k(device):
    """generate samples on the CPU from the masked distribution: with top_k=1 it is greedy decoding."""
    model = tiny_model().to(device)
    torch.manual_seed(0)
    sampled = model.generate(tokens(B=2, T=3).to(device), max_new_tokens=8, top_k=1)
    greedy = tokens(B=2, T=3).to(device)
    for _ in range(8):
        greedy = torch.cat([greedy, model(greedy).logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(sampled, greedy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (set_sync_debug_mode is CUDA's)")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_on_cuda_a_dense_training_step_waits_for_the_gpu_once(dtype, tmp_path):
    """torch.cuda.set_sync_debug_mode reports every operation that makes the host wait for the GPU, inside torch
    too. A dense NITP step (fused AdamW; under fp16 the scaler hands its inf flag to the fused kernel) may wait
    once: train_step's one read of the losses and the NaN guard. Each report names the line of train.py that led to it."""
    if dtype == "bfloat16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("this GPU has no native bfloat16")
    run = train.setup(machinery.parse_args(TINY + ["--nitp", "--device", "cuda", "--dtype", dtype,
                                               "--out-dir", str(tmp_path)]))
    loss_fn = train.training_loss(run)
    train.train_step(run, loss_fn)  # the first step also creates the optimizer state
    syncs = []

    def record(message, *rest, **kw):
        if "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack() if f.filename in (train.__file__, machinery.__file__)]
            syncs.append(f"{frames[-1].name}: {frames[-1].line}" if frames else "outside train.py and machinery.py")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                train.train_step(run, loss_fn)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(syncs) == 3 and all(s.startswith("train_step: *numbers, grad_norm, bad, interrupted =") for s in syncs), syncs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (pinned memory is CUDA's)")
def test_on_cuda_a_batch_travels_through_one_contiguous_pinned_copy(monkeypatch):
    """A batch is a strided view of its windows: to_device stages it in one contiguous, page-locked buffer,
    from which the copy to the GPU need not wait."""
    x, _ = data.get_batch(np.arange(1000, dtype=np.uint16), 8, 16, torch.Generator().manual_seed(0))
    assert not x.is_contiguous()
    sources = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: sources.append(self) or real_to(self, *a, **kw))
    moved = machinery.to_device(x, torch.device("cuda"))
    assert torch.equal(moved.cpu(), x)
    assert sources[0].is_pinned() and sources[0].is_contiguous()


def test_a_gpu_that_the_build_has_no_kernels_for_is_refused_with_the_build_to_install(monkeypatch):
    """A V100 under a wheel built for 7.5 and newer: memory allocates, the first kernel fails. pick_device runs
    a kernel, and turns that failure into one line naming the GPU, its capability and a build that has it."""
    def no_kernel_image(device):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\n"
                           "CUDA kernel errors might be asynchronously reported at some other API call")

    monkeypatch.setattr(machinery, "run_a_kernel", no_kernel_image)
    gpu_of_capability(monkeypatch, (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    with pytest.raises(ValueError) as error:
        machinery.pick_device("cuda")
    message = str(error.value)
    assert "\n" not in message and "V100" in message and "7.0" in message and "sm_75" in message
    assert "whl/cu126" in message and "--device cpu" in message


def test_the_device_check_runs_a_kernel(monkeypatch):
    """pick_device does not stop at allocating memory: it runs a kernel and waits for it."""
    ran = []
    monkeypatch.setattr(machinery, "run_a_kernel", lambda device: ran.append(device))
    assert machinery.pick_device("cpu") == CPU and ran == [CPU]


def test_the_device_check_plans_what_each_device_can_run(monkeypatch, tmp_path):
    """device_check.py: the suite, bench.py in each precision the device trains in, compare.py, --compile (not
    on MPS) and torchrun over nccl (only with 2+ GPUs)."""
    def planned(kind, capability=(9, 0), gpus=1):
        gpu_of_capability(monkeypatch, capability)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        return [what for what, *_ in device_check.checks(torch.device(kind), tmp_path)]

    assert planned("cuda", gpus=2) == [
        "the test suite", "bench.py, float32", "bench.py, bfloat16", "bench.py, float16",
        "300 steps of compare.py --seeds 1", "--compile, NITP", "--compile, NITP on MoE",
        "DDP, torchrun over nccl, 2 GPUs"]
    assert "bench.py, bfloat16" not in planned("cuda", capability=(7, 5))  # a T4: no native bf16
    assert not any("DDP" in what for what in planned("cuda"))
    assert planned("mps") == ["the test suite", "bench.py, float32", "300 steps of compare.py --seeds 1"]
