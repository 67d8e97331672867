"""Tests for hf_example.py: NITP on Hugging Face GPT-2 and Llama. Hermetic: tiny configs, CPU, no hub access."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="hf_example.py needs Hugging Face transformers (pip install transformers)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from hf_example import (  # noqa: E402
    N_LAYER,
    VOCAB,
    NITPTrainer,
    build_model,
    byte_batches,
    byte_dataset,
    losses,
    nitp_states,
    saved_keys,
    train,
)
from nitp import NITP, NITPConfig  # noqa: E402

ARCHS = ["gpt2", "llama"]


def tiny(arch, seed=0):
    """(model in eval mode, so dropout cannot break equalities; NITP head; a batch of ids (2, 16))."""
    torch.manual_seed(seed)
    model = build_model(arch).eval()
    nitp = NITP(NITPConfig(), n_layer=model.config.num_hidden_layers, n_embd=model.config.hidden_size)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    return model, nitp, x


def decoder_layers(model):
    return model.transformer.h if model.config.model_type == "gpt2" else model.model.layers


def block_output(model, x, k):
    """Block k's output (1-based), captured by a forward hook; decoder layers return a tensor or a tuple."""
    captured = []
    hook = decoder_layers(model)[k - 1].register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        model(x)
    finally:
        hook.remove()
    (out,) = captured
    return out[0] if isinstance(out, tuple) else out


def embedding_output(model, x):
    """The input of the first block, computed from the embedding modules themselves."""
    if model.config.model_type == "gpt2":
        positions = torch.arange(x.size(1))
        return model.transformer.wte(x) + model.transformer.wpe(positions)  # dropout is the identity in eval
    return model.model.embed_tokens(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_h_is_the_lm_head_input(arch):
    model, nitp, x = tiny(arch)
    out = model(x, output_hidden_states=True)
    h, _ = nitp_states(out, nitp.layer)
    assert len(out.hidden_states) == N_LAYER + 1
    torch.testing.assert_close(model.lm_head(h), out.logits)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", range(1, N_LAYER))
def test_z_is_the_output_of_block_k(arch, k):
    model, _, x = tiny(arch)
    _, z = nitp_states(model(x, output_hidden_states=True), k)
    torch.testing.assert_close(z, block_output(model, x, k))


@pytest.mark.parametrize("arch", ARCHS)
def test_z_for_k_0_is_the_embedding_output(arch):
    model, _, x = tiny(arch)
    _, z = nitp_states(model(x, output_hidden_states=True), 0)
    torch.testing.assert_close(z, embedding_output(model, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_last_hidden_state_is_normed_so_k_must_stay_below_n_layer(arch):
    """HF replaces hidden_states[n_layer] by the final norm's output: it is h, not the last block's output."""
    model, _, x = tiny(arch)
    out = model(x, output_hidden_states=True)
    assert not torch.allclose(out.hidden_states[N_LAYER], block_output(model, x, N_LAYER))
    with pytest.raises(ValueError):
        nitp_states(out, N_LAYER)


@pytest.mark.parametrize("arch", ARCHS)
def test_losses_equal_the_by_hand_computation(arch):
    model, nitp, x = tiny(arch)
    total, lm, loss_nitp = losses(model, nitp, x)
    out = model(x, output_hidden_states=True)
    h, z = out.hidden_states[-1], out.hidden_states[nitp.layer]  # (B, T, d) each
    by_hand = (1 - F.cosine_similarity(nitp.head(h[:, :-1]), z[:, 1:], dim=-1)).mean()  # P(h_t) vs z_{t+1}
    torch.testing.assert_close(loss_nitp, by_hand)
    # the LM loss scores position t on token t+1: HF shifts the labels, so they must not be pre-shifted
    torch.testing.assert_close(lm, F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()))
    torch.testing.assert_close(total, lm + nitp.config.lam * loss_nitp)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_the_loss_and_updates_the_head(arch):
    model, nitp, _ = tiny(arch)
    head_before = [p.detach().clone() for p in nitp.parameters()]
    history = train(model, nitp, byte_batches(batch_size=4, seq_len=32), steps=8, log_every=100)
    lm, loss_nitp = zip(*history)
    assert all(torch.isfinite(torch.tensor(history)).flatten())
    assert sum(lm[-2:]) < sum(lm[:2]) and sum(loss_nitp[-2:]) < sum(loss_nitp[:2])
    assert all(not torch.equal(p, q) for p, q in zip(nitp.parameters(), head_before))  # in the optimiser


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_holds_the_lm_and_no_nitp_head(arch, tmp_path):
    model, nitp, x = tiny(arch)
    train(model, nitp, byte_batches(batch_size=2, seq_len=16), steps=2, log_every=100)
    keys = saved_keys(model, tmp_path)
    assert keys and keys <= set(model.state_dict())
    assert not any(name in key for key in keys for name in nitp.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    model.eval()
    torch.testing.assert_close(reloaded(x).logits, model(x).logits)  # tied weights included


# ---- NITPTrainer: the same recipe inside transformers.Trainer (which needs accelerate) ----

LAM = 0.5  # not 1: a part logged unweighted, or twice, breaks loss == lm + λ·nitp


def trainer_setup(arch, tmp_path, n=8, seq_len=16, dataset=None, **overrides):
    """(NITPTrainer with λ = 0.5 on tiny(arch) without dropout, its dataset): by default n windows, all in each step."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    model, nitp, _ = tiny(arch)
    for module in model.modules():  # GPT-2's dropout would break the equalities with the by-hand values
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    nitp.config.lam = LAM
    settings = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=n, learning_rate=1e-2,
                    weight_decay=0.1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                    disable_tqdm=True, seed=0)
    dataset = byte_dataset(n, seq_len) if dataset is None else dataset
    args = TrainingArguments(**{**settings, **overrides})
    return NITPTrainer(model=model, nitp=nitp, args=args, train_dataset=dataset), dataset



def by_hand(model, nitp, dataset, grad=False):
    """(lm, nitp) over the whole dataset as ONE batch, from the states here, not through the trainer."""
    batch = {key: torch.stack([example[key] for example in dataset]) for key in dataset[0]}  # (N, T) each
    with torch.set_grad_enabled(grad):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        h, z = out.hidden_states[-1], out.hidden_states[nitp.layer]                 # (N, T, d) each
        lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())  # -100 ignored
        a = batch["attention_mask"].bool()
        pairs = a[:, :-1] & a[:, 1:]                                                # (N, T-1)
        cos = F.cosine_similarity(nitp.head(h[:, :-1]), z[:, 1:].detach(), dim=-1)  # (N, T-1)
        return lm, (1 - cos)[pairs].mean()


class Snapshots(TrainerCallback):
    """Copies the model's and the head's states at each optimizer step's start, i.e. before its update."""

    def __init__(self, trainer):
        self.trainer, self.states = trainer, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.states.append([{k: v.clone() for k, v in m.state_dict().items()}
                            for m in (self.trainer.model, self.trainer.nitp)])


def safetensors_keys(directory):
    keys = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("loss_kwargs", [True, False], ids=["lm-over-tokens", "lm-per-micro-batch"])
def test_trainer_logs_the_real_parts_averaged_over_steps_under_accumulation(arch, loss_kwargs, tmp_path):
    """Every optimizer step takes the whole dataset in 2 micro-batches, every log averages 2 steps: the logged parts
    must be the by-hand values at the weights before each of those steps, and add up to the Trainer's loss.
    lm-per-micro-batch: as for a model whose forward takes no num_items_in_batch, so its LM loss is a batch mean."""
    trainer, dataset = trainer_setup(arch, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                     logging_steps=2, max_steps=4)
    trainer.model_accepts_loss_kwargs = loss_kwargs
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    trainer.train()
    model, nitp, _ = tiny(arch)
    expected = []
    for model_state, head_state in snapshots.states:
        model.load_state_dict(model_state)
        nitp.load_state_dict(head_state)
        expected.append(torch.stack(by_hand(model, nitp, dataset)))  # (2,) lm, nitp before this step
    logs = [log for log in trainer.state.log_history if "lm_loss" in log]
    assert [log["step"] for log in logs] == [2, 4] and len(expected) == 4
    for log, parts in zip(logs, torch.stack(expected).view(2, 2, 2).mean(dim=1)):  # (log, step, part) -> (log, part)
        torch.testing.assert_close(torch.tensor([log["lm_loss"], log["nitp_loss"]]), parts)
        torch.testing.assert_close(log["loss"], log["lm_loss"] + LAM * log["nitp_loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_optimises_the_head(arch, tmp_path):
    trainer, _ = trainer_setup(arch, tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.nitp.named_parameters()}
    trainer.train()
    groups = {id(p): group for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, p in trainer.nitp.named_parameters():
        assert id(p) in groups, name                         # in the optimizer the Trainer built
        assert groups[id(p)]["weight_decay"] == 0.1, name    # decayed, like the model's matrices
        assert not torch.equal(p.detach(), before[name]), name
        assert p.grad is None, name                          # cleared after each step, like the model's


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_clips_model_and_head_under_one_norm(arch, tmp_path):
    """The logged grad_norm, the norm the Trainer clips to max_grad_norm, covers the model's AND the head's grads."""
    trainer, dataset = trainer_setup(arch, tmp_path, max_steps=1)
    model, nitp, _ = tiny(arch)  # the trainer's starting weights
    lm, loss_nitp = by_hand(model, nitp, dataset, grad=True)
    (lm + LAM * loss_nitp).backward()
    norms = [p.grad.norm() for p in [*model.parameters(), *nitp.parameters()]]  # tied weights: counted once
    trainer.train()
    torch.testing.assert_close(torch.tensor(trainer.state.log_history[0]["grad_norm"]),
                               torch.stack(norms).norm(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_checkpoint_resumes_the_head_and_holds_no_head_in_the_model(arch, tmp_path):
    """4 steps straight = 2 steps, a checkpoint, a new trainer resuming to 4, bitwise (one CPU thread: the same
    batches and operations; a head not restored, or its Adam moments lost, would differ). Resumes mid-epoch."""
    settings = dict(n=16, per_device_train_batch_size=4, max_steps=4, save_strategy="steps", save_steps=2)
    straight, _ = trainer_setup(arch, tmp_path / "straight", **settings)
    straight.train()  # writes checkpoint-2 and checkpoint-4
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    resumed, _ = trainer_setup(arch, tmp_path / "resumed", **settings)
    g = torch.Generator().manual_seed(1)  # not the global RNG, which the Trainer's data order depends on
    for p in [*resumed.nitp.parameters(), *resumed.model.parameters()]:  # new weights: only the checkpoint helps
        torch.nn.init.normal_(p.data, std=0.02, generator=g)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in [(straight.nitp, resumed.nitp), (straight.model, resumed.model)]:
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    head_keys = set(resumed.nitp.state_dict())
    assert set(torch.load(checkpoint / "nitp_head.pt")) == head_keys
    keys = safetensors_keys(checkpoint) | saved_keys(resumed.model, tmp_path / "export")
    assert keys and keys <= set(resumed.model.state_dict())
    assert not any(name in key for key in keys for name in head_keys)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_masks_padded_pairs(arch, tmp_path):
    """Right padding: what the pads hold must not change the first step's NITP loss; it is the mean over real pairs."""
    logged = []
    for fill in (0, 255):
        dataset = byte_dataset(4, 16)
        for i, example in enumerate(dataset):  # 16, 13, 10 and 7 real tokens
            example["input_ids"][16 - 3 * i:] = fill
            example["attention_mask"][16 - 3 * i:] = 0
            example["labels"][16 - 3 * i:] = -100
        trainer, _ = trainer_setup(arch, tmp_path / str(fill), n=4, dataset=dataset, max_steps=1)
        trainer.train()
        logged.append(trainer.state.log_history[0]["nitp_loss"])
    assert logged[0] == logged[1]
    torch.testing.assert_close(torch.tensor(logged[0]), by_hand(*tiny(arch)[:2], dataset)[1])
