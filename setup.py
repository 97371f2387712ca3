"""Only the package layout that pyproject.toml cannot state; the metadata and every pin live there.

recipes/ stays beside the package in the source tree (STYLE: recipes sit outside the package), but an installed
wheel has no source tree beside it, so the recipes ship inside the package as `haina/recipes`. pyproject.toml can
map a package to another folder but cannot add that package to the ones it finds by scanning, hence this file.
`haina.train.pretrain.find_recipe` looks there first, then in the source tree.
"""

from setuptools import find_namespace_packages, setup

# Namespace packages: data folders (serve/static, each recipes/<stage>) are packages to setuptools too.
code = find_namespace_packages(include=["haina", "haina.*"], exclude=["*.__pycache__"])
recipes = ["haina.recipes", *(f"haina.recipes.{p}" for p in find_namespace_packages("recipes", exclude=["*.*"]))]

setup(
    packages=[*code, *recipes],
    package_dir={"haina.recipes": "recipes"},
    package_data={"haina.serve.static": ["*"], **{p: ["*.yaml", "*.jsonl", "*.sbatch"] for p in recipes}},
)
