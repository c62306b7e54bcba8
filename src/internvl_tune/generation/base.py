"""The generation interface: requests in, `n` texts per request out, whatever runs the model.

A request is a conversation in the training format (user turns with `<image>` placeholders, the k-th standing for
the k-th image), its images, the sampling parameters and an optional assistant prefill (the start of the answer,
which the model continues; dropout next-token prediction needs it). Example::

    request = GenerationRequest(
        messages=[{"role": "user", "content": "<image>\\nWhat colour is the shape?"}],
        images=["shapes/0.png"],
        params=SamplingParams(n=4, temperature=0.7, top_k=50, max_new_tokens=64, seed=1),
    )
    backend.generate([request])  # [["red", "It is red.", "red", "Red."]]

Backends: `HFBackend` (hf.py: transformers `generate` in this process, CPU or GPU) and `ServerBackend`
(server.py: any OpenAI-compatible chat-completions server, e.g. vLLM, LMDeploy, SGLang or serve.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from internvl_tune.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """How to draw the texts of one request.

    Attributes:
        n: texts per request.
        temperature: 0 = greedy (then the `n` texts are one text repeated).
        top_k: sample from the k likeliest tokens only; 0 = no limit.
        top_p: nucleus sampling; 1.0 = no limit.
        max_new_tokens: longest text, in tokens.
        seed: makes the draw reproducible (None: not seeded). The `hf` backend seeds each batch from its requests'
            seeds; a server seeds each request if it honours the OpenAI `seed` field (vLLM does).
    """

    n: int = 1
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise UserError(f"need n >= 1 and max_new_tokens >= 1, got {self.n} and {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError(
                f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_k}, "
                f"{self.top_p}"
            )


ImageInput = str | os.PathLike[str] | Image.Image


@dataclass
class GenerationRequest:
    """One prompt: `messages` ends with a user turn; `assistant_prefill` is the answer's start (not repeated in the
    returned texts, which hold only what the model added); `tiles_per_image`, when set, the most tiles each of its
    images is cut into (a server's `mm_processor_kwargs.max_dynamic_patch`: online RL asks the server for the tiles
    training uses), else the backend's own setting."""

    messages: list[dict[str, str]]
    images: Sequence[ImageInput] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    assistant_prefill: str = ""
    tiles_per_image: int | None = None


class Backend(Protocol):
    """What `sample`, `dropout-ntp` and evaluation need from a model."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[str]]:
        """The `params.n` texts of each request, in request order."""
        ...

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, list[str]]]:
        """`(request index, its texts)` as each request completes, in any order: a caller writes results as they
        come, so an interrupted run loses only the requests in flight."""
        ...

    def close(self) -> None:
        """Release what the backend holds (threads, connections)."""
        ...


def generate_all(backend: Backend, requests: Sequence[GenerationRequest]) -> list[list[str]]:
    """`Backend.generate` from `Backend.stream`: the results put back in request order."""
    results: list[list[str] | None] = [None] * len(requests)
    for index, texts in backend.stream(requests):
        results[index] = texts
    assert all(r is not None for r in results), "a backend's stream skipped a request"
    return results  # type: ignore[return-value]
