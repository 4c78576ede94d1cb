"""Errors raised by the dataset adapters.

Why a hierarchy: the runner (and the tests) want to tell "the data on disk is wrong, here is how
to fix it" apart from programming errors. Every adapter error is a :class:`DatasetError`; it
subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset cannot be loaded as asked; the message says what to do about it."""


class DatasetNotFoundError(DatasetError):
    """A file or folder the adapter needs is missing."""


class ChecksumError(DatasetError):
    """A file's MD5 differs from the official one (and the mismatch was not accepted)."""


class CorruptDataError(DatasetError):
    """A file exists but cannot be read, or its content has the wrong layout."""


class GroupLeakageError(DatasetError):
    """One group (patient, video, lesion) appears on both sides of a split."""


class DatasetWarning(UserWarning):
    """Something about the data the user should know that is not an error (a file accepted
    although its MD5 is not the official one). The message is one line that starts with the
    input it is about (a file, a folder, a field); ``run-benchmark`` prints it as
    ``run-benchmark: warning: <message>``, like its errors, while a library user keeps Python's
    warning machinery (filters, ``pytest.warns``).
    """
