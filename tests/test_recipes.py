"""Every recipe in experiments/ loads and validates; the YFCC-15M ones say how to launch them and what
they should reach."""

from pathlib import Path

import pytest

from declip_ds.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads(path):
    exp = load_config(path)
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    if path.stem.endswith("_yfcc15m"):
        method, arch = path.stem.split("_")[0], path.stem.split("_", 1)[1].rsplit("_", 1)[0]
        assert exp.method.name == method
        assert ("vit_base_patch32" in exp.model.vision.name) == (arch == "vit_b32")
        assert "deepspeed --hostfile hosts train.py" in header and "4 nodes x 8 GPUs" in header
        assert "Expected" in header and exp.train.batch_size == 128 and exp.train.steps == 128001
        assert exp.model.logit_scale_bounds == [3.0, 6.0]
        # the DeCLIP repo's zero-shot protocol: Resize(256) + CenterCrop(224), bilinear (METHODS.md §7)
        assert (exp.eval.interpolation, exp.eval.crop_ratio) == ("bilinear", 0.875)
        assert "Resize(256) + CenterCrop(224)" in path.read_text()
    else:
        assert (exp.eval.interpolation, exp.eval.crop_ratio) == ("bicubic", 0.875)  # the demo keeps the default


def test_every_method_has_its_benchmark_recipes():
    names = {p.stem for p in RECIPES}
    for method in ("clip", "declip", "slip", "filip"):
        assert {f"{method}_vit_b32_yfcc15m", f"{method}_rn50_yfcc15m"} <= names
    assert "defilip_vit_b32_yfcc15m" in names
