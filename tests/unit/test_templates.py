"""Conversation rendering and label masking (docs/original-differences.md §1.2, §1.3).

Expected ids are built by tokenizing the expected pieces by hand, one piece at a time, so that the test
states which tokens are trained instead of re-running the module's own logic.
"""

import dataclasses

import pytest

from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data.templates import (
    TEMPLATES,
    TemplateMismatchError,
    build_generation_prompt,
    chat_template_jinja,
    get_template,
    stop_token_ids,
    tokenize_conversation,
)
from internvl_tune.testing.tiny import build_tiny_tokenizer

IGN = IGNORE_INDEX
DEFAULT_SYSTEM = TEMPLATES["internvl2_5"].system_message
IMAGE = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


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
    assert list(TEMPLATES) == ["internvl2_5", "Hermes-2", "internlm2-chat", "phi3-chat"]
    with pytest.raises(ValueError, match="unknown template 'chatml'.*internvl2_5, Hermes-2, internlm2-chat, phi3-chat"):
        get_template("chatml")


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


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_jinja_chat_template_matches_python_rendering(tokenizer, name):
    template = get_template(name)
    tokenizer = build_tiny_tokenizer()
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
