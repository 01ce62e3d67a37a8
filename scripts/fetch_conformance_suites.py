"""Fetch the test suites that PEFT and transformers ship in their source distributions.

The suites are the bar our classes are held to: PEFT's method matrix for HTA, transformers' model tests for
the uRNN models. They are downloaded from
the package index for the *installed* versions, unpacked under ``.cache/suites/`` and never
committed. Running this twice is free: an unpacked suite is reused.

    python scripts/fetch_conformance_suites.py            # prints the two suite folders
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = ROOT / ".cache" / "suites"


def suite_dir(distribution: str) -> Path:
    """Where the ``tests/`` folder of the installed ``distribution``'s sdist is unpacked."""
    version = importlib.metadata.version(distribution)
    return SUITES / f"{distribution}-{version}"


def fetch(distribution: str) -> Path:
    target = suite_dir(distribution)
    if (target / "tests").is_dir():
        return target
    version = importlib.metadata.version(distribution)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"{distribution}=={version}", "-d", tmp],
            check=True,
        )
        (archive,) = Path(tmp).glob("*.tar.gz")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/tests/" in m.name or m.name.endswith("/tests")]
            tar.extractall(unpacked, members=members, filter="data")
        (top,) = unpacked.iterdir()
        staging = target.with_suffix(".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.move(str(top / "tests"), staging / "tests")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a half-fetched suite is never mistaken for a whole one
    return target


if __name__ == "__main__":
    for name in ("peft", "transformers"):
        print(fetch(name))
