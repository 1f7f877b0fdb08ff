"""rmt-fairseq: the Recurrent Memory Transformer as a fairseq plugin (`--user-dir user_dir`)."""

__version__ = "0.1.0"
