"""Tests for hf_example.py: NITP on Hugging Face GPT-2 and Llama. Hermetic: tiny configs, CPU, no hub access."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="hf_example.py needs Hugging Face transformers (pip install transformers)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_example import N_LAYER, VOCAB, build_model, byte_batches, losses, nitp_states, saved_keys, train  # noqa: E402
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
