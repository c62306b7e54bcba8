"""The `hf` backend: transformers `generate` in this process, on the CPU or a GPU, prompts built as in training.

Each request's prompt comes from `build_inference_prompt` (data/prompt.py), the one prompt builder of chat,
evaluation and sampling: the checkpoint's template and system message, its images tiled by its training settings
(`max_tiles` overrides the most tiles per image), the assistant prefill after the assistant role. A request for `n`
texts becomes `n` rows of one batch, each row with its own copy of the image tiles; rows are padded on the LEFT
with an explicit attention mask (`left_pad`), so a batched text equals the text generated alone (greedy decoding;
sampled texts draw from one random stream per batch).

With V2PE (docs/v2pe.md) each row's prompt positions (`InferencePrompt.position_ids`, the checkpoint's fixed stride)
go to `generate` as `position_ids`, left-padded like the tokens; transformers continues them by 1 per new token, as
the V2PE rule continues text (`generation_positions`).

Batches hold requests with equal sampling parameters (seeds aside), about `batch_size` rows each, and at least one
whole request. A batch with seeded requests runs under a seed derived from theirs, inside `torch.random.fork_rng`,
so the caller's random state is left as it was and the same requests in the same batches give the same texts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from internvl_tune.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_tune.data.prompt import InferencePrompt, build_inference_prompt
from internvl_tune.data.templates import decode_answer, get_template, stop_token_ids
from internvl_tune.data.transform import SampleSettings
from internvl_tune.errors import UserError
from internvl_tune.generation.base import GenerationRequest, SamplingParams, generate_all
from internvl_tune.model.load import load_for_inference

# transformers' generate continues explicit position ids (each new token at the last position + 1) from 5.2 on;
# 5.0 and 5.1 give every new token the prompt's last position.
V2PE_GENERATE_MIN_TRANSFORMERS = (5, 2)


class HFBackend:
    """Generation with a loaded `InternVLForConditionalGeneration` (PEFT-wrapped is fine).

    Args:
        model: the model; it is put in eval mode for each call and given back in the mode it had.
        tokenizer: its tokenizer; `pad_token_id` must be set.
        settings: the template, system message and image settings the model was trained with.
        batch_size: rows (texts) per `generate` call; a request with more than `batch_size` texts runs alone.
        max_tiles: most tiles per image (None: the settings' `max_dynamic_patch`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: SampleSettings,
        *,
        batch_size: int = 8,
        max_tiles: int | None = None,
    ):
        if tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has no pad token; batched generation needs one")
        if batch_size < 1 or (max_tiles is not None and max_tiles < 1):
            raise UserError(f"need batch_size >= 1 and max_tiles >= 1, got {batch_size} and {max_tiles}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.settings = settings if max_tiles is None else replace(settings, max_dynamic_patch=max_tiles)
        self.template = get_template(self.settings.template, thinking=self.settings.thinking)
        self.eos_token_id = stop_token_ids(tokenizer, self.template)
        # Image tokens stand for tiles: one sampled into a text would break a training forward of it (its count would
        # no longer match the tiles: online RL trains on the sampled ids) and means nothing to a reader.
        self.suppress_tokens = [
            i
            for i in tokenizer.convert_tokens_to_ids([IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN])
            if i is not None and i != tokenizer.unk_token_id
        ]

    @classmethod
    def from_folder(
        cls, path: str | Path, *, batch_size: int = 8, max_tiles: int | None = None, thinking: bool = False
    ) -> HFBackend:
        """Load a model folder (either layout; on the GPU in bf16 when there is one, else the CPU in fp32).
        `thinking`: prompt in the template's thinking mode even if the checkpoint was not trained in it."""
        model, tokenizer, settings = load_for_inference(path)
        if thinking and not settings.thinking:
            # A folder we wrote records its template's plain system message; in thinking mode the thinking one takes
            # its place (a system message of the user's own is kept).
            plain = get_template(settings.template).system_message
            system = None if settings.system_message in (None, plain) else settings.system_message
            settings = replace(settings, thinking=True, system_message=system)
        return cls(model, tokenizer, settings, batch_size=batch_size, max_tiles=max_tiles)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[str]]:
        return generate_all(self, requests)

    def reload_weights(self, folder: str | Path) -> None:
        """Load the weights of an HF-layout folder's `*.safetensors` into the running model (a trainer's push).

        Raises:
            UserError: the folder holds no safetensors, or other parameters than this model's.
        """
        if not any(Path(folder).glob("*.safetensors")):
            raise UserError(f"{folder}: no *.safetensors weights")
        # transformers reads the names as it saved them (fused experts and all); never a pickle (use_safetensors).
        fresh = type(self.model).from_pretrained(
            folder, dtype=self.model.dtype, use_safetensors=True, local_files_only=True
        )
        missing, unexpected = self.model.load_state_dict(fresh.state_dict(), strict=False)
        if missing or unexpected:
            raise UserError(
                f"{folder}: its weights are not this model's (missing {missing[:4]}, extra {unexpected[:4]})"
            )

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, list[str]]]:
        for batch in self._batches(requests):
            texts = self._generate_batch([requests[i] for i in batch])
            yield from zip(batch, texts, strict=True)

    def close(self) -> None:
        pass

    def _batches(self, requests: Sequence[GenerationRequest]) -> Iterator[list[int]]:
        """Request indices grouped by sampling parameters (seed aside), about `batch_size` rows a batch, in order of
        each group's first request."""
        groups: dict[SamplingParams, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(replace(request.params, seed=None), []).append(index)
        for params, indices in groups.items():
            per_batch = max(1, self.batch_size // params.n)
            for start in range(0, len(indices), per_batch):
                yield indices[start : start + per_batch]

    def rollout(self, requests: Sequence[GenerationRequest]) -> list[list[Rollout]]:
        """The `params.n` responses of each request as token ids (what online RL trains on: the sampled tokens
        themselves, never a re-tokenised text), with their prompts and decoded answers."""
        out: list[list[Rollout] | None] = [None] * len(requests)
        for batch in self._batches(requests):
            prompts, ids = self._sample_ids([requests[i] for i in batch])
            for i, prompt, responses in zip(batch, prompts, ids, strict=True):
                max_new = requests[i].params.max_new_tokens
                out[i] = [
                    Rollout(
                        prompt=prompt,
                        response_ids=r,
                        text=decode_answer(self.tokenizer, self.template, r),
                        truncated=len(r) >= max_new and r[-1] not in self.stop_ids,
                    )
                    for r in responses
                ]
        return out  # type: ignore[return-value]

    def request_settings(self, request: GenerationRequest) -> SampleSettings:
        """The settings a request's prompt is built with: the backend's, with the request's `tiles_per_image` as the
        per-image budget when it sets one (the sample budget `max_dynamic_patch` is split over the images)."""
        if request.tiles_per_image is None:
            return self.settings
        return replace(self.settings, max_dynamic_patch=request.tiles_per_image * max(1, len(request.images)))

    def score(self, group: Sequence[Rollout], *, temperature: float = 1.0) -> list[list[float]]:
        """This model's log-prob of every token of one prompt's responses (what a server reports as `logprobs`) under
        softmax(logits / temperature), the distribution they were sampled from: one no-grad forward of the row
        `[prompt | r1 | ... | rn]`, as the trainer scores them (`group_token_logps`: the LM head only at response
        positions, never the whole [T, vocab] logits)."""
        from internvl_tune.data.collate import group_collate  # lazily: generation does not need the training stack
        from internvl_tune.data.images import blank_tile
        from internvl_tune.model.forward import InternVLTrainingForward
        from internvl_tune.model.logprobs import group_token_logps

        prompt = group[0].prompt
        row = {
            "prompt_ids": torch.tensor(prompt.input_ids, dtype=torch.long),
            "prompt_position_ids": prompt.position_ids,
            "pixel_values": prompt.pixel_values,
            "num_image_tokens": sum(prompt.num_tiles) * self.settings.num_image_token,
            "responses": [torch.tensor(r.response_ids, dtype=torch.long) for r in group],
        }
        dummy = blank_tile(self.settings.image_size, self.settings.normalize_type)
        batch = group_collate([row], self.tokenizer.pad_token_id, dummy)
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                forward = InternVLTrainingForward(self.model)
                logps = group_token_logps(forward, batch, self.model.device, temperature=temperature).float().cpu()
        finally:
            self.model.train(was_training)
        return [part.tolist() for part in logps.split([len(r.response_ids) for r in group])]

    @property
    def stop_ids(self) -> set[int]:
        return set(self.eos_token_id) if isinstance(self.eos_token_id, list | tuple) else {self.eos_token_id}

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[list[str]]:
        _, ids = self._sample_ids(requests)
        return [[decode_answer(self.tokenizer, self.template, r) for r in responses] for responses in ids]

    def _sample_ids(self, requests: list[GenerationRequest]) -> tuple[list[InferencePrompt], list[list[list[int]]]]:
        """Each request's prompt, and its `n` responses as token ids, each cut after its first stop token."""
        params = requests[0].params
        greedy = params.temperature == 0
        copies = 1 if greedy else params.n  # greedy texts are all the same: generate one, repeat it
        prompts = [
            build_inference_prompt(
                self.tokenizer,
                r.messages,
                list(r.images),
                self.request_settings(r),
                assistant_prefill=r.assistant_prefill,
            )
            for r in requests
        ]
        rows = [p for p in prompts for _ in range(copies)]
        input_ids, attention_mask = left_pad([p.input_ids for p in rows], self.tokenizer.pad_token_id)
        model, device = self.model, self.model.device
        tiles = [p.pixel_values for p in rows if p.pixel_values is not None]
        # generate() runs the vision encoder on any `pixel_values` key, even None: pass it only with tiles.
        images = {"pixel_values": torch.cat(tiles).to(device, model.dtype)} if tiles else {}
        sampling = {} if greedy else {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p}
        seeds = [r.params.seed for r in requests]
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                if any(s is not None for s in seeds):
                    torch.manual_seed(_batch_seed(seeds))
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    **{k: v.to(device) for k, v in generation_positions(rows, self.settings.v2pe).items()},
                    **images,
                    max_new_tokens=params.max_new_tokens,
                    do_sample=not greedy,
                    **sampling,
                    eos_token_id=self.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id,
                    suppress_tokens=self.suppress_tokens or None,
                )  # [rows, T + new]
        finally:
            model.train(was_training)
        stops = self.stop_ids
        responses = []
        for row in output[:, input_ids.shape[1] :].tolist():
            cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            responses.append(row[:cut])  # what follows the stop token is padding
        if greedy:
            return prompts, [[r] * params.n for r in responses]
        return prompts, [responses[i * copies : (i + 1) * copies] for i in range(len(requests))]


@dataclass(frozen=True)
class Rollout:
    """One sampled response: its prompt (ids, tiles, positions), its token ids up to and with the stop token,
    its answer text (`decode_answer`), whether it hit `max_new_tokens` before stopping, and the sampler's log-prob
    of each token where it reported them (a server's; None in process, where the trainer's are the sampler's)."""

    prompt: InferencePrompt
    response_ids: list[int]
    text: str
    truncated: bool
    sampler_logps: list[float] | None = None


def left_pad(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `input_ids` and `attention_mask` `[B, T]`.

    Example, pad id 9::

        [[5, 6, 7], [5, 8]] -> input_ids [[5, 6, 7], [9, 5, 8]], attention_mask [[1, 1, 1], [0, 1, 1]]
    """
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids, attention_mask


def generation_positions(prompts: Sequence[InferencePrompt], v2pe: str) -> dict[str, torch.Tensor]:
    """What `generate` takes for the prompts' positions: nothing with V2PE off (it counts 0, 1, 2, ... from the
    attention mask, the same positions), else `position_ids` [B, T] float32, left-padded with 0 like `left_pad`.

    Raises:
        UserError: V2PE with a transformers older than `V2PE_GENERATE_MIN_TRANSFORMERS`.
    """
    if v2pe == "off":
        return {}
    if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < V2PE_GENERATE_MIN_TRANSFORMERS:
        raise UserError(
            f"generating with V2PE positions needs transformers >= {'.'.join(map(str, V2PE_GENERATE_MIN_TRANSFORMERS))} "
            f"(older generate does not continue explicit position ids); this is {transformers.__version__}"
        )
    length = max(len(p.position_ids) for p in prompts)
    position_ids = torch.zeros((len(prompts), length), dtype=torch.float32)
    for row, prompt in enumerate(prompts):
        position_ids[row, length - len(prompt.position_ids) :] = prompt.position_ids
    return {"position_ids": position_ids}


def _batch_seed(seeds: list[int | None]) -> int:
    """One seed from a batch's request seeds, the same in every process and Python version."""
    digest = hashlib.sha256(repr(seeds).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63, what torch.manual_seed takes
