"""`haina pretrain`: a YAML recipe plus dotted overrides → a training run."""

from __future__ import annotations

from pathlib import Path

from haina.core.config import load_yaml, merge, parse_overrides
from haina.core.errors import HainaError
from haina.train.config import PretrainConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "pretrain"


def find_recipe(config: str) -> Path:
    """A recipe path as given, or a bundled recipe by name (`shakespeare-char`)."""
    path = Path(config)
    if path.is_file():
        return path
    for candidate in (RECIPES / config, RECIPES / f"{config}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []
    hint = f"; bundled recipes: {', '.join(names)}" if names else ""
    raise HainaError(f"config file not found: {config}{hint}")


def load_pretrain_config(config: str, data: str | None = None, out: str | None = None, resume: bool = False,
                         overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """The resolved config: recipe, then --data/--out/--resume, then dotted overrides."""
    recipe = find_recipe(config)
    raw = load_yaml(recipe)
    flags: dict = {}
    if data is not None:
        flags["data"] = {"dir": data}
    if out is not None:
        flags["out"] = out
    if resume:
        flags["train"] = {"resume": True}
    raw = merge(merge(raw, flags), parse_overrides(list(overrides)))
    cfg = PretrainConfig.from_dict(raw)
    if cfg.out is None:
        cfg = PretrainConfig.from_dict({**cfg.to_dict(), "out": str(Path("runs") / recipe.stem)})
    return cfg.resolved()


def pretrain(config: str, data: str | None = None, out: str | None = None, resume: bool = False,
             overrides: list[str] = ()) -> None:
    """Pretrain a Transformer from a YAML recipe, with dotted overrides.

    Reads the recipe (model, data, train, out), applies --data, --out, --resume and any
    `--section.key=value` overrides (e.g. --train.lr=3e-4 --model.n_layer=2), writes the resolved
    config to RUN/config.yaml, and trains. The run directory receives metrics.jsonl, tb/
    (TensorBoard), checkpoints/ (with index.json naming the latest and the best), report.json and
    loss.png.

    Args:
        config: recipe YAML file, or the name of a bundled recipe (shakespeare-char, gpt2-124m, quickstart).
        data: token-shard directory (overrides data.dir).
        out: run directory (overrides out; default runs/<recipe name>).
        resume: continue from the run's latest checkpoint.
    """
    from haina.train.trainer import run_pretrain

    cfg = load_pretrain_config(config, data=data, out=out, resume=resume, overrides=overrides)
    report = run_pretrain(cfg)
    val = report.get("val_loss")
    val_text = f"val loss {val:.4f} (perplexity {report['val_ppl']:.2f}), " if val is not None else ""
    print(f"{report['steps']} steps, {report['train_tokens']:,} tokens, {val_text}"
          f"{report['tokens_per_sec']:,.0f} tokens/s, stopped by {report['stopped_because']}")
    print(f"run: {cfg.out}   checkpoint: {report.get('best_checkpoint')}")


__all__ = ["find_recipe", "load_pretrain_config", "pretrain"]
