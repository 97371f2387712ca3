"""`haina finetune <method>` and `haina finetune merge`: recipes plus flags plus dotted overrides → a run.

Every method reads a recipe from `recipes/finetune/` (by default the one named like the method),
applies the command's flags, then `--section.key=value` overrides (`--lora.r=8`, `--train.lr=3e-4`),
and writes the resolved config into the run directory, as `haina pretrain` does.
"""

from __future__ import annotations

from typing import Any

from haina.core.config import load_yaml, merge, parse_overrides
from haina.core.errors import HainaError
from haina.core.log import info
from haina.finetune.base import run_command
from haina.finetune.config import FinetuneConfig
from haina.train.pretrain import find_recipe


def load_finetune_config(method: str, config: str | None, flags: dict[str, Any],
                         overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """The resolved config of `haina finetune METHOD`: recipe, then flags, then dotted overrides."""
    raw = load_yaml(find_recipe(config or method, stage="finetune"))
    raw = merge(merge(raw, flags), parse_overrides(list(overrides)))
    cfg = FinetuneConfig.from_dict({**raw, "method": method})
    return cfg


def _flags(base: str | None, data: list[str] | None, out: str | None, val: list[str] | None = None,
           resume: bool = False, **more: Any) -> dict[str, Any]:
    flags: dict[str, Any] = {"data": {}}
    if base is not None:
        flags["base"] = base
    if data:
        flags["data"]["train"] = list(data)
    if val:
        flags["data"]["val"] = list(val)
    if out is not None:
        flags["out"] = out
    if resume:
        flags["train"] = {"resume": True}
    for key, value in more.items():
        section, _, name = key.partition(".")
        flags.setdefault(section, {})[name] = value
    return flags


def _summary(report: dict[str, Any], out: str | None) -> None:
    val = report.get("val_loss")
    before = report.get("initial_val_loss")
    loss_text = "" if val is None else (f"val loss {before:.4f} → {val:.4f}, " if before is not None
                                        else f"val loss {val:.4f}, ")
    print(f"{report['steps']} steps, {report['train_tokens']:,} tokens ({report.get('supervised_tokens', 0):,} "
          f"supervised), {loss_text}{report['tokens_per_sec']:,.0f} tokens/s, stopped by {report['stopped_because']}")
    print(f"run: {out}   checkpoint: {report.get('best_checkpoint')}")


def sft_command(base: str, data: list[str], out: str, config: str | None = None, val: list[str] | None = None,
                train_on_prompt: bool = False, resume: bool = False, overwrite: bool = False, nproc: int = 1,
                max_restarts: int = 0, overrides: list[str] = ()) -> int:
    """Supervised fine-tuning on chat or instruction records, all weights or LoRA adapters (--lora.r=8).

    Records are JSONL: chat ({"messages": [{"role", "content"}, ...]}), instruction ({"prompt", "response"}) or
    Alpaca ({"instruction", "input", "output"}). Each is rendered with the base's chat template (ChatML when it has
    none; a plain "### User:" template ending answers with EOS when its vocabulary has no room for ChatML's markers)
    and the loss covers the assistant's tokens, each turn's end marker included, so the model learns to stop.
    Bad records are counted and kept with their reason in OUT/rejects.jsonl. The run directory is like
    pretraining's (config.yaml, metrics.jsonl, tb/, loss.png, report.json, checkpoints/) and works with generate,
    chat, serve and export hf. Any --section.key=value overrides the recipe (--lora.r=8 --train.lr=3e-4).

    Data parallel, as `haina pretrain`: --nproc N starts N processes under torchrun (DDP; for full fine-tuning
    --parallel.dp_shard=N shards the model with FSDP2), or launch `torchrun … -m haina finetune sft …` yourself.
    The global batch is processes × train.batch_size × train.grad_accum; only rank 0 writes.

    Args:
        base: the model to start from: a haina checkpoint or run directory, or a Hugging Face directory.
        data: chat or instruction JSONL files.
        out: the run directory to write.
        config: a recipe file or the name of a bundled one in recipes/finetune (default: sft).
        val: held-out JSONL files for validation (default: a share of --data, data.val_fraction).
        train_on_prompt: put the loss on the prompts too, not only on the answers.
        resume: continue the run in --out from its latest checkpoint.
        overwrite: start over in an existing --out.
        nproc: processes on this machine, one per GPU (or sharing the CPU cores): launches torchrun.
        max_restarts: with --nproc, how often torchrun restarts the job after a process fails; each restart resumes
            from the last checkpoint, so set train.save_every.
    """
    args = dict(locals())  # the command's own arguments: --nproc runs them again under torchrun
    from haina.finetune.sft import run_sft

    def load(resume: bool) -> FinetuneConfig:
        flags = _flags(base, data, out, val, resume)
        if train_on_prompt:
            flags["data"]["train_on_prompt"] = True
        return load_finetune_config("sft", config, flags, overrides)

    return run_command(sft_command, args, load, run_sft, lambda report, cfg: _summary(report, cfg.out))


def merge_command(checkpoint: str, out: str, overwrite: bool = False) -> None:
    """Fold a LoRA run's adapters into its base: a plain checkpoint that needs neither again.

    The result gives the same logits as base + adapters (within float rounding) and loads anywhere a
    checkpoint does (generate, chat, serve, export hf, and --base of another fine-tuning run).

    Args:
        checkpoint: a LoRA run directory (its best checkpoint) or one of its checkpoint directories.
        out: the checkpoint directory to write (an earlier merge there is replaced; anything else needs --overwrite).
        overwrite: replace an existing OUT that is not a merge output (never the run or its base).
    """
    import shutil

    import torch

    from haina.core.checksums import write_checksums
    from haina.core.output import check_output, output_dir
    from haina.model.checkpoint import load_model, save_model
    from haina.model.classifier import CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS, has_head, read_head
    from haina.model.lora import has_lora, merge_lora, read_adapter_config, resolve_adapter

    adapter = resolve_adapter(checkpoint)
    base = read_adapter_config(adapter).get("base")
    inputs = [checkpoint] + ([base] if base else [])
    check_output(out, "finetune merge", inputs=inputs, overwrite=overwrite)
    model, tokenizer = load_model(adapter)
    if not has_lora(model):
        raise HainaError(f"{checkpoint} has no LoRA adapters to merge; it is a whole model already")
    merge_lora(model)
    trained = load_yaml(adapter / "config.yaml") if (adapter / "config.yaml").is_file() else {}
    # A retriever (`finetune embed`) keeps the record of the pooling it was trained with, which `haina embed` reads.
    embed = {"method": "embed", "embed": trained["embed"]} if trained.get("method") == "embed" else {}
    head = has_head(adapter)  # a LoRA classifier: its head (trained in full) goes with the merged weights
    if head:
        read_head(adapter)  # its checksums, before anything is written
    with torch.no_grad(), output_dir(out, "finetune merge", inputs=inputs, overwrite=overwrite) as tmp:
        save_model(tmp, model, tokenizer, extra_config={**embed, "source": {"merged_adapter": str(adapter.resolve()),
                                                                             "base": base}}, checksums=not head)
        if head:
            for name in (CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS):
                shutil.copy2(adapter / name, tmp / name)
            write_checksums(tmp)
    info(f"merged {adapter} into its base ({model.num_params():,} parameters): {out}")


__all__ = ["load_finetune_config", "merge_command", "sft_command"]
