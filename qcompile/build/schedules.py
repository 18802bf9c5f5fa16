"""Tuning databases on disk: where they are, checking them, their digest, opening them for compile.

A database directory is MetaSchedule's own JSON database (TVM tools read it as it is):
  database_workload.json        one JSON line per kernel: [structural hash, the kernel's IRModule]
  database_tuning_record.json   one JSON line per measured candidate: [workload line index, [trace,
                                run seconds, target, argument info]]
Committed databases live in qcompile/data/schedules/<target>/<model>/ (and a user's in the
QCOMPILE_SCHEDULES roots, laid out the same way); `compile` applies every database of its target (kernels
are matched by structural hash, so databases of different models never conflict).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from .. import data
from ..atomic import atomic_file
from ..errors import UserError

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


def default_tuning_directory(target_name: str, model_name: str) -> Path:
    """Where `tune` writes by default: under the user's first QCOMPILE_SCHEDULES root, else beside the
    committed databases (in a checkout: qcompile/data/schedules/, which compile applies)."""
    roots = data.schedule_roots()
    return roots[-1 if len(roots) == 1 else 1] / target_name / model_name


@dataclasses.dataclass(frozen=True)
class DatabaseLines:
    """A checked database directory: per workload its structural hash; per record (file order) the
    workload index and the measured seconds (None: the candidate failed to build or run)."""

    workloads: list[str]
    records: list[tuple[int, float | None]]


def _lines(path: Path, repair: bool) -> list[str]:
    """The file's lines. A last line without its newline was cut short by a killed writer: `repair`
    drops it (it was never a finished record); otherwise it is an error."""
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        if not repair:
            raise UserError(f"{path}: last line is cut short (tuning was killed mid-write); rerun "
                            "`qcompile tune` on it to repair, or delete that line")
        text = text[:text.rfind("\n") + 1]
        atomic_file(path, lambda f: f.write(text.encode()))
    return text.splitlines()


def check_database(directory: Path, *, repair: bool = False) -> DatabaseLines:
    """Parse both files; a malformed line is a UserError naming the file and line."""
    workloads: list[str] = []
    for number, line in enumerate(_lines(directory / WORKLOADS, repair), 1):
        try:
            entry = json.loads(line)
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise ValueError
        except ValueError:
            raise UserError(f"{directory / WORKLOADS}: line {number} is not a MetaSchedule workload") from None
        workloads.append(entry[0])
    records: list[tuple[int, float | None]] = []
    for number, line in enumerate(_lines(directory / RECORDS, repair), 1):
        try:
            index, body = json.loads(line)
            if not (isinstance(index, int) and 0 <= index < len(workloads) and isinstance(body, list)):
                raise ValueError
            secs = body[1]
        except (ValueError, TypeError, IndexError):
            raise UserError(f"{directory / RECORDS}: line {number} is not a MetaSchedule tuning record "
                            f"(of {len(workloads)} workloads)") from None
        ok = isinstance(secs, list) and secs and all(isinstance(s, float | int) and s < 1e9 for s in secs)
        records.append((index, sum(secs) / len(secs) if ok else None))
    return DatabaseLines(workloads, records)


def database_dirs(root: Path) -> list[Path]:
    """`root` if it is a database directory, else its subdirectories that are."""
    if (root / WORKLOADS).is_file():
        return [root]
    return sorted(p for p in root.iterdir() if (p / WORKLOADS).is_file()) if root.is_dir() else []


@dataclasses.dataclass(frozen=True)
class Schedules:
    """The tuning databases one build applies."""

    directories: tuple[Path, ...]
    digest: str  # sha256 over the files' bytes: part of the build identity
    # Some database holds no record of a qcompile CPU rule: it was tuned before the rules were candidate
    # 0, so its records for the kernels a rule takes never competed with the rule.
    predates_cpu_rules: bool = False

    def open(self) -> Any:
        """One MetaSchedule database over all directories (read for compile)."""
        from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

        dbs = [ms.database.JSONDatabase(str(d / WORKLOADS), str(d / RECORDS), allow_missing=False)
               for d in self.directories]
        return dbs[0] if len(dbs) == 1 else ms.database.UnionDatabase(*dbs)

    def as_json(self) -> dict[str, Any]:
        return {"directories": [_shown(d) for d in self.directories], "sha256": self.digest}


def _shown(directory: Path) -> str:
    """A database directory as a manifest records it: relative to the package's data for the committed
    ones (no build machine's paths in a library), else as given."""
    try:
        return str(Path("qcompile/data") / directory.resolve().relative_to(data.package_data().resolve()))
    except ValueError:
        return str(directory)


def find_schedules(target_name: str, explicit: Path | None = None, *, enabled: bool = True) -> Schedules | None:
    """The databases for a build: `explicit` (a database directory, or a directory of them), else the
    committed ones for the target; None when disabled or there are none. Each is checked first."""
    if not enabled:
        return None
    if explicit is not None:
        root = Path(explicit)
        if not root.is_dir():
            raise UserError(f"--schedules {root}: no such directory")
        directories = database_dirs(root)
        if not directories:
            raise UserError(f"--schedules {root}: holds no {WORKLOADS}")
    else:
        directories = [d for root in data.schedule_roots() for d in database_dirs(root / target_name)]
    if not directories:
        return None
    from .cpu_rules import RULE_ATTR  # noqa: PLC0415 (imports no TVM)

    digest, predates = hashlib.sha256(), False
    for directory in directories:
        check_database(directory)
        for name in (WORKLOADS, RECORDS):
            path = directory / name
            content = path.read_bytes() if path.exists() else b""
            digest.update(name.encode() + b"\0" + content)
            predates |= name == RECORDS and RULE_ATTR.encode() not in content
    return Schedules(tuple(directories), digest.hexdigest()[:16], predates)
