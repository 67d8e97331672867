"""Where training runs: the device, the precision, and the processes under torchrun.

Learners train on a laptop CPU, a MacBook (MPS), a free Colab T4 or an older lab GPU, with whatever torch they
have. What each can run differs, and this file holds those differences, so that train.py and bench.py only
ask: which device, which precision, how do batches get there.
"""
import contextlib
import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """The device to train on, checked by running a kernel there. A GPU that this torch build has no kernels for
    (its wheel was built for newer GPUs only) is refused with the build to install instead."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: one GPU per process on this machine
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device = torch.device(name)
        run_a_kernel(device)
    except (RuntimeError, AssertionError) as e:  # AcceleratorError (torch 2.9+) is a RuntimeError
        if "no kernel image" in str(e):
            raise ValueError(missing_kernels(device)) from None
        reason = str(e).splitlines()[0].split(". ")[0][:160]  # torch's first sentence; the rest lists backends
        raise ValueError(f"device {name!r} is not usable here ({reason}); try --device cpu") from None
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the current GPU, for the kernels that take no device (and for nccl)
    return device


def run_a_kernel(device: torch.device) -> None:
    """Allocating memory is not enough: a GPU older than the build's kernels allocates fine and fails at the
    first kernel. .item() waits for the kernel, so that its error surfaces here."""
    (torch.ones(4, device=device) * 2).sum().item()


def missing_kernels(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return (f"this PyTorch build ({torch.__version__}) has no kernels for {torch.cuda.get_device_name(device)} "
            f"(compute capability {major}.{minor}; the build has {' '.join(torch.cuda.get_arch_list())}); "
            f"install a build for it, e.g. pip install torch --index-url https://download.pytorch.org/whl/cu126 "
            f"(kernels for 5.0 to 9.0), or use --device cpu")


def use_deterministic_algorithms() -> None:
    """For --deterministic. Without it, CUDA runs differ in the last bits from run to run: attention's backward
    and index_add_ (the MoE's scatter) add up partial results in whatever order the GPU's threads finish. cuBLAS
    reads its workspace setting once, at its first call: it must be set before any matmul."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def optimizer_kernels(device: torch.device) -> dict:
    """How AdamW runs here: one fused kernel for all parameters on CUDA and MPS (both since torch 2.4). On the
    CPU, the default loop over the parameters: the classroom numbers were measured with it, and a step of the
    toy model is dominated by the matmuls anyway. checkpoint.restore re-applies this choice on resume, since
    a checkpoint written on another device carries that device's choice."""
    return {"fused": True} if device.type in ("cuda", "mps") else {}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The precision to train in: float32, or autocast to bfloat16 / float16 (with a gradient scaler).

    'auto' picks, like the tools learners know:
      - CUDA with compute capability 8.0+ (A100, RTX 30xx and newer): bfloat16, native on their tensor cores;
      - older CUDA GPUs (T4, V100, RTX 20xx): float16. Recent torch says bf16 is "supported" there, but it is
        emulated, without tensor cores (reported at about a tenth of fp16's speed on a T4);
      - the CPU: float32. Even on ours, whose bf16 GEMM is faster, bf16 autocast made the small model's steps
        slower (RESULTS.md, "The classroom model" under "Speed");
      - MPS: float32. Autocast on MPS is new (torch 2.5+) and we could not test it, so MPS trains in fp32.
    An explicit choice that the device cannot run is refused with one line."""
    if device.type == "cuda":
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        if name == "auto":
            return torch.bfloat16 if native_bf16 else torch.float16
        if name == "bfloat16" and not native_bf16:
            major, minor = torch.cuda.get_device_capability(device)
            raise ValueError(f"this GPU (compute capability {major}.{minor}) has no native bfloat16; "
                             f"use --dtype float16 (what auto picks here)")
    elif device.type == "mps" and name not in ("auto", "float32"):
        raise ValueError("on MPS this code trains in float32 only (autocast there is new and untested by us); "
                         "use --dtype float32")
    return torch.float32 if name == "auto" else DTYPES[name]


def autocast_for(device: torch.device, dtype: torch.dtype):
    """The autocast context for the forward passes: none in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """fp16 gradients can underflow: the scaler multiplies the loss before backward, and skips any step whose
    scaled gradients overflowed. With bf16 or fp32 it is switched off and passes everything through."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def check_compile(device: torch.device) -> None:
    """--compile where torch.compile can run: refused with one line elsewhere, rather than a long traceback later."""
    if device.type == "mps":
        raise ValueError("--compile is not supported on MPS here (prototype in torch, untested by us); "
                         "drop --compile")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
        raise ValueError("--compile needs a GPU of compute capability 7.0 or higher (Triton); drop --compile")


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to GPU through one contiguous pinned copy, without waiting: the copy overlaps the work already
    queued. (A batch is a strided view of its windows; pin_memory() would keep the strides, and a strided copy
    to the GPU first makes an unpinned temporary, which waits.)"""
    if device.type != "cuda":
        return batch.to(device)
    staged = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)  # contiguous and page-locked
    staged.copy_(batch)
    return staged.to(device, non_blocking=True)


def torchrun_rank(device: torch.device) -> tuple[int, int]:
    """(rank, world size) from the variables torchrun sets; (0, 1) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"torchrun runs on CUDA GPUs (nccl) or the CPU (gloo), not on {device.type}; "
                         f"add --device cpu")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
