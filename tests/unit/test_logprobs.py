"""Chunked target log-probs == log_softmax of the full logits, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from internvl_tune.model.logprobs import target_logps


def full_logps(hidden, head, targets):
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


class WrappedHead(nn.Module):
    """Not a plain nn.Linear: takes the generic (checkpointed module) path, as a LoRA-wrapped head would."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])  # 7 puts chunk boundaries inside the 10 rows
def test_target_logps_equal_full_logits(bias, wrapped, chunk_size):
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=generator))
        if bias:
            head.bias.copy_(torch.randn(50, generator=generator))
    hidden = torch.randn(10, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=generator)
    upstream = torch.randn(10, generator=generator)  # per-token weights, as a DPO loss gives

    expected = full_logps(hidden, head, targets)
    (expected * upstream).sum().backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    hidden.grad = None
    head.zero_grad()

    got = target_logps(hidden, WrappedHead(head) if wrapped else head, targets, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.shape == (10,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    (got * upstream).sum().backward()
    ours = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    for a, b in zip(ours, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_target_logps_frozen_head_and_empty():
    head = nn.Linear(8, 20, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 8, requires_grad=True)
    targets = torch.tensor([0, 3, 19, 7, 7])
    got = target_logps(hidden, head, targets, chunk_size=2)
    got.sum().backward()
    assert head.weight.grad is None and hidden.grad is not None
    expected_grad = torch.autograd.grad(full_logps(hidden, head, targets).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected_grad, atol=1e-6, rtol=1e-5)
    assert target_logps(hidden[:0], head, targets[:0]).shape == (0,)
    with pytest.raises(ValueError, match="chunk"):
        target_logps(hidden, head, targets, chunk_size=0)


def test_target_logps_bf16_close_to_fp32():
    torch.manual_seed(1)
    head = nn.Linear(32, 300, bias=False)
    hidden = torch.randn(12, 32)
    targets = torch.randint(0, 300, (12,))
    exact = full_logps(hidden, head, targets)
    got = target_logps(hidden.bfloat16(), head.bfloat16(), targets, chunk_size=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact, atol=0.15, rtol=0.02)  # bf16 inputs: ~3 significant digits


def test_training_forward_gathered_logps_equal_full_logits(tokenizer):
    """The hidden-state path (LM head on K gathered rows) == log_softmax of the stock logits at those positions,
    values and every parameter's gradient (fp32, atol 1e-5), with an image and a dummy tile in the batch."""
    from internvl_tune.model.forward import InternVLTrainingForward
    from internvl_tune.testing.tiny import build_tiny_model

    model = build_tiny_model(tokenizer, seed=0)[0].eval()
    image_id = model.config.image_token_id
    ids = torch.tensor([[1, 2, image_id, image_id, image_id, image_id, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14]])
    mask, positions = torch.ones_like(ids), torch.arange(9).expand(2, 9)
    pixels, flags = torch.randn(2, 3, 56, 56), torch.tensor([True, False])
    rows, cols = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([5, 7, 0, 3, 8])
    targets = torch.tensor([3, 5, 7, 10, 2])
    forward = InternVLTrainingForward(model, logprob_chunk_size=2)

    logits = forward(ids, mask, positions, pixels, flags)
    expected = torch.log_softmax(logits[rows, cols], dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    expected.sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    got = forward(ids, mask, positions, pixels, flags, logp_index=rows * 9 + cols, logp_targets=targets)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gather_lists_by_hand():
    from internvl_tune.model.logprobs import label_gather, response_gather, segment_sum

    index, targets, segment = response_gather(
        torch.tensor([1, 0]),
        torch.tensor([[3, 4, 0], [5, 0, 0]]),
        torch.tensor([[7, 8, 0], [9, 0, 0]]),
        torch.tensor([[True, True, False], [True, False, False]]),
        seq_len=10,
    )
    assert index.tolist() == [13, 14, 5] and targets.tolist() == [7, 8, 9] and segment.tolist() == [0, 0, 1]
    index, targets, segment = label_gather(torch.tensor([[-100, 5, 7], [-100, -100, 4]]))
    assert index.tolist() == [0, 1, 4] and targets.tolist() == [5, 7, 4] and segment.tolist() == [0, 0, 1]
    sums = segment_sum(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 0, 2]), 3)
    assert sums.tolist() == [3.0, 0.0, 4.0]


def test_entropy_pass_equals_full_softmax():
    """`target_logps_and_entropy` against log_softmax over the whole vocabulary: the log-probs equal
    `target_logps`'s, the entropy -sum p log p, with rows split over several chunks (fp32, 1e-5)."""
    from internvl_tune.model.logprobs import target_logps, target_logps_and_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden, targets = torch.randn(7, 16) * 3, torch.randint(0, 50, (7,))
    logps, entropy = target_logps_and_entropy(hidden, head, targets, chunk_size=3)
    full = torch.log_softmax(head(hidden), dim=-1)
    torch.testing.assert_close(logps, full[torch.arange(7), targets], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps, target_logps(hidden, head, targets, chunk_size=3), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1), atol=1e-5, rtol=1e-5)
    flat = torch.nn.Linear(16, 50)
    torch.nn.init.zeros_(flat.weight), torch.nn.init.zeros_(flat.bias)
    _, uniform = target_logps_and_entropy(hidden, flat, targets)  # every token equally likely: H = log 50
    torch.testing.assert_close(uniform, torch.full((7,), math.log(50)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("wrap", [False, True], ids=["fused", "module"])
def test_temperature_scores_the_scaled_distribution(wrap):
    """log_softmax(logits / T)[target], values and gradients (hidden, weight, bias), for the fused head and for a
    head called as a module; the entropy path at the same T (fp32, 1e-5)."""
    from internvl_tune.model.logprobs import target_logps_and_entropy

    torch.manual_seed(1)
    head = nn.Linear(16, 40)
    module = nn.Sequential(head) if wrap else head  # not a bare nn.Linear: the module path
    hidden = (torch.randn(9, 16) * 2).requires_grad_()
    targets = torch.randint(0, 40, (9,))
    got = target_logps(hidden, module, targets, chunk_size=4, temperature=0.6)
    got.sum().backward()
    ours = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    hidden.grad, head.weight.grad, head.bias.grad = None, None, None
    full = torch.log_softmax(head(hidden) / 0.6, dim=-1)
    expected = full[torch.arange(9), targets]
    expected.sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, (hidden.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    logps, entropy = target_logps_and_entropy(hidden.detach(), module, targets, chunk_size=4, temperature=0.6)
    torch.testing.assert_close(logps, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1).detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, target_logps(hidden, module, targets), atol=1e-3)  # T changes the numbers
