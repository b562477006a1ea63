"""Job ids: shape, uniqueness, creation-time order."""

from __future__ import annotations

from engine.ids import is_id, new_id, new_ids


def test_shape_and_uniqueness() -> None:
    ids = new_ids(10_000)
    assert len(set(ids)) == 10_000
    assert all(is_id(i) for i in ids)
    assert not is_id("nope") and not is_id("G" * 32) and not is_id(ids[0].upper())


def test_ids_sort_by_creation_time() -> None:
    early, late = new_id(now_ms=1_000), new_id(now_ms=1_001)
    assert early < late
    made = {t: new_id(now_ms=t) for t in (5, 3, 4)}
    assert sorted(made.values()) == [made[3], made[4], made[5]]
    assert new_id(now_ms=0)[:12] == "000000000000"
