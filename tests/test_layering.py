"""The layering rule of STYLE.md, checked: a stage imports only from stages below it."""

import ast
from pathlib import Path

ORDER = ["core", "tokenizer", "data", "model", "generate", "train", "finetune", "eval", "compress", "export",
         "serve", "rag"]
TOP = {"cli", "quickstart", "__init__", "__main__"}
ROOT = Path(__file__).resolve().parents[1] / "haina"


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "haina" else None


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def test_stages_import_only_downward():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        stage = rel.parts[0].removesuffix(".py")
        if stage in TOP:
            continue
        assert stage in ORDER, f"{rel}: '{stage}' is not a known stage; add it to STYLE.md's order and ORDER"
        for module in _imports(path):
            target = _stage(module)
            if target in TOP:
                violations.append(f"{rel} imports {module} (the CLI/quickstart layer sits on top)")
            elif target and target in ORDER and ORDER.index(target) > ORDER.index(stage):
                violations.append(f"{rel} imports {module}: {stage} may not depend on {target}")
    assert not violations, "\n".join(violations)


def test_core_imports_nothing_from_haina():
    for path in (ROOT / "core").rglob("*.py"):
        assert not [m for m in _imports(path) if m.startswith("haina.") and not m.startswith("haina.core")], path
