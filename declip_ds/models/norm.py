"""BatchNorm computed in float32 whatever the input and parameter dtypes.

DeepSpeed's bf16/fp16 mode casts parameters but keeps buffers in fp32, a mix torch's batch_norm
rejects (bf16 weight, fp32 running stats); the DeCLIP reference kept its BNs in fp32 too
(``fp16_normal_bn: True``). Parameters, buffers and state-dict names are those of nn.BatchNorm*.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F


def batch_norm_fp32(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` in float32 (``nn.BatchNorm*``'s forward semantics), returned in ``x``'s dtype."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    for name in ("running_mean", "running_var"):
        buf = getattr(bn, name)
        if buf is not None and buf.dtype != torch.float32:  # a caller cast the buffers down
            buf.data = buf.data.float()
    use_batch_stats = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    weight = bn.weight.float() if bn.weight is not None else None
    bias = bn.bias.float() if bn.bias is not None else None
    out = F.batch_norm(x.float(), bn.running_mean if track else None, bn.running_var if track else None,
                       weight, bias, use_batch_stats, momentum, bn.eps)
    return out.to(x.dtype)


class BatchNorm1dFP32(nn.BatchNorm1d):
    """nn.BatchNorm1d computed in float32 (for the method heads' MLPs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        return batch_norm_fp32(self, x)


def _fp32_forward(self, x):
    out = batch_norm_fp32(self, x)
    # timm's BatchNormAct2d folds dropout and the activation into the norm layer
    if hasattr(self, "act"):
        out = self.act(self.drop(out) if hasattr(self, "drop") else out)
    return out


def make_batchnorms_fp32_(module: nn.Module) -> nn.Module:
    """Make every BatchNorm in ``module`` (incl. timm's BatchNormAct2d) compute in float32."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.forward = types.MethodType(_fp32_forward, m)
    return module
