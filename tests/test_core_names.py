"""The core never names a backend: no identifier or string in ``memory_controller/`` (docstrings and comments
aside) says vllm, transformers or ollama. A backend takes part through the ``Backend`` protocol, its own
options under ``[backends.<id>]`` and, for another holder of memory, the ``HolderSource`` protocol."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = re.compile(r"vllm|transformers|ollama", re.IGNORECASE)
TEXT_TOKENS = {tokenize.NAME, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}  # 3.12+: f-string parts


def named_backends(source: str) -> list[tuple[int, str]]:
    """(line, token) for every name or string token naming a backend, docstrings and comments left out."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(first.value.lineno)
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and tok.start[0] in docstrings:
            continue
        if tok.type in TEXT_TOKENS and NAMES.search(tok.string):
            found.append((tok.start[0], tok.string))
    return found


@pytest.mark.parametrize(("source", "hits"), [
    ('x = "ollama_host"\n', 1),
    ("def unload_ollama():\n    pass\n", 1),
    ('name = f"{a} vLLM {b}"\n', 1),
    ("from .x import TransformersThing\n", 1),
    ('"""A docstring may say Ollama and vLLM."""\n# so may a comment: transformers\nx = 1\n', 0),
    ('def f():\n    """Ollama in a docstring."""\n    return "llama"\n', 0),
])
def test_the_check_finds_names_in_code_and_leaves_docs_alone(source, hits):
    assert len(named_backends(source)) == hits


def test_no_core_module_names_a_backend():
    found = {str(p.relative_to(ROOT)): named_backends(p.read_text(encoding="utf-8"))
             for p in sorted((ROOT / "memory_controller").rglob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}
