"""The project's own errors. Each carries a user-facing message and a hint (what to do)."""

from __future__ import annotations


class MemctlError(Exception):
    """Base error: ``message`` says what went wrong, ``hint`` what the user can do.

    ``advice_key`` names the troubleshooting entry of the user guide that applies
    (``out_of_memory``, ``model_not_loading``, ``container_not_stopping``) or ``None``.
    """

    advice_key: str | None = None
    code: str = "error"  # machine-readable kind; UIs translate by it (strings: err.<code>)

    def __init__(self, message: str, hint: str | None = None, *, details: str | None = None,
                 code: str | None = None, args: dict | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details
        if code is not None:
            self.code = code
        self.args_ = dict(args or {})  # arguments for the translated message

    def __str__(self) -> str:  # one line a user can read
        return f"{self.message} — {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "details": self.details,
            "advice": self.advice_key,
            "code": self.code,
            "args": self.args_,
        }


class SettingsError(MemctlError):
    """An invalid setting: names the field, the value and what is allowed."""


class ModelNotFoundError(MemctlError):
    advice_key = "model_not_loading"


class InvalidModelIdError(MemctlError):
    advice_key = "model_not_loading"


class ModelLoadError(MemctlError):
    advice_key = "model_not_loading"


class QuantizationUnavailableError(MemctlError):
    advice_key = "model_not_loading"


class InsufficientMemoryError(MemctlError):
    """Raised before a load/start when the estimate does not fit (or on OOM during load)."""

    advice_key = "out_of_memory"

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        needed_bytes: int | None = None,
        free_bytes: int | None = None,
        details: str | None = None,
    ):
        super().__init__(message, hint, details=details)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes


class DockerUnavailableError(MemctlError):
    """Docker does not answer: the message says why and the hint how to start it (no guide entry
    applies: "a container does not stop" is about a container Docker runs)."""

    advice_key = None
    code = "docker_unavailable"


class ContainerError(MemctlError):
    advice_key = "container_not_stopping"


class ContainerStartError(ContainerError):
    """The container exited or never became ready. ``log_tail`` holds its last lines."""

    advice_key = "model_not_loading"

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        log_tail: list[str] | None = None,
        cause: str | None = None,
        details: str | None = None,
    ):
        super().__init__(message, hint, details=details)
        self.log_tail = log_tail or []
        self.cause = cause


class OperationBusyError(MemctlError):
    """A state-changing operation is already running."""


class OperationCancelledError(MemctlError):
    """The running operation was told to stop (emergency clear)."""


class OperationTimeoutError(MemctlError):
    """A backend call did not finish within its deadline; it is abandoned and cleaned up when it returns."""


class CorruptDataError(MemctlError):
    """Data read from outside (a file, a container label, an HTTP body) is malformed or over a limit."""

    code = "corrupt_data"


class StalePlanError(MemctlError):
    """``apply(plan)``: what is loaded or free memory changed since the plan was made; nothing was touched."""

    code = "stale_plan"


# --------------------------------------------------------------------------- serving refusals
class RequestRefusedError(MemctlError):
    """A generation request this model cannot take as sent (``code``: ``context_length_exceeded``,
    ``tools_not_supported``, ``model_not_servable``); decided before anything is loaded or evicted."""

    code = "request_refused"

    def __init__(self, message: str, hint: str | None = None, *, code: str, param: str | None = None,
                 args: dict | None = None):
        super().__init__(message, hint, code=code, args=args)
        self.param = param


class ServingPausedError(MemctlError):
    """On-demand loading is paused after an emergency clear or an unload, until the user loads a model or
    resumes serving (``memctl serve resume``, the dashboard)."""

    code = "serving_paused"


class GenerationCancelledError(MemctlError):
    """A queued or running request was cancelled by an emergency clear, an unload or a switch; asking again
    may succeed."""

    code = "generation_cancelled"
