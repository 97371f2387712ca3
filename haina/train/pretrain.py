"""`haina pretrain`: a YAML recipe plus dotted overrides → a training run.

`run_pretrain` wires a `PretrainConfig` to token shards, a fresh Transformer and the one `Trainer`: next-token
prediction (train.objective clm), or BERT's masked tokens for an encoder (mlm, `haina.train.mlm`).

Under torchrun (or `--nproc N`, which starts torchrun) every rank runs this command; `haina.train.distributed`
joins them into one job, data parallel as the `parallel:` section says.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from haina.core.config import load_yaml, merge, parse_overrides
from haina.core.errors import HainaError
from haina.core.log import info
from haina.core.output import check_output, claim_output, read_manifest
from haina.core.seed import seed_everything
from haina.data.shards import TokenShards, check_tokenizer, find_tokenizer, read_meta
from haina.model.checkpoint import SHARDS
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer
from haina.train import distributed
from haina.train.config import Objective, PretrainConfig
from haina.train.mlm import MLMMasking, MLMTrainer, with_mask_token
from haina.train.trainer import Trainer

COMMAND = "pretrain"  # the name in the manifest of its run directories
# A run --resume may continue: the quickstart's directory holds a pretraining run too (checkpoints, index, config).
RESUMABLE = (COMMAND, "quickstart")


def find_recipe(config: str, stage: str = "pretrain") -> Path:
    """A recipe path as given, or a bundled recipe by name (`shakespeare-char`).

    A file that exists always wins. Bundled recipes are package data (`haina/recipes/<stage>`) when haina is
    installed from a wheel or with `pip install .`; in a source checkout they are `recipes/<stage>` beside the
    package, where STYLE keeps them and where an editable install or PYTHONPATH finds them.
    """
    path = Path(config)
    if path.is_file():
        return path
    checkout = Path(__file__).resolve().parents[2]
    bundled = [Path(str(resources.files("haina") / "recipes" / stage))]  # haina installs as files, never zipped
    if (checkout / "pyproject.toml").is_file():  # not a site-packages/recipes that some other package left
        bundled.append(checkout / "recipes" / stage)
    recipes = next((d for d in bundled if d.is_dir()), None)
    if recipes is None:
        raise HainaError(f"config file not found: {config} (and no bundled recipes: this haina is installed "
                         f"without its package data)")
    for candidate in (recipes / config, recipes / f"{config}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in recipes.glob("*.yaml"))
    hint = f"; bundled recipes: {', '.join(names)}" if names else ""
    raise HainaError(f"config file not found: {config}{hint}")


def load_pretrain_config(config: str, data: str | None = None, out: str | None = None, resume: bool = False,
                         overrides: list[str] | tuple[str, ...] = (), objective: Objective | None = None) -> PretrainConfig:
    """The resolved config: recipe, then --data/--out/--resume/--objective, then dotted overrides."""
    recipe = find_recipe(config)
    raw = load_yaml(recipe)
    flags: dict = {}
    if data is not None:
        flags["data"] = {"dir": data}
    if out is not None:
        flags["out"] = out
    train = {**({"resume": True} if resume else {}), **({"objective": objective} if objective else {})}
    if train:
        flags["train"] = train
    raw = merge(merge(raw, flags), parse_overrides(list(overrides)))
    cfg = PretrainConfig.from_dict(raw)
    if cfg.out is None:
        cfg = PretrainConfig.from_dict({**cfg.to_dict(), "out": str(Path("runs") / recipe.stem)})
    return cfg.resolved()


def claim_run(cfg: PretrainConfig, *, overwrite: bool = False, check_only: bool = False) -> Path:
    """Check `cfg.out` for this pretraining run and make it the run directory (`claim_run_dir`)."""
    inputs = [cfg.data.dir] + ([cfg.data.tokenizer] if cfg.data.tokenizer else [])
    return claim_run_dir(Path(cfg.out or "runs/pretrain"), COMMAND, inputs=inputs, resume=cfg.train.resume,
                         overwrite=overwrite, resumable=RESUMABLE, extra={"data": str(cfg.data.dir)},
                         check_only=check_only)


def claim_run_dir(out: Path, command: str, *, inputs: list[str], resume: bool, overwrite: bool,
                  resumable: tuple[str, ...] | None = None, extra: dict | None = None, check_only: bool = False) -> Path:
    """Check `out` for a training run of `command`, as the rules of `haina.core.output` say; make it the run dir.

    An empty or missing directory is created. An existing one is continued with `resume` (only if its
    manifest says one of `resumable` made it), replaced with `overwrite` (only if it is not, does not
    contain, and does not lie inside an input), and otherwise refused in one line. `check_only` makes every
    check and claims nothing: a command that has minutes of loading ahead refuses a bad --out first.
    """
    resumable = resumable or (command,)
    if resume and overwrite:
        raise HainaError("--resume continues a run and --overwrite starts it over; pass one of them, not both")
    if out.is_dir() and any(out.iterdir()):
        manifest = read_manifest(out)
        ours = manifest is not None and manifest["command"] == command
        if resume:
            if manifest is None or manifest["command"] not in resumable:
                what = f"the output of 'haina {manifest['command']}'" if manifest else "not a haina run"
                raise HainaError(f"cannot --resume {out}: it is {what}, and --resume continues only a run that "
                                 f"'haina {command}' made; choose that run's directory as --out")
            return out  # continued in place: nothing in it is replaced
        if ours and not overwrite:
            raise HainaError(f"--out {out} already holds a 'haina {command}' run; pass --resume to continue it or "
                             "--overwrite to start over (deleting its checkpoints), or choose another --out")
    if check_only:
        check_output(out, command, inputs=inputs, overwrite=overwrite)
        return out
    return claim_output(out, command, inputs=inputs, overwrite=overwrite, extra=extra)


def pretrain(config: str, data: str | None = None, out: str | None = None, resume: bool = False,
             overwrite: bool = False, objective: Objective | None = None, nproc: int = 1, max_restarts: int = 0,
             overrides: list[str] = ()) -> int:
    """Pretrain a Transformer from a YAML recipe, with dotted overrides.

    Reads the recipe (model, data, train, out), applies --data, --out, --resume and any
    `--section.key=value` overrides (e.g. --train.lr=3e-4 --model.n_layer=2), writes the resolved
    config to RUN/config.yaml, and trains. The run directory receives metrics.jsonl, tb/
    (TensorBoard), checkpoints/ (with index.json naming the latest and the best), report.json and
    loss.png. SIGTERM or Ctrl-C stops at the next step with a checkpoint (exit status 0); --resume
    then continues exactly where it stopped.

    Data parallel on one machine: --nproc N starts N processes under torchrun (DDP; --parallel.dp_shard N
    shards the model with FSDP2). On several machines, start `torchrun … -m haina pretrain …` on each. The
    global batch is processes × train.batch_size × train.grad_accum; only rank 0 writes. When torchrun restarts
    a failed job (--max-restarts), every process continues from the run's last checkpoint.

    Args:
        config: recipe YAML file, or the name of a bundled recipe (shakespeare-char, gpt2-124m, quickstart,
            encoder-small).
        data: token-shard directory (overrides data.dir).
        out: run directory (overrides out; default runs/<recipe name>).
        resume: continue the pretraining run in --out from its latest checkpoint.
        overwrite: start over in an existing --out (a previous run, or any directory that is not an input).
        objective: clm (next token, a causal model) or mlm (BERT's masked tokens, an encoder: model.causal false);
            overrides train.objective.
        nproc: processes on this machine, one per GPU (or sharing the CPU cores): launches torchrun.
        max_restarts: with --nproc, how often torchrun restarts the job after a process fails (torchrun's
            --max-restarts); each restart resumes from the last checkpoint, so set train.save_every.
    """
    resume, overwrite = distributed.launch_options(nproc, max_restarts, resume, overwrite)
    with distributed.same_on_every_rank():  # under torchrun, every rank reads the same recipe
        cfg = load_pretrain_config(config, data=data, out=out, resume=resume, overrides=overrides,
                                   objective=objective)
        if cfg.parallel.tp > 1:  # heads and MLP width must split evenly: one line before any process starts
            from haina.train.tensor_parallel import check_tensor_parallel

            check_tensor_parallel(cfg.model, cfg.parallel.tp)
    if nproc > 1:
        if distributed.under_torchrun():
            raise HainaError("--nproc starts torchrun itself; under torchrun leave it out (torchrun's "
                             "--nproc-per-node sets the processes)")
        cfg.parallel.degrees(nproc)  # a mesh that does not fit: one line before starting any process
        argv = [config, *(["--data", data] if data else []), *(["--out", out] if out else []),
                *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else []),
                *(["--objective", objective] if objective else []), *(f"--{o}" for o in overrides)]
        return distributed.relaunch(nproc, ["pretrain", "--config", *argv], max_restarts=max_restarts)
    with distributed.session(cfg.parallel, cfg.train.device) as dist:
        report = run_pretrain(cfg, claim=True, overwrite=overwrite, dist=dist)
    if dist is not None and not dist.is_main:
        return 0
    val = report.get("val_loss")
    if val is None:
        val_text = ""
    elif report.get("objective") == "mlm":
        acc = report.get("val_accuracy")
        val_text = f"val masked-token loss {val:.4f}" + (f" (accuracy {acc:.2%}), " if acc is not None else ", ")
    else:
        val_text = f"val loss {val:.4f} (perplexity {report['val_ppl']:.2f}), "
    print(f"{report['steps']} steps, {report['train_tokens']:,} tokens, {val_text}"
          f"{report['tokens_per_sec']:,.0f} tokens/s, stopped by {report['stopped_because']}")
    if report["skipped_steps"] or report["rollbacks"]:
        print(f"skipped {len(report['skipped_steps'])} steps with a non-finite loss or gradient, rolled back "
              f"{len(report['rollbacks'])} times (see report.json)")
    best = report.get("best_checkpoint")
    print(f"run: {cfg.out}   checkpoint: {best}")
    if best and (Path(best) / SHARDS).is_dir():  # one file per rank: what generate, serve and export hf read is made
        print(f"sharded checkpoint: for generate, serve or export hf run  haina export checkpoint --checkpoint "
              f"{cfg.out} --out DIR")
    return 0


def run_pretrain(cfg: PretrainConfig, tokenizer: Tokenizer | None = None, *, claim: bool = False,
                 overwrite: bool = False, dist: distributed.Distributed | None = None) -> dict[str, Any]:
    """Pretrain a fresh Transformer on the token shards named by `cfg`; returns the run report.

    Args:
        cfg: the full pretraining config (model, data, train, out).
        tokenizer: the shards' tokenizer if the caller has it; else found via data.tokenizer or beside the shards.
        claim: check and claim `cfg.out` as `haina pretrain` does (`claim_run`), once the inputs are found
            sound; a caller that owns the directory already (the quickstart) leaves it False.
        overwrite: with `claim`, start over in an existing directory.
        dist: this rank's place in a torchrun job (`haina.train.distributed.session`); None for one process.
    """
    with distributed.same_on_every_rank():  # every rank reads the same files: rank 0 alone reports a problem
        cfg = cfg.resolved()
        train, val, tokenizer = _open_data(cfg, tokenizer)
        if claim:
            claim_run(cfg, overwrite=overwrite, check_only=dist is not None)
    out = Path(cfg.out or "runs/pretrain")
    if dist is not None:
        if claim:
            dist.barrier()  # every rank has checked --out before rank 0 claims it
            if dist.is_main:
                claim_run(cfg, overwrite=overwrite)
            dist.barrier()
            if read_manifest(out) is None:  # another machine's rank 0 claimed it on a disk this one cannot see
                raise HainaError(f"this machine does not see the run directory {out} that rank 0 created; --out "
                                 "must be on a filesystem every machine shares, at the same path")
        # Each data-parallel group its rows of the global batch (a tensor-parallel group's ranks read the same).
        train = distributed.RankRows(train, dist.dp_rank, dist.dp_size)
    seed_everything(cfg.train.seed)  # before building the model: its initialization is part of the run
    model = Transformer(cfg.model)
    config = {**cfg.to_dict(), "out": str(out)}
    common = {"train_data": train, "val_data": val, "tokenizer": tokenizer, "config": config, "dist": dist}
    if cfg.train.objective == "mlm":
        masking = MLMMasking.from_tokenizer(tokenizer, cfg.train.mask_prob)
        return MLMTrainer(model, cfg.train, out, masking=masking, **common).fit()
    return Trainer(model, cfg.train, out, **common).fit()


def _open_data(cfg: PretrainConfig,
               tokenizer: Tokenizer | None) -> tuple[TokenShards, TokenShards | None, Tokenizer | None]:
    """The train and validation shards and the tokenizer, checked against each other and the model."""
    meta = read_meta(cfg.data.dir)
    if tokenizer is None:
        tokenizer = find_tokenizer(cfg.data.dir, cfg.data.tokenizer)
    else:
        check_tokenizer(meta, tokenizer, data_dir=cfg.data.dir)
    if tokenizer is None:
        info(f"no tokenizer found for {cfg.data.dir} (set data.tokenizer); checkpoints will not include one")
    vocab = max(int(meta["vocab_size"]), tokenizer.vocab_size if tokenizer else 0)
    if vocab > cfg.model.vocab_size:
        raise HainaError(f"the tokenizer has {vocab} tokens but model.vocab_size is {cfg.model.vocab_size}; "
                         f"set model.vocab_size ≥ {vocab} (e.g. --model.vocab_size={vocab})")
    if cfg.train.objective == "mlm":
        tokenizer = with_mask_token(tokenizer, cfg.model.vocab_size)  # saved with every checkpoint of the run
    block = cfg.train.block_size
    train = TokenShards(cfg.data.dir, "train")
    train.check_length(block)
    val = None
    if int(meta["splits"].get("val", {}).get("tokens", 0)) > 0:
        val = TokenShards(cfg.data.dir, "val")
        val.check_length(block)
    else:
        info(f"{cfg.data.dir} has no validation split; training without evaluation")
    return train, val, tokenizer


__all__ = ["claim_run", "claim_run_dir", "find_recipe", "load_pretrain_config", "pretrain", "run_pretrain"]
