"""`<image>` placeholders in a user's text: where a question gets them (`user_turn`) and the text without them
(`remove_image_placeholders`). Plain strings, no tokenizer: every command that asks a model a question (chat,
sampling, evaluation, the server) and the prompt versions of preference data use these two.
"""

from __future__ import annotations

import re

from internvl_tune.constants import IMAGE_PLACEHOLDER


def user_turn(question: str, num_images: int) -> str:
    """The user turn for a question about `num_images` new images, with their `<image>` placeholders.

    A question that holds placeholders already is kept as it is. Otherwise one image gets `"<image>\\n"` in front,
    as training does for a single-image record; several get one numbered line each, as the original `chat()` does::

        user_turn("Same?", 2) == "Image-1: <image>\\nImage-2: <image>\\nSame?"
    """
    if not num_images or IMAGE_PLACEHOLDER in question:
        return question
    if num_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n{question}"
    return "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_images + 1)) + question


def remove_image_placeholders(text: str) -> str:
    """The text without its `<image>` placeholders, and without the `"\\n"` after each and the `Image-k: ` labels
    `user_turn` puts before them: what is left when the images go another way (as separate parts of an API
    message, or not at all)::

        remove_image_placeholders("Image-1: <image>\\nImage-2: <image>\\nSame?") == "Same?"
    """
    return _PLACEHOLDER_WITH_LABEL.sub("", text).strip()


_PLACEHOLDER_WITH_LABEL = re.compile(r"(?:Image-\d+: )?" + re.escape(IMAGE_PLACEHOLDER) + r"\n?")
