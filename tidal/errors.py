"""The one exception type for errors a user can cause.

Owns: `TidalError`. A bad flag, a missing model file, a malformed request or a prompt that
is too long raise it, with a message that says what to change. The CLI prints it as one
line (no traceback); the server turns it into an OpenAI-style 4xx error.
Must not: be raised for internal bugs (those stay ordinary exceptions).
"""


class TidalError(Exception):
    """A user-caused error. `param` names the offending input where there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
