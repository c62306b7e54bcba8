"""A small OpenAI-compatible server for a model folder, through the `hf` backend.

    python -m internvl_tune.generation.serve MODEL_DIR --port 8000
    internvl-tune sample prompts.jsonl --backend server --base-url http://localhost:8000/v1 ...

It answers `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/reload_weights`. A chat request takes the
fields the `server` backend sends: `messages` with text and `image_url` data-URL parts, `n`, `temperature`, `top_p`,
`top_k`, `max_tokens`, `seed`, `continue_final_message` to continue a last assistant message,
`mm_processor_kwargs.max_dynamic_patch` (the most tiles per image, as vLLM reads it), `return_token_ids` (each
choice's sampled `token_ids` and the answer's `prompt_token_ids`, as vLLM answers them) and `logprobs` (each sampled
token's log-prob under softmax(logits / temperature), the distribution it was drawn from, from one more no-grad forward
of the responses: `HFBackend.score`). Prompts are built as
`sample --backend hf` builds them: a user turn's images go before its text as `user_turn` places them. Each
connection gets a thread; the requests waiting when the model is free are generated as one batch. A choice's
`finish_reason` is "length" when its text hit `max_tokens`, else "stop"; there is no `usage`. It is for tests and for
sharing one model between processes on one machine; for speed on GPUs serve the model with vLLM, LMDeploy or SGLang.

Weight pushes (online RL with `rl.rollout_backend: server`, docs/rl.md): the trainer saves the policy into the folder the server was
started with and posts `/v1/reload_weights`; the server loads that folder's `*.safetensors` (never a pickle) between
two batches, and answers the requests after it with the new weights. The request may name the folder (`{"path":
...}`) but never another one: a reload is not a way to load other files. With `--api-key` (or
`$INTERNVL_TUNE_API_KEY`) every request must send it as a bearer token (as vLLM's `--api-key`); binding to an address
beyond this machine without one is refused.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from internvl_tune.constants import IMAGE_PLACEHOLDER
from internvl_tune.data.placeholders import user_turn
from internvl_tune.errors import MissingPathError, UserError
from internvl_tune.generation.base import Backend, GenerationRequest, SamplingParams
from internvl_tune.generation.hf import HFBackend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Answer:
    """What one request got: its texts and, from a backend that samples ids (`rollout`), each text's token ids,
    whether it was cut at max_tokens, and the prompt's ids."""

    texts: list[str]
    token_ids: list[list[int]] | None = None
    truncated: list[bool] | None = None
    prompt_ids: list[int] | None = None
    logprobs: list[list[float]] | None = None


def _generate(backend: Backend, requests: list[GenerationRequest], with_logprobs: list[bool]) -> list[_Answer]:
    """Each request's answer; with ids from a backend that samples ids (`rollout`), and the log-prob of each
    sampled token where the request asked for them (`score`: one more no-grad forward of its responses)."""
    rollout = getattr(backend, "rollout", None)
    if rollout is None:
        return [_Answer(texts) for texts in backend.generate(requests)]
    return [
        _Answer(
            [r.text for r in group],
            [r.response_ids for r in group],
            [r.truncated for r in group],
            list(group[0].prompt.input_ids),
            backend.score(group, temperature=request.params.temperature or 1.0) if asked else None,
        )
        for request, group, asked in zip(requests, rollout(requests), with_logprobs, strict=True)
    ]


class _Batcher:
    """One thread runs the backend; requests that arrive while it is busy wait and are generated together."""

    def __init__(self, backend: Backend, max_batch: int):
        self.backend, self.max_batch = backend, max_batch
        self.queue: queue.Queue[tuple[Any, Future]] = queue.Queue()  # ((request, with_logprobs) or a job, future)
        threading.Thread(target=self._run, daemon=True, name="generate").start()

    def submit(self, request: GenerationRequest, *, with_logprobs: bool = False) -> _Answer:
        future: Future = Future()
        self.queue.put(((request, with_logprobs), future))
        return future.result()

    def run_between_batches(self, job) -> Any:
        """Run `job()` on the generation thread, after the batch in progress and before the next (a weight reload
        never runs while the model generates); returns its result or raises its exception."""
        future: Future = Future()
        self.queue.put((job, future))
        return future.result()

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.max_batch and not callable(batch[0][0]):
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if callable(item[0]):  # a job waits for this batch, then runs alone
                    self.queue.put(item)
                    break
                batch.append(item)
            if callable(batch[0][0]):
                job, future = batch[0]
                try:
                    future.set_result(job())
                except Exception as e:
                    future.set_exception(e)
                continue
            try:
                results = _generate(self.backend, [r for (r, _), _ in batch], [lp for (_, lp), _ in batch])
            except Exception:
                # One bad request must not fail the others: each is run again alone, and an error goes to its own
                # waiting handler, which answers 500.
                for (request, with_logprobs), future in batch:
                    try:
                        future.set_result(_generate(self.backend, [request], [with_logprobs])[0])
                    except Exception as e:
                        future.set_exception(e)
                continue
            for (_, future), answer in zip(batch, results, strict=True):
                future.set_result(answer)


class ChatCompletionsServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` serving one model; `max_in_flight` is the most requests it has held at once."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        backend: Backend,
        *,
        model_name: str,
        max_batch: int = 16,
        api_key: str | None = None,
        weights_dir: str | Path | None = None,
    ):
        if api_key is None and not is_local_address(address[0]):
            raise UserError(
                f"serving on {address[0]}, beyond this machine, needs --api-key (or $INTERNVL_TUNE_API_KEY)"
            )
        super().__init__(address, _Handler)
        self.model_name = model_name
        self.api_key = api_key
        self.weights_dir = Path(weights_dir).resolve() if weights_dir is not None else None
        self.batcher = _Batcher(backend, max_batch)
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.num_requests = 0

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def is_local_address(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def reload_request_folder(body: dict[str, Any], weights_dir: Path | None) -> Path:
    """The folder a `/v1/reload_weights` request may load: the server's own, and only when it holds safetensors.

    Raises:
        RequestError: the server has no weights folder, the request names another path, or the folder holds no
            `*.safetensors` (a pickled `.bin` is never loaded).
    """
    if weights_dir is None:
        raise RequestError("this server was not started from a model folder: nothing to reload")
    named = body.get("path")
    if named is not None and Path(str(named)).resolve() != weights_dir:
        raise RequestError(f"reload_weights loads only the folder the server was started with ({weights_dir})")
    if not any(weights_dir.glob("*.safetensors")):
        raise RequestError(f"{weights_dir}: no *.safetensors weights (pickled weights are never loaded)")
    return weights_dir


class RequestError(ValueError):
    """A request the server cannot take (answered 400)."""


def parse_chat_request(body: dict[str, Any]) -> GenerationRequest:
    """An OpenAI chat-completions body as a `GenerationRequest` (the images decoded, placeholders placed).

    Raises:
        RequestError: a malformed body (no messages, an unknown part type, an image that is not a data URL, ...).
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    turns: list[dict[str, str]] = []
    images: list[Image.Image] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError("each message needs a role: system, user or assistant")
        content = message.get("content")
        if isinstance(content, str):
            turns.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError("a message's content must be a string or a list of parts")
        texts, turn_images = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url":
                turn_images.append(_decode_image((part.get("image_url") or {}).get("url", "")))
            else:
                raise RequestError(f"unsupported content part type {kind!r}; use text or image_url")
        text = "\n".join(texts)
        if turn_images and message["role"] != "user":
            raise RequestError("images are only allowed in user messages")
        if turn_images and IMAGE_PLACEHOLDER not in text:
            text = user_turn(text, len(turn_images))
        turns.append({"role": message["role"], "content": text})
        images += turn_images
    num_placeholders = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns if t["role"] == "user")
    if num_placeholders != len(images):
        raise RequestError(f"{num_placeholders} <image> placeholders in the user messages for {len(images)} images")
    prefill = ""
    if body.get("continue_final_message"):
        if turns[-1]["role"] != "assistant":
            raise RequestError("continue_final_message needs a last assistant message")
        prefill = turns.pop()["content"]
    if not turns or turns[-1]["role"] != "user":
        raise RequestError("the conversation must end with a user message (or set continue_final_message)")
    top_k = int(body.get("top_k") or 0)
    try:
        params = SamplingParams(
            n=int(body.get("n") or 1),
            temperature=float(body.get("temperature", 1.0)),
            top_k=max(top_k, 0),  # vLLM spells "no limit" -1
            top_p=float(body.get("top_p", 1.0)),
            max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 256),
            seed=None if body.get("seed") is None else int(body["seed"]),
        )
        tiles = (body.get("mm_processor_kwargs") or {}).get("max_dynamic_patch")  # per image, as vLLM reads it
        tiles = None if tiles is None else int(tiles)
    except (TypeError, ValueError, AttributeError) as e:
        raise RequestError(str(e)) from e
    if tiles is not None and tiles < 1:
        raise RequestError(f"mm_processor_kwargs.max_dynamic_patch must be >= 1, got {tiles}")
    return GenerationRequest(turns, images, params, assistant_prefill=prefill, tiles_per_image=tiles)


def _decode_image(url: str) -> Image.Image:
    if not url.startswith("data:") or ";base64," not in url:
        raise RequestError("images must be base64 data URLs (data:image/png;base64,...); this server fetches nothing")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1], validate=True)))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise RequestError(f"an image_url is not a readable image: {e}") from e
    return image.convert("RGB")


class _Handler(BaseHTTPRequestHandler):
    server: ChatCompletionsServer
    protocol_version = "HTTP/1.1"

    def _authorized(self) -> bool:
        """With an API key, a request must carry it (`Authorization: Bearer KEY`); answered 401 otherwise."""
        key = self.server.api_key
        if key is None or self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._send(401, {"error": {"message": "missing or wrong API key", "type": "authentication_error"}})
        return False

    def do_GET(self) -> None:  # noqa: N802 (the http.server spelling)
        if not self._authorized():
            return
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            model = {"id": self.server.model_name, "object": "model", "owned_by": "internvl-tune"}
            self._send(200, {"object": "list", "data": [model]})
        elif self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path.rstrip("/") in ("/v1/reload_weights", "/reload_weights"):
            self._send(*self._reload())
            return
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        status, payload = self._answer()
        self._send(status, payload)

    def _reload(self) -> tuple[int, dict]:
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            folder = reload_request_folder(body, self.server.weights_dir)
        except (ValueError, TypeError) as e:  # RequestError, bad JSON
            return 400, {"error": {"message": str(e), "type": "invalid_request_error"}}
        backend = self.server.batcher.backend
        try:
            self.server.batcher.run_between_batches(lambda: backend.reload_weights(folder))
        except Exception as e:
            logger.exception("weight reload failed")
            return 500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}
        return 200, {"status": "reloaded", "path": str(folder)}

    def _answer(self) -> tuple[int, dict]:
        """The status and body of a chat request. A request counts as in flight from its arrival until its answer is
        ready, not while the answer is written back: a client that sends its next request as soon as it has read
        an answer is never counted twice."""
        server = self.server
        with server.lock:
            server.in_flight += 1
            server.num_requests += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                request = parse_chat_request(body)
            except (ValueError, TypeError) as e:  # RequestError, bad JSON
                return 400, {"error": {"message": str(e), "type": "invalid_request_error"}}
            try:
                answer = server.batcher.submit(request, with_logprobs=bool(body.get("logprobs")))
            except Exception as e:  # the model failed on this request: the client sees why
                logger.exception("generation failed")
                return 500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}
            with_ids = bool(body.get("return_token_ids")) and answer.token_ids is not None
            choices = []
            for i, text in enumerate(answer.texts):
                cut = answer.truncated is not None and answer.truncated[i]
                choice = {"index": i, "message": {"role": "assistant", "content": text}}
                choice["finish_reason"] = "length" if cut else "stop"
                if with_ids:
                    choice["token_ids"] = answer.token_ids[i]
                if answer.logprobs is not None:  # OpenAI's layout; the token as vLLM's --return-tokens-as-token-ids
                    ids = answer.token_ids[i]
                    choice["logprobs"] = {
                        "content": [
                            {"token": f"token_id:{t}", "logprob": lp}
                            for t, lp in zip(ids, answer.logprobs[i], strict=True)
                        ]
                    }
                choices.append(choice)
            payload = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": server.model_name,
                "choices": choices,
            }
            if with_ids:
                payload["prompt_token_ids"] = answer.prompt_ids
            return 200, payload
        finally:
            with server.lock:
                server.in_flight -= 1

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server signature)
        logger.debug(format, *args)


def start_server(
    backend: Backend,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str = "internvl",
    max_batch: int = 16,
    api_key: str | None = None,
    weights_dir: str | Path | None = None,
) -> ChatCompletionsServer:
    """Serve `backend` in a background thread (port 0: a free port; see `server.base_url`); `shutdown()` stops it.
    `weights_dir`: the folder `/v1/reload_weights` reloads (None: no reloads)."""
    server = ChatCompletionsServer(
        (host, port), backend, model_name=model_name, max_batch=max_batch, api_key=api_key, weights_dir=weights_dir
    )
    threading.Thread(target=server.serve_forever, daemon=True, name="serve").start()
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m internvl_tune.generation.serve",
        description="Serve a model folder as an OpenAI-compatible chat-completions API (transformers generate).",
    )
    parser.add_argument("model", help="model folder (either layout)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the name clients ask for (default: the folder's name)")
    parser.add_argument("--max-tiles", type=int, help="most tiles per image (default: the checkpoint's setting)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per generate call")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("INTERNVL_TUNE_API_KEY"),
        help="bearer token every request must send (default $INTERNVL_TUNE_API_KEY; needed beyond localhost)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not Path(args.model).is_dir():
            raise MissingPathError(f"{args.model}: no such folder")
        backend = HFBackend.from_folder(args.model, batch_size=args.batch_size, max_tiles=args.max_tiles)
        try:
            server = ChatCompletionsServer(
                (args.host, args.port),
                backend,
                model_name=args.model_name or Path(args.model).resolve().name,
                api_key=args.api_key,
                weights_dir=args.model,
            )
        except OSError as e:  # the port is taken, or the host is not this machine's
            raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    except UserError as e:  # any other exception keeps its traceback
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    print(f"serving {args.model} as {server.model_name!r} at {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
