# fairseq --user-dir shim: importing the package registers its tasks, models and criteria (rmt_fairseq/__init__.py).
import rmt_fairseq  # noqa: F401
