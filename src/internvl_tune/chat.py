"""`internvl-tune chat`: talk to an InternVL checkpoint (either layout) with the same prompt as training.

The prompt is built by `build_inference_prompt` (data/prompt.py) from the settings the checkpoint records: its
template with its system message, images tiled as in training (the tile budget split across images), each `<image>`
expanded to `<img>` + `<IMG_CONTEXT>` x (tokens x tiles) + `</img>`. With several images and no placeholders,
`Image-1: <image>\\nImage-2: <image>\\n` is put before the question, as the original `chat()` does for multi-image
prompts.

A LoRA adapter folder (`final_adapter/`) is refused with a message: use the merged `final/` that training
writes next to it, or merge the adapters into a model folder first with `internvl-tune export --merge-lora`.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from transformers import TextIteratorStreamer

from internvl_tune.data.placeholders import user_turn
from internvl_tune.data.prompt import InferencePrompt, build_inference_prompt
from internvl_tune.data.templates import decodes_special_tokens, get_template, stop_token_ids, stream_answer
from internvl_tune.errors import MissingPathError, UserError
from internvl_tune.generation.hf import generation_positions
from internvl_tune.model.load import load_for_inference


@dataclass
class ChatSession:
    """A loaded model plus the conversation so far (messages, and the images its `<image>` placeholders stand for)."""

    model_path: str
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    history: list[dict[str, str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        self.model, self.tokenizer, self.settings = load_for_inference(self.model_path)
        self.device = self.model.device
        self.template = get_template(self.settings.template, thinking=self.settings.thinking)

    def prompt(self, messages: list[dict[str, str]], images: Sequence[str] | None = None) -> InferencePrompt:
        """Token ids and tiles for the conversation; the k-th `<image>` is the k-th of `images` (default: the
        session's)."""
        images = self.images if images is None else images
        return build_inference_prompt(self.tokenizer, messages, images, self.settings)

    def ask(self, question: str, images: Sequence[str] = ()) -> Iterator[str]:
        """The answer to `question` as a stream of text pieces; `images` join the conversation (all its images go
        with every turn, as in the original `chat()`). The turn joins the history once its answer is complete.

        Raises:
            UserError: here, for a missing or unreadable image or an `<image>` count that does not match the images.
            Exception: from the stream, for an error during generation.
        """
        images = list(images)
        for path in images:
            if not Path(path).is_file():
                raise MissingPathError(f"{path}: no such image file")
        messages = [*self.history, {"role": "user", "content": user_turn(question, len(images))}]
        prompt = self.prompt(messages, [*self.images, *images])
        return self._stream(messages, images, prompt)

    def _stream(self, messages: list[dict[str, str]], images: list[str], prompt: InferencePrompt) -> Iterator[str]:
        # GPT-OSS answers follow a channel header of special tokens: kept in the stream, parsed off by stream_answer.
        skip_special = not decodes_special_tokens(self.template)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=skip_special)
        input_ids, pixel_values = prompt.input_ids, prompt.pixel_values
        positions = generation_positions([prompt], self.settings.v2pe)  # V2PE's, else none: generate counts them
        kwargs = {
            "input_ids": torch.tensor([input_ids], device=self.device),
            "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long, device=self.device),
            **{k: v.to(self.device) for k, v in positions.items()},
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": stop_token_ids(self.tokenizer, self.template),
            "pad_token_id": self.tokenizer.pad_token_id,
            "streamer": streamer,
            "do_sample": self.temperature > 0,
        }
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values.to(self.device, self.model.dtype)
        errors = []

        def generate() -> None:
            try:
                self.model.generate(**kwargs)
            except Exception as e:  # raised again below, in the caller's thread
                errors.append(e)
                streamer.end()  # else the loop below waits for tokens that never come

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        pieces = []
        for piece in stream_answer(self.template, streamer):
            pieces.append(piece)
            yield piece
        thread.join()
        if errors:
            raise errors[0]
        self.images += images
        self.history += [messages[-1], {"role": "assistant", "content": "".join(pieces).strip()}]


def run_chat(
    model: str,
    question: str | None,
    images: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    out: TextIO | None = None,
) -> str:
    """One question (printed to `out`, default stdout, as it streams), or an interactive loop when `question` is
    None."""
    out = out or sys.stdout  # looked up per call: a default bound at import keeps a stream that may be closed since
    session = ChatSession(str(Path(model)), max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if question is not None:
        return "".join(_print_stream(session.ask(question, images), out))
    out.write("interactive chat: empty line or Ctrl-D to quit; '/image PATH' attaches an image to the next turn\n")
    pending = list(images)
    answer = ""
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line.startswith("/image "):
            path = line.split(" ", 1)[1].strip()
            if Path(path).is_file():
                pending.append(path)
            else:
                print(f"error: {path}: no such image file", file=sys.stderr)
            continue
        # A turn that fails (a bad image, an `<image>` count that does not match) is reported and dropped, with
        # the images attached for it; the conversation goes on.
        try:
            stream = session.ask(line, pending)
        except UserError as e:  # anything else is not the turn's fault: it keeps its traceback
            print(f"error: {e}", file=sys.stderr)
        else:
            out.write("assistant> ")
            answer = "".join(_print_stream(stream, out))
        pending = []
    return answer


def _print_stream(pieces: Iterator[str], out: TextIO) -> Iterator[str]:
    for piece in pieces:
        out.write(piece)
        out.flush()
        yield piece
    out.write("\n")
