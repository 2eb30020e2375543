"""train.accumulation=contrastive: k micro-batches give the gradient of ONE contrastive batch of k*b."""

import json

import pytest
import torch

from declip_ds.config import ConfigError, from_dict
from declip_ds.registry import get_method
from declip_ds.train.accumulate import ContrastiveBatch
from tests.test_methods import TINY, make_batch
from tests.test_reliability import cmd, metrics, run
from tests.test_train_e2e import shapes  # noqa: F401  (fixture)


def grads(method):
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["clip", "slip", "filip"])
def test_gradient_equals_the_full_batch_gradient(name):
    torch.manual_seed(0)
    method = get_method(name)(from_dict({**TINY, "method": {"name": name}}))
    batch = make_batch(method, n=8)
    method.zero_grad()
    full = method.total_loss(method(batch))
    full.backward()
    want = grads(method)

    method.zero_grad()
    parts = [{k: v[:3] for k, v in batch.items()}, {k: v[3:6] for k, v in batch.items()}, {k: v[6:] for k, v in batch.items()}]
    big = ContrastiveBatch(method, parts)
    assert torch.allclose(big.loss, full, atol=1e-6)
    big.backward(lambda x: x.backward())
    got = grads(method)
    assert set(got) == set(want) and ("model.logit_scale" in got or name == "filip")  # FILIP: clip_weight 0
    for n in want:  # float32 sums in another order: relative to the tensor's scale
        err = (got[n] - want[n]).abs().max()
        assert err <= 1e-5 + 1e-5 * want[n].abs().max(), (n, err, want[n].abs().max())
    # plain accumulation (mean of per-micro-batch losses) is a different gradient
    method.zero_grad()
    sum(method.total_loss(method(p)) / 3 for p in parts).backward()
    scale = "filip.logit_scale_dense" if name == "filip" else "model.logit_scale"
    assert not torch.allclose(grads(method)[scale], want[scale], atol=1e-4)


def test_methods_without_support_are_refused_at_load():
    with pytest.raises(ConfigError, match="train.accumulation=contrastive is not supported by method 'declip'"):
        from_dict({"method": {"name": "declip"}, "train": {"accumulation": "contrastive"}})


@pytest.mark.parametrize("name", ["clip", "filip", pytest.param("slip", marks=pytest.mark.slow)])
def test_deepspeed_step_equals_the_full_batch_step(tmp_path, shapes, name):  # noqa: F811
    """Same samples (one resampled stream, one worker): 2 micro-batches of 4 with contrastive
    accumulation give the loss and gradient norm of one batch of 8, through DeepSpeed's engine."""
    a, b = tmp_path / "full", tmp_path / "accum"
    rc, out = run(cmd(a, shapes, "train.steps=2", "train.save_every=100", f"method.name={name}"), tmp_path)
    assert rc == 0, out[-3000:]
    rc, out = run(cmd(b, shapes, "train.steps=2", "train.save_every=100", "train.batch_size=4", "train.grad_accum=2",
                      "train.accumulation=contrastive", f"method.name={name}"), tmp_path)
    assert rc == 0, out[-3000:]
    ma, mb = metrics(a), metrics(b)
    for s in (1, 2):
        for f in ("loss", "grad_norm"):
            assert mb[s][f] == pytest.approx(ma[s][f], rel=1e-4, abs=1e-6), (s, f)


def test_batchnorm_running_statistics_count_each_micro_batch_once():
    """A ResNet tower's BatchNorm: the no-grad pass leaves the running statistics alone, so after the
    k grad passes they equal plain accumulation's (one update per micro-batch)."""
    torch.manual_seed(0)
    tiny = {**TINY, "model": {**TINY["model"], "vision": {"name": "resnet_tiny_clip", "image_size": 32, "width": 16,
                                                          "layers": 2, "heads": 2}}}
    method = get_method("clip")(from_dict({**tiny, "method": {"name": "clip"}})).train()
    batch = make_batch(method, n=6)
    parts = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    bns = [m for m in method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns
    start = {k: v.clone() for k, v in method.state_dict().items() if "running" in k or "num_batches" in k}
    for p in parts:  # plain accumulation: each micro-batch through the towers once
        method.embed(p)
    want = {k: v.clone() for k, v in method.state_dict().items() if k in start}
    method.load_state_dict({**method.state_dict(), **start})
    ContrastiveBatch(method, parts).backward(lambda x: x.backward())
    got = {k: v for k, v in method.state_dict().items() if k in start}
    for k in start:
        assert torch.equal(got[k], want[k]), k
    assert any(not torch.equal(want[k], start[k]) for k in start)  # the statistics did move
