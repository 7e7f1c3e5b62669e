"""SSE framing and OpenAI chunk/response shapes."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from memory_controller.toolcalls import ToolCall

SSE_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def comment(text: str) -> bytes:
    """An SSE comment line: clients ignore it, it keeps the connection and the IDE's timer alive."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


class CleanupStreamingResponse(StreamingResponse):
    """A StreamingResponse whose ``cleanup`` runs exactly once, even when the client goes away before
    the body is read (a plain generator's ``finally`` never runs if it was never started)."""

    def __init__(self, content: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None] | None],
                 **kwargs: Any) -> None:
        kwargs.setdefault("media_type", "text/event-stream")
        super().__init__(content, **kwargs)
        self._cleanup = cleanup
        self._cleaned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the body and run the clean-up (once; also for a response that is never sent)."""
        aclose = getattr(self.body_iterator, "aclose", None)
        if aclose is not None:
            await aclose()
        if not self._cleaned:
            self._cleaned = True
            result = self._cleanup()
            if result is not None:
                await result


class Shape:
    """Builds the chunks and responses of one request (chat or legacy completion)."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def chunk(self, *, content: str | None = None, role: bool = False, finish_reason: str | None = None,
              tool_calls: list[dict[str, Any]] | None = None, with_usage_field: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if content is not None:
                delta["content"] = content
            if tool_calls is not None:
                delta["tool_calls"] = tool_calls
            out = self._base("chat.completion.chunk")
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            out = self._base("text_completion")
            out["choices"] = [{"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish_reason}]
        if with_usage_field:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        out = self._base("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        out["choices"] = []
        out["usage"] = usage
        return out

    def response(self, text: str | None, calls: tuple[ToolCall, ...], finish_reason: str,
                 usage: dict[str, int]) -> dict[str, Any]:
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if calls:
                message["tool_calls"] = [c.to_openai() for c in calls]
            out = self._base("chat.completion")
            out["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}]
        else:
            out = self._base("text_completion")
            out["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
        out["usage"] = usage
        return out


def tool_call_deltas(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [{"index": i, "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments_json}} for i, c in enumerate(calls)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
