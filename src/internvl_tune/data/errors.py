from internvl_tune.errors import UserError


class DataError(UserError):
    """A problem with user data; the message names the file, the line (when known) and the problem.

    `kind` groups problems in reports (e.g. "malformed JSON", "image count", "image tokens cut").
    """

    def __init__(self, message: str, kind: str = "invalid record"):
        super().__init__(message)
        self.kind = kind
