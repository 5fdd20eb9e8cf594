#!/usr/bin/env python3
"""A recording stand-in for the `pulumi` CLI, for the Automation API calls that only read a stack.

Installed as `pulumi` on PATH by tests. Every call appends {"argv", "backend", "passphrase_file"} (the environment
the real CLI would read its backend and secrets from) to $FAKE_PULUMI_LOG. It answers `version`, `stack select`,
`stack output --json [--show-secrets]` (the JSON in $FAKE_PULUMI_OUTPUTS, as `pulumi stack output --json` prints
it) and `whoami`; anything else exits 1 saying so, as a CLI without that stack would.
"""

import json
import os
import sys

argv = sys.argv[1:]
with open(os.environ["FAKE_PULUMI_LOG"], "a") as log:
    log.write(json.dumps({"argv": argv, "backend": os.environ.get("PULUMI_BACKEND_URL", ""),
                          "passphrase_file": os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE", "")}) + "\n")
argv = [a for a in argv if a not in ("--non-interactive",)]  # a global flag the Automation API passes
if argv[:1] == ["version"]:
    print("v3.272.0")
elif argv[:2] == ["stack", "select"] or argv[:1] == ["whoami"]:
    print("")
elif argv[:2] == ["stack", "output"]:
    print(open(os.environ["FAKE_PULUMI_OUTPUTS"]).read())
else:
    print(f"fake pulumi: unsupported command {argv}", file=sys.stderr)
    sys.exit(1)
