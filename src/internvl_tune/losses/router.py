"""The MoE router's load-balancing loss (Switch Transformer, arXiv 2101.03961, eq. 4), as InternVL3.5 adds it.

For the routers of all MoE layers, over the real tokens t (padding excluded) of one forward, E experts, top-k routing::

    p_t      = softmax(router logits of t)                         [E]
    f[j, e]  = share of tokens whose j-th choice (j < k) is e      [k, E]
    P[e]     = mean over tokens of p_t[e]                          [E]
    loss     = E * sum_{j, e} f[j, e] * P[e]

The layers' tokens are pooled (a token counted once per MoE layer), the choices ranked by p_t. Perfectly balanced
routing gives k; all tokens on the same k experts give about E. The original (`InternVLChatModel.forward` in
`internvl_chat_gpt_oss/`) computes this with transformers' `load_balancing_loss_func` on the forward's router logits
and adds `router_aux_loss_coef` times it to the language-model loss; TRL's DPO trainer adds it to the MPO loss the
same way. `router_aux_coefficient` says when it is on.
"""

from __future__ import annotations

import torch

from internvl_tune.errors import UserError

MOE_LLMS = ("qwen3_moe", "gpt_oss")


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, real: torch.Tensor | None) -> torch.Tensor:
    """The loss above. `router_logits`: per MoE layer [N, E] for the forward's N = B x T tokens (row-major);
    `real`: [N] bool, the tokens that count (None: all). Computed in fp32."""
    logits = torch.stack(router_logits).float()  # [L, N, E]
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).float()  # [L, N, k, E]
    weight = torch.ones(logits.shape[1], device=logits.device) if real is None else real.to(logits.device).float()
    weight = weight.expand(logits.shape[0], -1)  # [L, N]
    total = weight.sum()
    tokens_per_expert = (chosen * weight[..., None, None]).sum(dim=(0, 1)) / total  # [k, E]
    prob_per_expert = (probs * weight[..., None]).sum(dim=(0, 1)) / total  # [E]
    return num_experts * (tokens_per_expert * prob_per_expert[None]).sum()


def router_aux_coefficient(requested: float | None, text_config, recipe: str) -> float:
    """The weight of `load_balancing_loss` in a run: `train.router_aux_loss_coef` when set (0 = off), else the
    original's rule: the LLM config's `router_aux_loss_coef` when the original computes the loss at all, which is
    when `output_router_logits` is on in the config, and in SFT always for GPT-OSS (its SFT entry turns it on).
    Dense LLMs have no router: 0; a coefficient above 0 asked for on one is refused.

    Raises:
        UserError: `requested` > 0 for an LLM without routers.
    """
    family = getattr(text_config, "model_type", None)
    if family not in MOE_LLMS:
        if requested:
            raise UserError(
                f"train.router_aux_loss_coef={requested}: the LLM ({family}) has no MoE router; MoE LLMs: "
                + ", ".join(MOE_LLMS)
            )
        return 0.0
    if requested is not None:
        return float(requested)
    on = bool(getattr(text_config, "output_router_logits", False)) or (recipe == "sft" and family == "gpt_oss")
    return float(getattr(text_config, "router_aux_loss_coef", 0.0)) if on else 0.0
