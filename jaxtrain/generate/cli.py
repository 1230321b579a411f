"""`python -m jaxtrain.generate`: completions of prompts from a trained run or a Hugging Face
model, printed (and written with ``--output``).

    python -m jaxtrain.generate --workdir=runs/sft --prompt="What is 2 + 3?"
    python -m jaxtrain.generate --workdir=runs/lm --prompt="ROMEO:" --max_new_tokens=100 \\
        --temperature=0.8 --top_p=0.95 --seed=1
    python -m jaxtrain.generate --hf=path/to/hf_model --prompts_file=prompts.jsonl \\
        --output=completions.jsonl

Prompts: ``--prompt`` (repeatable) and/or ``--prompts_file``: one prompt a line (blank lines
skipped), or ``.jsonl`` rows with ``"prompt"`` (a string) or ``"messages"`` (a conversation
ending with the turn to answer). ``--chat`` makes string prompts user turns of the chat
template; by default a run trained on conversations (chat SFT, DPO) reads them as chat, any
other run and a Hugging Face model as plain text. Which checkpoint of a run: ``--checkpoint``
(``latest``, ``best``, a step). :mod:`jaxtrain.generate.load` says what is loaded,
:mod:`jaxtrain.generate.text` how prompts are rendered and completions cut.

Output (``--output=FILE.jsonl``): one row per prompt: ``prompt``, ``completion`` (text),
``tokens`` (the generated ids), ``output_tokens``, ``prompt_tokens``, ``finish_reason``
(``stop``: eos or end of turn; ``length``: ``--max_new_tokens`` reached).

Exit codes: 0 done; 2 bad input, with one message and no traceback: missing or contradictory
flags, a workdir without a checkpoint or of another kind of model (CLIP), a missing step, a
prompt longer than the model's context (the run's ``data.seq_len``, DPO ``data.max_length``;
HF: ``max_position_embeddings``), a bad prompts file (its line named). All of these are found
before anything compiles.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from jaxtrain.cli import EXIT_OK, failure_exit_code, parse_flags, setup_logging
from jaxtrain.errors import ConfigError
from jaxtrain.generate.load import LoadedModel, load_hf_dir, load_run
from jaxtrain.generate.text import Prompt, TextFormat


def _define_flags() -> dict[str, Any]:
    """The CLI's flags (defined by :func:`run` only, so importing this module defines none)."""
    return {
        "workdir": flags.DEFINE_string("workdir", None, "A jaxtrain language-model run (lm, "
                                       "SFT, DPO, LoRA) to generate from."),
        "hf": flags.DEFINE_string("hf", None, "A Hugging Face model directory to generate from "
                                  "(instead of --workdir)."),
        "tokenizer": flags.DEFINE_string("tokenizer", None, "--hf: the tokenizer (default: the "
                                         "one in the --hf directory)."),
        "checkpoint": flags.DEFINE_string("checkpoint", "latest", "--workdir: 'latest', 'best' "
                                          "(checkpoint.best_metric) or a step number."),
        "prompts": flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable)."),
        "prompts_file": flags.DEFINE_string("prompts_file", None, "One prompt a line, or .jsonl "
                                            "rows with 'prompt' or 'messages'."),
        "chat": flags.DEFINE_bool("chat", None, "String prompts are user turns of the chat "
                                  "template (default: yes for runs trained on chat data / DPO)."),
        "max_new_tokens": flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at "
                                               "most per prompt."),
        "temperature": flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = "
                                          "greedy."),
        "top_k": flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens; 0 = "
                                      "all."),
        "top_p": flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of tokens "
                                    "with this probability mass; 1 = all."),
        "seed": flags.DEFINE_integer("seed", 0, "Sampling seed (the same seed, the same "
                                     "samples)."),
        "batch_size": flags.DEFINE_integer("batch_size", 8, "Prompts decoded together."),
        "output": flags.DEFINE_string("output", None, "Write the completions here (.jsonl)."),
    }


_FLAGS: dict[str, Any] = {}


@dataclasses.dataclass(frozen=True)
class PromptIn:
    """A prompt and where it came from (for messages: "--prompt 0", "prompts.jsonl line 3")."""

    value: Prompt
    where: str


def read_prompts_file(path: str) -> list[PromptIn]:
    """The prompts of `path`: one per non-blank line, or (``.jsonl``) one per row, a string
    ``prompt`` or a list ``messages``. A ConfigError names the file and line (1-based)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--prompts_file {path!r} does not exist.")
    jsonl = path.endswith(".jsonl")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompts_file {path!r} is not UTF-8 ({e}).") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        if not jsonl:
            out.append(PromptIn(line, where))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e}); each line must be an object with "
                              "'prompt' (a string) or 'messages' (a list of {role, content})."
                              ) from None
        value = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        if not (isinstance(value, str) or (isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and
                isinstance(m.get("content"), str) for m in value))):
            raise ConfigError(f"{where}: expected an object with 'prompt' (a string) or "
                              "'messages' (a non-empty list of {role, content} strings), got "
                              f"{line[:100]!r}.")
        out.append(PromptIn(value, where))
    if not out:
        raise ConfigError(f"--prompts_file {path!r} has no prompts.")
    return out


def _check_flags(v: dict[str, Any]) -> None:
    if bool(v["workdir"]) == bool(v["hf"]):
        raise ConfigError("Give exactly one of --workdir (a jaxtrain run) and --hf (a Hugging "
                          "Face model directory).")
    if not v["prompts"] and not v["prompts_file"]:
        raise ConfigError("Give --prompt=... (repeatable) or --prompts_file=FILE.")
    if v["tokenizer"] and not v["hf"]:
        raise ConfigError("--tokenizer goes with --hf; a run uses its own data.tokenizer.")
    rules = [("max_new_tokens", v["max_new_tokens"] >= 1, ">= 1"),
             ("temperature", v["temperature"] >= 0, ">= 0 (0 = greedy)"),
             ("top_k", v["top_k"] >= 0, ">= 0 (0 = off)"),
             ("top_p", 0 < v["top_p"] <= 1, "in (0, 1] (1 = off)"),
             ("batch_size", v["batch_size"] >= 1, ">= 1")]
    for name, ok, rule in rules:
        if not ok:
            raise ConfigError(f"--{name}={v[name]} must be {rule}.")
    if v["output"] and not v["output"].endswith(".jsonl"):
        raise ConfigError(f"--output={v['output']!r} must be a .jsonl file.")


def _encode(model: LoadedModel, fmt: TextFormat, prompts: Sequence[PromptIn],
            context_name: str) -> list[list[int]]:
    """Every prompt's ids, checked against the model's context before anything compiles."""
    out = []
    for p in prompts:
        try:
            ids = fmt.encode(p.value)
        except ValueError as e:
            raise ConfigError(f"{p.where}: {e}") from None
        if not ids:
            raise ConfigError(f"{p.where}: the prompt has no tokens.")
        if model.max_context and len(ids) >= model.max_context:
            raise ConfigError(
                f"{p.where}: the prompt has {len(ids)} tokens, but the model's context is "
                f"{model.max_context} tokens ({context_name}) and must hold the prompt and at "
                "least one new token: shorten the prompt.")
        out.append(ids)
    return out


def generate_completions(
    *, workdir: str | None = None, hf: str | None = None, tokenizer: str | None = None,
    checkpoint: str = "latest", prompts: Sequence[str] = (), prompts_file: str | None = None,
    chat: bool | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
    top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
    output: str | None = None,
) -> list[dict[str, Any]]:
    """What `python -m jaxtrain.generate` does with its flags' values: the completions, as the
    rows of ``--output``; printed to stdout. ConfigError on bad input (before compiling)."""
    values = dict(locals())
    _check_flags(values)
    given = [PromptIn(p, f"--prompt {i}") for i, p in enumerate(prompts)]
    if prompts_file:
        given += read_prompts_file(prompts_file)
    if workdir:
        model = load_run(workdir, checkpoint)
        context_name = "the run's data.seq_len / data.max_length"
    else:
        model = load_hf_dir(hf, tokenizer or "")
        context_name = "max_position_embeddings"
    fmt = TextFormat(model.tokenizer, chat=model.chat if chat is None else chat,
                     add_special_tokens=model.add_special_tokens)
    ids = _encode(model, fmt, given, context_name)
    logging.info("Generating from %s: %d prompts, chat=%s.", model.where, len(given), fmt.chat)

    from jaxtrain.generate.decode import Generator, SamplingConfig

    generator = Generator(model.cfg, model.params, pad_id=fmt.pad_id,
                          max_context=model.max_context or None)
    rows = []
    for start in range(0, len(given), batch_size):
        batch = given[start:start + batch_size]
        chats = [fmt.is_chat(p.value) for p in batch]
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed + start,
                                  eos_ids=fmt.eos_ids,
                                  stop_ids=fmt.turn_end_ids if any(chats) else ())
        completions = generator.generate(ids[start:start + batch_size], sampling)
        for p, is_chat, c in zip(batch, chats, completions, strict=True):
            text, count, stopped = fmt.completion_text(c.tokens, chat=is_chat)
            rows.append({"prompt": p.value, "completion": text, "tokens": list(c.tokens)[:count],
                         "output_tokens": count, "prompt_tokens": len(c.prompt_tokens),
                         "finish_reason": "stop" if stopped else c.finish_reason})
            _print(len(rows) - 1, rows[-1])
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        logging.info("Wrote %d completions to %s.", len(rows), output)
    return rows


def _print(index: int, row: dict[str, Any]) -> None:
    prompt = row["prompt"] if isinstance(row["prompt"], str) else "\n".join(
        f"[{m['role']}] {m['content']}" for m in row["prompt"])
    sys.stdout.write(f"--- prompt {index} ---\n{prompt}\n--- completion {index} "
                     f"({row['finish_reason']}, {row['output_tokens']} tokens) ---\n"
                     f"{row['completion']}\n")
    sys.stdout.flush()


def main(argv: Sequence[str]) -> int:
    """absl's entry: :func:`generate_completions` with the flags' values; the exit code."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
    try:
        generate_completions(**{k: v.value for k, v in _FLAGS.items()})
    except (Exception, KeyboardInterrupt) as e:
        code = failure_exit_code(e)
        if code is None:
            raise
        return code
    return EXIT_OK


def run() -> None:
    """Define the flags (once) and run `python -m jaxtrain.generate`."""
    if not _FLAGS:
        _FLAGS.update(_define_flags())
    setup_logging()
    app.run(main, flags_parser=parse_flags)
