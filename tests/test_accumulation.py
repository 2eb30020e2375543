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


def queue_state(method):
    return method.nn_queue.state_dict() if hasattr(method, "nn_queue") else None


@pytest.mark.parametrize("name,extra", [("clip", {}), ("slip", {}), ("filip", {}), ("declip", {}), ("defilip", {}),
                                        ("declip", {"contrastive_text": "masked"})],
                         ids=["clip", "slip", "filip", "declip", "defilip", "declip-masked-text"])
def test_gradient_equals_the_full_batch_gradient(name, extra):
    torch.manual_seed(0)
    # float64, so the only difference left is the order of sums (float32 leaves ~1e-5 through BatchNorm heads)
    method = get_method(name)(from_dict({**TINY, "method": {"name": name, **extra}})).train().double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in make_batch(method, n=8).items()}
    before = queue_state(method)
    if before is not None:  # a queue with a few real texts in it, so the neighbours are not all random rows
        with torch.no_grad():
            method.commit(method.embed({k: v.double() if v.is_floating_point() else v
                                        for k, v in make_batch(method, n=6).items()}))
        before = queue_state(method)
    method.zero_grad()
    full = method.total_loss(method(batch))
    full.backward()
    want, after = grads(method), queue_state(method)

    method.zero_grad()
    if before is not None:
        method.nn_queue.load_state_dict(before)
    parts = [{k: v[:3] for k, v in batch.items()}, {k: v[3:6] for k, v in batch.items()}, {k: v[6:] for k, v in batch.items()}]
    big = ContrastiveBatch(method, parts)
    assert torch.allclose(big.loss, full, atol=1e-12, rtol=0)
    if before is not None:  # DeCLIP's queue: read during the passes, updated once at the end, with all k*b texts
        assert method.nn_queue.ptr == before["ptr"]
    big.backward(lambda x: x.backward())
    got = grads(method)
    if before is not None:
        assert method.nn_queue.ptr == after["ptr"] == before["ptr"] + 16
        torch.testing.assert_close(method.nn_queue.bank, after["bank"], atol=1e-6, rtol=0)
    assert set(got) == set(want) and ("model.logit_scale" in got or name == "filip")  # FILIP: clip_weight 0
    for n in want:  # sums in another order: relative to the tensor's scale
        err = (got[n] - want[n]).abs().max()
        assert err <= 1e-12 + 1e-10 * want[n].abs().max(), (n, err, want[n].abs().max())
    # plain accumulation (mean of per-micro-batch losses) is a different gradient
    method.zero_grad()
    sum(method.total_loss(method(p)) / 3 for p in parts).backward()
    scale = "filip.logit_scale_dense" if name == "filip" else "model.logit_scale"
    assert not torch.allclose(grads(method)[scale], want[scale], atol=1e-4)


def test_methods_without_support_are_refused_at_load():
    from declip_ds.methods.base import Method
    from declip_ds.registry import METHODS, register_method

    @register_method("no_split_test")
    class NoSplit(Method):  # a user's method that keeps one forward
        pass

    try:
        with pytest.raises(ConfigError, match="train.accumulation=contrastive is not supported by method 'no_split_test'"):
            from_dict({"method": {"name": "no_split_test"}, "train": {"accumulation": "contrastive"}})
    finally:
        del METHODS["no_split_test"]
    assert all(cls.supports_contrastive_accumulation for n, cls in METHODS.items())  # every shipped method


@pytest.mark.parametrize("name", [pytest.param("clip", marks=pytest.mark.slow), "filip", "declip",
                                  pytest.param("slip", marks=pytest.mark.slow),
                                  pytest.param("defilip", marks=pytest.mark.slow)])
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




@pytest.mark.slow  # the 2-rank ZeRO-3 test below covers the same two failures in the default run
@pytest.mark.parametrize("name", ["clip", "declip"])
def test_zero3_contrastive_accumulation_equals_the_full_batch_step(tmp_path, shapes, name):  # noqa: F811
    """ZeRO-3 partitions the temperature, which the loss of the cached embeddings reads outside the towers
    (it failed at step 1), and counts micro-steps in the engine's forward (called around the engine, the
    second micro-batch's gradient replaced the first's: grad norm 27.13 instead of 24.36 at step 1). Three
    steps of 2 x 4 equal three of one batch of 8."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    a, b = tmp_path / "full", tmp_path / "accum"
    rc, out = run(cmd(a, shapes, "train.steps=3", "train.save_every=100", f"method.name={name}", ds=ds), tmp_path)
    assert rc == 0, out[-3000:]
    rc, out = run(cmd(b, shapes, "train.steps=3", "train.save_every=100", "train.batch_size=4", "train.grad_accum=2",
                      "train.accumulation=contrastive", f"method.name={name}", ds=ds), tmp_path)
    assert rc == 0, out[-3000:]
    ma, mb = metrics(a), metrics(b)
    for s in (1, 2, 3):
        for f in ("loss", "grad_norm"):
            assert mb[s][f] == pytest.approx(ma[s][f], rel=1e-4, abs=1e-6), (s, f)


def zero3_full_vs_accumulated(tmp_path, shapes, steps, extra_ds=None):
    """Metrics of 2 ZeRO-3 ranks: batches of 8 per rank, then 2 x 4 with contrastive accumulation."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, **(extra_ds or {})}))
    a, b = tmp_path / "full", tmp_path / "accum"
    rc, out = run(cmd(a, shapes, f"train.steps={steps}", "train.save_every=100", ds=ds, ranks=2), tmp_path, timeout=300)
    assert rc == 0, out[-3000:]
    rc, out = run(cmd(b, shapes, f"train.steps={steps}", "train.save_every=100", "train.batch_size=4",
                      "train.grad_accum=2", "train.accumulation=contrastive", ds=ds, ranks=2), tmp_path, timeout=300)
    assert rc == 0, out[-3000:]
    return metrics(a), metrics(b)


@pytest.mark.slow
@pytest.mark.dist
def test_zero3_bf16_contrastive_accumulation_on_two_ranks_matches_the_global_batch(tmp_path, shapes):  # noqa: F811
    """The configuration of a large run: 2 ranks, ZeRO-3, bf16. 2 x 4 micro-batches per rank with contrastive
    accumulation against one batch of 8 per rank: the same losses and gradient norms within bf16 rounding
    (the towers run in bf16 on different batch shapes; seen: within 7e-4 and 1.4e-3 relative). A lost or
    replaced micro-batch gradient is off by ~10 % (see the fp32 ZeRO-3 test above)."""
    ma, mb = zero3_full_vs_accumulated(tmp_path, shapes, 3, {"bf16": {"enabled": True}})
    for s in (1, 2, 3):
        for f in ("loss", "grad_norm"):
            assert mb[s][f] == pytest.approx(ma[s][f], rel=5e-3), (s, f)  # seen: <= 1.4e-3


@pytest.mark.dist
def test_zero3_contrastive_accumulation_on_two_ranks_equals_the_global_batch(tmp_path, shapes):  # noqa: F811
    """2 ranks, ZeRO-3: each rank's 2 x 4 micro-batches, gathered across ranks by the loss, give the step of
    one global batch of 2 x 8 (the parameters and the temperature partitioned over both ranks)."""
    ma, mb = zero3_full_vs_accumulated(tmp_path, shapes, 2)
    for s in (1, 2):
        for f in ("loss", "grad_norm"):
            assert mb[s][f] == pytest.approx(ma[s][f], rel=1e-4, abs=1e-6), (s, f)
