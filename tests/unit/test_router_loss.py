"""The MoE load-balancing loss (losses/router.py): by hand, against transformers' function the original calls, as
the training forward computes it, and when it is on."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

from internvl_tune.errors import UserError
from internvl_tune.losses.router import load_balancing_loss, router_aux_coefficient
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.testing.tiny import build_tiny_model


def test_by_hand():
    """E = 2, k = 1; both tokens prefer expert 0 with p = [0.75, 0.25]: f = [1, 0], P = [0.75, 0.25], loss = 2 x
    0.75 = 1.5. A third, padding token routed to expert 1 does not count."""
    logit = torch.log(torch.tensor(3.0)).item()  # softmax([ln 3, 0]) = [0.75, 0.25]
    logits = torch.tensor([[logit, 0.0], [logit, 0.0], [0.0, 5.0]])
    loss = load_balancing_loss([logits], top_k=1, real=torch.tensor([True, True, False]))
    assert loss.item() == pytest.approx(1.5, abs=1e-6)


def test_equals_the_function_the_original_calls():
    """transformers' `load_balancing_loss_func` (which `InternVLChatModel.forward` of InternVL3.5 calls) on 3 layers,
    a padded batch of 2 x 5 tokens, 6 experts, top 2."""
    generator = torch.Generator().manual_seed(0)
    layers = [torch.randn(10, 6, generator=generator) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    expected = load_balancing_loss_func(tuple(layers), num_experts=6, top_k=2, attention_mask=mask)
    ours = load_balancing_loss(layers, top_k=2, real=mask.reshape(-1).bool())
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("llm", ["gpt_oss", "qwen3_moe"])
def test_the_training_forward_reads_every_router_of_the_forward(tokenizer, llm):
    model, _ = build_tiny_model(tokenizer, seed=0, llm=llm)
    forward = InternVLTrainingForward(model)
    forward.track_router_loss()
    ids = torch.randint(10, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    forward(input_ids=ids, attention_mask=mask, position_ids=torch.arange(9).expand(2, 9))
    # The LLM's own router logits (transformers records them with output_router_logits), through the same formula.
    out = model.model.language_model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    expected = load_balancing_loss_func(out.router_logits, num_experts=4, top_k=2, attention_mask=mask)
    assert len(out.router_logits) == 2
    assert forward.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    forward.aux_loss.backward()  # it reaches the router weights
    router = "router" if llm == "gpt_oss" else "gate"
    assert getattr(model.model.language_model.layers[0].mlp, router).weight.grad.abs().sum() > 0


class _Config:
    def __init__(self, model_type, output_router_logits=False, router_aux_loss_coef=0.5):
        self.model_type = model_type
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef


def test_when_the_loss_is_on():
    # As the original: GPT-OSS SFT always (its entry sets output_router_logits); otherwise the config's switch.
    assert router_aux_coefficient(None, _Config("gpt_oss"), "sft") == 0.5
    assert router_aux_coefficient(None, _Config("gpt_oss"), "mpo") == 0.0
    assert router_aux_coefficient(None, _Config("gpt_oss", output_router_logits=True), "mpo") == 0.5
    assert router_aux_coefficient(None, _Config("qwen3_moe"), "sft") == 0.0
    assert router_aux_coefficient(None, _Config("qwen3_moe", output_router_logits=True), "sft") == 0.5
    assert router_aux_coefficient(0.0, _Config("gpt_oss"), "sft") == 0.0  # asked off
    assert router_aux_coefficient(0.01, _Config("qwen3_moe"), "mpo") == 0.01
    assert router_aux_coefficient(None, _Config("qwen2"), "sft") == 0.0
    with pytest.raises(UserError, match="has no MoE router"):
        router_aux_coefficient(0.01, _Config("qwen2"), "sft")


@pytest.mark.parametrize("llm", ["gpt_oss", "qwen3_moe"])
def test_lora_on_a_moe_llm_adapts_attention_and_keeps_experts_and_routers_frozen(tokenizer, llm):
    from internvl_tune.model.lora import apply_lora

    model, _ = build_tiny_model(tokenizer, seed=0, llm=llm)
    peft_model = apply_lora(model, use_llm_lora=4)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("self_attn.q_proj.lora_A" in n for n in trainable)
    assert not any(".mlp.experts." in n or ".mlp.router." in n or ".mlp.gate." in n for n in trainable)


def test_active_parameters_count_k_of_e_experts(tokenizer):
    """Tiny Qwen3-MoE: 2 layers of 4 experts (gate_up [4, 128, 64] + down [4, 64, 64] = 49,152 weights per layer),
    2 per token: half of the 98,304 expert weights are active. A dense LLM's counts are equal."""
    from internvl_tune.model.freeze import active_parameter_counts

    model, _ = build_tiny_model(tokenizer, llm="qwen3_moe")
    total, active = active_parameter_counts(model)
    assert total == sum(p.numel() for p in model.parameters()) and total - active == 98_304 // 2
    dense, _ = build_tiny_model(tokenizer, llm="qwen3")
    assert len(set(active_parameter_counts(dense))) == 1
