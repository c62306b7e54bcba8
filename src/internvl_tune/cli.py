"""`internvl-tune` command line: thin shells over functions that tests call directly.

Each command is a handler, `_name(args) -> exit code`, registered with `_command` in `build_parser`. A handler checks
its arguments, then imports its machinery: building the parser, `--help` and a mistaken setting or path import
neither torch nor transformers, so they answer in well under a second. A user's mistake (`UserError`, errors.py)
is one `error: ...` line, exit 2; any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from internvl_tune import __version__
from internvl_tune.errors import MissingPathError, UserError

DEBUG_ENV = "INTERNVL_TUNE_DEBUG"  # set (not 0): a user error's traceback is shown too, as with --debug


def _run_config(cls: type, args: argparse.Namespace, *, trains: bool = True):
    """The run's config from --config and the overrides, its model folder and meta file checked before any work,
    and, for a run that trains, the packages it asks for (flash-attn, DeepSpeed)."""
    from internvl_tune.config import check_installed, check_paths, load_config

    config = load_config(cls, args.config, args.overrides)
    check_paths(config)
    if trains:
        check_installed(config)
    return config


# Each command checks its arguments before importing its machinery: a mistake is reported in a second.


def _print_summary(summary: dict) -> None:
    """The run's summary on stdout, once: by the main process of a multi-process launch."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}, indent=2))


def _sft(args: argparse.Namespace) -> int:
    from internvl_tune.config import SFTConfig

    config = _run_config(SFTConfig, args)
    from internvl_tune.recipes.sft import train

    _print_summary(train(config))
    return 0


def _mpo(args: argparse.Namespace) -> int:
    from internvl_tune.config import MPOConfig

    config = _run_config(MPOConfig, args)
    from internvl_tune.recipes.mpo import train

    _print_summary(train(config))
    return 0


def _rl(args: argparse.Namespace) -> int:
    from internvl_tune.config import RLConfig

    config = _run_config(RLConfig, args)
    from internvl_tune.recipes.rl import train

    _print_summary(train(config))
    return 0


def _precompute_ref(args: argparse.Namespace) -> int:
    from internvl_tune.config import MPOConfig

    config = _run_config(MPOConfig, args)
    from internvl_tune.recipes.precompute_ref import precompute_reference

    print(f"wrote {precompute_reference(config)}")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from internvl_tune.config import MPOConfig, SFTConfig, read_run_file

    args.overrides = [f"model.model_name_or_path={args.model}", f"data.meta_path={args.meta}", *args.overrides]
    mpo = args.preference or (args.config is not None and "mpo" in read_run_file(args.config))
    config = _run_config(MPOConfig if mpo else SFTConfig, args, trains=False)
    from internvl_tune.checkpoints.read import load_tokenizer, read_model_config
    from internvl_tune.data.check import check_data
    from internvl_tune.data.lengths import measure_workers
    from internvl_tune.data.packing import PackingSettings
    from internvl_tune.model.prepare import check_template, sample_settings

    check_template(config.data, args.model)
    model_config = read_model_config(args.model)  # either layout, as plain JSON: no remote code
    tokenizer = load_tokenizer(args.model)
    d = config.data
    report = check_data(
        args.meta,
        tokenizer,
        sample_settings(config.data, model_config),
        batch_size=args.batch_size or config.train.per_device_train_batch_size,
        pairs=mpo,  # a run file with an mpo section checks pair data, like --preference
        packing=PackingSettings(
            d.max_packed_tokens, d.num_images_expected, d.max_buffer_size, d.oversize_sample
        ),  # what packing with the run's budgets (or the defaults) would do
        packs=d.packing,  # and whether a sample over them is refused, as the run would
        workers=measure_workers(args.workers if args.workers is not None else d.measure_workers),
    )
    print(report.format(max_listed=args.max_listed))
    print(_parameter_line(model_config))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return 1 if report.num_errors else 0


def _parameter_line(model_config) -> str:
    """The model's size as check-data reports it: parameters, and for a MoE LLM those active per token."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from internvl_tune.model.freeze import active_parameter_counts

    with torch.device("meta"):  # shapes only: nothing is allocated or read
        total, active = active_parameter_counts(InternVLForConditionalGeneration(model_config))
    line = f"model: {total / 1e6:,.1f} M parameters ({model_config.text_config.model_type} LLM)"
    return line + (f", {active / 1e6:,.1f} M active per token" if active != total else "")


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
        raise MissingPathError(f"{path}: no such folder")


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
        raise UserError("--base names the base model of a LoRA adapter folder; it is used with --merge-lora only")
    _existing_folder(args.src)
    from internvl_tune.model.save import export_checkpoint

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


def _generation_backend(args: argparse.Namespace):
    """The backend `sample`, `dropout-ntp` and `eval` generate with, its options checked before a model is loaded."""
    if args.backend == "server":
        if not args.base_url or args.model:
            raise UserError("--backend server takes --base-url (and --model-name), not --model")
        from internvl_tune.generation.server import ServerBackend

        return ServerBackend(
            args.base_url, model_name=args.model_name, api_key=args.api_key, max_concurrency=args.max_concurrency
        )
    if not args.model or args.base_url:
        raise UserError("--backend hf takes --model MODEL_DIR (a server is used with --backend server --base-url)")
    _existing_folder(args.model)
    import torch

    from internvl_tune.generation.hf import HFBackend

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:  # one GPU per process under torchrun
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    thinking = getattr(args, "thinking", False)
    return HFBackend.from_folder(args.model, batch_size=args.batch_size, max_tiles=args.max_tiles, thinking=thinking)


def _generation_run(args: argparse.Namespace, default_n: int, max_new_tokens: int) -> dict:
    """The sampling parameters, shard and selection shared by `sample` and `dropout-ntp`, checked."""
    from internvl_tune.generation.base import SamplingParams
    from internvl_tune.preference_data.resumable import shard_from_env

    for path in args.inputs:
        if not Path(path).is_file():
            raise MissingPathError(f"{path}: no such file")
    shard_index, num_shards = shard_from_env() if args.shard_index is None else (args.shard_index, args.num_shards)
    if not 0 <= shard_index < num_shards:
        raise UserError(f"need 0 <= --shard-index < --num-shards, got {shard_index} and {num_shards}")
    if args.sample_max_num is not None and args.sample_max_num < 1:
        raise UserError(f"--sample-max-num must be >= 1, got {args.sample_max_num}")
    params = SamplingParams(
        n=default_n if args.num_return_sequences is None else args.num_return_sequences,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
        seed=args.seed,
    )
    return dict(
        params=params,
        image_root=args.image_root,
        sample_max_num=args.sample_max_num,
        sample_start_idx=args.sample_start_idx,
        shard_index=shard_index,
        num_shards=num_shards,
        progress=not args.no_progress,
    )


def _print_run(summary, what: str) -> None:
    print(
        f"{summary.output}: {summary.num_written} {what} written; {summary.num_requests} inputs generated for, "
        f"{summary.num_complete} complete before"
        + (f", {summary.num_duplicates} duplicate inputs skipped" if summary.num_duplicates else "")
        + (f", {summary.num_skipped} identical to chosen not written" if summary.num_skipped else "")
    )


def _sample(args: argparse.Namespace) -> int:
    from internvl_tune.preference_data.prompts import version_for_file
    from internvl_tune.preference_data.sample import DEFAULT_SAMPLING, sample_responses

    run = _generation_run(args, DEFAULT_SAMPLING.n, DEFAULT_SAMPLING.max_new_tokens)
    for path in args.inputs:
        version_for_file(args.prompt_version, path)
    backend = _generation_backend(args)
    try:
        for path in args.inputs:
            _print_run(
                sample_responses(backend, path, args.out, prompt_version=args.prompt_version, **run), "responses"
            )
    finally:
        backend.close()
    return 0


def _dropout_ntp(args: argparse.Namespace) -> int:
    from internvl_tune.preference_data.dropout_ntp import DEFAULT_SAMPLING, dropout_ntp

    run = _generation_run(args, DEFAULT_SAMPLING.n, DEFAULT_SAMPLING.max_new_tokens)
    if not 0 <= args.start_ratio < 1:
        raise UserError(f"--start-ratio must be in [0, 1), got {args.start_ratio}")
    backend = _generation_backend(args)
    try:
        for path in args.inputs:
            _print_run(dropout_ntp(backend, path, args.out, start_ratio=args.start_ratio, **run), "pairs")
    finally:
        backend.close()
    return 0


def _eval(args: argparse.Namespace) -> int:
    from internvl_tune.evaluate.benchmark import evaluate_benchmark, format_report, load_benchmark, prepare_output
    from internvl_tune.judge import resolve_scorers

    # Everything is checked before a model loads: the benchmark's lines, the scorers, the output folder.
    questions = load_benchmark(args.benchmark, image_root=args.image_root)
    for source in {q.source for q in questions}:
        resolve_scorers(args.scorers, source)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.backend == "hf" and args.model:
        _existing_folder(args.model)
    model = str(Path(args.model).resolve()) if args.model else f"{args.base_url} {args.model_name or ''}".strip()
    if args.thinking and args.backend != "hf":
        raise UserError("--thinking sets the prompt of --backend hf; a server's thinking mode is set where it runs")
    run = dict(
        prompt=args.prompt,
        scorers=args.scorers,
        thinking=args.thinking,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        settings={"benchmark": str(Path(args.benchmark).resolve()), "model": model},
    )
    prepare_output(args.out, **run)
    backend = _generation_backend(args)
    try:
        report = evaluate_benchmark(backend, questions, args.out, **run, progress=not args.no_progress)
    finally:
        backend.close()
    print(format_report(report))
    print(f"wrote {Path(args.out) / 'report.json'}, responses.jsonl, predictions.tsv")
    return 0


def _add_backend_args(parser: argparse.ArgumentParser) -> None:
    """The model to generate with: `--backend hf --model DIR` or `--backend server --base-url URL` (`_generation_backend`)."""
    backend = parser.add_argument_group("backend")
    backend.add_argument("--backend", choices=["hf", "server"], default="hf", help="hf: transformers in this process")
    backend.add_argument("--model", help="model folder (--backend hf)")
    backend.add_argument("--batch-size", type=int, default=8, help="texts per generate call (hf)")
    backend.add_argument("--max-tiles", type=int, help="most tiles per image (hf; default: the checkpoint's)")
    backend.add_argument("--base-url", help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 (server)")
    backend.add_argument("--model-name", help="served model name (server; default: the first it lists)")
    backend.add_argument("--api-key", help="bearer token (server; default: $OPENAI_API_KEY)")
    backend.add_argument("--max-concurrency", type=int, default=8, help="most requests in flight (server)")


def _add_generation_args(parser: argparse.ArgumentParser, *, n_default: int, max_new_tokens: int) -> None:
    """Options of `sample` and `dropout-ntp`: the backend, the sampling parameters, selection and sharding."""
    parser.add_argument("--out", required=True, help="output folder (the output file takes the input's name)")
    _add_backend_args(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num-return-sequences", type=int, help=f"texts per input (default {n_default})")
    sampling.add_argument("--temperature", type=float, default=0.7)
    sampling.add_argument("--top-k", type=int, default=50, help="0: no limit")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--max-new-tokens", type=int, help=f"default {max_new_tokens}")
    sampling.add_argument("--seed", type=int, default=0, help="base seed; each input's draws derive from it")
    data = parser.add_argument_group("inputs")
    data.add_argument("--image-root", help="folder image paths are relative to (default: the input file's)")
    data.add_argument("--sample-max-num", type=int, help="use at most this many input lines, evenly spaced")
    data.add_argument("--sample-start-idx", type=int, default=0, help="the first of them")
    data.add_argument("--shard-index", type=int, help="this process's shard (default: $RANK under torchrun, else 0)")
    data.add_argument("--num-shards", type=int, default=1, help="processes sharing the inputs ($WORLD_SIZE)")
    data.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def _tiny_model(args: argparse.Namespace) -> int:
    from internvl_tune.demo.tiny_folder import write_tiny_model

    print(write_tiny_model(args.out, layout=args.layout, data=args.data, seed=args.seed, llm=args.llm).format())
    return 0


def _plot(args: argparse.Namespace) -> int:
    from internvl_tune.plot import plot_metrics

    print(f"wrote {plot_metrics(args.run, args.out)}")
    return 0


def _build_pairs(args: argparse.Namespace) -> int:
    from internvl_tune.preference_data.pairs import build_pairs

    summary = build_pairs(
        args.responses,
        args.out,
        num_pairs_per_key=args.num_pairs_per_key,
        seed=args.seed,
        answer_fix=args.answer_fix,
        scorers=args.scorers,
        image_root=args.image_root,
    )
    print(summary.format())
    return 0 if summary.meta_path else 1


def _fields_help(mpo: bool = False, rl: bool = False) -> str:
    import dataclasses

    from internvl_tune.config import DataArgs, ModelArgs, MPOArgs, RLArgs, TrainArgs, field_docs

    lines = ["fields (section.field=value):"]
    sections = [("model", ModelArgs), ("data", DataArgs), ("train", TrainArgs)]
    sections += ([("mpo", MPOArgs)] if mpo else []) + ([("rl", RLArgs)] if rl else [])
    for section, cls in sections:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section}.{f.name} [{default!r}]: {' '.join(docs[f.name].split())}")
    return "\n".join(lines)


def _command(
    sub: argparse._SubParsersAction, handler: Callable[[argparse.Namespace], int], name: str, **kwargs
) -> argparse.ArgumentParser:
    """A subcommand `name` run by `handler(args)`; it takes `--debug` (before or after the command name)."""
    command = sub.add_parser(name, **kwargs)
    # SUPPRESS: an absent --debug after the command leaves the one before it in place.
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    command.set_defaults(func=handler)
    return command


_DEBUG_HELP = f"show the traceback of a user error too (or set {DEBUG_ENV}=1)"


def build_parser() -> argparse.ArgumentParser:
    import typing

    from internvl_tune.config import SaveDtype

    dtypes = typing.get_args(SaveDtype)
    parser = argparse.ArgumentParser(
        prog="internvl-tune", description="Post-train InternVL models: SFT, MPO and online RL."
    )
    parser.add_argument("--version", action="version", version=f"internvl-tune {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    sft = _command(
        sub,
        _sft,
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

    mpo = _command(
        sub,
        _mpo,
        "mpo",
        help="Mixed Preference Optimization",
        description="MPO (sigmoid + bco_pair + sft by default) on MMPR-style preference data. Settings come from the "
        "YAML file (sections model, data, train, mpo), then key=value overrides; see configs/mpo/.",
        epilog=_fields_help(mpo=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mpo.add_argument("--config", required=True, help="YAML run file (sections model, data, train, mpo)")
    mpo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mpo.beta=0.1")

    rl = _command(
        sub,
        _rl,
        "rl",
        help="online RL (GSPO / GRPO) after MPO",
        description="Online RL, InternVL3.5's Cascade RL stage two: per step, rl.prompts_per_step prompts x "
        "rl.num_generations responses sampled by the policy, rewarded by rl.rewards (the judge), group advantages, "
        "GSPO (default) or GRPO updates on [prompt | r1 | ... | rG] rows. Settings come from the YAML file (sections "
        "model, data, train, rl), then key=value overrides; see configs/rl/ and docs/rl.md.",
        epilog=_fields_help(rl=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rl.add_argument("--config", required=True, help="YAML run file (sections model, data, train, rl)")
    rl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rl.num_generations=8")

    precompute = _command(
        sub,
        _precompute_ref,
        "precompute-ref",
        help="compute the reference log-probs of every pair once",
        description="Run the reference model over the MPO run's data once and write its log-probs to "
        "mpo.reference_cache; then `mpo` with mpo.reference=precomputed holds one model.",
    )
    precompute.add_argument("--config", required=True, help="the MPO run file")
    precompute.add_argument("overrides", nargs="*", help="key=value overrides")

    check = _command(
        sub,
        _check_data,
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
    check.add_argument(
        "--workers",
        type=int,
        help="processes checking records (0 or 1: this one; default: data.measure_workers, else the cores available)",
    )
    check.add_argument("--json", help="also write the report as JSON to this file")
    check.add_argument("overrides", nargs="*", help="key=value data overrides, e.g. max_dynamic_patch=6")

    convert = _command(
        sub,
        _convert,
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

    export = _command(
        sub,
        _export,
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

    chat = _command(
        sub,
        _chat,
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

    from internvl_tune.preference_data.prompts import DEFAULT_PROMPT_VERSION, PROMPT_VERSIONS

    sample = _command(
        sub,
        _sample,
        "sample",
        help="sample answers to questions with a ground truth (for build-pairs)",
        description="Answer each question of a prompt JSONL ({image, question, answer}) many times, in a prompt "
        "version of the original MMPR pipeline, with transformers (--backend hf) or an OpenAI-compatible server "
        "(--backend server: vLLM, LMDeploy, SGLang). Resumable: a stopped run continues where it stopped.",
    )
    sample.add_argument("inputs", nargs="+", metavar="PROMPTS", help="prompt JSONL file(s)")
    sample.add_argument(
        "--prompt-version",
        choices=list(PROMPT_VERSIONS),
        default=DEFAULT_PROMPT_VERSION,
        help="how the question is wrapped; a file name with _zh_ switches en to zh (default %(default)s, as the "
        "InternVL3 data scripts)",
    )
    _add_generation_args(sample, n_default=32, max_new_tokens=4096)

    dropout = _command(
        sub,
        _dropout_ntp,
        "dropout-ntp",
        help="rejected answers by dropout next-token prediction (for open-ended questions)",
        description="For each {image, question, chosen} line, keep the first --start-ratio of the chosen answer's "
        "words and let the model continue it without the image; rejected = prefix + continuation. Writes pair JSONL "
        "and a meta JSON for `internvl-tune mpo`. Resumable like sample.",
    )
    dropout.add_argument("inputs", nargs="+", metavar="PAIRS", help="JSONL file(s) with question and chosen")
    dropout.add_argument("--start-ratio", type=float, default=0.5, help="share of the chosen answer's words kept")
    _add_generation_args(dropout, n_default=1, max_new_tokens=2048)

    demo = _command(
        sub,
        _demo,
        "demo",
        help="tiny end-to-end run on a synthetic visual task (CPU, minutes)",
        description="Build a synthetic shapes task and a tiny InternVL, fine-tune it on CPU, "
        "evaluate on held-out images and write report.json.",
    )
    demo.add_argument("--output-dir", default="demo_out", help="where the data, model, run and report go")
    demo.add_argument("--quick", action="store_true", help="a shortened setting (for tests)")
    demo.add_argument("overrides", nargs="*", help="DemoSettings field=value overrides")

    tiny = _command(
        sub,
        _tiny_model,
        "tiny-model",
        help="write a random tiny InternVL (and a small dataset) to try the commands on",
        description="Write a random tiny InternVL folder (a few MB, built offline in seconds) in either layout, and "
        "with --data a small shapes dataset: SFT records (meta.json), preference pairs (pairs_train_meta.json), a "
        "benchmark and a prompt file. Its answers are noise: it is for trying the commands, not for results.",
    )
    tiny.add_argument("out", help="model folder to write (new or empty)")
    tiny.add_argument("--layout", choices=["hf", "original"], default="hf", help="checkpoint layout (default hf)")
    tiny.add_argument("--data", metavar="DIR", help="also write the dataset to this folder (new or empty)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    tiny.add_argument(
        "--llm",
        choices=["qwen2", "qwen3", "qwen3_moe", "gpt_oss"],
        default="qwen2",
        help="the LLM family: qwen2 (as InternVL 2.5 / 3) or one of InternVL3.5's (default qwen2)",
    )

    plot = _command(
        sub,
        _plot,
        "plot",
        help="draw a run's metrics.jsonl (loss, rewards, lr, throughput) into a PNG",
        description="Draw the metrics of an `sft` or `mpo` run against the step, one panel per group: loss (and "
        "MPO's terms), rewards and reward accuracy (MPO), learning rate, gradient norm, samples/s, tokens/s. "
        'Needs matplotlib: pip install "internvl-tune[plot]".',
    )
    plot.add_argument("run", help="run folder (its output_dir) or a metrics.jsonl file")
    plot.add_argument("--out", help="PNG to write (default: metrics.png beside metrics.jsonl)")

    from internvl_tune.judge import SCORERS
    from internvl_tune.preference_data.pairs import DEFAULT_NUM_PAIRS_PER_KEY

    pairs = _command(
        sub,
        _build_pairs,
        "build-pairs",
        help="sampled responses -> preference pairs by correctness",
        description="Judge each response of `sample`'s output against its ground truth and pair correct with "
        "incorrect (and with unparseable) responses of the same question. Writes the MMPR layout (raw/, pos_items/, "
        "neg_items/) and meta.json for `internvl-tune mpo`. Exits 1 when no pair could be built.",
    )
    pairs.add_argument(
        "responses", nargs="+", help="response JSONL files or folders of them (a file and its shards: one dataset)"
    )
    pairs.add_argument("--out", required=True, help="output folder")
    pairs.add_argument(
        "--num-pairs-per-key", type=int, default=DEFAULT_NUM_PAIRS_PER_KEY, help="most pairs of each kind per question"
    )
    pairs.add_argument("--seed", type=int, default=0, help="seeds the draw when a question has more pairs")
    pairs.add_argument(
        "--answer-fix",
        action="store_true",
        help="write correct answers as the ground truth spells them ('60°' -> '60')",
    )
    pairs.add_argument(
        "--scorers",
        default="auto",
        help="auto (by each record's source, else the file name), a kind (chartqa, docvqa, default, ...) or a "
        f"comma list of {', '.join(SCORERS)}",
    )
    pairs.add_argument(
        "--image-root", help="folder the image paths are relative to (as given to sample; needed for relative paths)"
    )

    from internvl_tune.evaluate.benchmark import PROMPTS

    evaluate = _command(
        sub,
        _eval,
        "eval",
        help="accuracy on a JSONL benchmark, scored by the judge",
        description="Answer each {image, question, answer, source} line of a benchmark (greedy by default) and "
        "judge the answers as build-pairs does. Prints the accuracy overall and per source; writes report.json, "
        "responses.jsonl (every response, its extracted answer and score) and predictions.tsv (VLMEvalKit's "
        "layout). Resumable: a stopped run continues where it stopped.",
    )
    evaluate.add_argument("benchmark", help="benchmark JSONL file")
    evaluate.add_argument("--out", required=True, help="output folder")
    evaluate.add_argument(
        "--prompt",
        choices=list(PROMPTS),
        default="direct",
        help="direct: the question as is; cot: the MPO chain-of-thought prompt, answer after 'Final answer:'",
    )
    evaluate.add_argument(
        "--scorers", default="auto", help="auto (by each line's source, else the file name), a kind or a comma list"
    )
    evaluate.add_argument(
        "--thinking",
        action="store_true",
        help="InternVL3.5 thinking mode: the template's thinking system prompt (hf backend), longer responses "
        "(default 16384 tokens); with or without it, an answer is read after its </think>",
    )
    evaluate.add_argument(
        "--max-new-tokens", type=int, help="longest response (default: direct 64, cot 4096, --thinking 16384)"
    )
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds each question's draw when sampling")
    evaluate.add_argument("--image-root", help="folder image paths are relative to (default: the benchmark's)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_backend_args(evaluate)
    return parser


def _close_process_group() -> None:
    """Destroy the run's process group after a command succeeded: left to interpreter teardown, gloo's threads can
    abort a rank ("terminate called without an active exception", seen after a ZeRO-3 precompute-ref) after its
    work is done. torch is not imported for commands that never used it."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _leave(code: int) -> int:
    """A rank of a launched multi-process run ends here with `code`, once its exit hooks have run (trackers,
    progress bars, the peer watch, data-loader workers, logging) and its output is flushed: the interpreter's
    teardown is skipped. In that teardown, any thread still inside a C++ call (gloo, the store, torch's own) is
    killed as it takes the GIL back, and the forced unwind through a noexcept frame aborts a rank whose work was
    done ("terminate called without an active exception", exit -6: seen after DDP, ZeRO-3 and benchmark runs, one
    run in many). Outside a launched run (one process, tests calling `main`) the code is returned as usual."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def drop_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    """transformers imports DeepSpeed (when installed) with every model it loads, and DeepSpeed then warns "Setting
    accelerator to CPU" on a machine without a GPU, for commands that never use it. The run's own log says the device
    and the engine (training/engine.py); this one line is dropped, every other DeepSpeed message kept."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").addFilter(drop_deepspeed_cpu_notice)  # its logger's name in deepspeed/utils
    if not sys.stderr.isatty():
        # transformers' "Loading weights" / "Writing model shards" bars are walls of carriage returns in a log file
        # or a pipe; it reads this setting when it is imported, which no command has done yet.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
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
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    # In a run of several processes, a rank that stops tells the others, which stop too (training/failure.py).
    from internvl_tune.training.failure import peer_failure, report_failure

    try:
        code = args.func(args)
        _close_process_group()
        return _leave(code)
    except UserError as e:
        if debug:
            import traceback

            traceback.print_exc()
        line = f"error: {' '.join(str(e).splitlines())}"
        print(line, file=sys.stderr)
        report_failure(2, line)
        return _leave(2)
    except KeyboardInterrupt as e:  # a training run's TrainingInterrupted says what it saved
        print(str(e) or "interrupted", file=sys.stderr)
        return _leave(130)
    except Exception as e:
        peer = peer_failure()  # this rank's error may only be the consequence of another's
        if peer is not None and not debug:
            code, line = peer
            print(f"error: {line}", file=sys.stderr)
            return _leave(code)
        report_failure(1, f"{type(e).__name__}: {' '.join(str(e).splitlines())}")
        raise


if __name__ == "__main__":
    sys.exit(main())
