"""`internvl-tune` command line: thin shells over functions that tests call directly."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from internvl_tune import __version__


def _run_config(cls: type, args: argparse.Namespace):
    """The run's config from --config and the overrides, its model folder and meta file checked before any work."""
    from internvl_tune.config import check_paths, load_config

    config = load_config(cls, args.config, args.overrides)
    check_paths(config)
    return config


# Each command checks its arguments before importing its machinery: a mistake is reported in a second.


def _sft(args: argparse.Namespace) -> int:
    from internvl_tune.config import SFTConfig

    config = _run_config(SFTConfig, args)
    from internvl_tune.recipes.sft import train

    summary = train(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}, indent=2))
    return 0


def _mpo(args: argparse.Namespace) -> int:
    from internvl_tune.config import MPOConfig

    config = _run_config(MPOConfig, args)
    from internvl_tune.recipes.mpo import train

    summary = train(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}, indent=2))
    return 0


def _precompute_ref(args: argparse.Namespace) -> int:
    from internvl_tune.config import MPOConfig

    config = _run_config(MPOConfig, args)
    from internvl_tune.recipes.precompute_ref import precompute_reference

    print(f"wrote {precompute_reference(config)}")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from internvl_tune.checkpoints.read import load_tokenizer, read_model_config
    from internvl_tune.config import MPOConfig, SFTConfig, read_run_file
    from internvl_tune.data.check import check_data
    from internvl_tune.model.prepare import sample_settings

    args.overrides = [f"model.model_name_or_path={args.model}", f"data.meta_path={args.meta}", *args.overrides]
    mpo = args.preference or (args.config is not None and "mpo" in read_run_file(args.config))
    config = _run_config(MPOConfig if mpo else SFTConfig, args)
    model_config = read_model_config(args.model)  # either layout, as plain JSON: no remote code
    tokenizer = load_tokenizer(args.model)
    report = check_data(
        args.meta,
        tokenizer,
        sample_settings(config.data, model_config),
        batch_size=args.batch_size or config.train.per_device_train_batch_size,
        pairs=mpo,  # a run file with an mpo section checks pair data, like --preference
    )
    print(report.format(max_listed=args.max_listed))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return 1 if report.num_errors else 0


def _parse_size(text: str) -> int:
    """`5GB`, `500MB`, `1.5GB` or a byte count -> bytes (an argparse type)."""
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
    number, factor = text, 1
    for unit, unit_factor in units.items():
        if text.upper().endswith(unit):
            number, factor = text[: -len(unit)], unit_factor
    try:
        size = int(float(number) * factor)
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write a positive number of bytes, KB, MB, GB or TB")
    return size


def _existing_folder(path: str) -> None:
    """A mistyped folder is "no such folder", not whatever the command would say of a folder without its files."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such folder")


def _convert(args: argparse.Namespace) -> int:
    _existing_folder(args.src)
    from internvl_tune.checkpoints.write import convert_to_hf, convert_to_original

    convert = convert_to_hf if args.to == "hf" else convert_to_original
    out = convert(args.src, args.dst, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    print(f"wrote {out}")
    if args.to == "original":
        print(
            "the original layout loads with trust_remote_code once the original modeling_*.py and "
            "configuration_*.py files of the model family are copied into it"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.base and not args.merge_lora:
        raise ValueError("--base names the base model of a LoRA adapter folder; it is used with --merge-lora only")
    _existing_folder(args.src)
    from internvl_tune.checkpoints.write import export_checkpoint

    out = export_checkpoint(
        args.src,
        args.dst,
        to=args.to,
        merge_lora_adapters=args.merge_lora,
        base=args.base,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_size,
    )
    print(f"wrote {out}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    _existing_folder(args.model)
    from internvl_tune.chat import run_chat

    run_chat(
        args.model,
        args.question,
        args.image,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from internvl_tune.config import set_field, split_override
    from internvl_tune.demo.run import DemoSettings, run_demo

    settings = DemoSettings(output_dir=args.output_dir)
    if args.quick:
        settings = settings.quick()
    for override in args.overrides:
        key, value = split_override(override)
        set_field(settings, key, value, f"override {override!r}")
    report = run_demo(settings)
    return 0 if report["passed"] else 1


def _fields_help(mpo: bool = False) -> str:
    import dataclasses

    from internvl_tune.config import DataArgs, ModelArgs, MPOArgs, TrainArgs, field_docs

    lines = ["fields (section.field=value):"]
    sections = [("model", ModelArgs), ("data", DataArgs), ("train", TrainArgs)] + ([("mpo", MPOArgs)] if mpo else [])
    for section, cls in sections:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section}.{f.name} [{default!r}]: {' '.join(docs[f.name].split())}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    import typing

    from internvl_tune.config import SaveDtype

    dtypes = typing.get_args(SaveDtype)
    parser = argparse.ArgumentParser(prog="internvl-tune", description="Post-train InternVL models: SFT and MPO.")
    parser.add_argument("--version", action="version", version=f"internvl-tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sft = sub.add_parser(
        "sft",
        help="supervised fine-tuning",
        description="Supervised fine-tuning of InternVL. "
        "Settings come from the YAML file, then key=value overrides (section.field=value or "
        "field=value); see configs/sft/ and docs/config.md for every field.",
    )
    sft.formatter_class = argparse.RawDescriptionHelpFormatter
    sft.epilog = _fields_help()
    sft.add_argument("--config", required=True, help="YAML run file (sections model, data, train)")
    sft.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.learning_rate=1e-5")
    sft.set_defaults(func=_sft)

    mpo = sub.add_parser(
        "mpo",
        help="Mixed Preference Optimization",
        description="MPO (sigmoid + bco_pair + sft by default) on MMPR-style preference data. Settings come from the "
        "YAML file (sections model, data, train, mpo), then key=value overrides; see configs/mpo/.",
        epilog=_fields_help(mpo=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mpo.add_argument("--config", required=True, help="YAML run file (sections model, data, train, mpo)")
    mpo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mpo.beta=0.1")
    mpo.set_defaults(func=_mpo)

    precompute = sub.add_parser(
        "precompute-ref",
        help="compute the reference log-probs of every pair once",
        description="Run the reference model over the MPO run's data once and write its log-probs to "
        "mpo.reference_cache; then `mpo` with mpo.reference=precomputed holds one model.",
    )
    precompute.add_argument("--config", required=True, help="the MPO run file")
    precompute.add_argument("overrides", nargs="*", help="key=value overrides")
    precompute.set_defaults(func=_precompute_ref)

    check = sub.add_parser(
        "check-data",
        help="validate a dataset and report lengths, tiles and problems",
        description="Validate every record of META.json without running the model. Exits 1 "
        "when any record has an error.",
    )
    check.add_argument("meta", help="meta JSON file")
    check.add_argument("--model", required=True, help="model folder (its tokenizer and image geometry are used)")
    check.add_argument("--config", help="YAML run file whose data settings to use")
    check.add_argument("--batch-size", type=int, default=0, help="batch size for the padding estimate")
    check.add_argument(
        "--preference", action="store_true", help="preference (MMPR) data: question / chosen / rejected records"
    )
    check.add_argument("--max-listed", type=int, default=10, help="problems listed per kind")
    check.add_argument("--json", help="also write the report as JSON to this file")
    check.add_argument("overrides", nargs="*", help="key=value data overrides, e.g. max_dynamic_patch=6")
    check.set_defaults(func=_check_data)

    convert = sub.add_parser(
        "convert",
        help="convert a checkpoint between the original and the HF layout",
        description="Lossless conversion between the original remote-code InternVL layout "
        "(InternVLChatModel) and transformers' InternVLForConditionalGeneration. Runs no remote "
        "code and holds at most one copy of the weights.",
    )
    convert.add_argument("src", help="checkpoint folder")
    convert.add_argument("dst", help="output folder")
    convert.add_argument("--to", choices=["hf", "original"], required=True, help="layout to write")
    convert.add_argument(
        "--max-shard-size", type=_parse_size, default="5GB", help="largest weight shard, e.g. 5GB, 500MB"
    )
    convert.add_argument("--dtype", choices=dtypes, default="auto", help="weights' dtype (auto: keep each tensor's)")
    convert.set_defaults(func=_convert)

    export = sub.add_parser(
        "export",
        help="write a full model (LoRA merged) in either layout",
        description="Write a full model folder from a trained model, an original checkpoint "
        "with unmerged LoRA weights, or (with --merge-lora) a LoRA adapter folder.",
    )
    export.add_argument("src", help="model or adapter folder")
    export.add_argument("dst", help="output folder")
    export.add_argument("--to", choices=["hf", "original"], default="hf", help="layout to write")
    export.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapters of SRC into the base")
    export.add_argument("--base", help="base model folder (default: the one recorded in the adapter config)")
    export.add_argument(
        "--max-shard-size", type=_parse_size, default="5GB", help="largest weight shard for --to original"
    )
    export.add_argument("--dtype", choices=dtypes, default="auto", help="weights' dtype (auto: the source's or base's)")
    export.set_defaults(func=_export)

    chat = sub.add_parser(
        "chat",
        help="chat with a model, with images",
        description="Chat with an InternVL checkpoint (either layout) using its own template, "
        "dynamic tiling and streaming output. Without QUESTION: an interactive session.",
    )
    chat.add_argument("model", help="model folder")
    chat.add_argument("question", nargs="?", help="the question (omit for interactive mode)")
    chat.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.set_defaults(func=_chat)

    demo = sub.add_parser(
        "demo",
        help="tiny end-to-end run on a synthetic visual task (CPU, minutes)",
        description="Build a synthetic shapes task and a tiny InternVL, fine-tune it on CPU, "
        "evaluate on held-out images and write report.json.",
    )
    demo.add_argument("--output-dir", default="demo_out", help="where the data, model, run and report go")
    demo.add_argument("--quick", action="store_true", help="a shortened setting (for tests)")
    demo.add_argument("overrides", nargs="*", help="DemoSettings field=value overrides")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    # key=value overrides may come before or after options; argparse alone only takes them in one place.
    args, extra = parser.parse_known_args(argv)
    if "overrides" in vars(args):
        # key=value overrides may come before or after options; argparse alone only takes them in one place.
        unknown = [a for a in extra if "=" not in a or a.startswith("-")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *extra]
    elif args.command == "chat" and args.question is None and len(extra) == 1 and not extra[0].startswith("-"):
        # argparse takes positionals only up to the first option: `chat MODEL --image P "question"` leaves it over.
        args.question = extra[0]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        # A user's mistake: our errors (ConfigError, DataError, ConversionError) are ValueErrors, as are the
        # argument checks of the libraries we call; a missing file is an OSError.
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training run's TrainingInterrupted says what it saved
        print(str(e) or "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
