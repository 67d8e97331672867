"""What the tests share: tiny settings, tiny models, the token cache, and the devices to test on.

Run the tests with `python -m pytest -q`. They are hermetic: no network. Tests that train, resume, evaluate,
sample, probe or benchmark take the `device` fixture and run once per device: on the CPU always, and on CUDA
and MPS where present; elsewhere those cases skip, saying why.
"""
import json
import os
from pathlib import Path

# cuBLAS reads its workspace setting once, at the process's first matmul on a GPU, and deterministic mode
# refuses every later matmul if it was unset then: set here, before any test runs a kernel, so that a test that
# passes --deterministic works whatever ran before it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

import data
import nitp
from model import GPT, GPTConfig
from nitp import NITP, NITPConfig

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--log-interval", "5"]


def missing(device: str) -> str | None:
    """Why this machine cannot test `device`, or None if it can."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU here"
    if device == "mps" and not torch.backends.mps.is_available():
        return "no Apple MPS device here"
    return None


@pytest.fixture(params=["cpu", "cuda", "mps"])
def device(request) -> str:
    """Each test that takes this runs on the CPU, and on CUDA and MPS where this machine has them."""
    if missing(request.param):
        pytest.skip(missing(request.param))
    return request.param


def exact(device: str) -> list[str]:
    """Flags for runs that must repeat bit for bit on `device`: on CUDA, torch's deterministic algorithms (the
    CPU is deterministic without them; on MPS we do not know, and the tests compare to 1e-5 there)."""
    return ["--device", device] + (["--deterministic"] if device == "cuda" else [])


def same(a, b, device: str) -> bool:
    """Bit for bit where runs repeat exactly (the CPU; CUDA with exact()), else to 1e-5."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return torch.equal(a, b) if device != "mps" else torch.allclose(a.float(), b.float(), atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def global_torch_settings():
    """Put back what a test switched on for the whole process: --deterministic's deterministic algorithms (left
    on, they make every later CUDA test that scatters or multiplies raise or slow down), and TF32 (a CUDA run's)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    """Keep the token cache out of the repository; share it across tests so each corpus is tokenized once."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path_factory.getbasetemp() / "token_cache")


def tiny_model(n_layer=4, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=n_layer, n_head=2, n_embd=16, **kw))


def tiny_nitp(n_layer=4, d=16, seed=1, **kw) -> NITP:
    torch.manual_seed(seed)
    return NITP(NITPConfig(**kw), n_layer=n_layer, n_embd=d)


def tokens(B=3, T=12, seed=0) -> torch.Tensor:
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


# Poisons for the NaN/inf guard: replace the training loss's result (nitp.TrainingLoss) with one of these

def poison_the_nitp_loss(loss, parts):
    parts["nitp"] = parts["nitp"] * float("nan")
    return parts["lm"] + parts["nitp"], parts


def poison_the_gradients(loss, parts):
    loss.register_hook(lambda grad: grad * float("inf"))  # the loss stays finite, its gradients do not
    return loss, parts


def poison_training_loss(monkeypatch, poison, when, then=None) -> None:
    """At the training steps where when(step) holds (counted from 1, as the logs count), nitp.TrainingLoss returns
    poison(loss, parts) instead of its own result; then(), if given, is called just before, each time."""
    real = nitp.TrainingLoss.forward

    def poisoned(self, x, y, step=0):
        loss, parts = real(self, x, y, step)
        if not when(step + 1):  # `step` counts from 0 here
            return loss, parts
        if then is not None:
            then()
        return poison(loss, parts)

    monkeypatch.setattr(nitp.TrainingLoss, "forward", poisoned)
