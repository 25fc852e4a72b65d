"""Output-and-gradient distillation: the student matches the teacher's input gradient as well as
its outputs (Jacobian matching, Srinivas & Fleuret, ICML 2018; Sobolev training, Czarnecki et
al., NeurIPS 2017).

The gradient is that of the answer's log-likelihood with respect to the input embeddings, at every
input position, for the student and the teacher reading the same input. The two models may differ
in width, so both gradients are taken to a space they share: the one-hot token space. There the
gradient at a position is E g (E: the model's [vocab, width] input embedding table, g: the
gradient with respect to the embedding), and the vocabulary is shared because KD needs one
tokenizer. A fixed random Gaussian matrix P [vocab, m] projects it to m numbers per position,
g -> g (E^T P), which keeps the cost down: the [width, m] map E^T P is computed once per step, and
a cached teacher gradient is m numbers per position. Where the widths and tables agree this is a
random projection of g itself.

As in Srinivas & Fleuret, each example's projected gradient is scaled to unit norm before the two
are compared: loss = mean over examples of |g_s / |g_s| - g_t / |g_t||^2, in [0, 4]. Its own
gradient with respect to the student's weights needs a second backward pass (create_graph), about
doubling the cost of a step: docs/distillation.md measures what it buys.
"""

from __future__ import annotations


def projection(vocab_size: int, m: int, seed: int = 0):
    """The fixed [vocab, m] random projection, the same on every call with the same seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(vocab_size, m, generator=generator) / m ** 0.5


def token_space_map(model, P):
    """[width, m]: a model's input-embedding gradient -> the projected one-hot-token gradient."""
    table = model.get_input_embeddings()
    if table.weight.shape[0] != P.shape[0]:
        raise ValueError(f"gradient matching needs one vocabulary: the model has {table.weight.shape[0]} tokens, "
                         f"the projection {P.shape[0]}")
    weight = table.weight * getattr(table, "embed_scale", 1.0)  # BART scales its embeddings inside the table
    return weight.T.to(P.dtype) @ P.to(weight.device)


def input_embeddings(model, ids, create_graph: bool):
    """The embeddings of `ids`, as a tensor the answer's log-likelihood can be differentiated by:
    a graph node of the student's table (create_graph), else a leaf (a constant teacher target, or
    a frozen table)."""
    embeds = model.get_input_embeddings()(ids)
    if not create_graph or not embeds.requires_grad:
        embeds = embeds.detach().requires_grad_(True)
    return embeds


def input_gradient(model, forward, ids, create_graph: bool):
    """(log-likelihood per row, d log-likelihood / d input embeddings [rows, length, width]).

    `forward(inputs_embeds) -> [rows]` computes each row's answer log-likelihood. Rows do not
    interact, so one backward pass of their sum gives every row's gradient. With create_graph the
    gradient is itself differentiable (the student's side); otherwise it is a constant target."""
    import torch

    embeds = input_embeddings(model, ids, create_graph)
    with torch.enable_grad():
        ll = forward(embeds)
        grad, = torch.autograd.grad(ll.sum(), embeds, create_graph=create_graph)
    return ll, grad


def project(grad, mask, token_map):
    """[..., length, width] -> [..., length, m], zero at padding."""
    return (grad.to(token_map.dtype) @ token_map) * mask[..., None].to(grad.device, token_map.dtype)


def matching_loss(student: list, teacher: list):
    """Mean over examples of the squared distance between unit-norm projected gradients."""
    import torch

    total = 0.0
    for s, t in zip(student, teacher):
        s, t = s.reshape(-1), t.reshape(-1).to(s.device, s.dtype)
        total = total + ((s / s.norm().clamp(min=1e-12) - t / t.norm().clamp(min=1e-12)) ** 2).sum()
    return total / max(len(student), 1) if student else torch.zeros(())
