import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


@pytest.mark.slow
def test_peak_rss_loading_a_1gb_checkpoint_stays_near_its_size():
    import load_memory

    result = load_memory.run(params_m=600, methods=("dsv2",))
    assert result["checkpoint_bytes"] >= 1e9
    assert result["dsv2"] <= 1.3, f"peak RSS growth {result['dsv2']:.2f}× the checkpoint"
