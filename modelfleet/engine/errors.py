"""Errors the engine raises for bad requests and bad configs, each naming its field."""


class InvalidRequest(ValueError):
    """A request or config field is out of range; `param` names it, the message starts with it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

    def __reduce__(self):  # picklable across the engine process's pipe
        return (type(self), (self.param, self.message))


class InvalidConfig(InvalidRequest):
    """An engine config field is invalid."""
