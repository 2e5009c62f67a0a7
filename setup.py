"""Package layout that pyproject.toml cannot express: the recipes stay at the repository's top level
(``recipes/``) and ship inside the wheel as ``mllm/recipes`` (``mllm.config`` finds either)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mllm*", "parallel*", "launch*"])
    + ["mllm.recipes", "mllm.recipes.model"],
    package_dir={"mllm.recipes": "recipes"},
)
