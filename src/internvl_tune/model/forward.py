"""The training forward: image tiles through the ViT once, features placed at the `<IMG_CONTEXT>` tokens."""

from __future__ import annotations

import time

import torch
from peft import PeftModel
from torch import nn
from transformers import InternVLForConditionalGeneration

from internvl_tune.losses.router import load_balancing_loss
from internvl_tune.model.attention import row_attention
from internvl_tune.model.logprobs import DEFAULT_LOGPROB_CHUNK, target_logps, target_logps_and_entropy


def base_model(model: nn.Module) -> InternVLForConditionalGeneration:
    """The InternVL model under an optional PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def idle_inputs(pad_token_id: int, dummy_tile: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Inputs of the smallest forward (one padding token, one dropped dummy tile, one log-prob read): what a rank with
    nothing to compute runs so that it joins the others' collectives."""
    return {
        "input_ids": torch.full((1, 1), pad_token_id, dtype=torch.long, device=device),
        "attention_mask": torch.ones((1, 1), dtype=torch.long, device=device),
        "position_ids": torch.zeros((1, 1), dtype=torch.long, device=device),
        "pixel_values": dummy_tile.unsqueeze(0).to(device),
        "image_flags": torch.zeros(1, dtype=torch.bool),
        "logp_index": torch.zeros(1, dtype=torch.long, device=device),
        "logp_targets": torch.full((1,), pad_token_id, dtype=torch.long, device=device),
    }


class InternVLTrainingForward(nn.Module):
    """Wraps an InternVL model so that one `forward` call (what DDP/FSDP hook) does the whole multimodal pass.

    Unlike the stock forward it accepts tiles whose features are dropped (`image_flags == False`): a text-only
    batch carries one dummy tile so that every rank runs the same graph (docs/original-differences.md §3.4), and its
    features enter the graph with weight zero rather than being skipped, so DDP sees a gradient (of zeros) for
    every ViT parameter.
    """

    def __init__(self, model: nn.Module, *, logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK):
        super().__init__()
        self.model = model
        self.logprob_chunk_size = logprob_chunk_size
        # The blocks FSDP2 shards one by one (accelerate's TRANSFORMER_BASED_WRAP reads this name): each decoder layer
        # and each ViT layer. Without it only the root would be one FSDP unit, gathered whole for every forward.
        self._no_split_modules = sorted(getattr(base_model(model), "_no_split_modules", None) or ())
        # Stage timing waits for the device, so it is off unless a recipe turns it on for a logging step.
        self.time_stages = False
        self.vit_seconds = 0.0  # time spent in the ViT + projector since the recipe last reset it (telemetry)
        # MoE: the routers' logits of the current forward, and the load-balancing loss of the last one (losses/router.py)
        self._router_logits: list[torch.Tensor] | None = None
        self.router_top_k = 0
        self.aux_loss: torch.Tensor | None = None

    def track_router_loss(self) -> None:
        """Compute the MoE load-balancing loss on every forward from now on (`self.aux_loss`), from the logits the
        LLM's routers (transformers' `*TopKRouter` modules, which return them first) produce in that forward."""
        text = base_model(self.model).config.text_config
        self.router_top_k = int(text.num_experts_per_tok)
        routers = [m for m in base_model(self.model).modules() if type(m).__name__.endswith("TopKRouter")]
        if not routers:
            raise ValueError(f"{text.model_type}: no MoE router modules found for the load-balancing loss")

        def keep_logits(module, args, output):
            if self._router_logits is not None:  # in a forward, not in a gradient checkpoint's recomputation
                self._router_logits.append(output[0])

        for router in routers:
            router.register_forward_hook(keep_logits)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None,  # [B, T] or [B, 1, T, T]; None with attention_groups
        position_ids: torch.Tensor,  # [B, T]
        pixel_values: torch.Tensor | None = None,  # [N, 3, S, S]
        image_flags: torch.Tensor | None = None,  # [N] bool
        logp_index: torch.Tensor | None = None,  # [K] flat positions b * T + t whose next token a loss reads
        logp_targets: torch.Tensor | None = None,  # [K] the token to score at each of them
        attention_groups: torch.Tensor | None = None,  # [B, T] rows holding several sequences (model/attention.py)
        attention_roles: torch.Tensor | None = None,  # [B, T]
        with_entropy: bool = False,
        logit_temperature: float = 1.0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V]; or, with `logp_index`, only log p(target) at those positions, fp32 [K]; with
        `with_entropy` too (no gradients), the pair (log-probs, the entropy of each position's next token) [K] each.
        `logit_temperature`: the log-probs (and entropy) are of softmax(logits / logit_temperature).

        The second form never builds the [B, T, V] logits: the LM head runs on the K gathered hidden states, in
        chunks (`target_logps`). Pass `image_flags` on the CPU (as collators make them): the tile split is then
        computed without waiting for the device.
        """
        internvl = base_model(self.model)
        if self.router_top_k:
            self._router_logits = []
        try:
            out = self._forward(
                internvl,
                input_ids,
                attention_mask,
                position_ids,
                pixel_values,
                image_flags,
                logp_index,
                logp_targets,
                attention_groups,
                attention_roles,
                with_entropy,
                logit_temperature,
            )
        finally:
            logits, self._router_logits = self._router_logits, None
        if self.router_top_k:
            if attention_groups is not None:
                real = attention_groups != -1
            elif attention_mask is not None and attention_mask.dim() == 2:
                real = attention_mask.bool()
            else:
                real = None
            self.aux_loss = load_balancing_loss(logits, self.router_top_k, None if real is None else real.reshape(-1))
        return out

    def _forward(
        self,
        internvl,
        input_ids,
        attention_mask,
        position_ids,
        pixel_values,
        image_flags,
        logp_index,
        logp_targets,
        attention_groups,
        attention_roles,
        with_entropy=False,
        logit_temperature=1.0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        attention_kwargs = {}
        if attention_groups is not None:
            # Segments under sdpa_segments, a BlockMask under flex attention, else the dense mask (model/attention.py).
            attention_mask, attention_kwargs = row_attention(
                internvl, attention_groups, attention_roles, input_ids.device
            )
        inputs_embeds = internvl.get_input_embeddings()(input_ids)  # [B, T, D]
        if pixel_values is not None:
            inputs_embeds = self._place_image_features(internvl, input_ids, inputs_embeds, pixel_values, image_flags)
        # No KV cache in training (and no "use_cache=True is incompatible with gradient checkpointing" warning).
        if logp_index is None:
            return self.model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **attention_kwargs,
            ).logits
        # internvl.model is the backbone without the head; LoRA layers injected by PEFT live inside it.
        hidden = internvl.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **attention_kwargs,
        ).last_hidden_state  # [B, T, D]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logp_index)  # [K, D]
        head, chunk = internvl.lm_head, self.logprob_chunk_size
        if with_entropy:
            return target_logps_and_entropy(picked, head, logp_targets, chunk, temperature=logit_temperature)
        return target_logps(picked, head, logp_targets, chunk, temperature=logit_temperature)

    def _place_image_features(self, internvl, input_ids, inputs_embeds, pixel_values, image_flags) -> torch.Tensor:
        config = internvl.config
        start = synchronized_time(pixel_values.device) if self.time_stages else 0.0
        features = internvl.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output  # [N, tokens_per_tile, D]
        features = features.to(inputs_embeds.dtype)
        if self.time_stages:
            self.vit_seconds += synchronized_time(pixel_values.device) - start
        flags = image_flags if image_flags is not None else torch.ones(len(features), dtype=torch.bool)
        real_index = flags.nonzero().squeeze(1).to(features.device, non_blocking=True)
        real = features.index_select(0, real_index).reshape(-1, features.shape[-1])
        placeholder = input_ids == config.image_token_id
        if placeholder.device.type == "cpu" and int(placeholder.sum()) != real.shape[0]:
            # On an accelerator this check would stall the step; collators check the same counts on CPU data.
            raise ValueError(
                f"{int(placeholder.sum())} <IMG_CONTEXT> tokens but {real.shape[0]} image features; "
                "the data pipeline must keep them equal"
            )
        inputs_embeds = inputs_embeds.masked_scatter(placeholder.unsqueeze(-1), real)
        if flags.device.type != "cpu" or not bool(flags.all()):
            # Dummy tiles enter with weight 0, so every ViT parameter gets a (zero) gradient on every rank.
            dummy_index = (~flags).nonzero().squeeze(1).to(features.device, non_blocking=True)
            inputs_embeds = inputs_embeds + features.index_select(0, dummy_index).sum() * 0.0
        return inputs_embeds


def synchronized_time(device: torch.device) -> float:
    """Wall time once the device has finished its queued work, so GPU stages are timed, not just launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def stage_clock(enabled: bool):
    """`synchronized_time` on the steps that measure stages, else a clock that reads 0 and never waits."""
    return synchronized_time if enabled else _no_wait_clock


def _no_wait_clock(device: torch.device) -> float:
    return 0.0
