"""haina as a user installs it: a built wheel in a fresh venv, run from a directory that is not the checkout.

The wheel is real (built by setuptools from a copy of the source tree) and so is the venv (`python -m venv`, the
wheel installed by pip). Only the dependencies are borrowed: installing torch and the rest again would take minutes
and need an index, so a `.pth` file, written after the install, puts this environment's site-packages behind the
venv's own. A `.pth` line adds a folder to `sys.path` without running that folder's `.pth` files, so the editable
haina of a checkout (a finder hook installed by such a file) stays invisible; the test asserts that the wheel's
copy is the one that runs.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from haina.core.errors import HainaError
from haina.train.pretrain import find_recipe

ROOT = Path(__file__).resolve().parents[1]
# What a wheel is built from; build/ and *.egg-info that a build leaves behind land in the copy, not the checkout.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "haina", "recipes")


def _run(args: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, **kw)
    assert r.returncode == 0, f"{args}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _bare_env() -> dict:
    """This process's environment without what would make the checkout's haina importable."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the freshly built wheel installed, its dependencies borrowed from this environment."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (torch depends on it)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    # No build isolation and no index: setuptools (>= 77, a dependency of torch) builds the wheel offline.
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", tmp / "dist", src], env=_bare_env())
    (wheel,) = (tmp / "dist").glob("haina-*.whl")
    target = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", target])
    python = target / "bin" / "python"
    # This pip installs into the venv's interpreter (pip --python), which saves bootstrapping a pip there.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel],
         env=_bare_env())
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz-borrowed-dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return target


def test_the_wheel_runs_with_its_package_data(venv, tmp_path):
    """haina, its recipes and the playground's static files all come from the venv's site-packages."""
    probe = (
        "import json, haina\n"
        "from haina.train.pretrain import find_recipe\n"
        "from haina.serve.app import STATIC_DIR\n"
        "print(json.dumps({'haina': haina.__file__, 'quickstart': str(find_recipe('quickstart')),\n"
        "                  'data': str(find_recipe('default', 'data')), 'static': str(STATIC_DIR / 'index.html')}))\n"
    )
    r = _run([venv / "bin" / "python", "-c", probe], cwd=tmp_path, env=_bare_env())
    found = json.loads(r.stdout)
    for what, path in found.items():
        path = Path(path)
        assert path.is_relative_to(venv) and "site-packages" in path.parts and path.is_file(), (what, path)
    assert Path(found["quickstart"]).parent.parent.name == "recipes"


def test_quickstart_from_the_wheel_in_another_directory(venv, tmp_path):
    """`haina quickstart` with no --out writes runs/quickstart under the current directory, not the checkout."""
    r = _run([venv / "bin" / "haina", "quickstart", "--max-minutes", "0.5"], cwd=tmp_path, env=_bare_env(),
             timeout=300)
    run = tmp_path / "runs" / "quickstart"
    report = json.loads((run / "report.json").read_text())
    # Installation is what is tested here; learning is test_quickstart.py's (on a loaded machine this short
    # budget may leave time for a single step).
    assert report["steps"] >= 1 and report["val_loss"] is not None and report["params"] > 0
    assert (run / "tokenizer" / "tokenizer.json").is_file() and (run / "loss.png").is_file()
    assert "Go on with:" in r.stdout


def test_a_given_recipe_path_beats_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("model: {}\n")  # a file named like the bundled recipe
    assert find_recipe("quickstart") == Path("quickstart")
    assert find_recipe("quickstart.yaml").name == "quickstart.yaml"  # no such file here: the bundled one
    assert find_recipe("quickstart.yaml").parent.parent.name == "recipes"
    with pytest.raises(HainaError, match=r"config file not found: nope; bundled recipes: .*quickstart"):
        find_recipe("nope")
