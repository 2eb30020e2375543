"""Load a trained DualEncoder from a checkpoint, never unpickling arbitrary objects.

Our checkpoints (``<run>/checkpoints/step_XXXXXXXX/``) carry ``model.safetensors`` (the method's
full state in fp32; the DualEncoder under the ``model.`` prefix) and ``config.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

FORMATS = ("auto", "ours", "openai", "open_clip", "declip")


def find_our_checkpoint(path: str | Path) -> Path:
    """The ``model.safetensors`` for a file, a tag dir, a ``checkpoints`` dir or a run dir
    (the newest complete tag)."""
    from declip_ds.train.checkpoint import complete_tags

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Checkpoint '{p}' does not exist.")
    if p.is_file():
        return p
    if (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    for d in (p / "checkpoints", p):
        tags = complete_tags(d)
        if tags:
            return d / tags[-1] / "model.safetensors"
    raise FileNotFoundError(
        f"No declip_ds checkpoint under '{p}': expected model.safetensors in it, or complete "
        f"step_XXXXXXXX/ directories in it or in its checkpoints/ folder."
    )


def load_experiment(path: str | Path):
    """The Experiment a checkpoint was trained with (its ``config.yaml``) and its weights file."""
    from declip_ds.config import from_dict

    weights = find_our_checkpoint(path)
    for cfg_path in (weights.parent / "config.yaml", weights.parent.parent.parent / "config.yaml"):
        if cfg_path.is_file():
            return from_dict(yaml.safe_load(cfg_path.read_text())), weights
    raise FileNotFoundError(f"No config.yaml next to {weights}; it records the model's architecture.")


def _detect(path: Path) -> str:
    try:
        find_our_checkpoint(path)
        if path.is_dir() or path.suffix == ".safetensors":
            return "ours"
    except FileNotFoundError:
        pass
    raise ValueError(
        f"Could not recognise the checkpoint format of '{path}'. This version reads declip_ds checkpoints "
        f"(format='ours': a run dir, a step_XXXXXXXX dir or its model.safetensors)."
    )


def load_pretrained(path: str | Path, format: str = "auto"):
    """A DualEncoder with the weights of ``path``.

    format: auto | ours | openai | open_clip | declip. This version reads ``ours``; the OpenAI /
    open_clip / DeCLIP-release converters are not implemented yet and say so.
    """
    from safetensors.torch import load_file

    from declip_ds.models import build_model

    if format not in FORMATS:
        raise ValueError(f"Unknown checkpoint format '{format}'. Choose one of: {', '.join(FORMATS)}.")
    path = Path(path)
    if format == "auto":
        format = _detect(path)
    if format != "ours":
        raise NotImplementedError(f"Loading '{format}' checkpoints is not implemented in this version; "
                                  f"only declip_ds checkpoints (format='ours') can be loaded.")
    exp, weights = load_experiment(path)
    state = load_file(str(weights))
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not model_state:
        raise ValueError(f"{weights} holds no 'model.*' tensors; is it a declip_ds checkpoint?")
    model = build_model(exp.model)
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit the model of its config.yaml: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}.")
    return model.eval()
