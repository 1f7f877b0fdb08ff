"""`parse` mode of the docs shim for one fairseq command (tests/docs/shim.py): the command's arguments through the
real fairseq parser with the plugin loaded. Run as `parse.py NAME ARGS...` through the tests' fork server, whose
zygote for this script has imported fairseq's options once (a fresh shim paid that import for every documented
command in a parse block)."""

import os
import sys

from fairseq import options  # noqa: F401  (what parse_fairseq needs: imported by the zygote)

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import shim  # noqa: E402

if __name__ == "__main__":
    shim.parse_fairseq(sys.argv[1], sys.argv[2:])
