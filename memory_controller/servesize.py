"""IDE-aware sizing (pure): the profile a model is served with to an IDE coding assistant.

An IDE assistant (Roo Code, Continue) sends a long system prompt plus tool definitions with every
request: a context below ``min_context`` (``settings.ide_min_context``, 32768 by default) makes tool
calls fail. So the served context is the largest that fits, up to the model's own maximum; when that
is below the minimum, a lower precision of the backend's fit ladder that reaches the minimum is
preferred over a smaller context; when none reaches it, the largest context that fits is served with
a warning. Every decision comes back as a :class:`~memory_controller.types.Message`:

* ``ide.lower_precision`` (from, to, context_tokens, min_context) — a lower precision was chosen;
* ``ide.below_minimum`` (context_tokens, min_context) — a warning: the IDE may fail below it;
* ``ide.model_max_below_minimum`` (model_max_context, min_context) — the model itself cannot reach
  the minimum; it is served at its maximum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .types import Message, Precision, Profile, msg


def _candidates(base: Profile, ladder: Sequence[Precision]) -> list[Profile]:
    """``base`` then the ladder's precisions below it, in ladder order, each once."""
    steps = list(ladder)
    if base.precision in steps:  # only the rungs below the base one
        steps = steps[steps.index(base.precision) + 1:]
    out = [base]
    for p in steps:
        if all(c.precision is not p for c in out):
            out.append(base.with_(precision=p))
    return out


def ide_profile(
    base: Profile,
    *,
    model_max_context: int | None,
    ladder: Sequence[Precision],
    max_context_for: Callable[[Profile], int],
    min_context: int,
) -> tuple[Profile, tuple[Message, ...]] | None:
    """The profile to serve ``base``'s model to an IDE with, and what was decided; None when no
    precision of ``base`` + ``ladder`` fits even one token.

    ``max_context_for(profile)`` is the largest context (tokens) that fits in memory with that
    profile's precision (0 or less when the weights alone do not fit). ``model_max_context`` caps the
    context (None: no cap known). ``ladder`` lists lower precisions in the order to try (8-bit, then
    4-bit); rungs at or above ``base.precision`` in it are skipped.
    """
    if min_context < 1:
        raise ValueError(f"min_context must be at least 1, got {min_context}")
    cap = model_max_context if model_max_context and model_max_context > 0 else None
    target = min(min_context, cap) if cap is not None else min_context
    notes: list[Message] = []
    if cap is not None and cap < min_context:
        notes.append(msg("ide.model_max_below_minimum",
                         f"the model's maximum context {cap} is below the {min_context} tokens an IDE "
                         "assistant needs; it is served at its maximum",
                         model_max_context=cap, min_context=min_context))

    best: tuple[Profile, int] | None = None  # the largest context seen (the higher precision on ties)
    for i, cand in enumerate(_candidates(base, ladder)):
        fits = max_context_for(cand)
        ctx = min(fits, cap) if cap is not None else fits
        if ctx < 1:
            continue
        if ctx >= target:
            chosen = cand.with_(context_tokens=ctx)
            if i > 0:
                notes.append(msg("ide.lower_precision",
                                 f"{base.precision.value} fits only a context below {min_context} tokens; "
                                 f"{cand.precision.value} serves {ctx}",
                                 **{"from": base.precision.value, "to": cand.precision.value},
                                 context_tokens=ctx, min_context=min_context))
            return chosen, tuple(notes)
        if best is None or ctx > best[1]:
            best = (cand, ctx)
    if best is None:
        return None
    cand, ctx = best
    if cand.precision is not base.precision:
        notes.append(msg("ide.lower_precision",
                         f"{cand.precision.value} serves the largest context that fits ({ctx})",
                         **{"from": base.precision.value, "to": cand.precision.value},
                         context_tokens=ctx, min_context=min_context))
    notes.append(msg("ide.below_minimum",
                     f"only {ctx} tokens of context fit, below the {min_context} an IDE assistant needs: "
                     "it may fail (\"Roo is having trouble\"); free memory or pick a smaller model",
                     context_tokens=ctx, min_context=min_context))
    return cand.with_(context_tokens=ctx), tuple(notes)
