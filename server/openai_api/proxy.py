"""Pass a request through to a deployment that serves HTTP itself (vLLM), unbuffered.

Bytes go from the upstream socket to the client as they come (``aiter_raw``: no decoding, no
re-chunking); one keep-alive ``httpx.AsyncClient`` is shared. A stream that breaks because the
container went away (emergency clear, unload) ends with an OpenAI-shaped error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi.responses import Response

from memory_controller.backend import Deployment

from .errors import ApiError
from .stream import SSE_HEADERS, CleanupStreamingResponse

log = logging.getLogger("memctl.server.openai")


def served_name(dep: Deployment) -> str:
    """The model name the engine answers to (vLLM: ``--served-model-name``)."""
    name = dep.detail.get("served_name") if dep.detail else None
    return str(name) if name else dep.model_id


class Proxy:
    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self._client: httpx.AsyncClient | None = None
        self.closed = False  # the server is stopping: streams end with an error event

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                trust_env=False,  # never route a loopback engine through a proxy from the environment
            )
        return self._client

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        key = getattr(self.settings, "vllm_api_key", None)
        if key is not None:
            headers["authorization"] = f"Bearer {key.get_secret_value()}"
        return headers

    async def forward(self, path: str, body: dict[str, Any], dep: Deployment, slot: Any,
                      cleanup: Callable[[], None]) -> Response:
        """POST ``body`` to ``{dep.endpoint}/{path}``; ``cleanup`` runs exactly once when done."""
        assert dep.endpoint
        url = dep.endpoint.rstrip("/") + "/" + path
        payload = json.dumps({**body, "model": served_name(dep)}).encode()
        client = self.client()
        try:
            if not body.get("stream"):
                resp = await client.post(url, content=payload, headers=self._headers())
                cleanup()
                return Response(resp.content, status_code=resp.status_code,
                                media_type=resp.headers.get("content-type", "application/json"))
            upstream = await client.send(client.build_request("POST", url, content=payload,
                                                              headers=self._headers()), stream=True)
        except httpx.HTTPError as exc:
            cleanup()
            raise ApiError(502, f"{dep.model_id}: the engine at {dep.endpoint} did not answer ({exc!r})",
                           type_="server_error", code="upstream_unreachable") from None
        except BaseException:
            cleanup()
            raise
        if upstream.status_code >= 400:
            try:
                content = await upstream.aread()
            finally:
                await upstream.aclose()
                cleanup()
            return Response(content, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type", "application/json"))

        async def body_iter() -> AsyncIterator[bytes]:
            tail = b""  # the end of what came so far: a complete stream ends with "data: [DONE]"
            try:
                async for raw in upstream.aiter_raw():
                    if self.closed or (slot is not None and slot.cancelled()):
                        yield _stopped(dep, "the memctl server is stopping" if self.closed
                                       else getattr(slot, "reason", None) or "").sse()
                        yield b"data: [DONE]\n\n"
                        return
                    tail = (tail + raw)[-32:]
                    yield raw
            except httpx.HTTPError as exc:
                log.info("stream from %s broke: %r", dep.endpoint, exc)
                yield _stopped(dep, repr(exc)).sse()
                yield b"data: [DONE]\n\n"
                return
            if b"[DONE]" not in tail:  # the engine went away mid-answer (a container killed, say)
                reason = getattr(slot, "reason", None) if slot is not None and slot.cancelled() else None
                yield _stopped(dep, reason or "the engine closed the stream early").sse()
                yield b"data: [DONE]\n\n"

        async def close() -> None:
            try:
                await upstream.aclose()
            finally:
                cleanup()

        return CleanupStreamingResponse(body_iter(), close, status_code=upstream.status_code,
                                        headers=SSE_HEADERS,
                                        media_type=upstream.headers.get("content-type", "text/event-stream"))

    def close_soon(self) -> None:
        """Mark closing (streams end with an error event) and close the client on its loop (any thread)."""
        self.closed = True
        client, self._client = self._client, None
        if client is not None:
            try:
                asyncio.get_running_loop().create_task(client.aclose())
            except RuntimeError:
                pass  # no loop here any more: the sockets close with the process

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _stopped(dep: Deployment, detail: str = "") -> ApiError:
    extra = f" ({detail})" if detail else ""
    return ApiError(503, f"generation stopped: {dep.model_id} was unloaded or an emergency clear ran{extra}",
                    type_="server_error", code="generation_cancelled", headers={"Retry-After": "1"})
