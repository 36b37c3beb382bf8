"""benchmarks/page_folios.py: both ways write the same bytes, and a short run reports every figure."""
import json

import numpy as np

from benchmarks import page_folios


def test_both_ways_write_the_same_bytes(tmp_path):
    data = memoryview(np.random.default_rng(0).integers(0, 255, (5 << 20) + 123, np.uint8).tobytes())
    for name, pieces in (("huge", None), ("small", page_folios._arrow_like_pieces())):
        path = tmp_path / name
        page_folios.write_file(str(path), data, pieces)
        assert path.read_bytes() == bytes(data), name


def test_a_short_run_reports_each_way_in_each_condition(tmp_path):
    out = tmp_path / "pf.json"
    assert page_folios.main(["--mb", "48", "--rounds", "1", "--idle", "0", "--dir", str(tmp_path),
                             "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mb_per_run"] == 48
    for cond in page_folios.CONDITIONS:
        for way in ("huge", "small"):
            assert res[f"{way}_{cond}_wall_s"] > 0
            assert 0 <= res[f"{way}_{cond}_pmd_mapped_mb"] <= 48
        assert res[f"huge_vs_small_sys_{cond}"] >= 0
    assert [p.name for p in tmp_path.iterdir()] == ["pf.json"]  # its scratch files are gone
