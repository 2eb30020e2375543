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
