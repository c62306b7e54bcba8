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

The InternVL3.5 GPT-OSS template (`internvl3_5_gpt_oss`, OpenAI's harmony tokens) adds two things to this shape
(docs/original-differences.md §1.2): a trained `answer_prefix` between the role and the answer (the channel header
the model writes itself), and an end token that depends on the position: the conversation's last assistant message
ends with `<|return|>` (where generation stops), earlier ones with `<|end|>`::

    "<|start|>assistant" "<|channel|>final<|message|>" "Red." "<|end|>"      an earlier answer
    "<|start|>assistant" "<|channel|>final<|message|>" "Red." "<|return|>"   the last answer
     ^ role: IGNORE       ^ trained ...................................^

Thinking mode (`get_template(name, thinking=True)`, the `thinking` data setting) changes the default system message
to the template's thinking one (`R1_SYSTEM_PROMPT` of the 3.5 MPO trainer for ChatML, "Reasoning: high" for
GPT-OSS); for ChatML the `<think>...</think>` text of an answer is trained as written, while GPT-OSS moves it into an
analysis message of its own (`reasoning_prefix`), as `preprocess_internvl3_5_gpt_oss_with_think` does::

    "<think>Two shapes.</think> Red."  ->
    "<|start|>assistant" "<|channel|>analysis<|message|>Two shapes.<|end|><|start|>assistant<|channel|>final"
                         "<|message|>Red.<|return|>"        (all trained after the first role)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from internvl_tune.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from internvl_tune.data.errors import DataError
from internvl_tune.errors import UserError

if TYPE_CHECKING:  # only a type here: config validation reads the template names without transformers
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]

THINK_START, THINK_END = "<think>", "</think>"


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
        last_stop_str: if set, the end token of the conversation's last message when it is an assistant turn, in
            place of `stop_str` (GPT-OSS `<|return|>`); generation stops at it, not at `stop_str`.
        answer_prefix: trained text between the assistant role and the answer, which the model writes itself
            after the prompt's bare role (GPT-OSS `<|channel|>final<|message|>`). Answers decoded from generated
            tokens drop it (`decode_answer`).
        thinking_system_message: the default system message in thinking mode (None: no thinking mode).
        reasoning_prefix: if set, in thinking mode the `<think>...</think>` text of an answer becomes a message of
            its own: `reasoning_prefix + thought + stop_str + assistant_role + answer_prefix + answer`. None: the
            `<think>` text stays in the answer as written.
        thinking: whether this is the thinking variant (`get_template(name, thinking=True)`).
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
    last_stop_str: str | None = None
    answer_prefix: str = ""
    thinking_system_message: str | None = None
    reasoning_prefix: str | None = None
    thinking: bool = False

    def __post_init__(self) -> None:
        if self.system_template.count("{system_message}") != 1:
            raise ValueError(f"template {self.name!r}: system_template must contain '{{system_message}}' once")
        if not self.sep.startswith(self.stop_str):
            raise ValueError(f"template {self.name!r}: sep {self.sep!r} must start with stop_str {self.stop_str!r}")

    @property
    def generation_stop_str(self) -> str:
        """The token that ends a generated answer: `last_stop_str` where the template has one, else `stop_str`."""
        return self.last_stop_str or self.stop_str

    @property
    def splits_thoughts(self) -> bool:
        """Whether `<think>...</think>` of an answer is rendered as a reasoning message of its own."""
        return self.thinking and self.reasoning_prefix is not None

    def end_of(self, *, last: bool) -> str:
        """The end token of an assistant message: `last_stop_str` for the conversation's last message."""
        return self.last_stop_str if last and self.last_stop_str else self.stop_str


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
# `R1_SYSTEM_PROMPT` of the InternVL3.5 MPO trainer (`internvl_chat_mpo.py`), its trailing newline included: the
# thinking mode of the Qwen3-based 3.5 models, which keep the `internvl2_5` template.
R1_SYSTEM_PROMPT = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and "
    "reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> "
    "tags.\n\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate "
    "the answer from the think section with a newline.\n\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section.\n"
)
# The GPT-OSS system message of `internvl3_5_gpt_oss`; thinking mode raises the reasoning effort and opens the
# analysis channel, the rewrite the 3.5 MPO trainer (commented out there) makes for R1 questions.
_GPT_OSS_SYSTEM_MESSAGE = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: {reasoning}\n\n# Valid channels: {channels}. Channel must be included "
    "for every message."
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
        Template(
            name="internvl2_5",
            system_message=_INTERNVL2_5_SYSTEM_MESSAGE,
            sep="<|im_end|>\n",
            thinking_system_message=R1_SYSTEM_PROMPT,
            **_CHATML,
        ),
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
        Template(
            name="internvl3_5_gpt_oss",
            system_template="<|start|>system<|message|>{system_message}",
            system_message=_GPT_OSS_SYSTEM_MESSAGE.format(reasoning="low", channels="final"),
            user_role="<|start|>user<|message|>",
            assistant_role="<|start|>assistant",
            sep="<|end|>",
            stop_str="<|end|>",
            last_stop_str="<|return|>",
            answer_prefix="<|channel|>final<|message|>",
            thinking_system_message=_GPT_OSS_SYSTEM_MESSAGE.format(reasoning="high", channels="analysis, final"),
            reasoning_prefix="<|channel|>analysis<|message|>",
        ),
    )
}


def get_template(name: str, *, thinking: bool = False) -> Template:
    """Look up a template by name, or its thinking variant; raises UserError listing the known names."""
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; known templates: {', '.join(TEMPLATES)}")
    template = TEMPLATES[name]
    if not thinking:
        return template
    if template.thinking_system_message is None:
        with_thinking = ", ".join(n for n, t in TEMPLATES.items() if t.thinking_system_message is not None)
        raise UserError(f"template {name!r} has no thinking mode (templates with one: {with_thinking})")
    return replace(template, system_message=template.thinking_system_message, thinking=True)


@dataclass(frozen=True)
class _Segment:
    """One rendered segment, `text = head + trained + tail`. Only assistant segments have a `trained` part: the
    answer through its end token (`end`); `head` is the role, `tail` the rest of `sep` after the end token."""

    role: str
    head: str
    trained: str = ""
    tail: str = ""
    end: str = ""

    @property
    def text(self) -> str:
        return self.head + self.trained + self.tail


def _answer_body(template: Template, content: str, *, partial: bool = False) -> str:
    """What follows the assistant role up to (not including) the end token; `partial`: the start of an answer (an
    assistant prefill), whose thought may still be open and whose end is not stripped."""
    if template.splits_thoughts and THINK_START in content:
        assert template.reasoning_prefix is not None
        if THINK_END in content:
            # As `preprocess_internvl3_5_gpt_oss_with_think`: the last `</think>` closes the thought, text before
            # the first `<think>` is dropped, and both parts are stripped.
            thought, answer = content.rsplit(THINK_END, 1)
            thought = thought.split(THINK_START, 1)[-1].strip()
            answer = answer.lstrip() if partial else answer.strip()
            return (
                template.reasoning_prefix
                + thought
                + template.stop_str
                + template.assistant_role
                + template.answer_prefix
                + answer
            )
        if partial:
            return template.reasoning_prefix + content.split(THINK_START, 1)[-1].lstrip()
    return template.answer_prefix + content


def _render_segments(
    template: Template, messages: Sequence[Message], system_message: str | None, *, for_generation: bool
) -> list[_Segment]:
    """The system segment (if any) and one segment per turn, each ending with `template.sep` (the last assistant
    segment with `last_stop_str` in place of `stop_str`, where the template has one)."""
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
    tail = template.sep[len(template.stop_str) :]
    for index, message in enumerate(turns):
        if message["role"] == "user":
            segments.append(_Segment("user", template.user_role + message["content"] + template.sep))
            continue
        end = template.end_of(last=index == len(turns) - 1)
        body = _answer_body(template, message["content"])
        segments.append(_Segment("assistant", template.assistant_role, body + end, tail, end))
    return segments


def build_generation_prompt(
    template: Template,
    messages: Sequence[Message],
    *,
    system_message: str | None = None,
    assistant_prefill: str = "",
) -> str:
    """The inference prompt: system segment, every turn, then the bare assistant role for the model to continue.

    `messages` must end with a user turn. `system_message` overrides both a system turn and the template default
    (e.g. a checkpoint's `config.system_message`). Example (`internvl2_5`, one user turn "Hi")::

        "<|im_start|>system\\n{default}<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"

    The prompt ends where the original `chat()` ends it, after the role: for `internvl3_5_gpt_oss` at
    `<|start|>assistant`, the model writing the channel header. An `assistant_prefill` (the start of the answer,
    for the model to continue) is rendered as training renders an answer's start: after the role for ChatML, after
    `<|channel|>final<|message|>` for GPT-OSS (in thinking mode, a prefill that opens `<think>` continues in the
    analysis channel).
    """
    segments = _render_segments(template, messages, system_message, for_generation=True)
    prompt = "".join(s.text for s in segments) + template.assistant_role
    if assistant_prefill:
        prompt += _answer_body(template, assistant_prefill, partial=True)
    return prompt


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: Template) -> list[int]:
    """Ids that end generation: the template's generation stop token first, then its extra stop tokens. GPT-OSS
    stops at `<|return|>` only, as the original `chat()` does: `<|end|>` also closes a thought in thinking mode."""
    return [_single_token_id(tokenizer, template, s) for s in (template.generation_stop_str, *template.extra_stop_strs)]


def decode_answer(tokenizer: PreTrainedTokenizerBase, template: Template, ids: Sequence[int]) -> str:
    """The answer text of generated token ids (what follows the prompt), in the form a data record holds.

    ChatML and the other InternVL 2 templates: the ids decoded without special tokens (Qwen3's `<think>` tokens are
    not special and stay). GPT-OSS: the ids up to the first stop token, decoded with special tokens and parsed by
    `parse_answer` (`<|channel|>final<|message|>Red.` -> `Red.`).
    """
    if not template.answer_prefix:
        return tokenizer.decode(ids, skip_special_tokens=True)
    stops = set(stop_token_ids(tokenizer, template))
    cut = next((i for i, token_id in enumerate(ids) if token_id in stops), len(ids))
    return parse_answer(template, tokenizer.decode(list(ids[:cut]), skip_special_tokens=False))


def parse_answer(template: Template, text: str) -> str:
    """The answer in generated text that keeps its special tokens, for templates with an `answer_prefix`.

    Example (`internvl3_5_gpt_oss`)::

        "<|channel|>final<|message|>Red.<|return|>"                                   -> "Red."
        "<|channel|>analysis<|message|>Two shapes.<|end|><|start|>assistant"
        "<|channel|>final<|message|>Red."                                            -> "<think>\\nTwo shapes.\\n</think>\\n\\nRed."

    The answer ends at the first end token. The result of a text's start is a start of the text's result (while the
    channel header is incomplete it is empty), so a stream can be parsed as it grows (`stream_answer`). Text off
    the format (a model that does not write the header) is returned as it is.
    """
    if not template.answer_prefix:
        return text
    ends = (template.stop_str, template.generation_stop_str, *template.extra_stop_strs)
    if any(p.startswith(text) for p in (template.answer_prefix, template.reasoning_prefix) if p):
        return ""  # the header is not complete yet
    if template.reasoning_prefix and text.startswith(template.reasoning_prefix):
        rest = text[len(template.reasoning_prefix) :]
        if template.stop_str not in rest:
            return f"{THINK_START}\n{rest}"
        thought, _, after = rest.partition(template.stop_str)
        header = template.assistant_role + template.answer_prefix
        answer = "" if header.startswith(after) else after[len(header) :] if after.startswith(header) else after
        return f"{THINK_START}\n{thought}\n{THINK_END}\n\n{_cut_at(answer, ends)}"
    if text.startswith(template.answer_prefix):
        return _cut_at(text[len(template.answer_prefix) :], ends)
    return text


def _cut_at(text: str, ends: Iterable[str]) -> str:
    return text[: min((i for i in (text.find(e) for e in ends) if i >= 0), default=len(text))]


def decodes_special_tokens(template: Template) -> bool:
    """Whether generated text must keep its special tokens for `parse_answer` (a streamer's `skip_special_tokens`
    is the opposite)."""
    return bool(template.answer_prefix)


def stream_answer(template: Template, pieces: Iterable[str]) -> Iterator[str]:
    """The answer of a stream of generated text pieces, as pieces (`parse_answer` of the text so far, less what was
    given out). Pieces pass through for templates without an `answer_prefix`."""
    if not template.answer_prefix:
        yield from pieces
        return
    text, given = "", ""
    for piece in [*pieces, None]:  # None: the end, where a held-back tail is parsed too
        if piece is not None:
            text += piece
        # A tail that may be the start of a special token (`<|en`) waits for the piece that completes it.
        tag = text.rfind("<")
        complete = text if piece is None or tag < 0 or ">" in text[tag:] else text[:tag]
        answer = parse_answer(template, complete)
        if len(answer) > len(given) and answer.startswith(given):
            yield answer[len(given) :]
            given = answer


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    messages: Sequence[Message],
    *,
    system_message: str | None = None,
    memo: dict[str, list[int]] | None = None,
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

    Args:
        memo: the ids of texts that every conversation of a run repeats (the system segment when it is not the
            record's own, the assistant role, the end tokens), kept by the caller for one tokenizer so that they are
            tokenized once, not once per sample (`SampleBuilder`); it holds a handful of entries.

    Raises:
        TemplateMismatchError: the role prefix does not tokenize to the same tokens alone and inside the turn
            (a merge across the role/answer boundary), or the stop token is not a single token where it belongs.
    """
    return next(tokenize_conversations(tokenizer, template, [messages], system_message=system_message, memo=memo))


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    conversations: Sequence[Sequence[Message]],
    *,
    system_message: str | None = None,
    memo: dict[str, list[int]] | None = None,
) -> Iterator[TokenizedConversation]:
    """`tokenize_conversation` of each conversation, in order, their texts tokenized in one batched call, each
    distinct text once (a preference pair's two conversations share their system and user segments). Each one's
    TemplateMismatchError is raised when it is reached, so a caller that checks each result before taking the next
    meets a record's problems in the order one conversation at a time would."""
    rendered = [_render_segments(template, m, system_message, for_generation=False) for m in conversations]
    # What is the same in every conversation of a run: a record's own system turn is not (it may be unique).
    repeated = {template.assistant_role} | {s.end for segments in rendered for s in segments if s.role == "assistant"}
    for messages, segments in zip(conversations, rendered, strict=True):
        if template.supports_system and (system_message is not None or not messages or messages[0]["role"] != "system"):
            repeated.add(segments[0].text)
    texts = [
        text
        for segments in rendered
        for text in [s.text for s in segments] + [s.head + s.trained for s in segments if s.role == "assistant"]
    ]
    ids_of = _text_ids(tokenizer, [*repeated, *texts], {} if memo is None else memo, repeated)
    bos = (
        [tokenizer.bos_token_id]
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
        else []
    )
    role_ids = ids_of[template.assistant_role]
    for segments in rendered:
        end_ids = {
            s.end: _single_token_id(tokenizer, template, s.end, ids_of[s.end])
            for s in segments
            if s.role == "assistant"
        }
        input_ids: list[int] = list(bos)
        labels: list[int] = [IGNORE_INDEX] * len(bos)
        for segment_index, segment in enumerate(segments):
            ids = ids_of[segment.text]
            input_ids.extend(ids)
            if segment.role != "assistant":
                labels.extend([IGNORE_INDEX] * len(ids))
                continue
            through_end = ids_of[segment.head + segment.trained]
            _check_assistant_segment(
                tokenizer, template, segment_index, segment.end, ids, role_ids, through_end, end_ids[segment.end]
            )
            num_trailing = len(ids) - len(through_end)
            labels.extend([IGNORE_INDEX] * len(role_ids) + ids[len(role_ids) : len(through_end)])
            labels.extend([IGNORE_INDEX] * num_trailing)
        yield TokenizedConversation(input_ids=input_ids, labels=labels)


def _text_ids(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], memo: dict[str, list[int]], remember: set[str]
) -> dict[str, list[int]]:
    """{text: its ids, tokenized alone without special tokens} for each distinct text: from `memo`, or from one
    batched tokenizer call (whose results for the texts in `remember` go into `memo`). A tokenizer is deterministic,
    so a remembered text has the ids it would get again."""
    ids_of = {text: memo[text] for text in texts if text in memo}
    new = list(dict.fromkeys(text for text in texts if text not in ids_of))
    if new:
        for text, ids in zip(new, tokenizer(new, add_special_tokens=False)["input_ids"], strict=True):
            ids_of[text] = ids
            if text in remember:
                memo[text] = ids
    return ids_of


def _single_token_id(
    tokenizer: PreTrainedTokenizerBase, template: Template, text: str, ids: list[int] | None = None
) -> int:
    """The id of a stop string, which must be a single token (`ids`: its ids when already tokenized)."""
    if ids is None:
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
    end: str,
    ids: list[int],
    role_ids: list[int],
    through_end: list[int],
    end_id: int,
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
    if len(through_end) <= len(role_ids) or ids[: len(through_end)] != through_end or through_end[-1] != end_id:
        raise TemplateMismatchError(
            f"{where}: expected the stop token {end!r} right after the answer, but the segment "
            f"tokenizes to {tokenizer.convert_ids_to_tokens(ids)}"
        )


def _jinja_str(text: str) -> str:
    # A JSON string is a valid Jinja string literal: Jinja unescapes \n, \" and \\ the same way.
    return json.dumps(text, ensure_ascii=False)


def chat_template_jinja(template: Template, *, bos_token: str | None = None) -> str:
    """A Jinja chat template that renders like `build_generation_prompt`, for a saved tokenizer.

    With `add_generation_prompt=True` it equals `build_generation_prompt`; without, it renders every turn with its
    separator, i.e. the text `tokenize_conversation` tokenizes (the last message, if an assistant turn, with the
    template's `last_stop_str`; GPT-OSS answers with their channel header, thoughts split off in thinking mode). A
    `system_message` keyword passed to `apply_chat_template` overrides the system turn and the default, as the
    `system_message` argument does. `bos_token`, if given, is put first: pass it for tokenizers that add a BOS,
    because `apply_chat_template` tokenizes without special tokens.

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
    ]
    if template.splits_thoughts:
        assert template.reasoning_prefix is not None
        split_prefix = template.stop_str + template.assistant_role + template.answer_prefix
        lines += [  # the `_answer_body` rule: the last `</think>` closes the thought; both parts stripped
            "{%- macro answer(content) -%}",
            "{%- if " + q(THINK_START) + " in content and " + q(THINK_END) + " in content -%}",
            "{%- set parts = content.rsplit(" + q(THINK_END) + ", 1) -%}",
            "{{- "
            + q(template.reasoning_prefix)
            + " + parts[0].split("
            + q(THINK_START)
            + ", 1)[-1].strip() + "
            + q(split_prefix)
            + " + parts[1].strip() -}}",
            "{%- else -%}{{- " + q(template.answer_prefix) + " + content -}}{%- endif -%}",
            "{%- endmacro -%}",
        ]
    else:
        lines.append("{%- macro answer(content) -%}{{- " + q(template.answer_prefix) + " + content -}}{%- endmacro -%}")
    lines += [
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
    tail = template.sep[len(template.stop_str) :]
    lines += [
        "{%- for message in turns -%}",
        "{%- if message['role'] == 'user' -%}",
        "{{- " + q(template.user_role) + " + text(message['content']) + " + q(template.sep) + " -}}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{%- set end = "
        + q(template.end_of(last=True))
        + " if loop.last else "
        + q(template.end_of(last=False))
        + " -%}",
        "{{- " + q(template.assistant_role) + " + answer(text(message['content'])) + end + " + q(tail) + " -}}",
        "{%- else -%}",
        "{{- raise_exception('roles must be system (first only), user or assistant') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "{{- " + q(template.assistant_role) + " -}}",
        "{%- endif -%}",
    ]
    return "\n".join(lines)
