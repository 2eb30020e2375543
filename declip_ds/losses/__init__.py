"""Pure-torch losses: the reference implementations that the Triton kernels are checked against."""

from declip_ds.losses.clip import clip_loss
from declip_ds.losses.filip import filip_loss, filip_similarity, filip_topk_loss
from declip_ds.losses.simclr import simclr_loss
from declip_ds.losses.gather import all_gather_no_grad, all_gather_with_grad, world_info

__all__ = ["clip_loss", "filip_similarity", "filip_loss", "filip_topk_loss", "all_gather_with_grad", "all_gather_no_grad", "world_info", "simclr_loss"]
