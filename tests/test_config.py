"""Config loading: YAML, overrides, unknown keys, wrong types, DeepSpeed contradictions."""

import json
import math
from pathlib import Path

import pytest

from declip_ds.config import ConfigError, from_dict, load_config, to_dict
from declip_ds.train.ds_config import build_ds_config, read_ds_config, resolve_precision
from declip_ds.train.schedule import lr_at

DEMO = "experiments/demo_shapes.yaml"


def test_demo_config_loads_and_overrides_are_typed():
    exp = load_config(DEMO, ["train.lr=3e-4", "train.steps=7", "model.vision.freeze_patch_embed=true",
                             "train.betas=[0.9,0.95]"])
    assert exp.train.lr == 3e-4 and isinstance(exp.train.lr, float)
    assert exp.train.steps == 7 and exp.model.vision.freeze_patch_embed is True
    assert exp.train.betas == [0.9, 0.95]
    assert type(exp.method).__name__ == "CLIPConfig"


@pytest.mark.parametrize("override,match", [
    (["train.lrr=1"], r"Unknown config key 'train.lrr'. Did you mean 'lr'\? Allowed keys in train: .*\blr\b"),
    (["method.name=declip", "method.queue_sze=8"],
     r"'method.queue_sze'. Did you mean 'queue_size'\? Allowed keys in method \(the declip method's\)"),
    (["bogus.x=1"], r"Unknown config key 'bogus'"),
    (["model.vision.nam=vit"], r"'model.vision.nam'"),
    (["train.steps=abc"], r"train.steps: expected an integer"),
    (["train.steps=1.5"], r"train.steps: expected an integer"),
    (["train.lr=fast"], r"train.lr: expected a number"),
    (["model.grad_checkpointing=3"], r"expected true or false"),
    (["method.name=de-clip"], r"Unknown method 'de-clip'. Known: .*clip"),
    (["method.clip_weigth=1"], r"'method.clip_weigth'"),
    (["train.precision=fp8"], r"train.precision: 'fp8' is not allowed"),
    (["data.mode=stream"], r"data.mode"),
    (["model.logit_scale_init=.nan"], r"model.logit_scale_init: must be finite"),
    (["model.logit_scale_bounds=[6,3]"], r"logit_scale_bounds"),
    (["train.batch_size=0"], r"train.batch_size: must be > 0"),
    (["data.train_weights=[1,2]"], r"data.train_weights has 2 entries"),
    # '::' joins sources inside one list item: counted at load, not only after DeepSpeed started
    (["data.train_shards=[/d/a.tar::/d/b.tar]", "data.train_weights=[1]"],
     r"data.train_weights has 1 entries but data.train_shards has 2 sources"),
    (["data.train_shards=[/d/a.tar, /d/b.tar]", "data.train_weights=[1,3]", "data.mode=epoch"],
     r"data.train_weights only apply in resampled mode"),
    (["data.train_shards=[/d/a.tar, /d/b.tar]", "data.train_weights=[1,-3]"], r"data.train_weights: need finite"),
    (["data.train_shards=[/d/a.tar, /d/b.tar]", "data.train_weights=[0,0]"], r"data.train_weights: need finite"),
    (["model.text.heads=3"], r"divisible"),
    (["noequals"], r"key=value"),
    (["model.vision.name=vit_huge"], r"model.vision.name: 'vit_huge' is not allowed. Choose one of: .*vit_tiny"),
    (["loss.filip_argmax=keep"], r"loss.filip_argmax: 'keep' is not allowed. Choose one of: recompute, save"),
    (["loss.chunk_size=0"], r"loss.chunk_size: must be > 0"),
    (["eval.interpolation=lanczos"], r"eval.interpolation: 'lanczos' is not allowed. Choose one of: bicubic, bilinear"),
    (["eval.crop_ratio=0"], r"eval.crop_ratio: must be a number with 0 < crop_ratio <= 1.*got 0"),
    (["eval.crop_ratio=1.2"], r"eval.crop_ratio: must be a number with 0 < crop_ratio <= 1.*got 1.2"),
    (["eval.crop_ratio=big"], r"eval.crop_ratio: expected a number"),
    (["data.timeout_minutes=-1"], r"data.timeout_minutes: must be a finite number >= 0 \(0 = no limit\), got -1"),
    # every method's loss weights, through one check over the registry's configs
    (["method.clip_weight=-1"], r"method.clip_weight: a loss weight must be a finite number >= 0, got -1"),
    (["method.name=filip", "method.filip_weight=.inf"], r"method.filip_weight: a loss weight must be a finite"),
    (["method.name=defilip", "method.filip_weight=-1"], r"method.filip_weight: a loss weight must be a finite"),
    (["method.name=declip", "method.nn_weight=.nan"], r"method.nn_weight: a loss weight must be a finite"),
    (["method.name=filip", "method.mlm_mask_text=true", "model.text.mask_token=true", "method.mlm_prob=1.5"],
     r"method.mlm_prob: must be in \(0, 1\)"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, override)


def test_eval_preprocessing_keys_default_and_old_configs_load(tmp_path):
    """eval.interpolation / eval.crop_ratio: bicubic and 224/256 by default (today's eval transform), also
    for a run's saved config.yaml written before the keys existed."""
    import yaml

    from declip_ds.config import save_config

    exp = load_config(DEMO)
    assert (exp.eval.interpolation, exp.eval.crop_ratio) == ("bicubic", 0.875)
    assert load_config(DEMO, ["eval.interpolation=bilinear", "eval.crop_ratio=1"]).eval.crop_ratio == 1.0
    save_config(exp, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del data["eval"]["interpolation"], data["eval"]["crop_ratio"]
    old = from_dict(data)
    assert (old.eval.interpolation, old.eval.crop_ratio) == ("bicubic", 0.875)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping with the sections model, method, .* not a list"):
        load_config(p)
    p.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="list.yaml' is empty .* Pass a recipe from experiments/"):
        load_config(p)
    p.write_text("train:\n  lr: [1e-3\n")
    with pytest.raises(ConfigError, match=r"list.yaml' is not valid YAML \(line 3, column 1\)"):
        load_config(p)


def test_yaml_numbers_without_a_dot_and_override_syntax_errors(tmp_path):
    """YAML 1.1 reads 1e-3 as a string: a float key takes it as the number (as overrides always did); an
    override that is not valid YAML names the key and the quoting that fixes it."""
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  lr: 1e-3\n  warmup_init_lr: 2.5E-5\n  steps: 7\n")
    exp = load_config(p)
    assert (exp.train.lr, exp.train.warmup_init_lr) == (1e-3, 2.5e-5)
    with pytest.raises(ConfigError, match="train.weight_decay: expected a number, got str '1e-3x'"):
        load_config(p, ["train.weight_decay=1e-3x"])
    with pytest.raises(ConfigError, match=r"Override 'data.train_shards': the value .* is not valid YAML .*"
                                          r"data.train_shards='\[\"/data/\{00000..00009\}.tar\"\]'"):
        load_config(p, ["data.train_shards=[/data/{00000..00003}.tar]"])
    assert load_config(p, ['data.train_shards=["/d/{00000..00003}.tar"]']).data.train_shards == ["/d/{00000..00003}.tar"]


def write(tmp_path, data):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(data))
    return str(p)


def test_ds_config_is_filled(tmp_path):
    exp = from_dict({"train": {"batch_size": 8, "grad_accum": 2, "grad_clip": 1.0}})
    out = build_ds_config(exp, read_ds_config("ds_configs/zero2.json"), world_size=4)
    assert out["train_batch_size"] == 64 and out["train_micro_batch_size_per_gpu"] == 8
    assert out["gradient_accumulation_steps"] == 2 and out["gradient_clipping"] == 1.0
    assert out["bf16"]["enabled"] and not out["fp16"]["enabled"]
    assert out["optimizer"]["type"] == "AdamW" and out["optimizer"]["params"]["lr"] == exp.train.lr
    assert out["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("ds,overrides,match", [
    ({"train_batch_size": 100}, [], r"train_batch_size=100 but train.batch_size \(8\) x train.grad_accum \(1\) x world size \(2\) = 16"),
    ({"train_micro_batch_size_per_gpu": 4}, [], r"train_micro_batch_size_per_gpu=4 contradicts"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, [], r"both true"),
    ({"bf16": {"enabled": True}}, ["train.precision=fp32"], r"train.precision=fp32 contradicts"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.5}}}, [], r"optimizer.params.lr=0.5 contradicts"),
    ({"optimizer": {"type": "SGD"}}, [], r"AdamW"),
    ({"scheduler": {"type": "WarmupLR"}}, [], r"'scheduler' section"),
    ({"gradient_clipping": 1.0}, [], r"train.grad_clip is 0"),
    ({"zero_optimisation": {"stage": 2}}, [], r"unknown top-level key"),
    ({"zero_optimization": {"stage": 7, "overlap_comm": "maybe"}}, [],  # DeepSpeed's own check, before any build
     r"zero_optimization.stage: Input should be 0, 1, 2, 3.* \(got 7\); zero_optimization.overlap_comm: .*'maybe'"),
])
def test_ds_contradictions_are_errors(tmp_path, ds, overrides, match):
    exp = from_dict({"train": {"batch_size": 8}})
    for o in overrides:
        k, v = o.split("=")
        setattr(exp.train, k.split(".")[1], v)
    with pytest.raises(ConfigError, match=match):
        build_ds_config(exp, read_ds_config(write(tmp_path, ds)), world_size=2)


def test_precision_auto_follows_the_json():
    exp = from_dict({})
    assert resolve_precision(exp, {"bf16": {"enabled": True}}) == "bf16"
    assert resolve_precision(exp, {}) == "fp32"
    shipped = {f.name: resolve_precision(exp, read_ds_config(str(f))) for f in Path("ds_configs").glob("*.json")}
    assert shipped == {"zero0.json": "bf16", "zero1.json": "bf16", "zero2.json": "bf16", "zero3.json": "bf16",
                       "zero2_offload.json": "bf16", "zero2_fp32.json": "fp32"}


@pytest.mark.parametrize("section,match", [
    ({"writer": {"decoupled": True}}, r"checkpoint.writer is not supported: .*side process .*COMPLETE.*Remove it"),
    ({"writer": {"type": "mock"}}, r"checkpoint.writer is not supported"),
    ({"use_node_local_storage": True}, r"checkpoint.use_node_local_storage is not supported: each node"),
    ({"checkpoint_serialization": False}, r"checkpoint.checkpoint_serialization is not supported"),
    ({"tag_validaton": "Fail"}, r"unknown key checkpoint.tag_validaton. Known: \['load_universal', 'parallel_write', "
                                r"'tag_validation'\]"),
    ({"tag_validation": "Strict"}, r"checkpoint.tag_validation='Strict' is not allowed. Choose one of: Ignore, Warn"),
    ("yes", r"checkpoint must be a mapping"),
])
def test_ds_checkpoint_section_keeps_the_trainers_crash_safe_save(tmp_path, section, match):
    with pytest.raises(ConfigError, match=match):
        read_ds_config(write(tmp_path, {"checkpoint": section}))


def test_ds_checkpoint_section_allows_tag_validation_and_deepspeeds_defaults(tmp_path):
    for mode in ("Ignore", "warn", "FAIL"):
        assert read_ds_config(write(tmp_path, {"checkpoint": {"tag_validation": mode}}))["checkpoint"]
    defaults = {"writer": None, "use_node_local_storage": False, "checkpoint_serialization": True}
    assert read_ds_config(write(tmp_path, {"checkpoint": defaults}))["checkpoint"] == defaults


def test_missing_ds_config_file():
    with pytest.raises(ConfigError, match="file not found"):
        read_ds_config("ds_configs/nope.json")


def test_schedule_warmup_then_cosine():
    kw = dict(lr=1e-3, steps=1000, warmup_steps=100, warmup_init_lr=1e-4, min_lr=0.0)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(50, **kw) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(100, **kw) == pytest.approx(1e-3)
    assert lr_at(550, **kw) == pytest.approx(0.5e-3)
    assert lr_at(1000, **kw) == pytest.approx(0.0, abs=1e-12)
    vals = [lr_at(s, **kw) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert math.isclose(lr_at(0, lr=1.0, steps=10, warmup_steps=0), 1.0)


@pytest.mark.parametrize("override,warns", [
    (["method.name=declip"], "its two MoCo-v2 views crop with method.view_scale"),
    (["method.name=defilip"], "its two MoCo-v2 views crop with method.view_scale"),
    (["method.name=filip", "method.image_view=moco_v2"], "method.image_view=clip crops with it"),
    (["method.name=filip"], None), (["method.name=slip"], None), (["method.name=declip", "data.rrc_scale=[0.5,1]"], None),
])
def test_an_rrc_scale_the_method_does_not_read_is_named(override, warns):
    """The demo sets data.rrc_scale [0.8, 1]; DeCLIP's views (and FILIP's MoCo-v2 view) crop at their own scale,
    so loading such a config says the key is unused and what to set instead."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = load_config(DEMO, override)
        from_dict(to_dict(exp))  # a config read back (a checkpoint's) says nothing more
    got = [str(w.message) for w in caught if "data.rrc_scale" in str(w.message)]
    if warns is None:
        assert got == []
    else:
        assert len(got) == 1 and "data.rrc_scale=[0.8, 1.0] is not used by method" in got[0] and warns in got[0]
