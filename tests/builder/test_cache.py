"""The build cache stores whole entries or none (edgepack.files underneath)."""

from __future__ import annotations

from pathlib import Path

from builder.cache import BuildCache, cache_key


def test_a_model_entry_round_trips_with_its_sidecars(tmp_path: Path) -> None:
    model, sidecar = tmp_path / "model.xml", tmp_path / "model.bin"
    model.write_bytes(b"<xml/>")
    sidecar.write_bytes(b"\x00" * 4096)
    cache = BuildCache(tmp_path / "cache")
    key = cache_key("pass", "convert")

    stored = cache.put_model(key, model, {"nodes": 3}, sidecars=[sidecar])
    hit = cache.get_model(key)

    assert hit == (stored, {"nodes": 3})
    assert stored.read_bytes() == b"<xml/>" and (stored.parent / "model.bin").read_bytes() == sidecar.read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache" / "passes").iterdir()) == [key]


def test_a_failed_copy_leaves_no_entry_and_no_staging_folder(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    cache = BuildCache(tmp_path / "cache")
    key = cache_key("pass", "missing-sidecar")

    # A cache that cannot store an entry is not a failed build: the caller keeps its own file.
    assert cache.put_model(key, model, {}, sidecars=[tmp_path / "absent.bin"]) == model

    assert list((tmp_path / "cache" / "passes").iterdir()) == []
    assert cache.get_model(key) is None


def test_results_are_replaced_whole(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path / "cache")
    cache.put_result("k", {"p95_ms": 1.0})
    cache.put_result("k", {"p95_ms": 2.0})

    assert cache.get_result("k") == {"p95_ms": 2.0}
    assert [p.name for p in (tmp_path / "cache" / "results").iterdir()] == ["k.json"]
