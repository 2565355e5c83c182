"""User-facing errors.

Anything a user can cause (a missing file, a corrupt checkpoint, an unknown recipe key) raises
`UserError` with one sentence that names the thing and the fix. The CLI prints it on one line
and exits with code 2, with no traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear sentence (CLI exit code 2)."""


class MissingCapability(UserError):
    """A task asked a model for something its family cannot do."""

    def __init__(self, family: str, capability: str, task: str):
        super().__init__(
            f"the '{family}' model family cannot '{capability}', which '{task}' needs; "
            f"use a model whose family provides it"
        )
