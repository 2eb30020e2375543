"""The temperature clamp (the DeCLIP reference's logit_scale in [3, 6]) must reach what the forward uses,
under every ZeRO stage: the optimizer's fp32 master copy and, under ZeRO-3, the partitioned working copy
the next forward gathers from."""

import pytest
import torch

from tests.distributed import run_ranks


class _Temperature(torch.nn.Module):
    def __init__(self, init: float):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.logit_scale = torch.nn.Parameter(torch.full((1,), init))

    def forward(self, x, sign):  # d loss / d logit_scale = sign: Adam moves it against the sign
        return self.linear(x).sum() * 0 + sign * self.logit_scale.float().sum(), self.logit_scale.float().sum()

    def scale_parameters(self):
        return [self.logit_scale]


def _seen_scales(rank, world, stage, bf16, persist):
    import os

    os.environ.setdefault("LOCAL_RANK", str(rank))
    import deepspeed

    from declip_ds.train.engine import clamp_scales

    zero = {"stage": stage}
    if stage == 3 and not persist:
        zero["stage3_param_persistence_threshold"] = 0  # small parameters partitioned too
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.5, "torch_adam": True, "weight_decay": 0.0}}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    seen = []
    for init, sign in ((2.659, 1.0), (5.9, -1.0)):  # pushed below 3, pushed above 6
        torch.manual_seed(0)
        model = _Temperature(init)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        clamp_scales(engine, model, (3.0, 6.0))  # before the first step, as the trainer does
        for _ in range(3):
            x = torch.ones(1, 4, dtype=torch.bfloat16 if bf16 else torch.float32)
            loss, used = engine(x, sign)
            seen.append(float(used.detach()))
            engine.backward(loss)
            engine.step()
            clamp_scales(engine, model, (3.0, 6.0))
    return seen


@pytest.mark.dist
@pytest.mark.parametrize("stage,bf16,persist", [(2, True, True), (3, False, True), (3, True, True), (3, True, False)])
def test_clamp_reaches_the_forward(stage, bf16, persist):
    # one rank: ZeRO-3 still partitions (into one piece), and a spawned pair of DeepSpeed CPU ranks can abort
    # at exit (the shm comm op), which would make this test flaky
    results = run_ranks(_seen_scales, world=1, args=(stage, bf16, persist), timeout=300)
    for seen in results:
        low, high = seen[:3], seen[3:]
        assert low == [3.0, 3.0, 3.0], (stage, bf16, persist, seen)  # 2.659 raised to 3 before the first step
        assert high[0] == pytest.approx(5.9, abs=0.02) and high[1:] == [6.0, 6.0], (stage, bf16, persist, seen)


def _released_from_the_bound(rank, world):
    """The temperature pushed above 6 for 4 steps, then down for 10, under ZeRO-0 with bf16 (DeepSpeed's
    FP16_UnfusedOptimizer keeps fp32 masters that safe_get_full_fp32_param cannot see) and in fp32."""
    import os

    os.environ.setdefault("LOCAL_RANK", str(rank))
    import deepspeed

    from declip_ds.train.engine import clamp_scales

    runs = {}
    for bf16 in (True, False):
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
               "optimizer": {"type": "AdamW", "params": {"lr": 0.5, "torch_adam": True, "weight_decay": 0.0}}}
        if bf16:
            cfg["bf16"] = {"enabled": True}
        torch.manual_seed(0)
        model = _Temperature(5.9)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        clamp_scales(engine, model, (3.0, 6.0))
        seen = []
        for sign in (-1.0,) * 4 + (1.0,) * 10:
            loss, used = engine(torch.ones(1, 4, dtype=torch.bfloat16 if bf16 else torch.float32), sign)
            seen.append(float(used.detach()))
            engine.backward(loss)
            engine.step()
            clamp_scales(engine, model, (3.0, 6.0))
        runs[type(engine.optimizer).__name__] = seen
    return runs


@pytest.mark.dist
def test_zero0_16bit_clamp_reaches_the_master_copy():
    """ZeRO-0 + bf16 (ds_configs/zero0.json): clamping only the working copy let the fp32 master drift to ~8,
    so the temperature stayed at 6 for all 10 steps after the gradient turned; clamped in the master, it
    leaves the bound as the fp32 run does (within bf16 rounding)."""
    runs = run_ranks(_released_from_the_bound, world=1, timeout=300)[0]
    bf16, fp32 = runs["FP16_UnfusedOptimizer"], runs["AdamW"]
    assert max(bf16[:7]) == 6.0 and bf16[-1] < 5.0, bf16
    assert all(abs(a - b) <= 0.02 for a, b in zip(bf16, fp32)), (bf16, fp32)


def test_fp16_optimizer_master_finds_each_parameter():
    """The fused FP16_Optimizer keeps one flat fp32 tensor per group: each parameter's master is its slice,
    in fp16_groups order; the unfused one a tensor per parameter; any other optimizer has none."""
    from types import SimpleNamespace

    from declip_ds.train.engine import fp16_optimizer_master

    params = [torch.zeros(2, 3), torch.zeros(1), torch.zeros(4)]
    flat = torch.arange(11, dtype=torch.float32)
    fused = SimpleNamespace(fp16_groups=[params[:2], params[2:]], fp32_groups_flat=[flat[:7].clone(), flat[7:].clone()])
    assert torch.equal(fp16_optimizer_master(fused, params[0]), torch.arange(6.0).view(2, 3))
    assert torch.equal(fp16_optimizer_master(fused, params[1]), torch.tensor([6.0]))
    fp16_optimizer_master(fused, params[2]).clamp_(8.0, 9.0)  # in place, in the optimizer's tensor
    assert fused.fp32_groups_flat[1].tolist() == [8.0, 8.0, 9.0, 9.0]
    masters = [p.float() + 1 for p in params]
    unfused = SimpleNamespace(fp16_groups=[params], fp32_groups=[masters])
    fp16_optimizer_master(unfused, params[2]).clamp_(0.0, 0.5)
    assert torch.equal(fp16_optimizer_master(unfused, params[1]), masters[1]) and masters[2].tolist() == [0.5] * 4
    assert fp16_optimizer_master(torch.optim.SGD(params, lr=1), params[0]) is None
    assert fp16_optimizer_master(fused, torch.zeros(1)) is None  # not one of its parameters
