#!/usr/bin/env python3
"""A recording stand-in for the `pulumi` CLI, for the Automation API calls that only read a stack.

Installed as `pulumi` on PATH by tests. Every call appends {"argv", "backend", "passphrase_file", "cwd", "project"}
(the environment the real CLI would read its backend and secrets from, the folder it ran in and the name in the
Pulumi.yaml it found there or above) to $FAKE_PULUMI_LOG. It answers `version`, `stack select`,
`stack output --json [--show-secrets]` (the JSON in $FAKE_PULUMI_OUTPUTS, as `pulumi stack output --json` prints
it) and `whoami`; anything else exits 1 saying so, as a CLI without that stack would. As the real CLI, `stack select`
needs a project: with no Pulumi.yaml in the folder or above, it fails with the real CLI's message.
"""

import json
import os
import sys
from pathlib import Path


def find_project(start: Path) -> tuple[Path | None, str]:
    """The Pulumi.yaml the CLI would use (searching upwards, as it does) and the project name in it."""
    for folder in (start, *start.parents):
        for name in ("Pulumi.yaml", "Pulumi.yml"):
            if (folder / name).is_file():
                for line in (folder / name).read_text().splitlines():
                    if line.startswith("name:"):
                        return folder / name, line.split(":", 1)[1].strip().strip("'\"")
                return folder / name, ""
    return None, ""


argv = sys.argv[1:]
project_file, project = find_project(Path.cwd())
with open(os.environ["FAKE_PULUMI_LOG"], "a") as log:
    log.write(json.dumps({"argv": argv, "backend": os.environ.get("PULUMI_BACKEND_URL", ""),
                          "passphrase_file": os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE", ""),
                          "cwd": os.getcwd(), "project": project}) + "\n")
argv = [a for a in argv if a not in ("--non-interactive",)]  # a global flag the Automation API passes
if argv[:1] == ["version"]:
    print("v3.272.0")
elif argv[:2] == ["stack", "select"] and project_file is None:
    print(f"error: no Pulumi.yaml project file found (searching upwards from {os.getcwd()}). If you have not "
          "created a project yet, use `pulumi new` to do so: no project file found", file=sys.stderr)
    sys.exit(255)
elif argv[:2] == ["stack", "select"] or argv[:1] == ["whoami"]:
    print("")
elif argv[:2] == ["stack", "output"]:
    print(open(os.environ["FAKE_PULUMI_OUTPUTS"]).read())
else:
    print(f"fake pulumi: unsupported command {argv}", file=sys.stderr)
    sys.exit(1)
