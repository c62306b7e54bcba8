"""The training forward: image tiles through the ViT once, features placed at the `<IMG_CONTEXT>` tokens."""

from __future__ import annotations

import time

import torch
from peft import PeftModel
from torch import nn
from transformers import InternVLForConditionalGeneration


def base_model(model: nn.Module) -> InternVLForConditionalGeneration:
    """The InternVL model under an optional PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class InternVLTrainingForward(nn.Module):
    """Wraps an InternVL model so that one `forward` call (what DDP/FSDP hook) does the whole multimodal pass.

    Unlike the stock forward it accepts tiles whose features are dropped (`image_flags == False`): a text-only
    batch carries one dummy tile so that every rank runs the same graph (spec §2.4), and its features enter the
    graph with weight zero rather than being skipped, so DDP sees a gradient (of zeros) for every ViT parameter.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.vit_seconds = 0.0  # time spent in the ViT + projector since the recipe last reset it (telemetry)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, T] or [B, 1, T, T]
        position_ids: torch.Tensor,  # [B, T]
        pixel_values: torch.Tensor | None = None,  # [N, 3, S, S]
        image_flags: torch.Tensor | None = None,  # [N] bool
    ) -> torch.Tensor:
        """Returns logits [B, T, V]."""
        internvl = base_model(self.model)
        config = internvl.config
        inputs_embeds = internvl.get_input_embeddings()(input_ids)  # [B, T, D]
        if pixel_values is not None:
            start = synchronized_time(pixel_values.device)
            features = internvl.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output  # [N, tokens_per_tile, D]
            features = features.to(inputs_embeds.dtype)
            self.vit_seconds += synchronized_time(pixel_values.device) - start
            image_flags = image_flags if image_flags is not None else torch.ones(len(features), dtype=torch.bool)
            real = features[image_flags].reshape(-1, features.shape[-1])
            placeholder = input_ids == config.image_token_id
            if int(placeholder.sum()) != real.shape[0]:
                raise ValueError(
                    f"{int(placeholder.sum())} <IMG_CONTEXT> tokens but {real.shape[0]} image features; "
                    "the data pipeline must keep them equal"
                )
            inputs_embeds = inputs_embeds.masked_scatter(placeholder.unsqueeze(-1), real)
            if not bool(image_flags.all()):
                inputs_embeds = inputs_embeds + features[~image_flags].sum() * 0.0
        outputs = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids)
        return outputs.logits


def synchronized_time(device: torch.device) -> float:
    """Wall time once the device has finished its queued work, so GPU stages are timed, not just launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
