from dataclasses import dataclass, field
from typing import Literal

import pytest

from haina.core.config import from_dict, merge, parse_overrides, to_dict
from haina.core.errors import HainaError
from haina.core.io import atomic_path, write_json


@dataclass(frozen=True, kw_only=True)
class Inner:
    lr: float = 1e-3
    schedule: Literal["cosine", "linear"] = "cosine"
    steps: int = 10
    flag: bool = False


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str = "x"
    train: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()
    limit: int | None = None


def test_round_trip_and_overrides():
    cfg = from_dict(Outer, merge(to_dict(Outer()), parse_overrides(
        ["train.lr=3e-4", "train.steps=20", "train.flag=true", "tags=[a, b]", "limit=none", "name=run"])))
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 20 and cfg.train.flag is True
    assert cfg.tags == ("a", "b") and cfg.limit is None and cfg.name == "run"
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(HainaError, match=r"unknown config key 'train.lrr' \(did you mean 'lr'\?\)"):
        from_dict(Outer, {"train": {"lrr": 1}})


@pytest.mark.parametrize("override,msg", [
    ("train.steps=1.5", "expected an integer"),
    ("train.schedule=exp", "choose one of cosine, linear"),
    ("train.flag=maybe", "expected true/false"),
    ("train.lr=fast", "expected a number"),
])
def test_bad_values_are_one_line_errors(override, msg):
    with pytest.raises(HainaError, match=msg):
        from_dict(Outer, parse_overrides([override]))


def test_override_without_equals():
    with pytest.raises(HainaError, match="key.sub=value"):
        parse_overrides(["train.lr"])


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_unavailable_devices_are_one_line_errors():
    import torch

    from haina.core.device import resolve_device

    if not torch.cuda.is_available():
        with pytest.raises(HainaError, match="CUDA is not available"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():  # not a RuntimeError from deep inside model.to()
        with pytest.raises(HainaError, match="MPS is not available"):
            resolve_device("mps")
    assert resolve_device("cpu").type == "cpu"
