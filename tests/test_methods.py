"""Every registered method: its views come out of its own sample transform, one forward/backward on a
tiny model gives finite named losses, and a gradient reaches every parameter it trains."""

import numpy as np
import pytest
import torch
from PIL import Image

from declip_ds.config import from_dict
from declip_ds.registry import METHODS, get_method

get_method("clip")  # imports declip_ds.methods, which registers them all

TINY = {
    "model": {"vision": {"name": "vit_tiny", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
              "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}, "embed_dim": 16},
    "train": {"batch_size": 4},
}
CAPTIONS = ["a small red circle on the left", "two blue squares and a yellow star", "crimson disk, top right",
            "a large green triangle in the middle", "a white heart", "an orange cross at the bottom"]


def tiny_experiment(name: str, **method):
    return from_dict({**TINY, "method": {"name": name, **method}})


def make_batch(method, n=6):
    rng = np.random.default_rng(0)
    transform = method.sample_transform()
    samples = [transform(Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), CAPTIONS[i % 6])
               for i in range(n)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_one_step(name):
    torch.manual_seed(0)
    exp = tiny_experiment(name)
    method = get_method(name)(exp)
    method.train()
    batch = make_batch(method)
    out = method(batch)
    losses = {k: v for k, v in out.items() if k.endswith("_loss")}
    weights = method.loss_weights()
    assert losses and set(losses) <= set(weights)
    assert {k for k, w in weights.items() if w} <= set(losses)  # every weighted term is computed
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values()), losses
    total = method.total_loss(out)
    total.backward()
    no_grad = tuple(getattr(method, "parameters_without_gradient", lambda: ())())  # name prefixes
    missing = [n for n, p in method.named_parameters()
               if p.requires_grad and not n.startswith(no_grad) and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"{name}: no (finite) gradient for {missing[:8]}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_sample_transform_pickles(name):
    """DataLoader workers started by spawn / forkserver (Python 3.14's default on Linux) get the dataset,
    and with it the method's sample transform, pickled: no lambdas or closures in it."""
    import pickle

    exps = [tiny_experiment(name)]
    if name == "filip":  # its plain-caption and MLM-masked text views
        masked = {**TINY, "model": {**TINY["model"], "text": {**TINY["model"]["text"], "mask_token": True}}}
        exps = [from_dict({**TINY, "method": {"name": name, "mlm_mask_text": False}}),
                from_dict({**masked, "method": {"name": name, "mlm_mask_text": True}})]
    for exp in exps:
        method = get_method(name)(exp)
        transform = method.sample_transform()
        copy = pickle.loads(pickle.dumps(transform))
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
        torch.manual_seed(3)
        a = transform(image, CAPTIONS[0])
        torch.manual_seed(3)
        b = copy(image, CAPTIONS[0])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_state_round_trip(name):
    method = get_method(name)(tiny_experiment(name))
    state = method.extra_state()
    method.load_extra_state(state)  # what a resume does, per rank


def test_method_model_defaults_fill_only_what_the_config_leaves_out(monkeypatch):
    cls = get_method("clip")
    monkeypatch.setattr(cls, "model_defaults", {"text.mask_token": True, "token_dim": 8}, raising=False)
    exp = tiny_experiment("clip")
    assert exp.model.text.mask_token is True and exp.model.token_dim == 8
    explicit = from_dict({**TINY, "model": {**TINY["model"], "token_dim": 4}, "method": {"name": "clip"}})
    assert explicit.model.token_dim == 4  # the user's value stands; the method's validate judges it


@pytest.mark.parametrize("name", ["clip", "declip"])
def test_loss_impl_triton_matches_torch(name):
    """loss.impl picks the fused kernel (Triton's interpreter on CPU) with the same result."""
    from declip_ds.kernels import fused_clip_loss

    results = []
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        exp = from_dict({**TINY, "method": {"name": name}, "loss": {"impl": impl}})
        method = get_method(name)(exp).eval()
        assert (method.contrastive is fused_clip_loss) == (impl == "triton")
        torch.manual_seed(1)
        batch = make_batch(method)
        with torch.no_grad():
            results.append(method.total_loss(method(batch)))
    assert torch.allclose(results[0], results[1], atol=1e-5)
