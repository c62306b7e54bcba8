"""The fused paths on a CUDA device (run by benchmarks/gpu_check.sh as `pytest -m gpu`; skipped elsewhere).

Flex attention with the pair BlockMask must give the log-probs and gradients of SDPA with the dense mask, and the
training step must not wait for the host.
"""

from __future__ import annotations

import pytest
import torch

from internvl_tune.data.collate import pair_collate
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.model.logprobs import pair_logps
from internvl_tune.testing.tiny import build_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _pairs(tokenizer, num_pairs=3, *, v2pe=False):
    """Random pairs; with `v2pe`, float positions as V2PE gives them: 16 prompt tokens 1/4 apart (an image of 4 tiles
    at stride 1 in the tiny model), the rest 1 apart."""
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(num_pairs):
        prompt = torch.randint(10, 200, (40 + 7 * i,), generator=generator)
        chosen = torch.randint(10, 200, (20 + 5 * i,), generator=generator)
        rejected = torch.randint(10, 200, (30 - 3 * i,), generator=generator)
        prompt_positions = torch.arange(len(prompt))
        if v2pe:
            steps = torch.ones(len(prompt))
            steps[5:21] = 0.25
            prompt_positions = torch.cat([torch.zeros(1), steps[1:].cumsum(0)])
        end = prompt_positions[-1]
        pairs.append(
            {
                "prompt_ids": prompt,
                "chosen_ids": chosen,
                "chosen_labels": chosen.clone(),
                "rejected_ids": rejected,
                "rejected_labels": rejected.clone(),
                "prompt_position_ids": prompt_positions,
                "chosen_position_ids": end + 1 + torch.arange(len(chosen)),
                "rejected_position_ids": end + 1 + torch.arange(len(rejected)),
                "pixel_values": None,
                "num_image_tokens": 0,
                "truncated": False,
                "key": str(i),
                "where": f"x:{i}",
            }
        )
    return pairs


def _run(model, batch):
    model.zero_grad()
    out = pair_logps(InternVLTrainingForward(model), batch, "cuda")
    (out["chosen_logps"].sum() - 0.5 * out["rejected_logps"].sum()).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["chosen_logps"].detach(), out["rejected_logps"].detach(), grads


@pytest.mark.parametrize("v2pe", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_block_mask_equals_sdpa_dense_mask(tokenizer, dtype, v2pe):
    """fp32: 1e-3 on summed log-probs; bf16: 2% of the magnitude (two kernels round differently). With V2PE's float
    positions too."""
    batch = pair_collate(_pairs(tokenizer, v2pe=v2pe), tokenizer.pad_token_id, torch.zeros(3, 56, 56))
    results = {}
    for implementation in ("sdpa", {"text_config": "flex_attention", "vision_config": "sdpa"}):
        model = build_tiny_model(tokenizer, seed=1)[0]
        model.set_attn_implementation(implementation)
        model = model.to("cuda", dtype).eval()
        results[str(implementation)] = _run(model, batch)
    (sdpa, flex) = results.values()
    tolerance = {"atol": 1e-3, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.5, "rtol": 0.02}
    torch.testing.assert_close(flex[0], sdpa[0], **tolerance)
    torch.testing.assert_close(flex[1], sdpa[1], **tolerance)
    for name, grad in sdpa[2].items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (flex[2][name] - grad).abs().max() / scale < (1e-3 if dtype == torch.float32 else 0.05), name


def test_pair_forward_and_backward_do_not_sync(tokenizer):
    batch = pair_collate(_pairs(tokenizer), tokenizer.pad_token_id, torch.zeros(3, 56, 56))
    model = build_tiny_model(tokenizer, seed=1)[0].to("cuda").train()
    _run(model, batch)  # warm-up (first calls may allocate and compile)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(model, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("llm", ["gpt_oss", "qwen3_moe"])
def test_flex_with_sliding_windows_and_sinks_equals_the_dense_rule(tokenizer, llm):
    """InternVL3.5's LLMs under flex attention: GPT-OSS's sliding-window layers get their own BlockMask (window 8,
    counted in each sequence) and its sinks transformers' log-sum-exp correction; equal to the dense masks (GPT-OSS:
    eager) in fp32, 1e-3 on summed log-probs."""
    from internvl_tune.model.attention import resolve_attn_implementation

    batch = pair_collate(_pairs(tokenizer), tokenizer.pad_token_id, torch.zeros(3, 56, 56))
    results = []
    for implementation in (
        resolve_attn_implementation("sdpa", "cuda", llm),
        {"text_config": "flex_attention", "vision_config": "sdpa"},
    ):
        model = build_tiny_model(tokenizer, seed=1, llm=llm)[0]
        for layer in model.model.language_model.layers:
            if hasattr(layer.self_attn, "sinks"):
                torch.nn.init.normal_(layer.self_attn.sinks, std=1.0, generator=torch.Generator().manual_seed(0))
        model.set_attn_implementation(implementation)
        results.append(_run(model.to("cuda").eval(), batch))
    (dense, flex) = results
    torch.testing.assert_close(flex[0], dense[0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(flex[1], dense[1], atol=1e-3, rtol=1e-4)
