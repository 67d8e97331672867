"""Frozen-representation evaluation: the paper's MTEB test, at toy scale, with labels from the corpus itself.

The paper freezes each model, mean-pools its last-layer hidden states over the valid tokens of a text,
ℓ2-normalizes the result, and scores that embedding on MTEB with no fine-tuning. We cannot download MTEB, so
we build two tasks of the same kinds from the training corpus:

  classification  a linear probe (logistic regression on the frozen embeddings) predicts which section a
                  passage comes from: its topic in the embedded Python reference, or which of 16 equal
                  stretches of any other corpus (in tiny-shakespeare, roughly which play). Accuracy.
  retrieval       each passage is cut in two halves; the first half must find its own second half among
                  all second halves by cosine similarity. Recall@1 and MRR.

Passages come from the whole corpus, so the language model has seen their text (MTEB's has not); the task
labels it has never seen. Splits are deterministic: every 4th passage of each section is a test passage.
"""
import math

import torch
import torch.nn.functional as F

from model import GPT

PASSAGES_PER_SECTION = 24  # at most, evenly spaced through the section; balances the classes
MIN_PASSAGES = 8           # sections with fewer are left out of classification


def make_passages(sections: list[tuple[str, list[int]]], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each section's token ids into passages of `length` tokens (a shorter last one is padded).
    Returns ids (M, length), valid-token mask (M, length) and the section index of each passage (M,)."""
    ids, masks, labels = [], [], []
    kept = [(name, toks) for name, toks in sections if math.ceil(len(toks) / length) >= MIN_PASSAGES]
    for label, (_, toks) in enumerate(kept):
        starts = list(range(0, len(toks), length))
        step = max(1, len(starts) // PASSAGES_PER_SECTION)
        for start in starts[::step][:PASSAGES_PER_SECTION]:
            piece = toks[start:start + length]
            ids.append(piece + [0] * (length - len(piece)))
            masks.append([1] * len(piece) + [0] * (length - len(piece)))
            labels.append(label)
    return torch.tensor(ids), torch.tensor(masks, dtype=torch.bool), torch.tensor(labels)


def split(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic, disjoint train/test indices: every 4th passage of each section is a test passage."""
    rank_in_section = torch.zeros_like(labels)
    for label in labels.unique():
        where = (labels == label).nonzero().flatten()
        rank_in_section[where] = torch.arange(len(where))
    is_test = rank_in_section % 4 == 3
    return (~is_test).nonzero().flatten(), is_test.nonzero().flatten()


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(M, T, d) states, (M, T) mask -> (M, d) ℓ2-normalized mean over the valid positions only."""
    mask = mask.unsqueeze(-1).to(states.dtype)                  # (M, T, 1)
    pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def embed(model: GPT, ids: torch.Tensor, mask: torch.Tensor, bag_of_tokens: bool = False,
          batch_size: int = 64) -> torch.Tensor:
    """Frozen embeddings (M, d): the pooled final hidden states (after ln_f), or with bag_of_tokens the
    pooled input token embeddings, a baseline that ignores order and context. Pooled in fp32 on the CPU,
    whatever device the model is on, so that the scores do not depend on where it trained."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        x = ids[i:i + batch_size].to(device)
        states = model.wte(x) if bag_of_tokens else model(x).hidden  # (b, T, d)
        out.append(mean_pool(states.to("cpu", torch.float32), mask[i:i + batch_size]))
    model.train(was_training)  # the caller's model comes back as it came
    return torch.cat(out)


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                          steps: int = 100, weight_decay: float = 1e-3) -> float:
    """Logistic regression on frozen features, trained full-batch with L-BFGS; test accuracy."""
    n_classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's random state alone
        torch.manual_seed(0)
        probe = torch.nn.Linear(features.size(1), n_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    scale = features[train].std().clamp(min=1e-8)  # features are unit vectors: bring them to unit scale per dim

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features[train] / scale), labels[train])
        loss = loss + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (probe(features[test] / scale).argmax(dim=-1) == labels[test]).float().mean().item()


def retrieval_scores(similarity: torch.Tensor) -> dict[str, float]:
    """similarity (N, N): query i's correct candidate is i. Recall@1 and mean reciprocal rank."""
    correct = similarity.diagonal().unsqueeze(1)                       # (N, 1)
    rank = (similarity > correct).sum(dim=1) + 1                      # (N,) 1 = best; ties count in its favour
    return {"recall@1": (rank == 1).float().mean().item(), "mrr": (1.0 / rank.float()).mean().item()}


def half_retrieval(model: GPT, ids: torch.Tensor, mask: torch.Tensor, bag_of_tokens: bool = False) -> dict[str, float]:
    """Each full passage's first half looks for its own second half among all second halves."""
    full = mask.all(dim=1)
    half = ids.size(1) // 2
    queries = embed(model, ids[full, :half], mask[full, :half], bag_of_tokens)      # (N, d)
    candidates = embed(model, ids[full, half:], mask[full, half:], bag_of_tokens)   # (N, d)
    return retrieval_scores(queries @ candidates.T)


def evaluate_representations(model: GPT, passages: tuple, bag_of_tokens: bool = False) -> dict[str, float]:
    """Both tasks for one model on make_passages' (ids, mask, labels). Returns the scores."""
    ids, mask, labels = passages
    train, test = split(labels)
    features = embed(model, ids, mask, bag_of_tokens)
    return {"probe_acc": linear_probe_accuracy(features, labels, train, test),
            **{f"retrieval_{k}": v for k, v in half_retrieval(model, ids, mask, bag_of_tokens).items()}}


def chance_levels(passages: tuple) -> dict[str, float]:
    """What guessing scores: the majority class's share of the test set; 1/N and H_N/N for retrieval."""
    _, mask, labels = passages
    _, test = split(labels)
    n = int(mask.all(dim=1).sum())
    return {"probe_acc": labels[test].bincount().max().item() / len(test),
            "retrieval_recall@1": 1 / n, "retrieval_mrr": sum(1 / r for r in range(1, n + 1)) / n}


def report(models: dict[str, GPT], sections: list[tuple[str, list[int]]], length: int, seed: int,
           baselines: bool = True) -> dict[str, dict]:
    """Scores of each named model, of two sanity baselines built from the first one (unless baselines=False),
    and of chance, printed as one table."""
    passages = make_passages(sections, length)
    rows = {name: evaluate_representations(model, passages) for name, model in models.items()}
    if baselines:
        first = next(iter(models.values()))
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's random state
            torch.manual_seed(seed)
            untrained = GPT(first.config).to(next(first.parameters()).device)
        rows["random init, same shape"] = evaluate_representations(untrained, passages)
        rows["bag of tokens (its embeddings)"] = evaluate_representations(first, passages, bag_of_tokens=True)
    rows["chance"] = chance_levels(passages)
    ids, _, labels = passages
    print(f"frozen-representation tasks: {len(ids)} passages of {length} tokens, {int(labels.max()) + 1} sections")
    print(f"  {'':32s} {'probe acc':>10s} {'recall@1':>10s} {'MRR':>10s}")
    for name, scores in rows.items():
        print(f"  {name:32s} {scores['probe_acc']:10.3f} {scores['retrieval_recall@1']:10.3f} "
              f"{scores['retrieval_mrr']:10.3f}")
    return rows
