"""Print a pip constraints file that pins each `>=` lower bound in pyproject.toml (dependencies and the test
extra) to exactly that version, so that the lower-bound job installs what pyproject declares.

Standard library only (Python 3.11+): it runs before the job's venv has anything installed.
"""

import re
import sys
from pathlib import Path

import tomllib

path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "pyproject.toml"
project = tomllib.loads(path.read_text())["project"]

for text in project["dependencies"] + project["optional-dependencies"]["test"]:
    requirement, _, marker = text.partition(";")
    name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)
    lowest = re.search(r">=\s*([^,\s]+)", requirement)
    if lowest:
        print(f"{name}=={lowest.group(1)}" + (f"; {marker.strip()}" if marker else ""))
