"""rmt-fairseq: the Recurrent Memory Transformer as a fairseq plugin (`--user-dir user_dir`)."""

from rmt_fairseq import cli_help as _cli_help
from rmt_fairseq import quiet as _quiet

__version__ = "0.1.0"

_quiet.install()  # third-party notices that say nothing about the run (rmt_fairseq/quiet.py)
_cli_help.install()  # fairseq's --help lists the plugin's flags (rmt_fairseq/cli_help.py)
