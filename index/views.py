"""Record ids of an item's gallery-side views (`pipeline.catalog_views`): `<item_id>#v<n>`.

A view is an extra vector of its item's SKU. It is written, replaced and deleted with the item
(`index.replica`), found by search as its item (`index.gallery` reports the item's id), and never
listed, counted or exported as an item. `#` is not allowed in client ids, so no client id collides.
"""

from __future__ import annotations

VIEW_SEP = "#v"
MAX_VIEWS = 4  # a delete or replace removes this many view ids, whatever the setting was when the item was added


def view_ids(item_id: str, n: int = MAX_VIEWS) -> list[str]:
    """The record ids of an item's first n views."""
    return [f"{item_id}{VIEW_SEP}{k}" for k in range(1, n + 1)]


def base_id(item_id: str) -> str:
    """A view record's item id (an item's own id unchanged)."""
    return item_id.split(VIEW_SEP, 1)[0]


def is_view(item_id: str) -> bool:
    return VIEW_SEP in item_id
