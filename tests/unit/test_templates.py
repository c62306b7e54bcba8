"""Conversation rendering and label masking (docs/original-differences.md §1.2, §1.3).

Expected ids are built by tokenizing the expected pieces by hand, one piece at a time, so that the test
states which tokens are trained instead of re-running the module's own logic.
"""

import dataclasses

import pytest

from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data.templates import (
    R1_SYSTEM_PROMPT,
    TEMPLATES,
    TemplateMismatchError,
    _render_segments,
    build_generation_prompt,
    chat_template_jinja,
    decode_answer,
    get_template,
    stop_token_ids,
    stream_answer,
    tokenize_conversation,
    tokenize_conversations,
)
from internvl_tune.testing.tiny import build_tiny_tokenizer

IGN = IGNORE_INDEX
DEFAULT_SYSTEM = TEMPLATES["internvl2_5"].system_message
IMAGE = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"


@pytest.fixture(scope="module")
def tokenizer():
    # The harmony tokens of GPT-OSS and Qwen3's <think> tokens, so every template renders with one tokenizer.
    return build_tiny_tokenizer(harmony=True, think_tokens=True)


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def ignored(tokenizer, text: str) -> list[int]:
    return [IGN] * len(enc(tokenizer, text))


def labelled_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decode each maximal run of trained labels, checking that labels equal input_ids where trained."""
    runs, current = [], []
    for token_id, label in zip(input_ids, labels, strict=True):
        if label == IGN:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token_id
            current.append(label)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_single_turn_internvl2_5_ids_and_labels(tokenizer):
    messages = [
        {"role": "user", "content": "What colour is the shape?"},
        {"role": "assistant", "content": "The answer is yes."},
    ]
    out = tokenize_conversation(tokenizer, get_template("internvl2_5"), messages)

    system = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    user = "<|im_start|>user\nWhat colour is the shape?<|im_end|>\n"
    im_end, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), enc(tokenizer, "\n")
    answer = enc(tokenizer, "The answer is yes.")
    assert (
        out.input_ids
        == (
            enc(tokenizer, system)
            + enc(tokenizer, user)
            + enc(tokenizer, "<|im_start|>assistant\n")
            + answer
            + [im_end]
        )
        + newline
    )
    assert out.labels == (
        ignored(tokenizer, system)
        + ignored(tokenizer, user)
        + ignored(tokenizer, "<|im_start|>assistant\n")
        + answer
        + [im_end]
        + [IGN]
    )
    trained = [token_id for token_id in out.labels if token_id != IGN]
    assert tokenizer.convert_ids_to_tokens(trained) == ["The", "Ġanswer", "Ġis", "Ġyes", ".", "<|im_end|>"]


def test_trailing_newline_of_internvl2_5_is_masked(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    out = tokenize_conversation(tokenizer, get_template("internvl2_5"), messages)
    assert tokenizer.convert_ids_to_tokens(out.input_ids[-2:]) == ["<|im_end|>", "Ċ"]
    assert out.labels[-2:] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), IGN]


def test_multi_turn_trains_every_answer(tokenizer):
    messages = [
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "There are two shapes."},
        {"role": "user", "content": "What colour is the circle?"},
        {"role": "assistant", "content": "red"},
    ]
    out = tokenize_conversation(tokenizer, get_template("internvl2_5"), messages)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pieces = [
        (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", False),
        ("<|im_start|>user\nHow many shapes are there?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("There are two shapes.", True),
        ("<|im_end|>", True),
        ("\n", False),
        ("<|im_start|>user\nWhat colour is the circle?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("red", True),
        ("<|im_end|>", True),
        ("\n", False),
    ]
    expected_ids, expected_labels = [], []
    for text, trained in pieces:
        ids = enc(tokenizer, text)
        expected_ids += ids
        expected_labels += ids if trained else [IGN] * len(ids)
    assert out.input_ids == expected_ids
    assert out.labels == expected_labels
    assert out.labels.count(im_end) == 2
    assert labelled_runs(tokenizer, out.input_ids, out.labels) == ["There are two shapes.<|im_end|>", "red<|im_end|>"]


def test_default_system_message_is_rendered(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    for name, template in TEMPLATES.items():
        text = tokenizer.decode(tokenize_conversation(tokenizer, template, messages).input_ids)
        expected = template.system_template.format(system_message=template.system_message) + template.sep
        assert text.startswith(expected), name


def test_explicit_system_turn_and_argument_override_default(tokenizer):
    template = get_template("internvl2_5")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    out = tokenize_conversation(tokenizer, template, messages)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert out.input_ids[: len(enc(tokenizer, system))] == enc(tokenizer, system)
    assert DEFAULT_SYSTEM not in tokenizer.decode(out.input_ids)
    assert labelled_runs(tokenizer, out.input_ids, out.labels) == ["Hello!<|im_end|>"]

    out = tokenize_conversation(tokenizer, template, messages, system_message="Answer with one word.")
    assert tokenizer.decode(out.input_ids).startswith("<|im_start|>system\nAnswer with one word.<|im_end|>\n")
    out = tokenize_conversation(tokenizer, template, messages[1:], system_message="Answer with one word.")
    assert tokenizer.decode(out.input_ids).startswith("<|im_start|>system\nAnswer with one word.<|im_end|>\n")


def test_multi_image_context_tokens_never_labelled(tokenizer):
    messages = [
        {"role": "user", "content": f"Image-1: {IMAGE}\nImage-2: {IMAGE}\nDescribe the image in detail."},
        {"role": "assistant", "content": "A red circle and a blue square."},
    ]
    out = tokenize_conversation(tokenizer, get_template("internvl2_5"), messages)
    context_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert out.input_ids.count(context_id) == 8
    assert context_id not in out.labels
    assert tokenizer.convert_tokens_to_ids("<img>") not in out.labels
    assert labelled_runs(tokenizer, out.input_ids, out.labels) == ["A red circle and a blue square.<|im_end|>"]


def test_no_labels_on_role_prefixes(tokenizer):
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
    ]
    for template in TEMPLATES.values():
        out = tokenize_conversation(tokenizer, template, messages)
        role_ids = enc(tokenizer, template.assistant_role)
        starts = [
            i for i in range(len(out.input_ids)) if out.input_ids[i : i + len(role_ids)] == role_ids
        ]  # every assistant turn
        assert len(starts) == 2, template.name
        for start in starts:
            assert out.labels[start : start + len(role_ids)] == [IGN] * len(role_ids), template.name
            assert out.labels[start + len(role_ids)] != IGN, template.name  # the answer starts right after


EXPECTED_TEXT = {
    "internvl2_5": (
        "<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{img}\nWhat is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>user\nAnd the colour?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    ),
    "Hermes-2": (
        "<|im_start|>system\n{sys}<|im_end|><|im_start|>user\n{img}\nWhat is in the picture?<|im_end|>"
        "<|im_start|>assistant\nA red circle.<|im_end|><|im_start|>user\nAnd the colour?<|im_end|>"
        "<|im_start|>assistant\nred<|im_end|>"
    ),
    "internlm2-chat": (
        "<|im_start|>system\n{sys}<|im_end|><|im_start|>user\n{img}\nWhat is in the picture?<|im_end|>"
        "<|im_start|>assistant\nA red circle.<|im_end|><|im_start|>user\nAnd the colour?<|im_end|>"
        "<|im_start|>assistant\nred<|im_end|>"
    ),
    "phi3-chat": (
        "<|system|>\n{sys}<|end|><|user|>\n{img}\nWhat is in the picture?<|end|>"
        "<|assistant|>\nA red circle.<|end|><|user|>\nAnd the colour?<|end|><|assistant|>\nred<|end|>"
    ),
}
EXPECTED_ANSWERS = {
    "internvl2_5": ["A red circle.<|im_end|>", "red<|im_end|>"],
    "Hermes-2": ["A red circle.<|im_end|>", "red<|im_end|>"],
    "internlm2-chat": ["A red circle.<|im_end|>", "red<|im_end|>"],
    "phi3-chat": ["A red circle.<|end|>", "red<|end|>"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
def test_each_template_renders_and_labels_answers(tokenizer, name):
    messages = [
        {"role": "user", "content": f"{IMAGE}\nWhat is in the picture?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "And the colour?"},
        {"role": "assistant", "content": "red"},
    ]
    template = get_template(name)
    out = tokenize_conversation(tokenizer, template, messages)
    expected = EXPECTED_TEXT[name].format(sys=template.system_message, img=IMAGE)
    assert tokenizer.decode(out.input_ids) == expected
    assert len(out.labels) == len(out.input_ids)
    assert labelled_runs(tokenizer, out.input_ids, out.labels) == EXPECTED_ANSWERS[name]


def test_registry_names_and_unknown_template():
    assert list(TEMPLATES) == ["internvl2_5", "Hermes-2", "internlm2-chat", "phi3-chat", "internvl3_5_gpt_oss"]
    with pytest.raises(
        ValueError, match="unknown template 'chatml'.*internvl2_5, Hermes-2, internlm2-chat, phi3-chat, internvl3_5_gpt"
    ):
        get_template("chatml")
    with pytest.raises(ValueError, match="'Hermes-2' has no thinking mode .*: internvl2_5, internvl3_5_gpt_oss"):
        get_template("Hermes-2", thinking=True)


def test_stop_token_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    assert stop_token_ids(tokenizer, get_template("internvl2_5")) == [ids("<|im_end|>")]
    assert stop_token_ids(tokenizer, get_template("Hermes-2")) == [ids("<|im_end|>"), ids("<|endoftext|>")]
    assert stop_token_ids(tokenizer, get_template("phi3-chat")) == [ids("<|end|>")]


def test_bos_tokenizer_gets_a_single_bos():
    plain = build_tiny_tokenizer()
    with_bos = build_tiny_tokenizer()
    with_bos.add_special_tokens({"bos_token": "<s>"})
    with_bos.add_bos_token = True
    bos_id = with_bos.bos_token_id
    assert with_bos("Hi")["input_ids"][0] == bos_id  # the tokenizer really adds a BOS by default
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "I am fine, thank you."},
    ]
    template = get_template("internvl2_5")
    out = tokenize_conversation(with_bos, template, messages)
    reference = tokenize_conversation(plain, template, messages)
    assert out.input_ids == [bos_id] + reference.input_ids
    assert out.labels == [IGN] + reference.labels
    assert out.input_ids.count(bos_id) == 1


def test_role_that_merges_with_answer_raises(tokenizer):
    # The trailing space of the role joins the answer's first word under byte-level BPE ("Ġ" + "The" -> "ĠThe"),
    # so the role's own tokens are not a prefix of the segment's tokens.
    template = dataclasses.replace(get_template("internvl2_5"), name="spaced", assistant_role="<|im_start|>assistant ")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is yes."}]
    with pytest.raises(TemplateMismatchError) as info:
        tokenize_conversation(tokenizer, template, messages)
    message = str(info.value)
    assert "'spaced'" in message and "'assistant'" in message
    assert "'Ġ'" in message and "'ĠThe'" in message


def test_stop_string_that_is_not_one_token_raises(tokenizer):
    template = dataclasses.replace(get_template("internvl2_5"), name="eos-s", sep="</s>\n", stop_str="</s>")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    with pytest.raises(TemplateMismatchError, match="'eos-s'.*'</s>' must be a single token"):
        tokenize_conversation(tokenizer, template, messages)


def test_bad_role_order_is_an_internal_error(tokenizer):
    template = get_template("internvl2_5")
    with pytest.raises(AssertionError):
        tokenize_conversation(tokenizer, template, [{"role": "assistant", "content": "Hello!"}])
    with pytest.raises(AssertionError):  # a trailing user turn is only for generation
        tokenize_conversation(tokenizer, template, [{"role": "user", "content": "Hi"}])


def test_generation_prompt():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert build_generation_prompt(get_template("internvl2_5"), messages) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_generation_prompt(get_template("phi3-chat"), messages[:1], system_message="Be brief.") == (
        "<|system|>\nBe brief.<|end|><|user|>\nHi<|end|><|assistant|>\n"
    )


@pytest.mark.parametrize(
    "name, thinking", [(name, False) for name in TEMPLATES] + [("internvl2_5", True), ("internvl3_5_gpt_oss", True)]
)
def test_jinja_chat_template_matches_python_rendering(name, thinking):
    template = get_template(name, thinking=thinking)
    tokenizer = build_tiny_tokenizer(harmony=True, think_tokens=True)
    tokenizer.chat_template = chat_template_jinja(template)
    without_system = [
        {"role": "user", "content": f"{IMAGE}\nWhat is in the picture?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": 'Say "yes" or\tno.'},
    ]
    with_system = [{"role": "system", "content": "You are a helpful assistant."}, *without_system]
    for messages in (without_system, with_system):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == build_generation_prompt(template, messages)
        # Without the generation prompt, a finished conversation renders to exactly the training text.
        finished = [*messages, {"role": "assistant", "content": "yes"}]
        rendered = tokenizer.apply_chat_template(finished, tokenize=False)
        assert rendered == tokenizer.decode(tokenize_conversation(tokenizer, template, finished).input_ids)
    rendered = tokenizer.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=True, system_message="Be brief."
    )
    assert rendered == build_generation_prompt(template, with_system, system_message="Be brief.")


# InternVL3.5: the Qwen3-based models keep `internvl2_5` (ChatML; every 3.5 Qwen3 script of the original sets
# conv_style internvl2_5), GPT-OSS uses `internvl3_5_gpt_oss` (harmony tokens). Each with and without thinking.
# The expected texts are written out by hand from the original's templates and preprocessors, with the end-token
# rule its comment states: the last assistant message ends with <|return|>, earlier ones with <|end|>.

GPT_OSS_SYSTEM = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)
GPT_OSS_THINKING_SYSTEM = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: high\n\n# Valid channels: analysis, final. Channel must be included for "
    "every message."
)
R1 = R1_SYSTEM_PROMPT
VARIANTS = {  # variant -> (template name, thinking)
    "qwen3": ("internvl2_5", False),
    "qwen3_thinking": ("internvl2_5", True),
    "gpt_oss": ("internvl3_5_gpt_oss", False),
    "gpt_oss_thinking": ("internvl3_5_gpt_oss", True),
}


def test_r1_system_prompt_is_the_mpo_trainers():
    assert R1.startswith("You are an AI assistant that rigorously follows this response protocol:\n\n1. First,")
    assert "Enclose this entire thinking process within <think> and </think> tags.\n\n2. After" in R1
    assert R1.endswith("The final answer should be standalone and not reference the thinking section.\n")
    assert get_template("internvl2_5", thinking=True).system_message == R1
    assert get_template("internvl3_5_gpt_oss").system_message == GPT_OSS_SYSTEM
    assert get_template("internvl3_5_gpt_oss", thinking=True).system_message == GPT_OSS_THINKING_SYSTEM


def think(thought: str, answer: str) -> str:
    return f"<think>\n{thought}\n</think>\n\n{answer}"


ONE_IMAGE_Q = f"{IMAGE}\nWhat colour is the shape?"
TWO_IMAGES_Q = f"Image-1: {IMAGE}\nImage-2: {IMAGE}\nHow many shapes are there?"
TEXT_Q = "Hello! How are you?"


def one_image(thinking: bool) -> list[dict[str, str]]:
    answer = think("One shape, red.", "Red.") if thinking else "Red."
    return [{"role": "user", "content": ONE_IMAGE_Q}, {"role": "assistant", "content": answer}]


def two_images(thinking: bool) -> list[dict[str, str]]:
    return [{"role": "user", "content": TWO_IMAGES_Q}, {"role": "assistant", "content": "There are two shapes."}]


def pure_text(thinking: bool) -> list[dict[str, str]]:
    return [{"role": "user", "content": TEXT_Q}, {"role": "assistant", "content": "I am fine, thank you."}]


def two_turns(thinking: bool) -> list[dict[str, str]]:
    first = think("A round shape.", "A red circle.") if thinking else "A red circle."
    return [
        {"role": "user", "content": f"{IMAGE}\nWhat is in the picture?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And the colour?"},
        {"role": "assistant", "content": "red"},
    ]


CASES = {"one_image": one_image, "two_images": two_images, "pure_text": pure_text, "two_turns": two_turns}
QWEN_USER = {
    "one_image": f"<|im_start|>user\n{ONE_IMAGE_Q}<|im_end|>\n",
    "two_images": f"<|im_start|>user\n{TWO_IMAGES_Q}<|im_end|>\n",
    "pure_text": f"<|im_start|>user\n{TEXT_Q}<|im_end|>\n",
}
OSS_USER = {
    "one_image": f"<|start|>user<|message|>{ONE_IMAGE_Q}<|end|>",
    "two_images": f"<|start|>user<|message|>{TWO_IMAGES_Q}<|end|>",
    "pure_text": f"<|start|>user<|message|>{TEXT_Q}<|end|>",
}
QA, OA = "<|im_start|>assistant\n", "<|start|>assistant"  # the assistant roles: never trained
# (variant, case) -> the rendered pieces, each with whether its tokens are trained.
EXPECTED_PIECES = {
    ("qwen3", "one_image"): [
        (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", False),
        (QWEN_USER["one_image"], False),
        (QA, False),
        ("Red.<|im_end|>", True),
        ("\n", False),
    ],
    ("qwen3", "two_images"): [
        (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", False),
        (QWEN_USER["two_images"], False),
        (QA, False),
        ("There are two shapes.<|im_end|>", True),
        ("\n", False),
    ],
    ("qwen3", "pure_text"): [
        (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", False),
        (QWEN_USER["pure_text"], False),
        (QA, False),
        ("I am fine, thank you.<|im_end|>", True),
        ("\n", False),
    ],
    ("qwen3", "two_turns"): [
        (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", False),
        (f"<|im_start|>user\n{IMAGE}\nWhat is in the picture?<|im_end|>\n", False),
        (QA, False),
        ("A red circle.<|im_end|>", True),
        ("\n", False),
        ("<|im_start|>user\nAnd the colour?<|im_end|>\n", False),
        (QA, False),
        ("red<|im_end|>", True),
        ("\n", False),
    ],
    ("qwen3_thinking", "one_image"): [
        (f"<|im_start|>system\n{R1}<|im_end|>\n", False),
        (QWEN_USER["one_image"], False),
        (QA, False),
        ("<think>\nOne shape, red.\n</think>\n\nRed.<|im_end|>", True),  # the thought is trained as written
        ("\n", False),
    ],
    ("qwen3_thinking", "two_images"): [
        (f"<|im_start|>system\n{R1}<|im_end|>\n", False),
        (QWEN_USER["two_images"], False),
        (QA, False),
        ("There are two shapes.<|im_end|>", True),
        ("\n", False),
    ],
    ("qwen3_thinking", "pure_text"): [
        (f"<|im_start|>system\n{R1}<|im_end|>\n", False),
        (QWEN_USER["pure_text"], False),
        (QA, False),
        ("I am fine, thank you.<|im_end|>", True),
        ("\n", False),
    ],
    ("qwen3_thinking", "two_turns"): [
        (f"<|im_start|>system\n{R1}<|im_end|>\n", False),
        (f"<|im_start|>user\n{IMAGE}\nWhat is in the picture?<|im_end|>\n", False),
        (QA, False),
        ("<think>\nA round shape.\n</think>\n\nA red circle.<|im_end|>", True),
        ("\n", False),
        ("<|im_start|>user\nAnd the colour?<|im_end|>\n", False),
        (QA, False),
        ("red<|im_end|>", True),
        ("\n", False),
    ],
    # GPT-OSS: the channel header is trained (the prompt ends at the role, the model writes it), and the last
    # answer ends with <|return|> whatever the number of images (the original: <|end|> for one image, <|return|>
    # for two, a NameError for pure text).
    ("gpt_oss", "one_image"): [
        (f"<|start|>system<|message|>{GPT_OSS_SYSTEM}<|end|>", False),
        (OSS_USER["one_image"], False),
        (OA, False),
        ("<|channel|>final<|message|>Red.<|return|>", True),
    ],
    ("gpt_oss", "two_images"): [
        (f"<|start|>system<|message|>{GPT_OSS_SYSTEM}<|end|>", False),
        (OSS_USER["two_images"], False),
        (OA, False),
        ("<|channel|>final<|message|>There are two shapes.<|return|>", True),
    ],
    ("gpt_oss", "pure_text"): [
        (f"<|start|>system<|message|>{GPT_OSS_SYSTEM}<|end|>", False),
        (OSS_USER["pure_text"], False),
        (OA, False),
        ("<|channel|>final<|message|>I am fine, thank you.<|return|>", True),
    ],
    ("gpt_oss", "two_turns"): [
        (f"<|start|>system<|message|>{GPT_OSS_SYSTEM}<|end|>", False),
        (f"<|start|>user<|message|>{IMAGE}\nWhat is in the picture?<|end|>", False),
        (OA, False),
        ("<|channel|>final<|message|>A red circle.<|end|>", True),  # an earlier answer: <|end|>
        ("<|start|>user<|message|>And the colour?<|end|>", False),
        (OA, False),
        ("<|channel|>final<|message|>red<|return|>", True),
    ],
    # Thinking: the thought goes to the analysis channel, stripped; everything after the first role is trained.
    ("gpt_oss_thinking", "one_image"): [
        (f"<|start|>system<|message|>{GPT_OSS_THINKING_SYSTEM}<|end|>", False),
        (OSS_USER["one_image"], False),
        (OA, False),
        (
            "<|channel|>analysis<|message|>One shape, red.<|end|><|start|>assistant<|channel|>final<|message|>Red."
            "<|return|>",
            True,
        ),
    ],
    ("gpt_oss_thinking", "two_images"): [
        (f"<|start|>system<|message|>{GPT_OSS_THINKING_SYSTEM}<|end|>", False),
        (OSS_USER["two_images"], False),
        (OA, False),
        ("<|channel|>final<|message|>There are two shapes.<|return|>", True),  # no thought: final channel only
    ],
    ("gpt_oss_thinking", "pure_text"): [
        (f"<|start|>system<|message|>{GPT_OSS_THINKING_SYSTEM}<|end|>", False),
        (OSS_USER["pure_text"], False),
        (OA, False),
        ("<|channel|>final<|message|>I am fine, thank you.<|return|>", True),
    ],
    ("gpt_oss_thinking", "two_turns"): [
        (f"<|start|>system<|message|>{GPT_OSS_THINKING_SYSTEM}<|end|>", False),
        (f"<|start|>user<|message|>{IMAGE}\nWhat is in the picture?<|end|>", False),
        (OA, False),
        (
            "<|channel|>analysis<|message|>A round shape.<|end|><|start|>assistant<|channel|>final<|message|>"
            "A red circle.<|end|>",  # an earlier answer ends with <|end|> in thinking mode too
            True,
        ),
        ("<|start|>user<|message|>And the colour?<|end|>", False),
        (OA, False),
        ("<|channel|>final<|message|>red<|return|>", True),
    ],
}


@pytest.mark.parametrize("variant, case", sorted(EXPECTED_PIECES))
def test_internvl3_5_text_ids_and_labels(tokenizer, variant, case):
    name, thinking = VARIANTS[variant]
    template = get_template(name, thinking=thinking)
    out = tokenize_conversation(tokenizer, template, CASES[case](thinking))
    pieces = EXPECTED_PIECES[variant, case]
    expected_ids, expected_labels = [], []
    for text, trained in pieces:
        ids = enc(tokenizer, text)
        expected_ids += ids
        expected_labels += ids if trained else [IGN] * len(ids)
    assert tokenizer.decode(out.input_ids) == "".join(text for text, _ in pieces)
    assert out.input_ids == expected_ids
    assert out.labels == expected_labels
    assert labelled_runs(tokenizer, out.input_ids, out.labels) == [text for text, trained in pieces if trained]


def test_gpt_oss_end_tokens_are_one_token_each_and_trained(tokenizer):
    """The end tokens themselves: <|return|> closes the last answer, <|end|> the earlier one, both trained."""
    ids = tokenizer.convert_tokens_to_ids
    for case in ("one_image", "two_images", "pure_text", "two_turns"):
        out = tokenize_conversation(tokenizer, get_template("internvl3_5_gpt_oss"), CASES[case](False))
        assert out.input_ids[-1] == out.labels[-1] == ids("<|return|>"), case
        assert out.labels.count(ids("<|return|>")) == 1, case
    out = tokenize_conversation(tokenizer, get_template("internvl3_5_gpt_oss"), two_turns(False))
    trained_ends = [t for t in out.labels if t in (ids("<|end|>"), ids("<|return|>"))]
    assert trained_ends == [ids("<|end|>"), ids("<|return|>")]  # system and user <|end|> are not trained


EXPECTED_PROMPTS = {  # two_turns without its last answer: where the original chat() ends the prompt
    "qwen3": (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{IMAGE}\nWhat is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>user\nAnd the colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "qwen3_thinking": (
        f"<|im_start|>system\n{R1}<|im_end|>\n<|im_start|>user\n{IMAGE}\nWhat is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nA round shape.\n</think>\n\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nAnd the colour?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "gpt_oss": (
        f"<|start|>system<|message|>{GPT_OSS_SYSTEM}<|end|><|start|>user<|message|>{IMAGE}\nWhat is in the picture?"
        "<|end|><|start|>assistant<|channel|>final<|message|>A red circle.<|end|>"
        "<|start|>user<|message|>And the colour?<|end|><|start|>assistant"
    ),
    "gpt_oss_thinking": (
        f"<|start|>system<|message|>{GPT_OSS_THINKING_SYSTEM}<|end|><|start|>user<|message|>{IMAGE}\n"
        "What is in the picture?<|end|><|start|>assistant<|channel|>analysis<|message|>A round shape.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>A red circle.<|end|>"
        "<|start|>user<|message|>And the colour?<|end|><|start|>assistant"
    ),
}


@pytest.mark.parametrize("variant", sorted(EXPECTED_PROMPTS))
def test_internvl3_5_inference_prompt(tokenizer, variant):
    name, thinking = VARIANTS[variant]
    template = get_template(name, thinking=thinking)
    messages = two_turns(thinking)
    prompt = build_generation_prompt(template, messages[:-1])
    assert prompt == EXPECTED_PROMPTS[variant]
    # The prompt's ids are the training ids up to the first trained token of the last answer (MPO's prompt split).
    out = tokenize_conversation(tokenizer, template, messages)
    answer_start = max(i for i, label in enumerate(out.labels) if label != IGN)
    while out.labels[answer_start - 1] != IGN:
        answer_start -= 1
    assert enc(tokenizer, prompt) == out.input_ids[:answer_start]


def test_internvl3_5_prefill_continues_where_training_puts_the_answer():
    messages = one_image(False)[:1]
    oss, oss_thinking = get_template("internvl3_5_gpt_oss"), get_template("internvl3_5_gpt_oss", thinking=True)
    start = f"<|start|>system<|message|>{GPT_OSS_SYSTEM}<|end|><|start|>user<|message|>{ONE_IMAGE_Q}<|end|>"
    assert build_generation_prompt(oss, messages, assistant_prefill="The") == (
        start + "<|start|>assistant<|channel|>final<|message|>The"
    )
    start = start.replace(GPT_OSS_SYSTEM, GPT_OSS_THINKING_SYSTEM)
    assert build_generation_prompt(oss_thinking, messages, assistant_prefill="<think>\nLet me") == (
        start + "<|start|>assistant<|channel|>analysis<|message|>Let me"
    )
    assert build_generation_prompt(oss_thinking, messages, assistant_prefill="<think>x</think> The") == (
        start
        + "<|start|>assistant<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>The"
    )
    qwen = get_template("internvl2_5", thinking=True)
    assert build_generation_prompt(qwen, messages, assistant_prefill="<think>\nLet me").endswith(
        "<|im_start|>assistant\n<think>\nLet me"
    )


def test_internvl3_5_stop_tokens(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    for thinking in (False, True):
        assert stop_token_ids(tokenizer, get_template("internvl2_5", thinking=thinking)) == [ids("<|im_end|>")]
        # <|return|> only, as the original chat() (sep2): <|end|> closes the analysis message mid-answer.
        assert stop_token_ids(tokenizer, get_template("internvl3_5_gpt_oss", thinking=thinking)) == [ids("<|return|>")]


def test_decode_answer_of_generated_ids(tokenizer):
    pad = tokenizer.pad_token_id
    oss = get_template("internvl3_5_gpt_oss")
    generated = enc(tokenizer, "<|channel|>final<|message|>Red.<|return|>") + [pad, pad]
    assert decode_answer(tokenizer, oss, generated) == "Red."
    generated = enc(
        tokenizer,
        "<|channel|>analysis<|message|>Two shapes.<|end|><|start|>assistant<|channel|>final<|message|>Red.<|return|>",
    )
    assert decode_answer(tokenizer, oss, generated) == "<think>\nTwo shapes.\n</think>\n\nRed."
    # A model trained by the original's rule may end a one-image answer with <|end|> and go on: the first answer.
    generated = enc(tokenizer, "<|channel|>final<|message|>Red.<|end|><|start|>assistant<|channel|>final")
    assert decode_answer(tokenizer, oss, generated) == "Red."
    assert decode_answer(tokenizer, oss, enc(tokenizer, "Red.")) == "Red."  # off the format: as it is
    # ChatML: decoded without special tokens; Qwen3's <think> markers are not special and stay.
    generated = enc(tokenizer, "<think>\nTwo shapes.\n</think>\n\nRed.<|im_end|>") + [pad]
    assert decode_answer(tokenizer, get_template("internvl2_5"), generated) == think("Two shapes.", "Red.")


def test_decoded_gpt_oss_answer_renders_back_to_the_generated_ids(tokenizer):
    """What chat puts into its history renders to the very tokens the model generated."""
    template = get_template("internvl3_5_gpt_oss", thinking=True)
    messages = one_image(True)[:1]
    generated_text = "<|channel|>analysis<|message|>One shape, red.<|end|><|start|>assistant<|channel|>final<|message|>Red.<|return|>"
    answer = decode_answer(tokenizer, template, enc(tokenizer, generated_text))
    out = tokenize_conversation(tokenizer, template, [*messages, {"role": "assistant", "content": answer}])
    prompt = enc(tokenizer, build_generation_prompt(template, messages))
    assert out.input_ids == prompt + enc(tokenizer, generated_text)


def test_stream_answer_gives_out_the_answer_as_it_grows():
    template = get_template("internvl3_5_gpt_oss", thinking=True)
    text = "<|channel|>analysis<|message|>Two shapes.<|end|><|start|>assistant<|channel|>final<|message|>Red.<|return|>"
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    streamed = list(stream_answer(template, pieces))
    assert "".join(streamed) == "<think>\nTwo shapes.\n</think>\n\nRed."
    assert not any("<|" in piece for piece in streamed)
    assert list(stream_answer(template, ["<|channel|>final<|message|>a <", " b"])) == ["a ", "< b"]
    assert list(stream_answer(get_template("internvl2_5"), ["a", "b"])) == ["a", "b"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_jinja_renders_internvl3_5_thoughts_like_python(variant):
    name, thinking = VARIANTS[variant]
    template = get_template(name, thinking=thinking)
    tokenizer = build_tiny_tokenizer(harmony=True, think_tokens=True)
    tokenizer.chat_template = chat_template_jinja(template)
    finished = two_turns(True)  # thoughts in both answers, also where thinking is off (then kept as text)
    finished[-1] = {"role": "assistant", "content": "  <think> It is red. </think>\nred "}
    rendered = tokenizer.apply_chat_template(finished, tokenize=False)
    assert rendered == tokenizer.decode(tokenize_conversation(tokenizer, template, finished).input_ids)
    rendered = tokenizer.apply_chat_template(finished[:-1], tokenize=False, add_generation_prompt=True)
    assert rendered == build_generation_prompt(template, finished[:-1])
    prefilled = [*finished[:-1], {"role": "assistant", "content": "The"}]
    rendered = tokenizer.apply_chat_template(prefilled, tokenize=False, continue_final_message=True)
    assert rendered == build_generation_prompt(template, finished[:-1], assistant_prefill="The")


@pytest.mark.parametrize(
    "name, thinking", [(name, False) for name in TEMPLATES] + [("internvl2_5", True), ("internvl3_5_gpt_oss", True)]
)
def test_a_memo_kept_across_conversations_changes_no_ids_and_holds_only_what_repeats(tokenizer, name, thinking):
    """A builder keeps one memo for a run: every conversation still gets the ids of its segments tokenized one by
    one (the reference here, as before the memo), and the memo holds the default system segments, the role and the
    end tokens, never a record's own system turn or text."""
    template = get_template(name, thinking=thinking)
    answers = ["Red.", "<think>Two shapes.</think> Blue.", "A ring"]
    conversations = []
    for i, answer in enumerate(answers * 3):
        turns = [{"role": "user", "content": f"{IMAGE}\nQuestion {i}?"}, {"role": "assistant", "content": answer}]
        if i % 3 == 1:
            turns = [{"role": "system", "content": f"Own system prompt {i}."}, *turns]
        if i % 3 == 2:
            turns += [{"role": "user", "content": "And?"}, {"role": "assistant", "content": f"More {i}."}]
        conversations.append(turns)
    memo: dict[str, list[int]] = {}
    for system_message in (None, "Be brief."):
        for messages in conversations:
            out = tokenize_conversation(tokenizer, template, messages, system_message=system_message, memo=memo)
            segments = _render_segments(template, messages, system_message, for_generation=False)
            assert out == tokenize_conversation(tokenizer, template, messages, system_message=system_message)
            assert out.input_ids == [i for s in segments for i in enc(tokenizer, s.text)]
        pair = list(tokenize_conversations(tokenizer, template, conversations[:2], system_message=system_message))
        assert pair == [
            tokenize_conversation(tokenizer, template, m, system_message=system_message) for m in conversations[:2]
        ]
    assert not any("Own system" in text or "Question" in text for text in memo)
    assert len(memo) <= 5  # two default system segments (none and "Be brief."), the role, at most two end tokens
