"""Exceptions raised in one layer and caught in another.

They live here, apart from the code that raises them, so that a catcher never imports the
raiser's module for its exception alone (the stream need not import a method to skip a failed
edit, the evaluator neither).  Exceptions raised and caught within one module stay there.
"""
from __future__ import annotations


class DataError(ValueError):
    """A malformed data file or record; the message names file, case_id and field."""


class EditFailed(RuntimeError):
    """An edit that could not be computed; the stream records it and goes on (or stops)."""


class BadEdit(RuntimeError):
    """A delta that must not be applied (non-finite, or its norm past the bound)."""


class StreamStopped(RuntimeError):
    """``stream.on_bad_edit=stop`` and an edit failed."""


class CheckpointError(RuntimeError):
    """Writing a checkpoint failed; the previous one is untouched."""


class CheckpointRefused(RuntimeError):
    """The run dir's checkpoint cannot be resumed (foreign or corrupted) under this ``resume`` mode."""


class CorruptCheckpoint(CheckpointRefused):
    """A checkpoint whose files are missing, unreadable or do not match their checksums."""
