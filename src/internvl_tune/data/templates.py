"""Conversation templates: the one place that renders chat messages and decides which tokens are trained.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`: an optional
system turn, then user and assistant turns alternating, starting with a user turn. Image placeholders are
already expanded in the content (`<img><IMG_CONTEXT>...</img>`); those are special tokens and never trained.

Rendering follows the original MPT-style templates (docs/original-differences.md §1.2): a system segment
`system_template.format(system_message=...) + sep`, then one segment `role + content + sep` per turn. For
training, every segment is tokenized on its own (the `preprocess_internvl2_5` rule, applied to all templates),
so no BPE merge crosses a segment boundary and the label mask can be computed per segment instead of by
string search with hard-coded offsets (the legacy preprocessors that silently zero the labels,
docs/original-differences.md §1.3).

Worked example (`internvl2_5`, no system turn, so the default system message is used)::

    messages = [
        {"role": "user", "content": "<img><IMG_CONTEXT><IMG_CONTEXT></img>\\nWhat colour is it?"},
        {"role": "assistant", "content": "Red."},
    ]

    segment                                                           labels
    "<|im_start|>system\\n你是书生·万象，...<|im_end|>\\n"                all IGNORE_INDEX
    "<|im_start|>user\\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\\n"
        "What colour is it?<|im_end|>\\n"                               all IGNORE_INDEX
    "<|im_start|>assistant\\n" + "Red." + "<|im_end|>" + "\\n"
     ^ role prefix: IGNORE    ^ trained ^ trained     ^ after the stop token: IGNORE

So the loss covers the answer text plus `<|im_end|>`, which teaches the model to stop. At inference the prompt
is the same text with the final assistant segment replaced by the bare role `"<|im_start|>assistant\\n"`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from internvl_tune.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from internvl_tune.data.errors import DataError
from internvl_tune.errors import UserError

if TYPE_CHECKING:  # only a type here: config validation reads the template names without transformers
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]


class TemplateMismatchError(DataError):
    """The tokenizer does not split a rendered turn the way the template's label mask assumes."""


@dataclass(frozen=True)
class Template:
    """A chat template: how to render a conversation and where the trained tokens end.

    Attributes:
        name: registry name, as passed in `conv_style` / `template`.
        system_template: the system segment without its separator, with one `{system_message}` field.
        system_message: the default system message, used when a conversation has no system turn.
        user_role: the text before each user turn's content.
        assistant_role: the text before each assistant turn's content; never trained.
        sep: the text after every segment; it must start with `stop_str`.
        stop_str: the end-of-turn token the model must learn to emit; trained on every assistant turn.
        supports_system: whether a system segment is rendered at all.
        extra_stop_strs: further tokens that end generation (not trained).
    """

    name: str
    system_template: str
    system_message: str
    user_role: str
    assistant_role: str
    sep: str
    stop_str: str
    supports_system: bool = True
    extra_stop_strs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.system_template.count("{system_message}") != 1:
            raise ValueError(f"template {self.name!r}: system_template must contain '{{system_message}}' once")
        if not self.sep.startswith(self.stop_str):
            raise ValueError(f"template {self.name!r}: sep {self.sep!r} must start with stop_str {self.stop_str!r}")


@dataclass
class TokenizedConversation:
    """Token ids of a rendered conversation and their labels (`IGNORE_INDEX` where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


_INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
_INTERNVL2_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
_CHATML = {
    "system_template": "<|im_start|>system\n{system_message}",
    "user_role": "<|im_start|>user\n",
    "assistant_role": "<|im_start|>assistant\n",
    "stop_str": "<|im_end|>",
}

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(name="internvl2_5", system_message=_INTERNVL2_5_SYSTEM_MESSAGE, sep="<|im_end|>\n", **_CHATML),
        Template(
            name="Hermes-2",
            system_message=_INTERNVL2_SYSTEM_MESSAGE,
            sep="<|im_end|>",
            extra_stop_strs=("<|endoftext|>",),
            **_CHATML,
        ),
        Template(name="internlm2-chat", system_message=_INTERNVL2_SYSTEM_MESSAGE, sep="<|im_end|>", **_CHATML),
        Template(
            name="phi3-chat",
            system_template="<|system|>\n{system_message}",
            system_message=_INTERNVL2_SYSTEM_MESSAGE,
            user_role="<|user|>\n",
            assistant_role="<|assistant|>\n",
            sep="<|end|>",
            stop_str="<|end|>",
        ),
    )
}


def get_template(name: str) -> Template:
    """Look up a template by name; raises ValueError listing the known names."""
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; known templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass(frozen=True)
class _Segment:
    role: str
    text: str


def _render_segments(
    template: Template, messages: Sequence[Message], system_message: str | None, *, for_generation: bool
) -> list[_Segment]:
    """The system segment (if any) and one segment per turn, each ending with `template.sep`."""
    turns = list(messages)
    system = template.system_message
    if turns and turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
        if not template.supports_system:
            raise DataError(f"template {template.name!r} has no system segment, but the messages have a system turn")
    if system_message is not None:
        if not template.supports_system:
            raise UserError(f"template {template.name!r} has no system segment; cannot use system_message")
        system = system_message

    # The caller validates user data; here a wrong order is a bug upstream.
    roles = [m["role"] for m in turns]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    last = "user" if for_generation else "assistant"
    assert roles == expected and roles and roles[-1] == last, (
        f"template {template.name!r}: turns must alternate user/assistant from a user turn and end with {last!r}, "
        f"got roles {roles}"
    )
    assert all(isinstance(m["content"], str) for m in turns), "message content must be a string"

    segments = []
    if template.supports_system:
        segments.append(_Segment("system", template.system_template.format(system_message=system) + template.sep))
    for message in turns:
        role_text = template.user_role if message["role"] == "user" else template.assistant_role
        segments.append(_Segment(message["role"], role_text + message["content"] + template.sep))
    return segments


def build_generation_prompt(
    template: Template, messages: Sequence[Message], *, system_message: str | None = None
) -> str:
    """The inference prompt: system segment, every turn, then the bare assistant role for the model to continue.

    `messages` must end with a user turn. `system_message` overrides both a system turn and the template default
    (e.g. a checkpoint's `config.system_message`). Example (`internvl2_5`, one user turn "Hi")::

        "<|im_start|>system\\n{default}<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"
    """
    segments = _render_segments(template, messages, system_message, for_generation=True)
    return "".join(s.text for s in segments) + template.assistant_role


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: Template) -> list[int]:
    """Ids that end generation: the trained stop token first, then the template's extra stop tokens."""
    return [_single_token_id(tokenizer, template, s) for s in (template.stop_str, *template.extra_stop_strs)]


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    messages: Sequence[Message],
    *,
    system_message: str | None = None,
) -> TokenizedConversation:
    """Tokenize a conversation segment by segment and mask everything but the answers and their stop tokens.

    Each segment is tokenized on its own with `add_special_tokens=False` and the results are concatenated. If the
    tokenizer adds a BOS token (`add_bos_token`, e.g. InternLM2), one BOS id is prepended, with an ignored label;
    this matches the original, which prepends the BOS string to the first segment and strips the BOS it adds
    to every segment. Labels: system and user segments are ignored; in an assistant segment the role prefix
    and whatever follows the stop token (the `"\\n"` of `internvl2_5`) are ignored. Example (`internvl2_5`)::

        "<|im_start|>assistant\\n" "The answer is yes." "<|im_end|>" "\\n"
        labels: -100 ... -100      The Ġanswer Ġis Ġyes .  <|im_end|>   -100

    There is no truncation here; the caller cuts to the maximum length.

    Raises:
        TemplateMismatchError: the role prefix does not tokenize to the same tokens alone and inside the turn
            (a merge across the role/answer boundary), or the stop token is not a single token where it belongs.
    """
    segments = _render_segments(template, messages, system_message, for_generation=False)
    stop_id = _single_token_id(tokenizer, template, template.stop_str)
    answer_ends = [  # each assistant segment up to and including the stop string
        s.text[: len(s.text) - len(template.sep) + len(template.stop_str)] for s in segments if s.role == "assistant"
    ]
    texts = [s.text for s in segments] + answer_ends + [template.assistant_role]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]  # one batched call
    segment_ids, role_ids = encoded[: len(segments)], encoded[-1]
    answer_end_ids = iter(encoded[len(segments) : -1])

    input_ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for segment_index, (segment, ids) in enumerate(zip(segments, segment_ids, strict=True)):
        input_ids.extend(ids)
        if segment.role != "assistant":
            labels.extend([IGNORE_INDEX] * len(ids))
            continue
        through_stop = next(answer_end_ids)
        _check_assistant_segment(tokenizer, template, segment_index, ids, role_ids, through_stop, stop_id)
        num_trailing = len(ids) - len(through_stop)
        labels.extend([IGNORE_INDEX] * len(role_ids) + ids[len(role_ids) : len(through_stop)])
        labels.extend([IGNORE_INDEX] * num_trailing)
    return TokenizedConversation(input_ids=input_ids, labels=labels)


def _single_token_id(tokenizer: PreTrainedTokenizerBase, template: Template, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise TemplateMismatchError(
            f"template {template.name!r}: stop string {text!r} must be a single token of this tokenizer, "
            f"but it tokenizes to {tokenizer.convert_ids_to_tokens(ids)}"
        )
    return ids[0]


def _check_assistant_segment(
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    segment_index: int,
    ids: list[int],
    role_ids: list[int],
    through_stop: list[int],
    stop_id: int,
) -> None:
    """Fail loudly where the original would silently train on nothing (docs/original-differences.md §1.3)."""
    where = f"template {template.name!r}, segment {segment_index} (role 'assistant')"
    if ids[: len(role_ids)] != role_ids:
        raise TemplateMismatchError(
            f"{where}: the role prefix {template.assistant_role!r} tokenizes to "
            f"{tokenizer.convert_ids_to_tokens(role_ids)} on its own, but the segment starts with "
            f"{tokenizer.convert_ids_to_tokens(ids[: len(role_ids) + 1])}; the role merges with the answer, "
            "so its tokens cannot be masked exactly"
        )
    if len(through_stop) <= len(role_ids) or ids[: len(through_stop)] != through_stop or through_stop[-1] != stop_id:
        raise TemplateMismatchError(
            f"{where}: expected the stop token {template.stop_str!r} right after the answer, but the segment "
            f"tokenizes to {tokenizer.convert_ids_to_tokens(ids)}"
        )


def _jinja_str(text: str) -> str:
    # A JSON string is a valid Jinja string literal: Jinja unescapes \n, \" and \\ the same way.
    return json.dumps(text, ensure_ascii=False)


def chat_template_jinja(template: Template, *, bos_token: str | None = None) -> str:
    """A Jinja chat template that renders like `build_generation_prompt`, for a saved tokenizer.

    With `add_generation_prompt=True` it equals `build_generation_prompt`; without, it renders every turn with its
    separator, i.e. the text `tokenize_conversation` tokenizes. A `system_message` keyword passed to
    `apply_chat_template` overrides the system turn and the default, as the `system_message` argument does.
    `bos_token`, if given, is put first: pass it for tokenizers that add a BOS, because `apply_chat_template`
    tokenizes without special tokens.

    A message's content is a string, or transformers' list of parts: `{"type": "text", "text": ...}` renders
    its text, `{"type": "image"}` the placeholder `<image>` and a newline, as the data records put it::

        [{"type": "image"}, {"type": "text", "text": "What is it?"}]   ->   "<image>\\nWhat is it?"
    """
    q = _jinja_str
    lines = []
    if bos_token is not None:
        lines.append("{{- " + q(bos_token) + " -}}")
    lines += [
        "{%- macro text(content) -%}",
        "{%- if content is string -%}{{- content -}}{%- else -%}{%- for part in content -%}",
        "{%- if part['type'] == 'image' -%}{{- " + q(IMAGE_PLACEHOLDER + "\n") + " -}}",
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}",
        "{%- else -%}{{- raise_exception('content parts must have type text or image') -}}",
        "{%- endif -%}{%- endfor -%}{%- endif -%}",
        "{%- endmacro -%}",
        "{%- set has_system = messages and messages[0]['role'] == 'system' -%}",
        "{%- set turns = messages[1:] if has_system else messages -%}",
        "{%- set system = text(messages[0]['content']) if has_system else " + q(template.system_message) + " -%}",
        "{%- if system_message is defined and system_message is not none -%}",
        "{%- set system = system_message -%}",
        "{%- endif -%}",
    ]
    if template.supports_system:
        prefix, suffix = template.system_template.split("{system_message}")
        lines.append("{{- " + q(prefix) + " + system + " + q(suffix + template.sep) + " -}}")
    else:
        lines.append("{%- if has_system -%}{{- raise_exception('this template has no system segment') -}}{%- endif -%}")
    lines += [
        "{%- for message in turns -%}",
        "{%- if message['role'] == 'user' -%}",
        "{{- " + q(template.user_role) + " + text(message['content']) + " + q(template.sep) + " -}}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{{- " + q(template.assistant_role) + " + text(message['content']) + " + q(template.sep) + " -}}",
        "{%- else -%}",
        "{{- raise_exception('roles must be system (first only), user or assistant') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "{{- " + q(template.assistant_role) + " -}}",
        "{%- endif -%}",
    ]
    return "\n".join(lines)
