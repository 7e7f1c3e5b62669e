"""What the hostile-input protections cost (issue 19), as ratios:

1. ``safefiles.check_model_dir`` (every file of a model folder: realpath + stat) beside a warm
   ``read_model_spec`` (what a plan reads anyway), per model of a tiny HF-layout cache;
2. a chat-template rendering with the budget hooks (every call/lookup/range step counted) vs the same
   template rendered by a plain sandboxed environment;
3. a request through ``server.security.SecurityMiddleware`` vs the bare app (in-process ASGI, no socket).
Run: .venv/bin/python bench/bench_hostile.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memory_controller import estimate as est  # noqa: E402
from memory_controller import safefiles  # noqa: E402


def _median(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_files() -> None:
    from tests import model_factory as mf

    with tempfile.TemporaryDirectory() as tmp:
        hub = Path(tmp) / "hub"
        snap = mf.build_into_cache(hub, "bench", mf.TINY)
        roots = safefiles.roots_of(snap, "hf_cache")
        est.read_model_spec(snap)
        check = _median(lambda: safefiles.check_model_dir(snap, roots), 200)
        spec = _median(lambda: est.read_model_spec(snap), 200)
        files = len(list(snap.iterdir()))
        print(f"check_model_dir: {check * 1e6:.0f} us for {files} files; warm read_model_spec {spec * 1e6:.0f} us; "
              f"ratio {check / spec:.2f}")


QWEN_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bench_template() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from backends.transformers.templates import _bound_environment, template_budget

    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 200} for i in range(200)]
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}} for i in range(20)]
    plain_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    plain_env.filters["tojson"] = __import__("json").dumps
    plain = plain_env.from_string(QWEN_LIKE)
    bounded = _compile_jinja_template(QWEN_LIKE)
    _bound_environment(QWEN_LIKE)

    def render_bounded() -> None:
        with template_budget():
            bounded.render(messages=messages, tools=tools, add_generation_prompt=True)

    base = _median(lambda: plain.render(messages=messages, tools=tools, add_generation_prompt=True), 50)
    hooked = _median(render_bounded, 50)
    print(f"template (200 messages, 20 tools): plain {base * 1e3:.2f} ms, with the budget {hooked * 1e3:.2f} ms; "
          f"ratio {hooked / base:.2f}")


def bench_middleware() -> None:
    from server.security import SecurityMiddleware

    async def app(scope, receive, send):  # noqa: ANN001 - a bare ASGI app
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 20000 + b'"}]}'
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"host", b"127.0.0.1:8765"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    guarded = SecurityMiddleware(app)

    async def once(target) -> None:  # noqa: ANN001
        sent = False

        async def receive():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(_message):  # noqa: ANN001
            return None

        await target(scope, receive, send)

    async def run(target, n: int) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await once(target)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    bare = asyncio.run(run(app, 500))
    with_guard = asyncio.run(run(guarded, 500))
    print(f"request (20 kB body) in-process: bare {bare * 1e6:.0f} us, through the middleware "
          f"{with_guard * 1e6:.0f} us (a body with more brackets than the depth limit is scanned on a worker thread); ratio {with_guard / bare:.1f}")


if __name__ == "__main__":
    bench_files()
    bench_template()
    bench_middleware()
