# fairseq --user-dir shim: import the registrations, nothing else.
import rmt_fairseq.criterions.rmt_classification  # noqa: F401
import rmt_fairseq.criterions.rmt_cross_entropy  # noqa: F401
import rmt_fairseq.models.rmt_encoder  # noqa: F401
import rmt_fairseq.models.rmt_lm  # noqa: F401
import rmt_fairseq.models.rmt_transformer_lm  # noqa: F401
import rmt_fairseq.tasks.rmt_algorithmic  # noqa: F401
import rmt_fairseq.tasks.rmt_lm  # noqa: F401
import rmt_fairseq.tasks.rmt_long_classification  # noqa: F401
