"""alignpipe: the alignment data pipeline (synthesis -> evaluation -> instantiation -> optimization)."""

__version__ = "0.1.0"


class AlignpipeError(Exception):
    """An error the user can fix (bad input, bad config, missing file). The CLI prints it as one line."""
