"""`haina <stage> …`: subcommands mapped onto typed functions.

Each command is a plain Python function. Its signature becomes the options (types, defaults,
`Literal` choices, `bool` as --flag/--no-flag, `list[...]` as several values) and its Google-style
docstring becomes the help text. Functions are imported only when their command runs, so
`haina --help` stays fast and a broken optional extra cannot break unrelated commands.

A function with a parameter named `overrides` receives every unknown `--section.key=value`; positional-only
parameters (`def f(reports: list[str], /)`) are positional on the command line (`haina eval compare A B`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from haina.core.config import coerce
from haina.core.errors import HainaError

# command path -> "module:function". Order is the order shown in `haina --help`.
COMMANDS: dict[tuple[str, ...], str] = {
    ("quickstart",): "haina.quickstart:quickstart",
    ("data", "prepare"): "haina.data.prepare.command:prepare",
    ("data", "augment"): "haina.data.prepare.augment:augment_command",
    ("data", "tokenize"): "haina.data.tokenize:tokenize_command",
    ("data", "instruct"): "haina.data.instruct:instruct_command",
    ("data", "tasks"): "haina.data.tasks:tasks_command",
    ("tokenizer", "train"): "haina.tokenizer.train:train_command",
    ("model", "params"): "haina.model.params:params_command",
    ("pretrain",): "haina.train.pretrain:pretrain",
    ("finetune", "sft"): "haina.finetune.command:sft_command",
    ("finetune", "continue"): "haina.finetune.continued:continue_command",
    ("finetune", "distill"): "haina.finetune.distill:distill_command",
    ("finetune", "dpo"): "haina.finetune.dpo:dpo_command",
    ("finetune", "classify"): "haina.finetune.classify:classify_command",
    ("finetune", "embed"): "haina.finetune.embed:embed_command",
    ("finetune", "merge"): "haina.finetune.command:merge_command",
    ("classify",): "haina.finetune.predict:predict_command",
    ("tune",): "haina.finetune.tune:tune_command",
    ("compress", "quantize"): "haina.compress.quantize:quantize_command",
    ("compress", "prune"): "haina.compress.prune:prune_command",
    ("generate",): "haina.generate.command:generate_command",
    ("chat",): "haina.generate.chat:chat_command",
    ("embed",): "haina.generate.embed:embed_command",
    ("export", "hf"): "haina.export.hf:export_hf_command",
    ("export", "peft"): "haina.export.peft:export_peft_command",
    ("export", "onnx"): "haina.export.onnx:export_onnx_command",
    ("export", "gguf"): "haina.export.gguf:export_gguf_command",
    ("export", "checkpoint"): "haina.export.consolidate:export_checkpoint_command",
    ("import", "hf"): "haina.export.hf:import_hf_command",
    ("eval", "lm"): "haina.eval.lm:eval_lm_command",
    ("eval", "generate"): "haina.eval.textgen:eval_generate_command",
    ("eval", "classify"): "haina.eval.classify:eval_classify_command",
    ("eval", "efficiency"): "haina.eval.efficiency:eval_efficiency_command",
    ("eval", "attention"): "haina.eval.attention:eval_attention_command",
    ("eval", "harness"): "haina.eval.harness:eval_harness_command",
    ("eval", "compare"): "haina.eval.compare:compare_command",
    ("serve",): "haina.rag.serving:serve_rag_command",
    ("rag", "collection"): "haina.rag.command:collection_command",
    ("rag", "index"): "haina.rag.command:index_command",
    ("rag", "upsert"): "haina.rag.command:upsert_command",
    ("rag", "update"): "haina.rag.command:update_command",
    ("rag", "delete"): "haina.rag.command:delete_command",
    ("rag", "get"): "haina.rag.command:get_command",
    ("rag", "query"): "haina.rag.command:query_command",
    ("rag", "stats"): "haina.rag.command:stats_command",
    ("rag", "ask"): "haina.rag.ask:ask_command",
    ("rag", "qa"): "haina.rag.qa:qa_command",
    ("rag", "eval"): "haina.rag.evaluate:rag_eval_command",
}

GROUP_HELP = {
    "data": "prepare raw text (clean, filter, dedup, split) and tokenize it into shards",
    "tokenizer": "train byte-level BPE or character tokenizers",
    "model": "inspect model presets and configs",
    "finetune": "fine-tune a model: sft, continue, distill, dpo, classify, embed (all weights or LoRA), merge adapters",
    "eval": "evaluate a checkpoint (perplexity, generation, classification, efficiency, attention, lm-eval) and "
            "compare reports",
    "compress": "shrink a checkpoint: quantize (int8, int4) or prune (unstructured or whole heads/channels)",
    "export": "write checkpoints in other ecosystems' formats",
    "import": "read checkpoints from other ecosystems' formats",
    "rag": "retrieval: vector-store collections, document indexing, hybrid (dense + BM25) search",
}


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _doc_parts(fn) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its description and per-argument help."""
    doc = inspect.getdoc(fn) or ""
    parts = re.split(r"^Args:\s*$", doc, maxsplit=1, flags=re.MULTILINE)
    description = parts[0].strip()
    args: dict[str, str] = {}
    if len(parts) == 2:
        current = None
        for line in parts[1].splitlines():
            if re.match(r"^\S", line):  # a new section (Returns:, Raises:) ends Args
                break
            m = re.match(r"^\s{2,6}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
            if m:
                current = m.group(1)
                args[current] = m.group(2)
            elif current and line.strip():
                args[current] += " " + line.strip()
    return description, args


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip Optional; return (type, is_optional)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _add_function_args(parser: argparse.ArgumentParser, fn) -> None:
    hints = get_type_hints(fn)
    _, arg_help = _doc_parts(fn)
    for name, param in inspect.signature(fn).parameters.items():
        if name == "overrides":
            continue
        tp, _ = _base_type(hints.get(name, str))
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:  # `def f(paths: list[str], /)`: `haina cmd A B`
            many = get_origin(tp) in (list, tuple)
            parser.add_argument(name, nargs="+" if many else None, metavar=name.upper().removesuffix("S"),
                                help=arg_help.get(name) or None)
            continue
        flag = "--" + name.replace("_", "-")
        required = param.default is inspect.Parameter.empty
        default = None if required else param.default
        help_text = arg_help.get(name, "")
        if not required and default is not None and default is not False and default not in ([], ()):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": name, "help": help_text.strip() or None}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        origin = get_origin(tp)
        if origin in (list, tuple):
            # Repeating the flag adds values (`--stop a --stop b`), as one flag with several does (`--stop a b`);
            # the default is filled in by `_call`, so that the values given do not extend it.
            kwargs["nargs"], kwargs["action"], default = "+", "extend", None
            inner = (get_args(tp) or (str,))[0]
            kwargs["metavar"] = getattr(inner, "__name__", "VALUE").upper()
        elif origin is Literal:
            kwargs["choices"] = [str(c) for c in get_args(tp)]
        else:
            kwargs["metavar"] = getattr(tp, "__name__", "VALUE").upper()
        parser.add_argument(flag, required=required, default=default, **kwargs)


def _call(fn, ns: argparse.Namespace, extra: list[str]) -> Any:
    hints = get_type_hints(fn)
    sig = inspect.signature(fn)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name in sig.parameters:
        if name == "overrides":
            kwargs[name] = _collect_overrides(extra)
            continue
        value = getattr(ns, name)
        if value is None and sig.parameters[name].default is not inspect.Parameter.empty:
            value = sig.parameters[name].default
        if value is not None and name in hints:
            value = coerce(value, _base_type(hints[name])[0], "--" + name.replace("_", "-"))
        if sig.parameters[name].kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[name] = value
    if extra and "overrides" not in sig.parameters:
        raise HainaError(f"unrecognized arguments: {' '.join(extra)}")
    return fn(*args, **kwargs)


def _collect_overrides(extra: list[str]) -> list[str]:
    """Accept `--a.b=1` and `--a.b 1`; anything else is an error."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            raise HainaError(f"unexpected argument '{item}'; overrides look like --section.key=value")
        if "=" in item:
            out.append(item[2:])
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append(f"{item[2:]}={extra[i + 1]}")
            i += 1
        else:
            raise HainaError(f"override '{item}' has no value; write {item}=VALUE")
        i += 1
    return out


def build_parser(load_functions: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The full parser. Only the command in `load_functions` has its function imported."""
    parser = argparse.ArgumentParser(prog="haina", description="haina: the whole life of a language model.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"haina {_version()}")
    subs = parser.add_subparsers(dest="command", metavar="<stage>")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, target in COMMANDS.items():
        if len(path) == 1:
            container = subs
        else:
            if path[0] not in groups:
                gp = subs.add_parser(path[0], help=GROUP_HELP.get(path[0]), description=GROUP_HELP.get(path[0]))
                groups[path[0]] = gp.add_subparsers(dest="subcommand", metavar="<command>")
            container = groups[path[0]]
        summary = _summaries().get(path, "")
        p = container.add_parser(path[-1], help=summary, description=summary,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(_target=target, _path=path)
        if load_functions == path:
            fn = _load(target)
            desc, _ = _doc_parts(fn)
            p.description = desc
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            _add_function_args(p, fn)
    return parser


def _summaries() -> dict[tuple[str, ...], str]:
    return {
        ("quickstart",): "the main job: corpus → tokenizer → shards → pretrain → eval → samples, on CPU",
        ("data", "prepare"): "clean, filter, deduplicate and split raw documents, with a report",
        ("data", "augment"): "augment a labeled dataset (deletion, swap, synonyms)",
        ("data", "tokenize"): "encode text into memory-mapped train/val token shards",
        ("data", "tasks"): "build a labeled classification set (docstring → library area) from the standard library",
        ("data", "instruct"): "build question-answer pairs from the standard library's docs (offline SFT data)",
        ("tokenizer", "train"): "train a byte-level BPE or character tokenizer",
        ("model", "params"): "parameter count and memory (weights, grads, AdamW, activations)",
        ("pretrain",): "pretrain a Transformer from a YAML recipe with dotted overrides",
        ("finetune", "sft"): "supervised fine-tuning on chat or instruction JSONL (all weights or LoRA)",
        ("finetune", "continue"): "continued pretraining on new token shards, with replay and a forgetting report",
        ("finetune", "distill"): "distill a teacher into a student (--base or --preset) on token shards",
        ("finetune", "dpo"): "direct preference optimization on prompt/chosen/rejected JSONL",
        ("finetune", "classify"): "train a text classifier (pooled hidden states → linear head), all weights or LoRA",
        ("finetune", "embed"): "train a retriever on query/passage pairs (contrastive, in-batch negatives)",
        ("classify",): "label texts with a classifier checkpoint: one JSON object per input with probabilities",
        ("tune",): "hyperparameter search (Optuna) over any training command's dotted options",
        ("compress", "quantize"): "quantize a checkpoint's linear layers to int8 or int4 (weights on disk and in memory)",
        ("compress", "prune"): "prune a checkpoint: magnitude/Wanda sparsity or whole heads/FFN channels",
        ("export", "onnx"): "export a decoder graph with its KV cache for ONNX Runtime",
        ("export", "gguf"): "export a Llama-architecture checkpoint as GGUF for llama.cpp (f16, q8_0, q4_0)",
        ("export", "checkpoint"): "a plain checkpoint (model.safetensors) from a sharded distributed checkpoint",
        ("finetune", "merge"): "fold a LoRA run's adapters into its base as a plain checkpoint",
        ("generate",): "generate text from a checkpoint",
        ("chat",): "interactive terminal chat with a checkpoint",
        ("embed",): "embed texts (pooled hidden states, or the packaged all-MiniLM-L6-v2) to JSONL or .npy",
        ("export", "hf"): "export a checkpoint as a Hugging Face transformers model",
        ("export", "peft"): "export a LoRA run's adapters in PEFT's format (adapter_config.json + safetensors)",
        ("import", "hf"): "import a Hugging Face Llama, GPT-2 or BERT checkpoint from disk",
        ("eval", "lm"): "sliding-window perplexity, loss and bits per byte on token shards or raw text",
        ("eval", "generate"): "generate for prompts and score against references (BLEU, chrF, ROUGE, exact match)",
        ("eval", "classify"): "classification metrics and calibration of a classifier checkpoint",
        ("eval", "efficiency"): "parameters, size, peak memory, prefill latency and decode tokens/s",
        ("eval", "attention"): "attention weights of every layer and head for a prompt (PNG grid and .npz)",
        ("eval", "harness"): "run lm-evaluation-harness tasks against the checkpoint through `haina serve`",
        ("eval", "compare"): "several eval reports side by side in one markdown table",
        ("serve",): "serve a checkpoint over an OpenAI-compatible HTTP API (--rag: answers grounded in a collection)",
        ("rag", "collection"): "create, list or drop vector-store collections (dimension, metric, HNSW settings)",
        ("rag", "index"): "chunk and index documents into a collection; re-indexing embeds only what changed",
        ("rag", "upsert"): "insert or replace records from JSONL ({id, text, metadata, vector?})",
        ("rag", "update"): "change the text, metadata or vector of existing records from JSONL",
        ("rag", "delete"): "delete records by id or metadata filter",
        ("rag", "get"): "print records by id or metadata filter as JSON lines",
        ("rag", "query"): "hybrid (dense + BM25), dense or BM25 search, with metadata filters",
        ("rag", "stats"): "a collection's counts, sizes, embedder and chunking (or BM25-only)",
        ("rag", "ask"): "answer a question from a collection with a checkpoint, citing the chunks used",
        ("rag", "qa"): "build a question set with known answer chunks (and SFT records that teach citing)",
        ("rag", "eval"): "recall@k, MRR, nDCG@10 per mode; with --checkpoint, citation validity and refusals",
    }


def _version() -> str:
    from haina import __version__

    return __version__


def _find_command(argv: list[str]) -> tuple[str, ...] | None:
    words = [a for a in argv if not a.startswith("-")]
    for n in (2, 1):
        if tuple(words[:n]) in COMMANDS:
            return tuple(words[:n])
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HAINA_DEBUG") == "1"
    from haina.core.log import setup_logging

    setup_logging(debug)
    try:
        path = _find_command(argv)
        parser = build_parser(path)
        ns, extra = parser.parse_known_args(argv)
        if not getattr(ns, "_target", None):
            if getattr(ns, "command", None):
                parser.parse_args([ns.command, "--help"])
            parser.print_help()
            return 0
        fn = _load(ns._target)
        from haina.eval.report import set_invocation

        set_invocation(argv)  # eval reports record the exact command
        # --debug is honoured anywhere on the line (read above); after the command, argparse leaves it in `extra`.
        result = _call(fn, ns, [a for a in extra if a != "--debug"])
        return result if isinstance(result, int) else 0
    except HainaError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except FileNotFoundError as e:
        if debug:
            raise
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        # A last resort: loaders name what is wrong with a file's content, but any open() may meet a path that
        # is not readable or not of the expected kind; the OS error and its path are then the whole story.
        if debug:
            raise
        print(f"error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if debug:
            raise
        extra = " (install it with: pip install 'haina[hf]')" if e.name == "transformers" else ""
        print(f"error: missing module '{e.name}'{extra}", file=sys.stderr)
        return 2


def _os_error_line(e: OSError) -> str:
    """'cannot use PATH: permission denied' (both paths for a failed rename or copy)."""
    what = {PermissionError: "permission denied", IsADirectoryError: "it is a directory, a file is expected",
            NotADirectoryError: "a directory is expected, a file is in the way",
            FileExistsError: "it already exists, and is in the way"}.get(type(e), e.strerror or str(e))
    paths = " → ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"cannot use {paths}: {what}" if paths else f"{what}"


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["COMMANDS", "Path", "build_parser", "main"]
