"""OpenAI-shaped errors: ``{"error": {"message", "type", "code"}}`` with the right HTTP status.

Every :class:`MemctlError` maps to one status; nothing else reaches the client as a traceback.

Retries: the clients' retry policies (the openai SDKs, ai-sdk, litellm) retry 408/409/429/5xx and read
``Retry-After``; several ignore ``x-should-retry``. So what waiting cannot fix is a 4xx they do not retry
(400 for the request or a model that cannot be served as it is — broken files, no tokenizer —, 404 for the
model id, 422 for memory that will not be free until the user frees it); what waiting fixes is a 503 with ``Retry-After``
(the on-demand pause, a cancelled request) or a 409 (another operation holds the controller).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.responses import JSONResponse

from memory_controller import errors as E
from memory_controller.units import fmt_bytes

log = logging.getLogger("memctl.server.openai")

# The openai clients retry 408/409/429/5xx unless told not to; a retry cannot fix these.
NO_RETRY = {"x-should-retry": "false"}


class ApiError(Exception):
    """An error answer: HTTP ``status``, OpenAI ``type`` and ``code``, a message a user can act on."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> bytes:
        """The error as a stream event (the openai clients raise it as an APIError)."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code, headers=NO_RETRY)


def insufficient_memory(message: str, needed_bytes: int | None, free_bytes: int | None,
                        hint: str | None) -> ApiError:
    parts = [message.rstrip(".")]
    if needed_bytes is not None and free_bytes is not None and fmt_bytes(needed_bytes) not in message:
        parts.append(f"it needs {fmt_bytes(needed_bytes)}, {fmt_bytes(free_bytes)} is free")
    text = "; ".join(parts) + "."
    if hint:
        text += f" {hint}"
    # Not a 503: waiting does not free memory, the user does; a retrying client would only repeat it.
    return ApiError(422, text, code="insufficient_memory", param="model", headers=NO_RETRY)


REFUSAL_STATUS = {"model_not_loaded": 409}


def from_memctl(exc: E.MemctlError) -> ApiError:
    """The HTTP answer for a controller error."""
    text = str(exc)
    if isinstance(exc, E.RequestRefusedError):
        return ApiError(REFUSAL_STATUS.get(exc.code, 400), text, code=exc.code, param=exc.param, headers=NO_RETRY)
    if isinstance(exc, E.ServingPausedError):
        retry = str(exc.args_.get("retry_after_s", 30))
        return ApiError(503, text, type_="server_error", code="serving_paused", param="model",
                        headers={"Retry-After": retry})
    if isinstance(exc, E.GenerationCancelledError):
        return ApiError(503, text, type_="server_error", code="generation_cancelled", headers={"Retry-After": "1"})
    if isinstance(exc, (E.ModelNotFoundError, E.InvalidModelIdError)):
        return ApiError(404, text, code="model_not_found", param="model", headers=NO_RETRY)
    if isinstance(exc, E.InsufficientMemoryError):
        return insufficient_memory(exc.message, exc.needed_bytes, exc.free_bytes, exc.hint)
    if isinstance(exc, (E.OperationBusyError, E.StalePlanError)):
        return ApiError(409, text, type_="server_error", code=exc.code if exc.code != "error" else "busy",
                        headers={"Retry-After": "2"})
    if isinstance(exc, E.OperationCancelledError):
        return ApiError(503, text, type_="server_error", code="cancelled", headers=NO_RETRY)
    if isinstance(exc, E.OperationTimeoutError):
        return ApiError(504, text, type_="server_error", code="timeout", headers=NO_RETRY)
    if not_servable(exc):
        return ApiError(400, text, code="model_not_servable", param="model", headers=NO_RETRY)
    if exc.code.startswith(("gen.", "model.")) and exc.code != "gen.failed":  # the request or the model's files
        return ApiError(400, text, code=exc.code, headers=NO_RETRY)
    code = exc.code if exc.code != "error" else type(exc).__name__
    return ApiError(500, text, type_="server_error", code=code, headers=NO_RETRY)


# Generation failures that are the model's or the request's, not the server's (the chat template refused or ran
# away, the request was malformed): 400, never "unload and load the model again".
_NOT_SERVABLE_CODES = ("gen.template_error", "gen.template_runaway", "model.no_chat_template", "model.bad_file")


def not_servable(exc: E.MemctlError) -> bool:
    """A property of the model's files (corrupt, linked out of the cache, malformed tokenizer/config/template,
    unknown code in auto_map, no usable quantisation): 400 ``model_not_servable``, its hint says what to do."""
    if exc.code in _NOT_SERVABLE_CODES:
        return True
    if exc.code == "gen.failed":
        return False  # the generation itself broke: a server error
    return isinstance(exc, (E.ModelLoadError, E.CorruptDataError, E.QuantizationUnavailableError))


def from_exception(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, E.MemctlError):
        return from_memctl(exc)
    log.exception("unexpected error while serving a request", exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}); see the memctl server log",
                    type_="server_error", code="internal_error", headers=NO_RETRY)
