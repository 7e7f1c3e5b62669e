"""IDE-aware sizing: the served context and precision at the edges of what fits."""

from __future__ import annotations

import pytest

from memory_controller.servesize import ide_profile
from memory_controller.types import Precision, Profile

BASE = Profile(mode="transformers", precision=Precision.BF16, context_tokens=2048, batch=1)
LADDER = (Precision.INT8, Precision.NF4)
MIN = 32768


def fits(table: dict[Precision, int]):
    """max_context_for from a table: precision -> largest context that fits."""
    seen: list[Precision] = []

    def max_context_for(profile: Profile) -> int:
        seen.append(profile.precision)
        return table[profile.precision]

    max_context_for.seen = seen  # type: ignore[attr-defined]
    return max_context_for


def codes(result) -> list[str]:
    return [m.code for m in result[1]]


@pytest.mark.parametrize(
    ("table", "model_max", "want_precision", "want_ctx", "want_codes"),
    [
        # plenty of memory: the model's maximum, base precision, nothing to say
        ({Precision.BF16: 200_000, Precision.INT8: 400_000, Precision.NF4: 800_000}, 131072,
         Precision.BF16, 131072, []),
        # exactly the minimum at base precision: base is kept
        ({Precision.BF16: MIN, Precision.INT8: 90_000, Precision.NF4: 200_000}, 131072,
         Precision.BF16, MIN, []),
        # one token short at base: 8-bit reaches it and is preferred
        ({Precision.BF16: MIN - 1, Precision.INT8: MIN, Precision.NF4: 200_000}, 131072,
         Precision.INT8, MIN, ["ide.lower_precision"]),
        # 8-bit short too: 4-bit
        ({Precision.BF16: 1000, Precision.INT8: MIN - 1, Precision.NF4: 50_000}, 131072,
         Precision.NF4, 50_000, ["ide.lower_precision"]),
        # the lower precision's context is still capped by the model's maximum
        ({Precision.BF16: 1000, Precision.INT8: 900_000, Precision.NF4: 900_000}, 40_000,
         Precision.INT8, 40_000, ["ide.lower_precision"]),
        # none reaches the minimum: the largest that fits (4-bit here), with the warning
        ({Precision.BF16: 1000, Precision.INT8: 8000, Precision.NF4: 20_000}, 131072,
         Precision.NF4, 20_000, ["ide.lower_precision", "ide.below_minimum"]),
        # none reaches it and base gives the largest: base, warning only
        ({Precision.BF16: 5000, Precision.INT8: 0, Precision.NF4: 0}, 131072,
         Precision.BF16, 5000, ["ide.below_minimum"]),
        # the model's own maximum is below the minimum and fits: served at it, no lower precision
        ({Precision.BF16: 100_000, Precision.INT8: 200_000, Precision.NF4: 400_000}, 4096,
         Precision.BF16, 4096, ["ide.model_max_below_minimum"]),
        # unknown model maximum: the largest that fits
        ({Precision.BF16: 70_000, Precision.INT8: 0, Precision.NF4: 0}, None,
         Precision.BF16, 70_000, []),
        # one token fits: still served, with the warning
        ({Precision.BF16: 1, Precision.INT8: 0, Precision.NF4: 0}, 131072,
         Precision.BF16, 1, ["ide.below_minimum"]),
    ],
)
def test_ide_profile_table(table, model_max, want_precision, want_ctx, want_codes):
    result = ide_profile(BASE, model_max_context=model_max, ladder=LADDER, max_context_for=fits(table),
                         min_context=MIN)
    assert result is not None
    profile, _ = result
    assert (profile.precision, profile.context_tokens) == (want_precision, want_ctx)
    assert codes(result) == want_codes
    assert profile.mode is BASE.mode and profile.batch == BASE.batch


def test_nothing_fits_at_any_precision_is_none():
    table = {Precision.BF16: 0, Precision.INT8: -5, Precision.NF4: 0}
    assert ide_profile(BASE, model_max_context=8192, ladder=LADDER, max_context_for=fits(table),
                       min_context=MIN) is None


def test_ladder_rungs_at_or_above_the_base_precision_are_not_tried():
    base = BASE.with_(precision=Precision.INT8)
    f = fits({Precision.INT8: 100, Precision.NF4: 40_000, Precision.BF16: 10**6})
    profile, messages = ide_profile(base, model_max_context=131072, ladder=(Precision.BF16, *LADDER),
                                    max_context_for=f, min_context=MIN)
    assert profile.precision is Precision.NF4
    assert Precision.BF16 not in f.seen
    note = messages[0]
    assert note.args["from"] == "int8" and note.args["to"] == "nf4" and note.args["context_tokens"] == 40_000


def test_below_minimum_message_names_both_numbers():
    _, messages = ide_profile(BASE, model_max_context=None, ladder=(), max_context_for=lambda p: 12_000,
                              min_context=MIN)
    warning = messages[-1]
    assert warning.code == "ide.below_minimum"
    assert warning.args == {"context_tokens": 12_000, "min_context": MIN}
    assert "12000" in warning.text and str(MIN) in warning.text
