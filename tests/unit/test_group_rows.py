"""RL groups on one row (`group_collate`): `[prompt | r1 | ... | rG]`, the image and prompt through the model once,
equal to G separate rows `[prompt | rj]`: per-token log-probs and gradients, fp32, 1e-5 absolute (log-probs O(1-10);
gradients also 1e-4 relative). Run for Qwen2 and for GPT-OSS (sliding windows shorter than the rows, sinks)."""

from __future__ import annotations

import pytest
import torch
from conftest import draw_image
from test_pairs import sinks_that_matter

from internvl_tune.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_tune.data.collate import group_collate
from internvl_tune.model.attention import dense_block_mask, resolve_attn_implementation, sequence_offsets
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.model.logprobs import group_token_logps
from internvl_tune.testing.tiny import build_tiny_model


def test_a_group_row_by_hand():
    """P=2, responses of 2 and 1 tokens: roles 0 0 1 1 2, positions 0 1 2 3 2; b0 sees the prompt and itself; the
    first token of each response is predicted from the last prompt position (flat index 1)."""
    group = {
        "prompt_ids": torch.tensor([10, 11]),
        "prompt_position_ids": torch.arange(2),
        "pixel_values": None,
        "num_image_tokens": 0,
        "responses": [torch.tensor([20, 21]), torch.tensor([30])],
    }
    batch = group_collate([group], pad_token_id=0, dummy_tile=torch.zeros(3, 2, 2))
    assert batch["input_ids"].tolist() == [[10, 11, 20, 21, 30]]
    assert batch["attention_roles"].tolist() == [[0, 0, 1, 1, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    assert batch["logp_index"].tolist() == [1, 2, 1] and batch["logp_targets"].tolist() == [20, 21, 30]
    assert batch["response_of_token"].tolist() == [0, 0, 1] and batch["response_lengths"].tolist() == [2, 1]
    mask = dense_block_mask(batch["attention_groups"], batch["attention_roles"])[0, 0].int().tolist()
    assert mask[4] == [1, 1, 0, 0, 1]
    assert sequence_offsets(batch["attention_groups"], batch["attention_roles"])[0].tolist() == [0, 1, 2, 3, 2]


def _groups(tokenizer, tmp_path):
    """Two prompts: one with a 2-tile image (4 image tokens a tile) and 4 responses, one text-only with 3."""
    ids = tokenizer.convert_tokens_to_ids
    generator = torch.Generator().manual_seed(3)
    draw_image(tmp_path / "a.png", (112, 56), "red")
    image = [ids(IMG_START_TOKEN)] + [ids(IMG_CONTEXT_TOKEN)] * 8 + [ids(IMG_END_TOKEN)]
    prompts = [
        torch.tensor(image + torch.randint(10, 300, (9,), generator=generator).tolist()),
        torch.randint(10, 300, (14,), generator=generator),
    ]
    groups = []
    for prompt, sizes, tiles in ((prompts[0], (5, 11, 1, 7), 2), (prompts[1], (9, 3, 12), 0)):
        groups.append(
            {
                "prompt_ids": prompt,
                "prompt_position_ids": torch.arange(len(prompt)),
                "pixel_values": torch.randn(tiles, 3, 56, 56, generator=generator) if tiles else None,
                "num_image_tokens": 8 if tiles else 0,
                "responses": [torch.randint(10, 300, (n,), generator=generator) for n in sizes],
            }
        )
    return groups


@pytest.mark.parametrize("llm", ["qwen2", "gpt_oss"])
@pytest.mark.parametrize("kernel", ["sdpa", "sdpa_segments"])
def test_a_group_row_equals_separate_rows(tokenizer, tmp_path, llm, kernel):
    model, _ = build_tiny_model(tokenizer, seed=4, llm=llm)
    sinks_that_matter(model, seed=2)
    model.set_attn_implementation(resolve_attn_implementation(kernel, "cpu", llm))
    model.eval()
    forward = InternVLTrainingForward(model)
    groups = _groups(tokenizer, tmp_path)
    vit_tiles = []
    model.model.vision_tower.register_forward_hook(lambda m, a, out: vit_tiles.append(out.last_hidden_state.shape[0]))

    batch = group_collate(groups, tokenizer.pad_token_id, torch.zeros(3, 56, 56))
    shared = group_token_logps(forward, batch, "cpu")
    weights = torch.linspace(-1, 1, len(shared))  # any per-token weighting, as an RL loss has
    (shared * weights).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert vit_tiles == [2]  # the image once for its 4 responses

    # Each response alone: a plain row [prompt | response], transformers' own causal (and sliding-window) masks.
    separate = []
    for g in groups:
        pixel_values = g["pixel_values"] if g["pixel_values"] is not None else torch.zeros(1, 3, 56, 56)
        flags = (
            torch.ones(len(pixel_values), dtype=torch.bool)
            if g["pixel_values"] is not None
            else torch.zeros(1, dtype=torch.bool)
        )
        for response in g["responses"]:
            ids = torch.cat([g["prompt_ids"], response])[None]
            p, n = len(g["prompt_ids"]), len(response)
            separate.append(
                forward(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    position_ids=torch.arange(p + n)[None],
                    pixel_values=pixel_values,
                    image_flags=flags,
                    logp_index=torch.arange(p - 1, p + n - 1),
                    logp_targets=response,
                )
            )
    separate = torch.cat(separate)
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=0)
    (separate * weights).sum().backward()
    assert len(shared_grads) > 20
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-5, rtol=1e-4, msg=name)
