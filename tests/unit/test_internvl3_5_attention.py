"""InternVL3.5's LLMs in the training paths: GPT-OSS sliding windows and attention sinks, Qwen3-MoE routing.

The window of a packed sample or a pair's answer is counted in its own sequence (`sequence_offsets`), so a packed row
equals each sample's own forward and a shared-prefix pair row equals the separate forwards (tests/unit/test_pairs.py
runs that one for these LLMs too). Tolerance: fp32, 1e-5 absolute on logits (values O(1)).
"""

from __future__ import annotations

import pytest
import torch
from test_pairs import sinks_that_matter

from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data.collate import pack_collate
from internvl_tune.model.attention import (
    dense_block_mask,
    resolve_attn_implementation,
    sequence_offsets,
    sliding_windows,
)
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.testing.tiny import build_tiny_model


def test_sequence_offsets_of_a_pair_row_and_a_packed_row_by_hand():
    # Pair: prompt 3, chosen 2, rejected 2, then padding. Packed: samples of 3 and 2 tokens.
    groups = torch.tensor([[0, 0, 0, 0, 0, 0, 0, -1], [0, 0, 0, 1, 1, -1, -1, -1]])
    roles = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    offsets = sequence_offsets(groups, roles)
    assert offsets[0, :7].tolist() == [0, 1, 2, 3, 4, 3, 4]  # the rejected answer continues the prompt too
    assert offsets[1, :5].tolist() == [0, 1, 2, 0, 1]


def test_a_window_of_two_on_a_pair_row_by_hand():
    """P=3, Lc=2, Lr=1, window 2: each token sees itself and the token before it in its own sequence; the rejected
    answer's token (offset 3) sees the last prompt token, not the chosen answer just before it in the row."""
    groups = torch.zeros(1, 6, dtype=torch.long)
    roles = torch.tensor([[0, 0, 0, 1, 1, 2]])
    mask = dense_block_mask(groups, roles, window=2)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 1, 0, 0, 1],
    ]


def test_the_layer_types_of_each_family():
    assert sliding_windows(build_tiny_model(llm="gpt_oss")[0]) == {"sliding_attention": 8, "full_attention": None}
    assert sliding_windows(build_tiny_model(llm="qwen3_moe")[0]) == {}


def _samples(tokenizer, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for row, n in lengths:
        ids = torch.randint(10, 400, (n,), generator=generator)
        labels = ids.clone()
        labels[: n // 3] = IGNORE_INDEX
        samples.append(
            {
                "input_ids": ids,
                "labels": labels,
                "position_ids": torch.arange(n),
                "pixel_values": None,
                "num_image_tokens": 0,
                "num_text_tokens": n,
                "truncated": False,
                "where": "x",
                "row": row,
            }
        )
    return samples


@pytest.mark.parametrize("llm", ["gpt_oss", "qwen3_moe", "qwen3"])
@pytest.mark.parametrize("kernel", ["sdpa", "sdpa_segments"])
def test_a_packed_row_equals_each_samples_own_forward(tokenizer, llm, kernel):
    """Rows of 3 samples (12-19 tokens; GPT-OSS's window is 8) and of 1; logits and gradients."""
    model, _ = build_tiny_model(tokenizer, seed=2, llm=llm)
    sinks_that_matter(model, seed=1)
    model.set_attn_implementation(resolve_attn_implementation(kernel, "cpu", llm))
    model.eval()
    forward = InternVLTrainingForward(model)
    samples = _samples(tokenizer, [(0, 12), (0, 19), (0, 15), (1, 17)])
    batch = pack_collate(samples, tokenizer.pad_token_id, torch.zeros(3, 56, 56), max_packed_tokens=64)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_groups", "attention_roles")}
    packed = forward(
        **inputs, attention_mask=None, pixel_values=batch["pixel_values"], image_flags=batch["image_flags"]
    )
    packed[batch["sample_ids"] != -1].sum().backward()  # padding's outputs are never read
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    starts = {0: 0, 1: 0}
    total = 0.0
    for s in samples:
        row, n = s["row"], len(s["input_ids"])
        ids = s["input_ids"][None]
        alone = forward(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(n)[None])
        torch.testing.assert_close(packed[row, starts[row] : starts[row] + n], alone[0], atol=1e-5, rtol=0)
        total = total + alone.sum()
        starts[row] += n
    total.backward()
    for name, grad in packed_grads.items():
        if "vision_tower" in name or "multi_modal_projector" in name:
            continue  # the packed forward's dummy tile gives the ViT a zero gradient; the text-only ones none
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-4, rtol=1e-4, msg=name)
