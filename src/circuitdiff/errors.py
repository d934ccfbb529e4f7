"""One error type for bad input: its message names the problem and the fix, on one line."""


class UserError(Exception):
    """Raised for bad input (a missing file, an unknown option, an empty selection...).

    The CLI prints it as a single line, ``circuitdiff: error: <message>``, without a traceback.
    """
