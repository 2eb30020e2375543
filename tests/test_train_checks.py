"""Checks the trainer makes before any process group or loader exists."""

from pathlib import Path

import pytest

from declip_ds.config import ConfigError, from_dict
from declip_ds.train import engine


def write_shards(d, n):
    import io
    import tarfile

    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with tarfile.open(d / f"{i:05d}.tar", "w") as tf:
            data = b"a caption"
            info = tarfile.TarInfo(f"k{i}.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(d) + "/{00000.." + f"{n - 1:05d}" + "}.tar"


def test_epoch_mode_with_too_few_shards_fails_with_the_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    exp = from_dict({"data": {"train_shards": [write_shards(tmp_path, 3)], "mode": "epoch", "workers": 2,
                              "num_samples": 3}})
    with pytest.raises(ValueError, match=r"3.*2.*2"):
        engine.resolve_sources(exp)


def test_shard_pattern_matching_nothing_names_it(tmp_path):
    pattern = str(tmp_path / "missing" / "{00000..00003}.tar")
    exp = from_dict({"data": {"train_shards": [pattern]}})
    with pytest.raises(FileNotFoundError, match="missing"):
        engine.resolve_sources(exp)


def test_synthetic_cannot_be_mixed(tmp_path):
    exp = from_dict({"data": {"train_shards": ["synthetic", write_shards(tmp_path, 2)]}})
    with pytest.raises(ConfigError, match="synthetic"):
        engine.resolve_sources(exp)


def test_param_groups_exclude_norms_biases_embeddings_and_temperature():
    from declip_ds.models import build_model

    model = build_model(from_dict({}).model)
    groups = engine.param_groups(model, 0.1, no_decay_embeddings=True)
    decay = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decay}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert not any(n.endswith("bias") or "logit_scale" in n or "embedding" in n or "pos_embed" in n or "cls_token" in n
                   for n in names)
    assert any("attn" in n and n.endswith("weight") for n in names)
    total = sum(len(g["params"]) for g in groups)
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_recipes_decay_the_attention_in_proj_biases_as_the_reference():
    """The DeCLIP reference exempts only Linear/Conv/norm biases: nn.MultiheadAttention's in_proj_bias is
    decayed. With train.decay_attention_in_proj_bias (every DeCLIP-reference *_yfcc15m recipe) the text blocks'
    attn.in_proj_bias and the ViT blocks' attn.qkv.bias are decayed, every other 1-D tensor is not."""
    import glob

    from declip_ds.config import load_config
    from declip_ds.models import build_model

    model = build_model(from_dict({}).model)  # vit_tiny + the text transformer
    def decayed(flag):
        groups = engine.param_groups(model, 0.1, no_decay_embeddings=False, decay_attention_in_proj_bias=flag)
        return {n for n, p in model.named_parameters() if any(p is q for q in groups[0]["params"])}
    one_d = {n for n, p in model.named_parameters() if p.ndim < 2}
    in_proj = {n for n in one_d if n.endswith(("attn.in_proj_bias", "attn.qkv.bias"))}
    assert {n.split(".")[0] for n in in_proj} == {"visual", "text"}  # both towers have them
    assert decayed(True) & one_d == in_proj and not decayed(False) & one_d
    assert decayed(True) - in_proj == decayed(False)
    recipes = sorted(glob.glob("experiments/*_yfcc15m.yaml"))
    reference = [r for r in recipes if "_official_" not in r]  # the DeCLIP reference's recipes
    assert reference and all(load_config(r).train.decay_attention_in_proj_bias for r in reference)
    # the official SLIP repo exempts every parameter whose name contains "bias" (tests/test_recipes.py)
    assert not any(load_config(r).train.decay_attention_in_proj_bias for r in set(recipes) - set(reference))


def test_a_checkpoint_config_without_newer_keys_is_not_a_change():
    """A tag saved before a key existed (here two, one of them FIXED_KEYS) compares equal to a run that
    keeps their defaults: the default keeps the old behaviour, so it is neither a change nor a refusal."""
    from declip_ds.config import to_dict
    from declip_ds.train import checkpoint as C

    current = to_dict(from_dict({"train": {"lr": 1e-3}}))
    saved = to_dict(from_dict({"train": {"lr": 1e-3}}))
    del saved["train"]["decay_attention_in_proj_bias"], saved["train"]["stop_file"]
    assert C.config_changes(C._with_defaults(saved), current) == {}
    current["train"]["decay_attention_in_proj_bias"] = True
    assert list(C.config_changes(C._with_defaults(saved), current)) == ["train.decay_attention_in_proj_bias"]
    # a key whose default changed later: a DeCLIP tag saved without method.contrastive_text ran "masked", so a
    # resume under today's default ("raw") shows as a change (which check_config refuses:
    # test_a_resume_under_a_changed_default_is_refused), and one that sets "masked" does not
    for name in ("declip", "defilip"):
        current = to_dict(from_dict({"method": {"name": name}, "model": {"token_dim": 8}}))
        saved = to_dict(from_dict({"method": {"name": name}, "model": {"token_dim": 8}}))
        del saved["method"]["contrastive_text"]
        assert current["method"]["contrastive_text"] == "raw"
        assert C.config_changes(C._with_defaults(saved), current) == {"method.contrastive_text": ("masked", "raw")}
        current["method"]["contrastive_text"] = "masked"
        assert C.config_changes(C._with_defaults(saved), current) == {}


def test_missing_sample_count_is_an_error_before_training(tmp_path):
    from declip_ds.data.wds import DataError

    exp = from_dict({"data": {"train_shards": [write_shards(tmp_path, 2)]}})  # no sizes.json, no num_samples
    with pytest.raises(DataError, match="num_samples|sizes.json"):
        engine.resolve_sources(exp)
    exp.data.num_samples = 2
    assert len(engine.resolve_sources(exp)[0]) == 2


def test_bad_eval_templates_fail_before_training(tmp_path):
    from declip_ds.eval.zero_shot import check_templates

    for spec in ("synthetic", "simple", "imagenet80"):
        check_templates(spec)
    good = tmp_path / "prompts.txt"
    good.write_text("a photo of a {}.\n\na drawing of a {0}.\n")  # "{0}": the DeCLIP repo's prompt files
    check_templates(str(good))
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo of a thing.\n")
    with pytest.raises(ConfigError, match=r"eval.templates: every line of .*bad.txt.*'a photo of a thing.'"):
        check_templates(str(bad))
    # a typo: the trainer stops before any process group, loader or training step (exit 2 in train.py)
    exp = from_dict({"eval": {"templates": "imagenet_80"}, "train": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(ConfigError, match=r"eval.templates: 'imagenet_80' is neither a template set"):
        engine.train(exp)
    assert not (tmp_path / "run").exists()
    exp = from_dict({"eval": {"templates": "imagenet_80", "at_end": False}, "train": {"eval_every": 0}})
    engine.check_eval(exp)  # never evaluated: nothing to check


def test_missing_eval_tasks_fail_before_training(tmp_path):
    """A typo in eval.data_root or eval.tasks stops the run at start (exit 2 in train.py), naming the task,
    its directory and the tasks that root has; the synthetic tasks the trainer will generate pass."""
    root = tmp_path / "eval"
    for task, files in (("cifar10", ("classnames.txt", "0.tar")), ("nolabels", ("0.tar",)), ("noshards", ("classnames.txt",))):
        (root / task).mkdir(parents=True)
        for f in files:
            (root / task / f).write_text("x")
    run = {"output_dir": str(tmp_path / "run")}
    engine.check_eval(from_dict({"eval": {"data_root": str(root), "tasks": ["cifar10"]}, "train": run}))
    for task, what in (("cifar100", "does not exist"), ("nolabels", "has no classnames.txt"),
                       ("noshards", "has no .tar shards")):
        exp = from_dict({"eval": {"data_root": str(root), "tasks": ["cifar10", task]}, "train": run})
        with pytest.raises(ConfigError, match=rf"eval.tasks: '{task}' needs the directory .*{task} .*{what}\. "
                                              rf"eval.data_root is .*, whose tasks are: cifar10\. Fix"):
            engine.train(exp)
    assert not (tmp_path / "run").exists()
    # the synthetic root is generated with the training shards: its tasks pass before it exists, others do not
    synthetic = {"synthetic_root": str(tmp_path / "shapes")}
    engine.check_eval(from_dict({"data": synthetic, "eval": {"tasks": ["shape", "color", "shape_color"]}}))
    with pytest.raises(ConfigError, match=r"eval.tasks: 'shapes' .*eval.data_root \(unset: <data.synthetic_root>"):
        engine.check_eval(from_dict({"data": synthetic, "eval": {"tasks": ["shapes"]}}))
    engine.check_eval(from_dict({"eval": {"data_root": str(tmp_path / "nope"), "at_end": False}}))  # never evaluated


def test_a_fresh_start_under_resume_auto_names_the_directory_and_the_logged_steps(tmp_path, monkeypatch):
    """--resume auto without a checkpoint starts at step 0 and says where it looked (absolute: a relative
    output_dir follows the working directory) and, when the directory logged steps, that they are redone."""
    monkeypatch.chdir(tmp_path)
    msg = engine.fresh_start_message(Path("runs/x"))
    assert msg == f"no complete checkpoint in {tmp_path}/runs/x/checkpoints (--resume auto): starting at step 0"
    (tmp_path / "runs/x").mkdir(parents=True)
    (tmp_path / "runs/x/metrics.jsonl").write_text('{"step": 10, "loss": 1}\n{"step": 20}\nnot json\n{"x": 1}\n')
    assert "metrics.jsonl logged steps up to 20, which are trained again" in engine.fresh_start_message(Path("runs/x"))


def test_a_resume_under_a_changed_default_is_refused(tmp_path):
    """A DeCLIP run that trained with contrastive_text masked (saved explicitly, or before the key existed)
    resumed with a YAML that leaves the key at today's default would switch its objective mid-run: the
    resume stops, naming the override that continues it as it trained; with the override it passes."""
    import yaml

    from declip_ds.config import to_dict
    from declip_ds.train import checkpoint as C

    class Engine:  # check_config reads the module's tensors only when model.safetensors is there
        module = None

    tag = tmp_path / "step_00000004"
    tag.mkdir()
    exp = {"method": {"name": "declip"}}
    for saved in (to_dict(from_dict({"method": {"name": "declip", "contrastive_text": "masked"}})),
                  {**to_dict(from_dict(exp)), "method": {k: v for k, v in to_dict(from_dict(exp))["method"].items()
                                                         if k != "contrastive_text"}}):
        (tag / "config.yaml").write_text(yaml.safe_dump(saved))
        target = C.ResumeTarget(tmp_path, tag.name)
        with pytest.raises(C.CheckpointError, match=r"trained with method.contrastive_text=masked, and this config "
                                                    r"has the new default .*add method.contrastive_text=masked"):
            C.check_config(Engine, target, to_dict(from_dict(exp)))
        current = to_dict(from_dict({"method": {"name": "declip", "contrastive_text": "masked"}}))
        assert C.check_config(Engine, target, current) == {}
