"""Run every shell command of README.md as written, on tiny stand-ins for the models and data it names.

    python tools/readme_commands.py              # build the stand-ins in a temporary folder, run, report
    python tools/readme_commands.py --list       # the commands, what happens to each, the stand-ins; runs nothing
    python tools/readme_commands.py --no-demo    # leave out `make demo` (about 6 minutes)
    python tools/readme_commands.py --keep DIR   # work in DIR and keep it, with each command's stdout and stderr

The commands are the lines of the README's ```bash blocks (comments cut, `\\` continuations joined) and the `make`
and `pip install` commands quoted inline in its prose. Each one meets the first rule of RULES that matches it:
it is run, or skipped with the reason. A run command keeps its text: the paths it names (`./InternVL3-1B-hf`,
`data/meta.json`, `configs/...`) are created in a scratch folder that is its working directory, as tiny
stand-ins (STANDINS), and only training commands get arguments appended (APPENDED: a one-step run). So a
README edit that names a new path or a new kind of command fails `tests/unit/test_readme_commands.py` until a
stand-in or a rule is added here.

Each run has stdin closed, a time limit, the venv's `bin` first on PATH and HF_HUB_OFFLINE=1 (nothing downloads).
The report gives each command's exit code and wall time, and flags a traceback, a `[y/N]`-style prompt, warning
lines and a timeout. The script exits 1 if any run command failed, was flagged for a traceback or prompt, or
timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# README path -> what is built there. Paths the commands write themselves (convert / export outputs) are not here.
STANDINS = {
    "InternVL3-1B-hf": "tiny HF-layout InternVL (internvl_tune.testing.tiny.save_tiny_model)",
    "InternVL3-1B-Instruct": "tiny HF-layout InternVL (same builder, seed 1)",
    "my-model-hf": "tiny HF-layout InternVL (same builder, seed 2)",
    "InternVL2_5-8B": "tiny ORIGINAL-layout checkpoint, InternLM2 LLM (internvl_tune.testing.original_checkpoint)",
    "data/meta.json": "8 SFT records of the demo's shapes task, images included (internvl_tune.demo.task)",
    "MMPR/meta.json": "8 MMPR pairs of the same task (internvl_tune.demo.task.make_pairs)",
    "data/images": "the images of data/meta.json",
    "data/benchmark.jsonl": "the shapes task's benchmark (make_task): 3 questions on a held-out image, its path "
    "relative to data/images (the README's --image-root)",
    "responses": "responses as `sample` writes them to the benchmark's questions: one right and one wrong answer each",
    "data/prompts.jsonl": "the benchmark's questions as a prompt file: {image, question, answer}",
    "data/captions.jsonl": "the benchmark's questions with their answers as chosen: {image, question, chosen}",
    "cat.jpg": "a 160x120 JPEG of the shapes task",
    "runs/lora/final_adapter": "LoRA adapter: configs/sft/internvl2_5_2b_lora.yaml on a tiny base, 1 step",
    "configs": "a copy of the repository's configs/",
    "InternVL3_5-1B-MPO": "tiny HF-layout InternVL (same builder, seed 4)",
    "prompts/meta.json": "a meta JSON naming data/prompts.jsonl (images under data/images), for rl",
}

# Appended to commands that train: one optimizer step instead of an epoch of a real dataset.
APPENDED = ["train.max_steps=1"]
# Appended to commands that generate: two short answers per question instead of 32 of up to 4096 tokens.
GENERATION_APPENDED = ("--num-return-sequences", "2", "--max-new-tokens", "8", "--no-progress")
# Appended to `rl`: one step of 2 prompts x 2 short responses instead of 512 x 16 of up to 32k tokens.
RL_APPENDED = (
    *APPENDED,
    "rl.prompts_per_step=2",
    "rl.mini_batch_size=2",
    "rl.num_generations=2",
    "rl.max_new_tokens=8",
)
# Appended to `eval`: short answers instead of a chain of thought of up to 4096 tokens.
EVAL_APPENDED = ("--max-new-tokens", "8", "--no-progress")

TIMEOUT_S = 300
DEMO_TIMEOUT_S = 900  # the README says ~6 min (busy 2 cores); the demo must stay within 15


@dataclass(frozen=True)
class Command:
    line: int  # README line where the command starts
    text: str


@dataclass(frozen=True)
class Rule:
    pattern: str  # re.match against the command text
    skip: str = ""  # reason; empty = run
    append: tuple[str, ...] = ()
    in_repo: bool = False  # run in the repository (make) instead of the scratch folder
    timeout_s: int = TIMEOUT_S


RULES = (
    Rule(r"make demo$", in_repo=True, timeout_s=DEMO_TIMEOUT_S),
    Rule(r"make test TORCH_SPEC=", skip="GPU install: a CUDA torch wheel from the network, then the suite"),
    Rule(r"make test$", skip="the test suite: out of scope here"),
    Rule(r"make test-min$", skip="builds .venv-min from the network, then the test suite: out of scope here"),
    Rule(r"python -m venv ", skip="GPU install: creates and activates another environment"),
    Rule(r"\. \.venv/bin/activate$", skip="activates .venv: every run here has the venv's bin first on PATH"),
    Rule(r"pip install ", skip="GPU install: installs packages into the active environment"),
    Rule(r"accelerate launch --num_processes 8 ", skip="8 processes (GPUs); `...` stands for a run file"),
    Rule(r"accelerate launch --config_file configs/accelerate/ddp\.yaml ", skip="online RL on 8 GPUs (DDP)"),
    Rule(
        r"accelerate launch --config_file configs/accelerate/fsdp2\.yaml .* rl ",
        skip="online RL on 4 GPUs (FSDP2) with a vLLM server on the other 4",
    ),
    Rule(r"accelerate launch --config_file configs/accelerate/", skip="DeepSpeed ZeRO-3 on 8 GPUs"),
    Rule(r"internvl-tune (sft|mpo) ", append=tuple(APPENDED)),
    Rule(r"internvl-tune rl ", append=RL_APPENDED),
    Rule(r"vllm serve ", skip="a vLLM server on a GPU"),
    Rule(r"internvl-tune sample .*--backend server", skip="needs the vLLM server of the line before"),
    Rule(r"internvl-tune (sample|dropout-ntp) ", append=GENERATION_APPENDED),
    Rule(r"internvl-tune eval ", append=EVAL_APPENDED),
    Rule(r"internvl-tune (precompute-ref|check-data|convert|export|chat|build-pairs|tiny-model|plot) "),
)


def extract_commands(readme: str) -> list[Command]:
    """The commands of a README: each line of its ```bash blocks and the inline `make ...` / `pip install ...`.

    Example:
        "```bash\\nmake demo   # tiny run\\n```\\nThen `make test-min`." -> [Command(2, "make demo"),
        Command(4, "make test-min")]
    """
    commands = []
    in_block = in_bash = False
    pending: tuple[int, str] | None = None  # a command continued with `\\`: its first line and text so far
    for number, line in enumerate(readme.splitlines(), start=1):
        if line.startswith("```"):
            in_bash = not in_block and line.strip() == "```bash"
            in_block = not in_block
        elif in_bash:
            start, text = pending or (number, "")
            text, pending = f"{text} {_cut_comment(line).strip()}".strip(), None
            if text.endswith("\\"):
                pending = (start, text[:-1].rstrip())
            elif text:
                commands.append(Command(start, text))
        elif not in_block:
            commands += [Command(number, span) for span in re.findall(r"`((?:make [a-z]|pip install )[^`]*)`", line)]
    return commands


def _cut_comment(line: str) -> str:
    """The line up to a shell comment: a `#` at the start or after a blank, outside quotes."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def rule_for(command: Command) -> Rule:
    for rule in RULES:
        if re.match(rule.pattern, command.text):
            return rule
    raise LookupError(f"README.md:{command.line}: no rule in tools/readme_commands.py for `{command.text}`")


def unresolved_paths(commands: list[Command]) -> list[str]:
    """Paths named by the run commands (and by their run files) that no stand-in, earlier command or repository
    config provides, as `README.md:line: path` strings."""
    produced: set[str] = set()
    missing = []
    for command in commands:
        rule = rule_for(command)
        if rule.skip or rule.in_repo:
            continue
        tokens = shlex.split(command.text)
        if tokens[1] in ("convert", "export"):
            produced.add(_key(tokens[3]))  # internvl-tune convert|export SRC DST ...
        if tokens[1] == "tiny-model":
            produced.add(_key(tokens[2]))  # internvl-tune tiny-model OUT [--data DIR]
        for option in ("--out", "--data"):
            if option in tokens:
                produced.add(_key(tokens[tokens.index(option) + 1]))  # an output folder, and what is in it
        produced.update(_key(t.partition("=")[2]) for t in tokens if t.partition("=")[0].endswith("output_dir"))
        for path in map(_key, _named_paths(tokens)):
            made = path in produced or any(path.startswith(folder + "/") for folder in produced)
            known = (REPO / path).is_file() if path.startswith("configs/") else path in STANDINS or made
            if not known:
                missing.append(f"README.md:{command.line}: {path}")
    return missing


def _named_paths(tokens: list[str]) -> list[str]:
    """Path-like arguments (`key=value` values included), and the model and meta paths of a `--config` run file
    that the command does not override."""
    overridden = {token.partition("=")[0].rpartition(".")[2] for token in tokens if "=" in token}
    paths = []
    for previous, token in zip(tokens[1:-1], tokens[2:], strict=True):
        key, _, value = token.partition("=") if "=" in token else ("", "", token)
        if key.endswith("output_dir"):
            continue  # written by the command
        if not value.startswith("-") and re.search(r"/|\.(json|jsonl|yaml|yml|jpg|jpeg|png)$", value):
            paths.append(value)
        if previous == "--config" and (REPO / _key(value)).is_file():
            run_file = yaml.safe_load((REPO / _key(value)).read_text())
            fields = (("model", "model_name_or_path"), ("data", "meta_path"))
            paths += [run_file[section][field] for section, field in fields if field not in overridden]
    return paths


def _key(path: str) -> str:
    return path.removeprefix("./").rstrip("/")


def build_standins(root: Path) -> None:
    """Create every STANDINS path under `root` (a LoRA run included: about half a minute on a CPU)."""
    import random

    from transformers.utils import logging as transformers_logging

    from internvl_tune.demo.task import draw_scene, make_pairs, make_task, sample_scene
    from internvl_tune.testing.original_checkpoint import build_original_checkpoint
    from internvl_tune.testing.tiny import save_tiny_model

    transformers_logging.disable_progress_bar()  # the builders' saves; the commands keep theirs
    for seed, name in enumerate(("InternVL3-1B-hf", "InternVL3-1B-Instruct", "my-model-hf")):
        save_tiny_model(root / name, seed=seed)
    build_original_checkpoint(root / "InternVL2_5-8B", llm="internlm2")
    data = make_task(root / "data", num_train=8, num_eval=1, seed=0)
    benchmark = [json.loads(line) for line in data.benchmark.read_text().splitlines()]
    for record in benchmark:
        record["image"] = record["image"].removeprefix("images/")  # relative to data/images, the README's --image-root
    data.benchmark.write_text("".join(json.dumps(r) + "\n" for r in benchmark))
    responses = []
    for record in benchmark:
        image, question, answer = record["image"], record["question"], record["answer"]
        item = {"image": image, "question": question, "answer": answer, "prompt_version": "en"}
        item["question_orig"] = question
        for said in (answer, "I cannot tell"):
            responses.append({**item, "response": f"I look at the image.\nI check it.\nFinal answer: {said}"})
    (root / "responses").mkdir()
    (root / "responses" / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
    prompts = [{k: r[k] for k in ("image", "question", "answer")} for r in responses[::2]]
    (root / "data" / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    captions = [{"image": p["image"], "question": p["question"], "chosen": p["answer"]} for p in prompts]
    (root / "data" / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    pairs = make_pairs(make_task(root / "MMPR", num_train=8, num_eval=1, seed=1), seed=1)
    shutil.copyfile(pairs.train_meta, root / "MMPR" / "meta.json")
    draw_scene(sample_scene(random.Random(0)), noise_seed=0).convert("RGB").resize((160, 120)).save(root / "cat.jpg")
    shutil.copytree(REPO / "configs", root / "configs")
    save_tiny_model(root / "InternVL3_5-1B-MPO", seed=4)
    (root / "prompts").mkdir()
    prompts_meta = {"shapes_prompts": {"root": "../data/images", "annotation": "../data/prompts.jsonl"}}
    (root / "prompts" / "meta.json").write_text(json.dumps(prompts_meta))

    save_tiny_model(root / "lora-base", seed=3)
    lora = [sys.executable, "-m", "internvl_tune.cli", "sft", "--config", "configs/sft/internvl2_5_2b_lora.yaml"]
    lora += ["model.model_name_or_path=lora-base", "train.output_dir=runs/lora", *APPENDED]
    done = subprocess.run(lora, cwd=root, env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: building runs/lora/final_adapter failed:\n{done.stderr[-3000:]}")


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class Result:
    command: Command
    skipped: str = ""
    shell: str = ""
    returncode: int | None = None
    seconds: float = 0.0
    flags: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return not self.skipped and (self.returncode != 0 or bool({"Traceback", "prompt", "timeout"} & {*self.flags}))


def run_command(command: Command, rule: Rule, workdir: Path, logs: Path, index: int) -> Result:
    shell = " ".join([command.text, *rule.append])
    start = time.perf_counter()
    process = subprocess.Popen(
        ["bash", "-c", shell],
        cwd=REPO if rule.in_repo else workdir,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a timeout kills the command's whole process group
    )
    flags = []
    try:
        out, err = process.communicate(timeout=rule.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        flags.append("timeout")
    seconds = time.perf_counter() - start
    (logs / f"{index:02d}.out").write_text(out)
    (logs / f"{index:02d}.err").write_text(err)
    both = out + err
    if "Traceback (most recent call last)" in both:
        flags.append("Traceback")
    if re.search(r"\[y/n\]|\(y/n\)", both, re.I):
        flags.append("prompt")
    warnings = sum(1 for line in both.splitlines() if re.search(r"warn", line, re.I))
    if warnings:
        flags.append(f"{warnings} warning lines")
    return Result(command, shell=shell, returncode=process.returncode, seconds=seconds, flags=tuple(flags))


def print_plan(commands: list[Command]) -> None:
    print("Stand-ins (README path -> built in the scratch folder, the working directory of the commands):\n")
    print("| README path | stand-in |\n|---|---|")
    for path, what in STANDINS.items():
        print(f"| `{path}` | {what} |")
    print(f"\nAppended to training commands: `{' '.join(APPENDED)}`.")
    print(f"Every run: stdin closed, HF_HUB_OFFLINE=1, time limit {TIMEOUT_S} s ({DEMO_TIMEOUT_S} s for make demo,")
    print("which runs in the repository).\n")
    print("| line | command | plan |\n|---|---|---|")
    for command in commands:
        rule = rule_for(command)
        plan = f"skip: {rule.skip}" if rule.skip else "run" + (f" + `{' '.join(rule.append)}`" if rule.append else "")
        print(f"| {command.line} | `{command.text}` | {plan} |")
    print()


def print_results(results: list[Result], logs: Path) -> None:
    print("| line | command | exit | time | notes |\n|---|---|---|---|---|")
    for r in results:
        if r.skipped:
            print(f"| {r.command.line} | `{r.command.text}` | skipped | | {r.skipped} |")
        else:
            mark = "FAIL " if r.failed else ""
            print(
                f"| {r.command.line} | `{r.shell}` | {mark}{r.returncode} | {r.seconds:.1f} s | {', '.join(r.flags)} |"
            )
    print(f"\nstdout and stderr of each command: {logs}/NN.out, NN.err (NN = the row, from 00)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--list", action="store_true", help="print the commands and the plan, run nothing")
    parser.add_argument("--no-demo", action="store_true", help="skip `make demo` (about 6 minutes)")
    parser.add_argument("--keep", type=Path, help="scratch folder to use and keep (must not exist)")
    args = parser.parse_args(argv)

    commands = extract_commands(args.readme.read_text())
    try:
        print_plan(commands)
    except LookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    missing = unresolved_paths(commands)
    if missing:
        print("error: paths with no stand-in:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    if args.list:
        return 0

    if args.keep:
        args.keep.mkdir(parents=True)
    workdir = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="readme_commands-"))
    logs = workdir / "logs"
    logs.mkdir()
    start = time.perf_counter()
    build_standins(workdir)
    print(f"stand-ins built in {workdir} ({time.perf_counter() - start:.0f} s)\n")

    results = []
    for index, command in enumerate(commands):
        rule = rule_for(command)
        skip = rule.skip or ("--no-demo" if args.no_demo and command.text == "make demo" else "")
        if skip:
            results.append(Result(command, skipped=skip))
            continue
        print(f"$ {' '.join([command.text, *rule.append])}", flush=True)
        result = run_command(command, rule, workdir, logs, index)
        results.append(result)
        if result.failed:
            print("  " + "\n  ".join((logs / f"{index:02d}.err").read_text().splitlines()[-15:]), flush=True)
    print()
    print_results(results, logs)
    failed = [r for r in results if r.failed]
    if not args.keep and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
        print("(all passed: scratch folder removed; --keep DIR keeps it)")
    print(f"\n{len(results) - len(failed)} of {len(results)} commands passed or skipped; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
