"""rmt-fairseq: the Recurrent Memory Transformer as a fairseq plugin.

`import rmt_fairseq` registers the plugin's tasks, models and criteria with fairseq (what `--user-dir user_dir`
does: user_dir/__init__.py imports this package), so a script can load a checkpoint through fairseq's hub
interface from any working directory. Registration happens once per process: Python imports this package once,
and fairseq's `--user-dir user_dir` finds the registrations already made. It imports fairseq (and torch).
"""

from rmt_fairseq import cli_help as _cli_help
from rmt_fairseq import quiet as _quiet

__version__ = "0.1.0"

_quiet.install()  # third-party notices that say nothing about the run (rmt_fairseq/quiet.py)
_cli_help.install()  # fairseq's --help lists the plugin's flags (rmt_fairseq/cli_help.py)

# the registrations (one registered component per module), in the order user_dir/__init__.py imported them
import rmt_fairseq.criterions.rmt_classification  # noqa: E402, F401
import rmt_fairseq.criterions.rmt_cross_entropy  # noqa: E402, F401
import rmt_fairseq.models.rmt_encoder  # noqa: E402, F401
import rmt_fairseq.models.rmt_lm  # noqa: E402, F401
import rmt_fairseq.models.rmt_transformer_lm  # noqa: E402, F401
import rmt_fairseq.tasks.rmt_algorithmic  # noqa: E402, F401
import rmt_fairseq.tasks.rmt_lm  # noqa: E402, F401
import rmt_fairseq.tasks.rmt_long_classification  # noqa: E402, F401
