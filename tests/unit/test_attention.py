"""Row block masks (dense for SDPA, BlockMask for flex attention) and the kernel choice."""

from __future__ import annotations

import pytest
import torch

from internvl_tune.model.attention import (
    SEGMENT_KERNEL,
    SEGMENTS_KWARG,
    Segment,
    dense_block_mask,
    flex_block_mask,
    resolve_attn_implementation,
    row_segments,
    segment_sdpa_forward,
)


def pair_row(p: int, c: int, r: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    groups = torch.tensor([[0] * (p + c + r) + [-1] * pad])
    roles = torch.tensor([[0] * p + [1] * c + [2] * r + [0] * pad])
    return groups, roles


def test_dense_mask_of_a_pair_by_hand():
    groups, roles = pair_row(2, 2, 1, 1)
    assert dense_block_mask(groups, roles)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # rejected sees the prompt and itself, never the chosen answer
        [0, 0, 0, 0, 0, 1],  # padding: itself only
    ]


def test_dense_mask_isolates_groups():
    groups = torch.tensor([[0, 0, 1, 1, 1]])
    roles = torch.zeros_like(groups)
    assert dense_block_mask(groups, roles)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_flex_block_mask_applies_the_same_rule():
    from torch.nn.attention.flex_attention import create_mask

    groups = torch.tensor([[0] * 7 + [1] * 5 + [-1] * 4, [0] * 16])
    roles = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 0, 0, 1, 2, 2, 0, 0, 0, 0], [0] * 4 + [1] * 6 + [2] * 6])
    block_mask = flex_block_mask(groups, roles)
    dense = create_mask(block_mask.mask_mod, 2, 1, 16, 16, device="cpu")
    real = (groups >= 0)[:, None, :, None]  # padding rows differ by design (their outputs are never read)
    expected = dense_block_mask(groups, roles)
    assert torch.equal(dense & real, expected & real)


@pytest.mark.parametrize(
    ("requested", "device", "expected"),
    [
        ("auto", "cpu", {"text_config": SEGMENT_KERNEL, "vision_config": "sdpa"}),
        ("sdpa_segments", "cuda", {"text_config": SEGMENT_KERNEL, "vision_config": "sdpa"}),
        ("auto", "cuda", {"text_config": "flex_attention", "vision_config": "sdpa"}),
        ("eager", "cuda", "eager"),
        ("sdpa", "cuda", "sdpa"),
        ("flash_attention_2", "cpu", "flash_attention_2"),
    ],
)
def test_kernel_choice(requested, device, expected):
    assert resolve_attn_implementation(requested, device) == expected


def test_segments_of_a_pair_and_a_packed_row_by_hand():
    # Row 0: a pair P=2, Lc=2, Lr=1, then padding. Row 1: packed samples of 2 and 3 tokens, then padding.
    groups = torch.tensor([[0, 0, 0, 0, 0, -1, -1], [0, 0, 1, 1, 1, -1, -1]])
    roles = torch.tensor([[0, 0, 1, 1, 2, 0, 0], [0] * 7])
    assert row_segments(groups, roles) == [
        [Segment(0, 4), Segment(4, 5, context_start=0, context_end=2)],  # rejected: the prompt, then itself
        [Segment(0, 2), Segment(2, 5)],
    ]
    # Two pairs in one row; a group without a prompt; a prompt-only (SFT) group between them.
    groups = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2]])
    roles = torch.tensor([[0, 1, 2, 2, 0, 0, 1, 2, 2]])
    assert row_segments(groups, roles) == [
        [Segment(0, 2), Segment(2, 4, 0, 1), Segment(4, 6), Segment(6, 7), Segment(7, 9, 6, 6)]
    ]


@pytest.mark.parametrize(
    ("groups", "roles"),
    [
        ([0, 0, 1, 1, 0], [0] * 5),  # group 0 split by group 1
        ([0, 0, 0, 0], [0, 2, 1, 1]),  # rejected before chosen
        ([0, 0, 0, 0], [0, 1, 0, 1]),  # context after the answer
    ],
)
def test_rows_not_laid_out_as_segments_take_the_dense_rule(groups, roles):
    assert row_segments(torch.tensor([groups]), torch.tensor([roles])) is None


def _random_rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of packed pairs and samples of random lengths, padded to one length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(3):
        groups, roles = [], []
        for group in range(int(torch.randint(1, 4, (1,), generator=g))):
            if torch.rand(1, generator=g) < 0.5:  # a pair
                lengths = torch.randint(1, 9, (3,), generator=g).tolist()
                row_roles = [0] * lengths[0] + [1] * lengths[1] + [2] * lengths[2]
            else:  # a sample
                row_roles = [0] * int(torch.randint(1, 12, (1,), generator=g))
            groups += [group] * len(row_roles)
            roles += row_roles
        rows.append((groups, roles))
    length = max(len(g) for g, _ in rows) + 2
    groups = torch.tensor([g + [-1] * (length - len(g)) for g, _ in rows])
    roles = torch.tensor([r + [0] * (length - len(r)) for _, r in rows])
    return groups, roles


@pytest.mark.parametrize("seed", range(4))
def test_segment_attention_equals_sdpa_with_the_dense_mask(seed):
    """Independent expectation: SDPA over the whole row with the dense mask (checked by hand above). fp32, outputs
    and gradients of query, key and value to 1e-5 at every non-padding position (padding outputs are never read)."""
    groups, roles = _random_rows(seed)
    rows, length = groups.shape
    heads, kv_heads, dim = 4, 2, 8  # grouped-query attention, as in the InternVL LLMs
    g = torch.Generator().manual_seed(100 + seed)
    q, k, v = (torch.randn(rows, h, length, dim, generator=g, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    weight = torch.randn(rows, length, heads, dim, generator=g) * (groups >= 0)[:, :, None, None]

    def run(segmented: bool):
        for t in (q, k, v):
            t.grad = None
        if segmented:
            out, _ = segment_sdpa_forward(
                None, q, k, v, None, scaling=0.3, **{SEGMENTS_KWARG: row_segments(groups, roles)}
            )
        else:
            kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
            mask = dense_block_mask(groups, roles)
            out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=0.3).transpose(1, 2)
        (out * weight).sum().backward()
        real = (groups >= 0)[:, :, None, None]
        return out.detach() * real, q.grad.clone(), k.grad.clone(), v.grad.clone()

    for got, expected in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
