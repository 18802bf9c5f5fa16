"""qcompile's data, shipped inside the package (so a wheel install finds it), and the user's additions.

  zoo.yaml         the model zoo: families (defaults) and models (deltas)
  targets/*.yaml   build targets
  tolerance.yaml   numeric tiers vs transformers, per dtype (targets share them)
  schedules/       committed MetaSchedule databases, schedules/<target>/<model>/

A user adds their own with environment variables (each a path list separated by ':'):
  QCOMPILE_ZOO        zoo files read after the built-in one (their families and models are added; a model
                      of the same name replaces the built-in one)
  QCOMPILE_TARGETS    directories of target files (a same-named file replaces the built-in target)
  QCOMPILE_SCHEDULES  directories laid out as schedules/ (<target>/<model>/), applied with the built-in ones
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def package_data() -> Path:
    """This folder on disk (a wheel or an editable install both unpack it as real files)."""
    return Path(str(resources.files(__name__)))


def user_paths(variable: str) -> list[Path]:
    """The paths a QCOMPILE_* variable lists, in order (empty entries ignored)."""
    return [Path(p) for p in os.environ.get(variable, "").split(os.pathsep) if p]


def zoo_files() -> list[Path]:
    return [package_data() / "zoo.yaml", *user_paths("QCOMPILE_ZOO")]


def target_dirs() -> list[Path]:
    """Built-in first: a later directory's file of the same name wins."""
    return [package_data() / "targets", *user_paths("QCOMPILE_TARGETS")]


def tolerance_file() -> Path:
    return package_data() / "tolerance.yaml"


def schedule_roots() -> list[Path]:
    return [package_data() / "schedules", *user_paths("QCOMPILE_SCHEDULES")]
