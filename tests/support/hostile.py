"""What a hostile peer may send a decoder: any JSON value (for hypothesis)."""

from __future__ import annotations

from hypothesis import strategies as st


def json_values(keys: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[object]:
    """Any JSON value: null, booleans, integers beyond 64 bits, floats, text, and lists and
    objects of those (object keys drawn from `keys`, any short text by default)."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(1 << 80), max_value=1 << 80)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=16),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(keys if keys is not None else st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=12,
    )
