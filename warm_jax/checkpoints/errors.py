"""The errors of the checkpoint layer; each message names the step directory and the array at fault."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the step dir and the array at fault."""


class NonFiniteStateError(CheckpointError):
    """The state to save holds NaN or Inf; nothing was written."""


class CheckpointCorruptError(CheckpointError):
    """A saved step does not match its manifest or cannot be read (restore() may fall back past it)."""


class DirectReadUnsupported(CheckpointError):
    """The checkpoint is not one `read_state_into` reads (not OCDBT, several processes, not local...)."""


def short_error(error: BaseException, limit: int = 400) -> str:
    """The gist of an Orbax/TensorStore error, without the multi-kilobyte spec dumps they carry."""
    text = str(error)
    for cut in (" See full TensorStore details", " [tensorstore_spec="):
        text = text.split(cut)[0]
    return text if len(text) <= limit else text[:limit] + " ..."
