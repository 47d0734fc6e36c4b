"""The package list of the wheel (everything else is in ``pyproject.toml``).

The dashboard lives in ``app/`` at the top of the repository but is installed as ``cbscope.app``
(not as a top-level ``app``, a name many projects use). ``pyproject.toml`` can either list
packages or find them, not both, so they are found here: every ``cbscope*`` package, and every
package under ``app/`` mapped into ``cbscope.app`` with ``package_dir``.
"""

from setuptools import find_packages, setup

APP_PACKAGES = [f"cbscope.{name}" for name in find_packages(include=["app", "app.*"])]

setup(
    packages=[*find_packages(include=["cbscope", "cbscope.*"]), *APP_PACKAGES],
    package_dir={"cbscope.app": "app"},
)
