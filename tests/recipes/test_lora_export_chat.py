"""LoRA training saves adapters only; export merges them (either layout); chat answers like greedy evaluation."""

import json

import pytest
import torch
from conftest import draw_image, make_colour_dataset
from safetensors.torch import load_file

from internvl_tune.checkpoints.write import EXTRA_WEIGHTS_FILE
from internvl_tune.cli import main
from internvl_tune.model.load import load_model
from internvl_tune.model.lora import load_adapter
from internvl_tune.testing.original_checkpoint import build_original_checkpoint
from internvl_tune.testing.parity import multimodal_inputs
from internvl_tune.training.metrics import read_metrics


def _logits(model, tokenizer):
    input_ids, pixel_values = multimodal_inputs(tokenizer)
    with torch.no_grad():
        return model.eval()(input_ids=input_ids, pixel_values=pixel_values).logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("lora")
    meta = make_colour_dataset(root / "data", num=8)
    config = root / "sft.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false}}\n"
        f"data: {{meta_path: {meta}, max_dynamic_patch: 4}}\n"
    )
    args = [
        "sft",
        "--config",
        str(config),
        "use_llm_lora=4",
        "use_backbone_lora=2",
        "freeze_backbone=true",
        "learning_rate=1e-2",
        "warmup_ratio=0",
        "per_device_train_batch_size=2",
        "max_steps=4",
        "save_steps=2",
        f"output_dir={root / 'run'}",
    ]
    assert main(args) == 0
    return root, args


def test_lora_checkpoints_hold_trained_weights_only_and_resume(lora_run, tiny_model_dir):
    root, args = lora_run
    saved = load_file(root / "run" / "checkpoint-2" / "model.safetensors")
    assert saved and all("lora_" in k or "multi_modal_projector" in k for k in saved)
    assert any("vision_tower" in k and "lora_B" in k for k in saved)
    assert all(torch.count_nonzero(v) for k, v in saved.items() if "lora_B" in k)  # trained, not zeros
    assert (
        main([*args[:-1], f"output_dir={root / 'resumed'}", f"resume_from_checkpoint={root / 'run' / 'checkpoint-2'}"])
        == 0
    )
    full = [r["loss"] for r in read_metrics(root / "run" / "metrics.jsonl")]
    resumed = [r["loss"] for r in read_metrics(root / "resumed" / "metrics.jsonl")]
    assert resumed == pytest.approx(full[2:], abs=1e-6)


def test_export_merge_lora_equals_the_unmerged_model_in_both_layouts(lora_run, tiny_model_dir):
    root, _ = lora_run
    adapter = root / "run" / "final_adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / EXTRA_WEIGHTS_FILE).is_file()
    assert not (adapter / "model.safetensors").exists()  # adapters only, not the full model

    base, tokenizer = load_model(tiny_model_dir)
    unmerged = load_adapter(base, adapter)
    unmerged.load_state_dict(load_file(adapter / EXTRA_WEIGHTS_FILE), strict=False)
    expected = _logits(unmerged, tokenizer)
    assert not torch.allclose(expected, _logits(load_model(tiny_model_dir)[0], tokenizer))  # LoRA changed the model

    assert main(["export", str(adapter), str(root / "merged_hf"), "--merge-lora"]) == 0
    assert main(["export", str(adapter), str(root / "merged_orig"), "--merge-lora", "--to", "original"]) == 0
    for folder in ("merged_hf", "merged_orig", "run/final"):
        model, _ = load_model(root / folder)
        torch.testing.assert_close(_logits(model, tokenizer), expected, atol=1e-5, rtol=1e-5)
    assert json.loads((root / "merged_orig" / "config.json").read_text())["architectures"] == ["InternVLChatModel"]


def test_merge_lora_on_a_folder_without_adapters_says_nothing_was_merged(tmp_path, tiny_model_dir, caplog):
    """A full model folder (e.g. `final/` instead of `final_adapter/`) is exported as it is, and the run says so; it
    said nothing. An original-layout folder with unmerged LoRA weights is merged, without the warning."""
    with caplog.at_level("WARNING"):
        assert main(["export", str(tiny_model_dir), str(tmp_path / "out"), "--merge-lora"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{tiny_model_dir} holds no LoRA adapters" in w and "nothing was merged" in w for w in warnings)
    assert (tmp_path / "out" / "config.json").is_file()

    caplog.clear()
    build_original_checkpoint(tmp_path / "orig_lora", llm_lora_rank=2)
    with caplog.at_level("WARNING"):
        assert main(["export", str(tmp_path / "orig_lora"), str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert not [r for r in caplog.records if "nothing was merged" in r.getMessage()]


def test_adapter_folder_without_merge_flag_is_refused_in_one_line(lora_run, capsys):
    root, _ = lora_run
    adapter = str(root / "run" / "final_adapter")
    for argv, message in (
        (["export", adapter, str(root / "refused")], "pass --merge-lora"),
        (["export", adapter, str(root / "refused"), "--base", str(root)], "used with --merge-lora only"),
        (["chat", adapter, "Hi?"], "holds LoRA adapters only: use the merged model"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (root / "refused").exists()


def test_chat_streams_the_greedy_answer(tmp_path, tiny_model_dir, capsys):
    from internvl_tune.data.images import image_geometry
    from internvl_tune.data.transform import SampleSettings
    from internvl_tune.evaluate.generate import answer_questions

    draw_image(tmp_path / "a.png", (112, 56), "red")
    assert (
        main(
            [
                "chat",
                str(tiny_model_dir),
                "What colour is the shape?",
                "--image",
                str(tmp_path / "a.png"),
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.strip()
    model, tokenizer = load_model(tiny_model_dir)
    geometry = image_geometry(model.config)
    [expected] = answer_questions(
        model,
        tokenizer,
        [{"image": str(tmp_path / "a.png"), "question": "What colour is the shape?"}],
        SampleSettings(image_size=geometry.image_size, num_image_token=geometry.num_image_token),
        max_new_tokens=6,
    )
    assert printed == expected


def test_chat_session_keeps_images_and_history(tmp_path, tiny_model_dir):
    from internvl_tune.chat import ChatSession

    for name, size in (("a.png", (112, 56)), ("b.png", (56, 56))):
        draw_image(tmp_path / name, size, "blue")
    session = ChatSession(str(tiny_model_dir), max_new_tokens=3)
    "".join(session.ask("Same?", [str(tmp_path / "a.png"), str(tmp_path / "b.png")]))
    prompt = session.prompt([*session.history, {"role": "user", "content": "And now?"}])
    context = session.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    # 12 // 2 = 6 tiles per image at most: a 2x1 grid + thumbnail = 3 tiles, and 1 tile; 4 tokens per tile.
    assert prompt.input_ids.count(context) == (3 + 1) * 4 and prompt.pixel_values.shape[0] == 4
    assert prompt.num_tiles == [3, 1]
    assert "Image-1: <img>" in session.tokenizer.decode(prompt.input_ids)
