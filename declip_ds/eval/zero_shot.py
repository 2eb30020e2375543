"""Zero-shot classification the CLIP way: a classifier from prompt embeddings, cosine logits.

Distributed evaluation is exact: each rank scores its own shards, per-class counts are summed over
ranks, and ranks without a batch keep step with a dummy forward (ZeRO-3 gathers parameters in
every forward, so all ranks must run the same number of them). An error on one rank (its files, its
images) is raised on every rank at the next point they all pass (``declip_ds.train.dist.share_error``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _param(model) -> torch.Tensor:
    return next(model.parameters())


def _one_slot(template: str) -> bool:
    """One place for the class name: "{}" or "{0}" (``str.format`` fills either)."""
    return template.count("{}") + template.count("{0}") == 1


def _check_slots(templates: list[str]) -> None:
    bad = [t for t in templates if not _one_slot(t)]
    if bad:
        raise ValueError(f"Templates must contain one '{{}}' (or '{{0}}') where the class name goes; these do not: "
                         f"{bad[:3]}")


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str], *, class_batch: int = 64) -> torch.Tensor:
    """(E, C) classifier: per class, the mean of the L2-normalised prompt embeddings, renormalised.

    ``templates`` are format strings with one "{}" (e.g. "a photo of a {}.") or "{0}" (the DeCLIP repo's prompt
    files).
    """
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template.")
    _check_slots(templates)
    device = _param(model).device
    columns = []
    for start in range(0, len(classnames), class_batch):
        names = classnames[start : start + class_batch]
        prompts = [t.format(c) for c in names for t in templates]  # (c*T,) class-major
        tokens = tokenizer(prompts).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)  # (c*T, E)
        emb = emb.view(len(names), len(templates), -1).mean(dim=1)  # (c, E)
        columns.append(F.normalize(emb, dim=-1))
    return torch.cat(columns).t().contiguous()  # (E, C)


class TokenClassifier:
    """FILIP's zero-shot classifier: per class, the token embeddings of all prompts averaged position by
    position and renormalised (C, L, d); an image is scored image->text only, without a scale
    (METHODS.md §4). See ``zero_shot_token_classifier`` for the two renormalisations."""

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor | None):
        self.tokens, self.mask = tokens, mask  # (C, L, d), bool (C, L) or None
        self.shape = (tokens.shape[-1], tokens.shape[0])  # like W: (d, C)

    def logits(self, model, images: torch.Tensor) -> torch.Tensor:
        from declip_ds.losses.filip import filip_similarity

        x = F.normalize(model.map_image_tokens(model.image_features(images)["tokens"]).float(), dim=-1)  # (B, Ti, d)
        s_i2t, _ = filip_similarity(x, self.tokens.to(x.device), None, None if self.mask is None else
                                    self.mask.to(x.device), direction="i2t")
        return s_i2t  # (B, C)


TOKEN_RENORMS = ("position", "class")


def token_settings(method_cfg, args=None) -> dict:
    """The token classifier's settings a FILIP-family method config carries (the defaults for others), then
    the command line's ``--mask-padding`` / ``--token-renorm`` (``add_token_args``): keyword arguments of
    ``evaluate_task_dir``."""
    out = {"mask_padding": getattr(method_cfg, "mask_padding", True),
           "token_renorm": getattr(method_cfg, "zero_shot_token_renorm", "position")}
    if getattr(args, "mask_padding", None) is not None:
        out["mask_padding"] = args.mask_padding == "true"
    if getattr(args, "token_renorm", None) is not None:
        out["token_renorm"] = args.token_renorm
    return out


def add_token_args(p) -> None:
    """The token classifier's command-line overrides (``--scoring token``)."""
    p.add_argument("--mask-padding", choices=["true", "false"], default=None,
                   help="token scoring: score only the prompt positions up to the EOT (true) or all context "
                        "positions (false, the DeCLIP reference's FILIP); default: the checkpoint's method")
    p.add_argument("--token-renorm", choices=TOKEN_RENORMS, default=None,
                   help="token scoring: renormalise each averaged position (position) or each class's token "
                        "matrix by its norm (class, the DeCLIP reference); default: the checkpoint's method")


@torch.no_grad()
def zero_shot_token_classifier(model, tokenizer, classnames: list[str], templates: list[str], *,
                               mask_padding: bool = True, renorm: str = "position") -> TokenClassifier:
    """Token-level classifier for FILIP-family models (``--scoring token``). Per class, each prompt's token
    embeddings are L2-normalised and averaged over the prompts position by position, then renormalised:

    renorm  ``position``: every position to unit length (each is a unit vector, as in training);
            ``class``: the class's whole (L, d) matrix divided by its Frobenius norm (over the scored
            positions), so positions keep their relative lengths and classes their relative scales: the
            DeCLIP reference's FILIP evaluation (``label_text_pred /= label_text_pred.norm()``).
    mask_padding  score only positions real (up to the EOT) in at least one prompt; False = all L."""
    from declip_ds.methods.filip import text_token_mask

    if renorm not in TOKEN_RENORMS:
        raise ValueError(f"Unknown token renormalisation '{renorm}': use one of {', '.join(TOKEN_RENORMS)}.")
    _check_slots(templates)
    device = _param(model).device
    tokens, masks = [], []
    for c in classnames:
        ids = tokenizer([t.format(c) for t in templates]).to(device)  # (T, L)
        y = F.normalize(model.map_text_tokens(model.text_features(ids)["tokens"]).float(), dim=-1)  # (T, L, d)
        mean = y.mean(dim=0)  # (L, d)
        valid = text_token_mask(ids).any(dim=0)  # (L,) positions real in at least one prompt
        if renorm == "position":
            tokens.append(F.normalize(mean, dim=-1))
        else:
            tokens.append(mean / (mean[valid] if mask_padding else mean).norm())
        masks.append(valid)
    return TokenClassifier(torch.stack(tokens), torch.stack(masks) if mask_padding else None)


def _logits(model, images: torch.Tensor, W) -> torch.Tensor:
    if isinstance(W, TokenClassifier):
        return W.logits(model, images)
    return F.normalize(model.encode_image(images).float(), dim=-1) @ W.to(images.device).float()  # (B, C)


def _synced(loader, group, device):
    """Yield the loader's batches; under a group, keep yielding ``None`` until every rank is done. An error in
    one rank's loader (an unreadable image, a vanished file) is raised on every rank (``RankFailed`` on the
    others), shared in the collective that counts the ranks with a batch: the others would wait in it. An
    error in the caller's work on a batch (out of memory in its forward), thrown into the generator
    (``gen.throw``), is shared the same way at the next count."""
    from declip_ds.train.dist import share_error

    it, failed = iter(loader), None
    while True:
        error, batch = failed, None
        if error is None:
            try:
                batch = next(it, None)
            except Exception as e:  # noqa: BLE001 (share_error re-raises it)
                error = e
        (busy,) = share_error(error, group, values=[int(batch is not None)], tensor_device=device)
        if busy == 0:
            return
        try:
            yield batch
        except Exception as e:  # noqa: BLE001 (the caller's error on this batch: shared at the next count)
            failed = e


@torch.no_grad()
def zero_shot_evaluate(model, W: torch.Tensor, loader, *, group=None, image_size: int | None = None) -> dict:
    """Top-1, top-5 (with more than 5 classes) and mean per-class recall of ``images @ W``.

    ``loader`` yields ``(images, labels)`` or ``(images, labels, keys)``. With ``group``, the counts of
    all ranks are summed, so the result equals a single-process run over the union of their data.
    """
    p = _param(model)
    dev = p.device if p.device.type == "cuda" else torch.device("cpu")  # where the counts live
    C = W.shape[1]  # (E, C) tensor or a TokenClassifier
    correct1 = torch.zeros(C, dtype=torch.long, device=dev)
    total = torch.zeros(C, dtype=torch.long, device=dev)
    correct5 = torch.zeros((), dtype=torch.long, device=dev)
    batches = _synced(loader, group, dev)
    for batch in batches:
        try:
            if batch is None:  # this rank is out of data; others are not: a throwaway forward through the same
                # modules as theirs (under ZeRO-3 every module's parameter gather is a collective, FILIP's token
                # mapping included)
                size = image_size or getattr(model, "image_size", 224)
                _logits(model, torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype), W)
                continue
            images, labels = batch[0].to(p.device, p.dtype), batch[1].to(dev).long()
            logits = _logits(model, images, W).to(dev)  # (B, C)
        except Exception as e:  # noqa: BLE001 (out of memory in this rank's forward: raised on every rank at the
            batches.throw(e)    # next count, where the others wait; a ZeRO-3 forward is itself collective)
        top = logits.topk(min(5, C), dim=-1).indices  # (B, k)
        hit1 = top[:, 0] == labels
        total += torch.bincount(labels, minlength=C)
        correct1 += torch.bincount(labels[hit1], minlength=C)
        correct5 += (top == labels[:, None]).any(dim=-1).sum()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        for t in (correct1, total, correct5):
            dist.all_reduce(t, group=group)
    n = int(total.sum())
    seen = total > 0
    return {
        "acc1": float(correct1.sum()) / max(n, 1),
        "acc5": float(correct5) / max(n, 1) if C > 5 else None,  # with <= 5 classes top-5 is trivially 1
        "mean_per_class_recall": float((correct1[seen].float() / total[seen].float()).mean()) if n else 0.0,
        "n": n,
    }


# ----------------------------------------------------------------------------- synthetic eval splits


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def load_templates(spec: str, task_dir: Path | None = None) -> list[str]:
    """``synthetic`` (the task's templates.txt), ``simple``, ``imagenet80`` or a file, one per line."""
    from declip_ds.eval import templates as T

    if spec == "synthetic":
        if task_dir is None or not (task_dir / "templates.txt").is_file():
            raise FileNotFoundError(f"templates 'synthetic' need {task_dir}/templates.txt; choose other templates "
                                    f"(--templates for the eval commands, eval.templates in a training config): "
                                    f"simple, imagenet80 or a file.")
        return read_lines(task_dir / "templates.txt")
    if spec == "simple":
        return list(T.SIMPLE_TEMPLATES)
    if spec == "imagenet80":
        return list(T.IMAGENET_TEMPLATES)
    if Path(spec).is_file():
        return read_lines(Path(spec))
    raise FileNotFoundError(f"Unknown templates '{spec}': use synthetic, simple, imagenet80 or a path to a file.")


TEMPLATE_SETS = ("synthetic", "simple", "imagenet80")


def check_templates(spec: str, key: str = "eval.templates") -> None:
    """Fail now, naming ``key``, if ``spec`` is neither a known template set nor a readable file whose
    every line has one "{}" or "{0}" (the trainer checks before training, not at its first evaluation)."""
    from declip_ds.config import ConfigError

    if spec in TEMPLATE_SETS:
        return
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{key}: '{spec}' is neither a template set ({', '.join(TEMPLATE_SETS)}) nor an existing "
                          "file; pick a set or give the path of a file with one prompt per line, e.g. "
                          "'a photo of a {}.'.")
    lines = read_lines(path)
    bad = [t for t in lines if not _one_slot(t)]
    if not lines or bad:
        raise ConfigError(f"{key}: every line of {path} must be a prompt with one '{{}}' (or '{{0}}') for the class name; "
                          + (f"{len(bad)} are not, e.g. {bad[0]!r}." if bad else "the file is empty."))


def evaluate_task_dir(model, tokenizer, task_dir: Path, *, templates: str, image_size: int, normalize,
                      batch_size: int = 128, rank: int = 0, world_size: int = 1, group=None, workers: int = 0,
                      scoring: str = "global", mask_padding: bool = True, token_renorm: str = "position",
                      interpolation: str = "bicubic", crop_ratio: float = 224 / 256) -> dict:
    """Zero-shot on one labelled shard directory (classnames.txt, *.tar with a ``cls`` key).

    scoring: ``global`` (cosine of the global embeddings) or ``token`` (FILIP's token-wise scoring, with
    ``mask_padding`` / ``token_renorm``: see ``zero_shot_token_classifier``).
    Images: ``eval_transform(image_size, normalize, crop_ratio, interpolation)``; the defaults are
    ``EvalConfig``'s (the trainer passes its exp.eval.interpolation / crop_ratio)."""
    from declip_ds.data.transforms import eval_transform
    from declip_ds.data.wds import build_eval_loader
    from declip_ds.train.dist import errors_shared

    task_dir = Path(task_dir)
    if scoring not in ("global", "token"):
        raise ValueError(f"Unknown scoring '{scoring}': use global or token.")
    with errors_shared(group):  # the files, read on every rank: one rank's error stops them all here
        classnames = read_lines(task_dir / "classnames.txt")
        prompts = load_templates(templates, task_dir)
        urls = sorted(str(p) for p in task_dir.glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"No .tar shards in {task_dir}.")
        transform = eval_transform(image_size, normalize=normalize, crop_ratio=crop_ratio, interpolation=interpolation)
        loader = build_eval_loader(urls, transform, batch_size,
                                   rank=rank, world_size=world_size, workers=workers)
    if scoring == "token":  # after the files: under ZeRO-3 (the trainer's evaluation) these forwards are collectives
        W = zero_shot_token_classifier(model, tokenizer, classnames, prompts, mask_padding=mask_padding,
                                       renorm=token_renorm)
    else:
        W = zero_shot_classifier(model, tokenizer, classnames, prompts)
    result = zero_shot_evaluate(model, W, loader, group=group, image_size=image_size)
    if result["n"] == 0:  # summed over the ranks: every rank raises
        raise NoEvalSamples(f"No labelled image could be read from the {len(urls)} shard(s) in {task_dir} (a "
                            f"sample needs an image and a .cls label; the skip warnings above say what was wrong), "
                            f"so there is no accuracy to report for it. Rebuild the task's shards.")
    check_imagenet_task(task_dir.name, classnames, result["n"])
    return result


IMAGENET_VAL_IMAGES = 50_000


def imagenet_release(name: str) -> tuple[str, int]:
    """(release, images) a 1000-class task named ``name`` should score: ImageNet-V2 (``imagenetv2*``, 10,000),
    ImageNet-Sketch (``*sketch*``, 50,889) or ImageNet val (50,000); counts from the downstream registry."""
    from declip_ds.eval.downstream import get_spec

    key = re.sub(r"[-_ ]", "", name.lower())
    if "imagenetv2" in key:
        return "ImageNet-V2", get_spec("imagenet_v2").n_images
    if "sketch" in key:
        return "ImageNet-Sketch", get_spec("imagenet_sketch").n_images
    return "ImageNet val", IMAGENET_VAL_IMAGES


def check_imagenet_task(name: str, classnames: list[str], n: int) -> list[str]:
    """Warnings for a 1000-class task named imagenet* whose class names are not OpenAI's (the list the
    literature's zero-shot numbers use, METHODS.md §7) or that scored other than its release's images
    (ImageNet val's 50,000, ImageNet-V2's 10,000, ImageNet-Sketch's 50,889: skipped samples change top-1):
    a number reported from it is then not the standard one."""
    from declip_ds.eval.templates import IMAGENET_CLASSNAMES

    if not name.lower().startswith("imagenet") or len(classnames) != len(IMAGENET_CLASSNAMES):
        return []
    out = []
    differ = [(i, a, b) for i, (a, b) in enumerate(zip(classnames, IMAGENET_CLASSNAMES)) if a != b]
    if differ:
        shown = "; ".join(f"class {i}: {a!r} (OpenAI: {b!r})" for i, a, b in differ[:3])
        out.append(f"'{name}': {len(differ)} of its 1000 class names differ from OpenAI's ImageNet names ({shown}); "
                   f"zero-shot top-1 depends on them, so the number is not comparable with published ones")
    release, expected = imagenet_release(name)
    if n != expected:
        out.append(f"'{name}': {n} images scored, not {release}'s {expected} (skipped or missing "
                   f"samples: see the warnings above); the number is not the full {release} set's")
    for w in out:
        log.warning(w)
    return out


class NoEvalSamples(ValueError):
    """An evaluation task yielded no sample: a 0 % row would read as a result."""


def format_table(results: dict[str, dict]) -> str:
    """A plain table: task, acc1, acc5, mean per-class recall, n."""
    rows = [f"{'task':<14}{'acc1':>8}{'acc5':>8}{'mpcr':>8}{'n':>7}"]
    for task, r in results.items():
        acc5 = f"{100 * r['acc5']:8.2f}" if r.get("acc5") is not None else f"{'-':>8}"
        rows.append(f"{task:<14}{100 * r['acc1']:8.2f}{acc5}{100 * r['mean_per_class_recall']:8.2f}{r['n']:>7}")
    return "\n".join(rows)
