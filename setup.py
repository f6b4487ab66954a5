"""Package discovery for the core/ -> fedcore and plugins/ -> fedcore.plugins layout.

find_packages cannot apply a package-dir mapping, so every folder with an
__init__.py under core/ and plugins/ is listed here; everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup


def _packages(root: str, name: str) -> list[str]:
    base = Path(__file__).parent / root
    return sorted(
        ".".join([name, *init.parent.relative_to(base).parts])
        for init in base.rglob("__init__.py")
        if "node_modules" not in init.parts
    )


setup(packages=_packages("core", "fedcore") + _packages("plugins", "fedcore.plugins"))
