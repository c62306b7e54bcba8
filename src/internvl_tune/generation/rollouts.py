"""Online RL rollouts from a server: the responses sampled there as token ids, the prompts built here.

The trainer needs each prompt's token ids, tiles and positions to score the responses, so it builds every prompt
itself (`build_inference_prompt`, as the `hf` backend does) and sends the request to the server with the tile budget
training uses (`tiles_per_image`). The server answers token ids (`ServerBackend.sample_ids`): the trained tokens are
the sampled ones, never a re-tokenised text. Where the server reports the prompt ids it built, they must equal the
trainer's: a server with another template, system message or tiling would otherwise train the policy on prompts it
was not sampled from, silently. `PromptMismatch` names the first differing token.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from internvl_tune.data.images import tiles_budget
from internvl_tune.data.prompt import InferencePrompt, build_inference_prompt
from internvl_tune.data.templates import decode_answer, get_template
from internvl_tune.data.transform import SampleSettings
from internvl_tune.errors import UserError
from internvl_tune.generation.base import GenerationRequest
from internvl_tune.generation.hf import Rollout
from internvl_tune.generation.server import SampledIds, ServerBackend


class PromptMismatch(UserError):
    """The server built another prompt than the trainer: `index` is the request's place in the call."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class ServerRollouts:
    """`rollout` as `HFBackend.rollout` returns it, sampled by a server.

    Args:
        client: the server's `ServerBackend` (its `max_concurrency` requests in flight).
        tokenizer: the policy's tokenizer (it builds the prompts and decodes the answers).
        settings: the run's sample settings: the template, system message and tiling training uses.
    """

    def __init__(self, client: ServerBackend, tokenizer: PreTrainedTokenizerBase, settings: SampleSettings):
        self.client, self.tokenizer, self.settings = client, tokenizer, settings
        self.template = get_template(settings.template, thinking=settings.thinking)

    def rollout(self, requests: Sequence[GenerationRequest]) -> list[list[Rollout]]:
        """The `params.n` responses of each request, as token ids with their prompts and decoded answers.

        Raises:
            PromptMismatch: the server reports prompt ids that differ from the trainer's for a request.
            ServerError: the server failed a request or returned no token ids.
        """
        prompts = [self.prompt(r) for r in requests]
        asked = [replace(r, tiles_per_image=self.tiles_per_image(r)) for r in requests]
        with ThreadPoolExecutor(self.client.max_concurrency, thread_name_prefix="rollouts") as pool:
            sampled = list(pool.map(self.client.sample_ids, asked))
        return [self._rollouts(i, p, s) for i, (p, s) in enumerate(zip(prompts, sampled, strict=True))]

    def prompt(self, request: GenerationRequest) -> InferencePrompt:
        return build_inference_prompt(
            self.tokenizer,
            request.messages,
            list(request.images),
            self.settings,
            assistant_prefill=request.assistant_prefill,
        )

    def tiles_per_image(self, request: GenerationRequest) -> int | None:
        """The per-image tile budget training gives this request's images (the sample budget split over them)."""
        if not request.images:
            return None
        if not self.settings.dynamic_image_size:
            return 1
        return tiles_budget(self.settings.max_dynamic_patch, len(request.images))

    def _rollouts(self, index: int, prompt: InferencePrompt, sampled: SampledIds) -> list[Rollout]:
        if sampled.prompt_ids is not None and list(sampled.prompt_ids) != list(prompt.input_ids):
            theirs, ours = list(sampled.prompt_ids), list(prompt.input_ids)
            at = next(
                (i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), min(len(theirs), len(ours))
            )
            raise PromptMismatch(
                index,
                f"the server built another prompt than training does ({len(theirs)} vs {len(ours)} tokens, first "
                f"difference at token {at}: {self.tokenizer.decode(theirs[at : at + 8])!r} vs "
                f"{self.tokenizer.decode(ours[at : at + 8])!r}); serve the policy's folder with its template and "
                "tiling settings (docs/rl.md)",
            )
        logprobs = sampled.logprobs or [None] * len(sampled.responses)
        return [
            Rollout(
                prompt=prompt,
                response_ids=ids,
                text=decode_answer(self.tokenizer, self.template, ids),
                truncated=reason == "length",
                sampler_logps=logps,
            )
            for ids, reason, logps in zip(sampled.responses, sampled.finish_reasons, logprobs, strict=True)
        ]
