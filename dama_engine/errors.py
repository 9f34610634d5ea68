"""The one base of every error that bad input causes (data, config, dataset files, vocabulary, a row too long).

Its message says what is wrong and where (the field, the row, the line) and how to fix it; whoever runs the engine
shows the message as it is: the CLI prints it and exits 2, the worker ends the run ``failed`` with ``user_error`` and
this message, never a traceback. Anything else that escapes the engine is a fault of the engine or the machine.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input; the message is for the user. A ``ValueError``, as each of its subclasses was before it."""
