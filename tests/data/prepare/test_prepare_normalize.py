"""Normalization: NFC, control characters, whitespace runs, optional mojibake repair, empties."""

import unicodedata

from haina.data.prepare.config import NormalizeConfig
from haina.data.prepare.normalize import normalize_stage, normalize_text


def test_nfc_controls_and_whitespace():
    decomposed = unicodedata.normalize("NFD", "café")
    text = f"  {decomposed}\u200b\x07 au\t\tlait\u00a0!  \r\nsecond   line \n\n\n\nthird\ufeff "
    assert normalize_text(text, NormalizeConfig()) == "café au lait !\nsecond line\n\nthird"
    kept = normalize_text(text, NormalizeConfig(collapse_whitespace=False, strip_control=False, nfc=False))
    assert decomposed in kept and "\t\t" in kept and "\x07" in kept


def test_mojibake_repair_is_optional():
    broken = "The cafÃ© was closed."
    assert normalize_text(broken, NormalizeConfig()) == broken
    assert normalize_text(broken, NormalizeConfig(fix_mojibake=True)) == "The café was closed."


def test_whitespace_only_documents_are_dropped_as_empty():
    kept, dropped = normalize_stage([{"text": " \n\t\u200b "}, {"text": "x"}], NormalizeConfig(), {})
    assert [d["text"] for d in kept] == ["x"]
    assert dropped[0]["reason"] == "empty"


def test_recipes_load_and_default_recipe_matches_the_defaults():
    from pathlib import Path

    from haina.core.config import from_dict, load_yaml
    from haina.data.prepare.config import PrepareConfig

    recipes = Path(__file__).resolve().parents[3] / "recipes" / "data"
    assert from_dict(PrepareConfig, load_yaml(recipes / "default.yaml")) == PrepareConfig()
    code = from_dict(PrepareConfig, load_yaml(recipes / "code.yaml"))
    assert code.code and code.filters == ("repetition",) and not code.normalize.collapse_whitespace
