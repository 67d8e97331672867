"""NITP on a Hugging Face `transformers` causal LM: GPT-2 and Llama, built from a config, no download.

The recipe, for any training loop (nanoGPT's, the HF Trainer's, yours):
  1. From ONE forward pass take h = the LM head's input (the final hidden states, after the final norm)
     and z = the output of block k (k ≈ 20% of the depth; 0 would be the embeddings).
     In HF: model(x, labels=x, output_hidden_states=True) gives both: h = hidden_states[-1], z = hidden_states[k].
     In nanoGPT: h = self.transformer.ln_f(x) (what lm_head reads), z = x right after block k in the loop.
  2. loss = lm_loss + lam * nitp(h, z)   (nitp.py: a SwiGLU head P and mean_t 1 - cos(P(h_t), sg(z_{t+1}))).
  3. Optimise the head's parameters too: it is a separate module, so add nitp.parameters() to the optimiser.
  4. Drop the head after training: it never lives inside the model, so save_pretrained / the checkpoint
     holds only the LM, and inference costs nothing extra.

With the HF Trainer, NITPTrainer below does all four (one forward pass, head in the optimiser, parts logged as
lm_loss / nitp_loss, head checkpointed beside the model as nitp_head.pt, never inside it).

Run: python hf_example.py [--arch gpt2|llama|both] [--steps 20] [--trainer]   (--trainer needs accelerate)
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built from a config: never reach the hub

import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from data import python_docs_text
from nitp import NITP, NITPConfig

N_LAYER, WIDTH, N_HEAD, VOCAB, SEQ_LEN = 4, 64, 4, 256, 64  # tiny: one token per byte, trains on a CPU


def build_model(arch: str) -> PreTrainedModel:
    """A freshly initialised tiny causal LM. No ids 50256 etc. (GPT-2's defaults) outside the byte vocabulary."""
    special = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=WIDTH, n_layer=N_LAYER,
                            n_head=N_HEAD, **special)  # ties lm_head to wte, like GPT-2
    elif arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=SEQ_LEN, hidden_size=WIDTH,
                             intermediate_size=176, num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD,
                             **special)  # untied lm_head, RMSNorm, RoPE, SwiGLU MLP
    else:
        raise ValueError(f"unknown arch {arch!r}")
    model = AutoModelForCausalLM.from_config(config)
    # GPT2LMHeadModel's class name does not say ForCausalLM, so HF leaves loss_type None; its loss falls back to
    # ForCausalLM anyway, but the Trainer (5.24) then counts num_items_in_batch over all labels, not labels[:, 1:],
    # and scales GPT-2's LM loss by (T-1)/T. Naming the loss it already uses fixes the count.
    model.loss_type = "ForCausalLM"
    return model


def nitp_states(outputs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, z) from the outputs of model(..., output_hidden_states=True).

    For GPT-2 and Llama, hidden_states has n_layer + 1 entries: [0] is the input of the first block (the
    embeddings), [i] the output of block i, except the last entry, which HF replaces by last_hidden_state,
    i.e. AFTER the final norm: exactly the LM head's input, h. So hidden_states[n_layer] is not the raw
    output of the last block, and k must stay below n_layer (NITP's own range check says the same)."""
    states = outputs.hidden_states
    if not 0 <= k < len(states) - 1:
        raise ValueError(f"k must be in 0..{len(states) - 2}, got {k}")
    return states[-1], states[k]  # (B, T, d) h, (B, T, d) z


def losses(model: PreTrainedModel, nitp: NITP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, lm, nitp) for a batch of token ids x (B, T), all from ONE forward pass."""
    # labels=x: HF shifts the labels inside, so position t is scored on token t+1
    out = model(x, labels=x, output_hidden_states=True, use_cache=False)
    h, z = nitp_states(out, nitp.layer)  # (B, T, d), (B, T, d)
    loss_nitp = nitp(h, z)               # scalar; nitp detaches z, so z stays a target only
    return out.loss + nitp.config.lam * loss_nitp, out.loss, loss_nitp


def byte_batches(batch_size: int = 8, seq_len: int = SEQ_LEN, seed: int = 0):
    """Endless random windows of the Python reference docs (shipped with Python), one token per byte."""
    data = torch.tensor(list(python_docs_text().encode()))  # (N,) byte ids
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=g)  # (B,)
        yield torch.stack([data[s:s + seq_len] for s in starts])                    # (B, T)


def byte_dataset(n: int, seq_len: int = SEQ_LEN, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n fixed windows of byte_batches as Trainer examples: input_ids, attention_mask, labels (HF shifts them)."""
    rows = next(byte_batches(batch_size=n, seq_len=seq_len, seed=seed))  # (n, T)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]


def train(model: PreTrainedModel, nitp: NITP, batches, steps: int, lr: float = 3e-3,
          log_every: int = 5) -> list[tuple[float, float]]:
    """AdamW over the model's AND the head's parameters; returns (lm, nitp) loss per step."""
    optimizer = torch.optim.AdamW([*model.parameters(), *nitp.parameters()], lr=lr)  # the head learns too
    model.train()
    nitp.train()
    history = []
    for step in range(steps):
        total, lm, loss_nitp = losses(model, nitp, next(batches))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        history.append((lm.item(), loss_nitp.item()))
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:3d} | total {total.item():.4f} | lm {lm.item():.4f} | nitp {loss_nitp.item():.4f}")
    return history


class _ZeroGrads(TrainerCallback):
    def __init__(self, module: torch.nn.Module):
        self.module = module

    def on_step_end(self, args, state, control, **kwargs):  # after every optimizer step, even a skipped one
        self.module.zero_grad()


class NITPTrainer(Trainer):
    """A transformers.Trainer (written against 5.24) that trains an NITP head beside the model: loss = LM + λ·L_NITP
    from one pass, the head in the optimiser, lm_loss / nitp_loss logged beside "loss", and the head saved as
    nitp_head.pt in every checkpoint (and resumed from it), never inside the model. One process only."""

    HEAD_FILE = "nitp_head.pt"
    loss_is_scaled_for_ga = True  # compute_loss scales both parts for gradient accumulation itself

    def __init__(self, *args, nitp: NITP, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1 or self.args.n_gpu > 1:  # the head is outside DDP: nothing would sync its grads
            raise NotImplementedError("NITPTrainer runs in one process on one device")
        self.nitp = nitp.to(self.args.device)
        self.add_callback(_ZeroGrads(self.nitp))  # the Trainer only calls model.zero_grad() after each step
        self._parts, self._parts_since = None, 0  # (2,) lm, nitp summed since the step of the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the plain LM loss, comparable with a run without NITP
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {**inputs, "output_hidden_states": True, "use_cache": False}
        lm, out = super().compute_loss(model, inputs, True, num_items_in_batch)  # the Trainer's own LM loss
        h, z = nitp_states(out, self.nitp.layer)  # (B, T, d), (B, T, d)
        mask, s = inputs.get("attention_mask"), self.nitp.config.shift
        if mask is not None:  # a pair counts only if both its positions are real tokens
            mask = mask[:, :mask.size(1) - s].bool() & mask[:, s:].bool()  # (B, T-s)
        loss_nitp = self.nitp(h, z, mask) / self.current_gradient_accumulation_steps  # a micro-batch mean
        # HF's LM loss is already divided by the accumulated batch's token count when num_items_in_batch reached
        # the model (the Trainer's own test, see training_step); otherwise it is a mean and is divided here
        if not ((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func):
            lm = lm / self.current_gradient_accumulation_steps
        lam = self.nitp.config.lam if self.state.global_step >= self.nitp.config.start else 0.0
        parts = torch.stack([lm.detach(), loss_nitp.detach()])  # (2,) this micro-batch's share of the step
        if self._parts is None:
            self._parts, self._parts_since = parts, self.state.global_step
        else:
            self._parts = self._parts + parts
        loss = lm + lam * loss_nitp
        return (loss, out) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._parts is not None:  # a training log: add the parts, averaged per step
            lm, loss_nitp = (self._parts / (self.state.global_step - self._parts_since)).tolist()
            logs.update(lm_loss=lm, nitp_loss=loss_nitp)
            self._parts = None
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}  # train() may call it twice
        decay = set(self.get_decay_parameter_names(self.nitp))  # the Trainer's rule: no decay on norms, biases
        for weight_decay, decayed in ((self.args.weight_decay, True), (0.0, False)):
            params = [p for n, p in self.nitp.named_parameters() if (n in decay) == decayed and id(p) not in known]
            if params:  # added before the Trainer builds its scheduler, so the schedule covers the head too
                optimizer.add_param_group({"params": params, "weight_decay": weight_decay})
        return optimizer

    def _clip_grad_norm(self, model):  # private hook: the Trainer clips model.parameters() only
        params = [*model.parameters(), *self.nitp.parameters()]  # one global norm, as train.py does
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def save_model(self, output_dir=None, _internal_call=False):  # checkpoints call it too, with their folder
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:  # beside the model's files: save_pretrained never sees the head
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.nitp.state_dict(), os.path.join(output_dir, self.HEAD_FILE))
        super().save_model(output_dir, _internal_call)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):  # private hook: train() resuming
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # before the optimiser is built: its state (optimizer.pt) then loads into the head's groups as well
        state = torch.load(os.path.join(resume_from_checkpoint, self.HEAD_FILE), map_location=self.args.device)
        self.nitp.load_state_dict(state)


def saved_keys(model: PreTrainedModel, directory: str | Path) -> set[str]:
    """save_pretrained(directory), then the tensor names in the safetensors file(s) it wrote."""
    model.save_pretrained(directory)
    keys = set()
    for file in Path(directory).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def trainer_demo(model: PreTrainedModel, nitp: NITP, steps: int, output_dir: str) -> list[tuple[float, float]]:
    """The same training with NITPTrainer: a checkpoint at the end, which holds the head beside the model."""
    args = TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=5,
                             save_strategy="steps", save_steps=steps, report_to="none", use_cpu=True,
                             disable_tqdm=True)
    trainer = NITPTrainer(model=model, nitp=nitp, args=args, train_dataset=byte_dataset(8 * steps))
    trainer.train()
    logs = [log for log in trainer.state.log_history if "lm_loss" in log]
    for log in logs:
        print(f"  step {log['step']:3d} | loss {log['loss']:.4f} | lm {log['lm_loss']:.4f} "
              f"| nitp {log['nitp_loss']:.4f}  (means since the previous log)")
    checkpoint = Path(output_dir) / f"checkpoint-{steps}"
    print(f"  {checkpoint.name}: {', '.join(sorted(f.name for f in checkpoint.iterdir()))}")
    return [(log["lm_loss"], log["nitp_loss"]) for log in logs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["gpt2", "llama", "both"], default="both")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--trainer", action="store_true", help="train with NITPTrainer, not the hand-written loop")
    args = parser.parse_args()
    for arch in ["gpt2", "llama"] if args.arch == "both" else [args.arch]:
        start = time.time()
        torch.manual_seed(0)
        model = build_model(arch)
        # num_hidden_layers / hidden_size are the generic names (GPT2Config maps them to n_layer / n_embd)
        nitp = NITP(NITPConfig(), n_layer=model.config.num_hidden_layers, n_embd=model.config.hidden_size)
        n_model = sum(p.numel() for p in model.parameters())
        n_head = sum(p.numel() for p in nitp.parameters())
        print(f"{arch}: {n_model / 1e3:.0f}k parameters + NITP head {n_head / 1e3:.0f}k (training only), "
              f"target block k={nitp.layer}")
        if args.trainer:
            with tempfile.TemporaryDirectory() as tmp:
                history = trainer_demo(model, nitp, args.steps, tmp)
        else:
            history = train(model, nitp, byte_batches(), args.steps)
        print(f"  lm loss {history[0][0]:.3f} -> {history[-1][0]:.3f}, "
              f"nitp loss {history[0][1]:.3f} -> {history[-1][1]:.3f}")

        # The head was never registered in the model, so the saved LM cannot contain it.
        with tempfile.TemporaryDirectory() as tmp:
            keys = saved_keys(model, tmp)
        head_names = list(nitp.state_dict())  # e.g. head.gate.weight, head.up.weight, head.down.weight
        leaked = [key for key in keys if any(name in key for name in head_names)]
        assert not leaked and keys <= set(model.state_dict()), leaked
        print(f"  save_pretrained wrote {len(keys)} tensors, none of the head's {head_names}; "
              f"{time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
