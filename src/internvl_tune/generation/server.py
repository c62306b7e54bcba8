"""The `server` backend: any OpenAI-compatible chat-completions server (vLLM, LMDeploy, SGLang, or serve.py).

This is how sampling runs on GPUs at speed: start the server with the model (e.g. `vllm serve MODEL_DIR --port
8000`), then point `--base-url http://localhost:8000/v1` at it. Each request becomes one `POST /chat/completions`:

    {"model": "...", "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
         {"type": "text", "text": "What colour is the shape?"}]}],
     "n": 4, "temperature": 0.7, "top_p": 1.0, "top_k": 50, "max_tokens": 64, "seed": 1}

A user turn's images go first, as data URLs of the files' bytes, and its text follows with the `<image>` placeholders
(and the `Image-k: ` labels `user_turn` puts before them) taken out: the server puts the image tokens in front of
the text itself, which for one image is the `"<image>\\n" + question` the training format has. The server tiles
the images with its own settings (vLLM: `--mm-processor-kwargs '{"max_dynamic_patch": 6}'`). An assistant prefill
is sent as a last assistant message with `"continue_final_message": true, "add_generation_prompt": false` (vLLM's
and serve.py's extension; a server without it answers the conversation instead of continuing it).

Requests run in threads, at most `max_concurrency` in flight. A 429 or 5xx answer, a refused or dropped connection
and a timeout are retried after 1, 2, 4, ... s (`backoff_s`, doubled each time, at most 60 s, or the server's
`Retry-After`), `max_retries` times; other errors stop the run with the server's message. A server that returns
fewer than `n` choices (one that ignores `n`) is asked again for the rest.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import mimetypes
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from internvl_tune.constants import IMAGE_PLACEHOLDER
from internvl_tune.data.placeholders import remove_image_placeholders
from internvl_tune.errors import UserError
from internvl_tune.generation.base import GenerationRequest, ImageInput, generate_all

RETRY_STATUS = (429, 500, 502, 503, 504)


class ServerError(UserError, OSError):
    """The server cannot be reached, or refused a request (the CLI reports it in one line)."""


class ServerBackend:
    """Chat completions from an OpenAI-compatible server.

    Args:
        base_url: the API root, e.g. `http://localhost:8000/v1`.
        model_name: the served model's name (None: the first the server lists at `/models`).
        api_key: sent as a bearer token (None: `$OPENAI_API_KEY` if set).
        max_concurrency: most requests in flight at once.
        max_retries: retries of a request after a 429 / 5xx answer or a connection error.
        backoff_s: the first wait before a retry; doubled for each further one.
        timeout_s: longest wait for one answer.

    Raises:
        ServerError: the server does not answer at `/models` (checked at once, so a wrong URL fails in a second).
        ValueError: `model_name` is not among the models the server lists.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model_name: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 8,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 3600.0,
    ):
        if max_concurrency < 1 or max_retries < 0:
            raise UserError(f"need max_concurrency >= 1 and max_retries >= 0, got {max_concurrency}, {max_retries}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.backoff_s, self.timeout_s = backoff_s, timeout_s
        served = [m["id"] for m in self._call("GET", "/models", None, retries=0).get("data", [])]
        if model_name is None:
            if not served:
                raise ServerError(f"{self.base_url}/models lists no model; pass the model name")
            model_name = served[0]
        elif served and model_name not in served:
            raise ServerError(f"{self.base_url} does not serve {model_name!r}; it serves {', '.join(served)}")
        self.model_name = model_name

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[str]]:
        return generate_all(self, requests)

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, list[str]]]:
        # Requests are submitted as slots free up, so a stopped stream leaves at most `max_concurrency` in flight.
        pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="chat-completions")
        pending: dict[Future, int] = {}
        next_index = 0
        try:
            while next_index < len(requests) or pending:
                while next_index < len(requests) and len(pending) < self.max_concurrency:
                    pending[pool.submit(self.complete, requests[next_index])] = next_index
                    next_index += 1
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pass

    def complete(self, request: GenerationRequest) -> list[str]:
        """The `params.n` texts of one request (several calls if the server returns fewer choices)."""
        return [(c.get("message") or {}).get("content") or "" for c in self._choices(request, {})[1]]

    def sample_ids(self, request: GenerationRequest) -> SampledIds:
        """The `params.n` responses of one request as the token ids the server sampled (online RL trains on them),
        with the prompt ids the server built when it reports them.

        Asks with `return_token_ids` (vLLM >= 0.10.2 and serve.py answer `token_ids` per choice and
        `prompt_token_ids`); an answer of `"token_id:N"` log-prob tokens (vLLM `--return-tokens-as-token-ids`) is
        read too.

        Raises:
            ServerError: the server returned no token ids for a choice.
        """
        prompt_ids, choices = self._choices(request, {"return_token_ids": True, "logprobs": True})
        responses = [_choice_token_ids(choice, self.base_url) for choice in choices]
        finished = [str(choice.get("finish_reason") or "stop") for choice in choices]
        logprobs = [_choice_logprobs(choice, len(ids)) for choice, ids in zip(choices, responses, strict=True)]
        return SampledIds(prompt_ids, responses, finished, logprobs)

    def _choices(self, request: GenerationRequest, extra: dict[str, Any]) -> tuple[list[int] | None, list[dict]]:
        """The server's `prompt_token_ids` (None if it sends none) and `params.n` choices of one request."""
        params = request.params
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": to_openai_messages(request),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            **extra,
        }
        if params.top_k:
            body["top_k"] = params.top_k
        if request.assistant_prefill:
            body.update(continue_final_message=True, add_generation_prompt=False)
        if request.tiles_per_image is not None:  # vLLM's per-request processor settings: the InternVL tile budget
            body["mm_processor_kwargs"] = {"max_dynamic_patch": request.tiles_per_image}
        choices: list[dict] = []
        prompt_ids = None
        while len(choices) < params.n:
            body["n"] = params.n - len(choices)
            if params.seed is not None:
                body["seed"] = params.seed + len(choices)  # a follow-up call draws new texts, not the first ones again
            answer = self._call("POST", "/chat/completions", body, retries=self.max_retries)
            got = answer.get("choices") or []
            if not got:
                raise ServerError(f"{self.base_url}/chat/completions returned no choices")
            prompt_ids = answer.get("prompt_token_ids", prompt_ids)
            choices += sorted(got, key=lambda c: c.get("index", 0))[: params.n - len(choices)]
        return prompt_ids, choices

    def reload_weights(self, folder: str | Path, *, kind: str = "internvl-tune") -> None:
        """Ask the server to load the weights now in `folder`, the folder it was started with (a trainer's push).

        `kind` names the server's endpoint (docs/rl.md): `internvl-tune` (serve.py) `POST /v1/reload_weights
        {"path": folder}`; `vllm` `POST /collective_rpc {"method": "reload_weights"}` (the server started with
        `VLLM_SERVER_DEV_MODE=1`; it rereads its model folder); `sglang` `POST /update_weights_from_disk
        {"model_path": folder}`.

        Raises:
            ServerError: the server refused or failed the reload, or `kind` is unknown.
        """
        root = self.base_url.removesuffix("/v1")
        folder = str(Path(folder).resolve())
        if kind == "internvl-tune":
            self._call("POST", "/reload_weights", {"path": folder}, retries=self.max_retries)
        elif kind == "vllm":
            self._call("POST", "/collective_rpc", {"method": "reload_weights"}, retries=self.max_retries, root=root)
        elif kind == "sglang":
            answer = self._call(
                "POST", "/update_weights_from_disk", {"model_path": folder}, retries=self.max_retries, root=root
            )
            if answer.get("success") is False:
                raise ServerError(f"{root}/update_weights_from_disk: {answer.get('message', 'failed')}")
        else:
            raise ServerError(f"unknown server kind {kind!r}; use internvl-tune, vllm or sglang")

    def _call(self, method: str, path: str, body: dict | None, *, retries: int, root: str | None = None) -> dict:
        url = (root or self.base_url) + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS or attempt == retries:
                    raise ServerError(f"{method} {url}: HTTP {e.code}: {_error_message(e)}") from e
                wait_s = _retry_after(e) or self._backoff(attempt)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                if attempt == retries:
                    reason = getattr(e, "reason", e)
                    raise ServerError(
                        f"cannot reach the server at {url} ({reason}); is it running? (e.g. vllm serve MODEL_DIR, "
                        "or python -m internvl_tune.generation.serve MODEL_DIR --port 8000)"
                    ) from e
                wait_s = self._backoff(attempt)
            time.sleep(wait_s)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        return min(60.0, self.backoff_s * 2**attempt) * random.uniform(1.0, 1.25)  # jitter: retries do not align


@dataclass(frozen=True)
class SampledIds:
    """What a server sampled for one request: its prompt's token ids (None when the server does not report them),
    each response's token ids, each response's `finish_reason` ("length": cut at max_tokens), and each response's
    per-token log-probs under the server's model where it sends them (None where not)."""

    prompt_ids: list[int] | None
    responses: list[list[int]]
    finish_reasons: list[str]
    logprobs: list[list[float] | None] | None = None


def _choice_token_ids(choice: dict, where: str) -> list[int]:
    ids = choice.get("token_ids")
    if isinstance(ids, list) and ids:
        return [int(i) for i in ids]
    content = (choice.get("logprobs") or {}).get("content") or []
    tokens = [entry.get("token", "") for entry in content]
    if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return [int(t.removeprefix("token_id:")) for t in tokens]
    raise ServerError(
        f"{where}/chat/completions returned no token ids; online RL trains on the sampled ids (vLLM >= 0.10.2 answers "
        "return_token_ids; or start vLLM with --return-tokens-as-token-ids)"
    )


def _choice_logprobs(choice: dict, num_tokens: int) -> list[float] | None:
    """A choice's per-token log-probs (`logprobs.content[i].logprob`), or None when the server sent none or not one
    per sampled token."""
    content = (choice.get("logprobs") or {}).get("content") or []
    values = [entry.get("logprob") for entry in content if isinstance(entry, dict)]
    if len(values) != num_tokens or not all(isinstance(v, int | float) for v in values):
        return None
    return [float(v) for v in values]


def to_openai_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """The request's messages in the OpenAI form: each user turn's images (as data URLs) before its text, the
    placeholders taken out of the text; the prefill as a last assistant message."""
    images = iter(request.images)
    messages: list[dict[str, Any]] = []
    for message in request.messages:
        num_images = message["content"].count(IMAGE_PLACEHOLDER) if message["role"] == "user" else 0
        if not num_images:
            messages.append(dict(message))
            continue
        parts: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": image_data_url(next(images))}} for _ in range(num_images)
        ]
        parts.append({"type": "text", "text": remove_image_placeholders(message["content"])})
        messages.append({"role": message["role"], "content": parts})
    if request.assistant_prefill:
        messages.append({"role": "assistant", "content": request.assistant_prefill})
    return messages


def image_data_url(image: ImageInput) -> str:
    """`data:<mime>;base64,...` of an image file's bytes (PNG-encoded for an image in memory)."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    else:
        data = Path(image).read_bytes()
        mime = mimetypes.guess_type(str(image))[0] or "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read().decode(errors="replace")
    except OSError:
        return str(error.reason)
    try:
        message = json.loads(body)["error"]
        message = message.get("message", message) if isinstance(message, dict) else message
    except (ValueError, KeyError, TypeError):
        message = body
    return " ".join(str(message).split())[:500] or str(error.reason)


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    try:
        return min(60.0, float(error.headers.get("Retry-After", "")))
    except ValueError:
        return None
