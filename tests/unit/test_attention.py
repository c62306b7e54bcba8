"""Row block masks (dense for SDPA, BlockMask for flex attention) and the kernel choice."""

from __future__ import annotations

import pytest
import torch

from internvl_tune.model.attention import dense_block_mask, flex_block_mask, resolve_attn_implementation


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
        ("auto", "cpu", "sdpa"),
        ("auto", "cuda", {"text_config": "flex_attention", "vision_config": "sdpa"}),
        ("eager", "cuda", "eager"),
        ("sdpa", "cuda", "sdpa"),
        ("flash_attention_2", "cpu", "flash_attention_2"),
    ],
)
def test_kernel_choice(requested, device, expected):
    assert resolve_attn_implementation(requested, device) == expected
