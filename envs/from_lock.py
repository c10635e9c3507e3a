"""Write envs/pipeline.yaml's pip section from requirements.lock: the same pins, for conda.

    python envs/from_lock.py        # after refreshing the lock (make lock)

Snakemake copies the environment file into .snakemake/conda/ before conda reads it, so a
relative ``-r ../requirements.lock`` would not resolve there: the pins are copied in (with
their platform markers; conda's pip checks no hashes).
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# Conda environment for every rule (snakemake --sdm conda): the pins of requirements.lock,
# written by envs/from_lock.py (tests/test_envs.py checks they agree). The package itself
# is installed by pipeline.post-deploy.sh: Snakemake copies this file into .snakemake/conda/
# before conda reads it, so a relative path here (`-e ../`, `-r ../requirements.lock`)
# would point into .snakemake/.
name: phantom-grad-pipeline
channels:
  - conda-forge
  - nodefaults
dependencies:
  - python=3.11
  - pip
  - pip:
"""


def lock_pins(lock: Path = ROOT / "requirements.lock") -> list[str]:
    """Every ``name==version[ ; marker]`` requirement of the lock, in its order."""
    pins = []
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*==[^ \\]+(?: ; [^\\]+?)?)\s*\\?$", line)
        if match:
            pins.append(match.group(1).strip())
    return pins


def main() -> None:
    pins = lock_pins()
    text = HEADER + "".join(f'      - "{pin}"\n' for pin in pins)
    (ROOT / "envs" / "pipeline.yaml").write_text(text)
    print(f"envs/pipeline.yaml: {len(pins)} pins from requirements.lock")


if __name__ == "__main__":
    main()
