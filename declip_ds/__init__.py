"""declip_ds: train, evaluate and benchmark CLIP, DeCLIP, SLIP, FILIP and DeFILIP with DeepSpeed."""

__version__ = "0.1.0"
