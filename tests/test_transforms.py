"""Image transforms and the multi-view SampleTransform (CPU, tiny images)."""

import math

import pytest
import torch
from PIL import Image

from declip_ds.data.transforms import (
    NORMALIZE,
    SampleTransform,
    ToRGB,
    clip_train_transform,
    eval_transform,
    moco_v2_transform,
    simclr_transform,
)


def _image(w=48, h=40):
    # a gradient so crops, flips and jitter all change the pixels
    img = Image.new("RGB", (w, h))
    img.putdata([(x * 5 % 256, y * 6 % 256, (x * y) % 256) for y in range(h) for x in range(w)])
    return img


@pytest.mark.parametrize("make", [clip_train_transform, moco_v2_transform, simclr_transform, eval_transform])
def test_shapes_and_dtype(make):
    out = make(32)(_image())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_normalize_constants_and_errors():
    assert NORMALIZE["openai"] == ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert NORMALIZE["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's ImageNet
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    for name, (mean, std) in NORMALIZE.items():
        out = eval_transform(16, normalize=name)(white)
        expected = (1 - torch.tensor(mean)) / torch.tensor(std)
        torch.testing.assert_close(out[:, 0, 0], expected)
    with pytest.raises(ValueError, match="imagenet, openai"):
        clip_train_transform(16, normalize="cifar")
    with pytest.raises(ValueError, match="bicubic"):
        eval_transform(16, interpolation="lanczos9")


def test_eval_transform_is_deterministic_center_crop():
    t = eval_transform(32)
    assert t.transforms[0].size == round(32 / (224 / 256))  # 37
    a, b = t(_image()), t(_image())
    assert torch.equal(a, b)
    assert t.draft_size is None  # evaluation decodes JPEGs in full, as the reference (shards = image folders)


def test_eval_transform_converts_to_rgb_after_the_crop_as_openai():
    """EvalModel.transform() stands in for OpenAI's preprocess: Resize + CenterCrop, then convert("RGB") (a palette or
    an alpha channel resized before the conversion gives other pixels). Without the step, L / P / RGBA images failed
    with a broadcast error in Normalize. RGB images, which our eval loaders make at load time, are unchanged."""
    import numpy as np
    from torchvision import transforms as T

    norm = T.Normalize(*NORMALIZE["openai"])
    openai_order = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                              lambda im: im.convert("RGB"), T.ToTensor(), norm])
    ours = eval_transform(32, normalize="openai", crop_ratio=1.0, interpolation="bicubic")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 61, 3), dtype=np.uint8), "RGB")
    alpha = rng.integers(0, 256, (40, 61), dtype=np.uint8)
    alpha[:, :20] = 0
    rgba = Image.fromarray(np.dstack([np.asarray(rgb), alpha]), "RGBA")
    images = {"RGB": rgb, "L": rgb.convert("L"), "P": rgb.quantize(16), "RGBA": rgba, "LA": rgba.convert("LA"),
              "CMYK": rgb.convert("CMYK")}
    refs = [openai_order]
    try:
        import open_clip

        refs.append(open_clip.image_transform(32, is_train=False, mean=NORMALIZE["openai"][0],
                                              std=NORMALIZE["openai"][1]))
    except ImportError:
        pass
    for mode, image in images.items():
        out = ours(image)
        assert out.shape == (3, 32, 32), mode
        for ref in refs:
            assert torch.equal(out, ref(image)), mode
    for mode in ("P", "RGBA"):  # converting first (the caller's way before) is not the same
        assert not torch.equal(ours(images[mode]), ours(images[mode].convert("RGB"))), mode
    before = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(), norm])
    assert torch.equal(ours(rgb), before(rgb))  # what the loaders feed it: as before the RGB step
    x = torch.rand(3, 40, 61)
    assert ToRGB()(x) is x  # tensors and arrays pass through, as open_clip's MaybeConvertMode


def test_eval_transform_protocols_and_crop_ratio_errors():
    from torchvision.transforms import InterpolationMode

    openai = eval_transform(224, normalize="openai", crop_ratio=1.0, interpolation="bicubic")
    declip = eval_transform(224, normalize="imagenet", crop_ratio=224 / 256, interpolation="bilinear")
    assert (openai.transforms[0].size, openai.transforms[0].interpolation) == (224, InterpolationMode.BICUBIC)
    assert (declip.transforms[0].size, declip.transforms[0].interpolation) == (256, InterpolationMode.BILINEAR)
    assert openai.transforms[1].size == declip.transforms[1].size == (224, 224)
    for bad in (0, -0.5, 1.01):
        with pytest.raises(ValueError, match=r"crop_ratio must be in \(0, 1\]"):
            eval_transform(32, crop_ratio=bad)


def test_moco_views_differ_between_calls_and_follow_torch_seed():
    t = moco_v2_transform(24)
    torch.manual_seed(0)
    a, b = t(_image()), t(_image())
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    a2 = t(_image())
    assert torch.equal(a, a2)  # all randomness comes from torch's RNG


def test_moco_recipe():
    t = moco_v2_transform(224)
    names = [type(x).__name__ for x in t.transforms]
    assert names == ["RandomResizedCrop", "RandomApply", "RandomGrayscale", "RandomApply",
                     "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert t.transforms[0].scale == (0.2, 1.0)
    jitter = t.transforms[1].transforms[0]  # MoCo v2 / SimCLR: ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8
    assert type(jitter).__name__ == "ColorJitter" and t.transforms[1].p == 0.8
    assert (jitter.brightness, jitter.contrast, jitter.saturation) == ((0.6, 1.4),) * 3
    assert jitter.hue == pytest.approx((-0.1, 0.1))
    assert t.transforms[2].p == 0.2 and t.transforms[4].p == 0.5  # grayscale, horizontal flip
    assert t.transforms[0].ratio == pytest.approx((3 / 4, 4 / 3))
    blur = t.transforms[3].transforms[0]
    assert blur.kernel_size[0] % 2 == 1 and 21 <= blur.kernel_size[0] <= 23
    assert blur.sigma == (0.1, 2.0) and t.transforms[3].p == 0.5
    assert simclr_transform(224).transforms[0].scale == (0.08, 1.0)
    clip = clip_train_transform(224)
    assert [type(x).__name__ for x in clip.transforms] == ["RandomResizedCrop", "ToTensor", "Normalize"]
    # STANDARD_SLIP in the DeCLIP repo: RandomResizedCrop(224, scale=(0.5, 1.0)), torchvision's bilinear default
    assert clip.transforms[0].interpolation.value == "bilinear" and clip.transforms[0].scale == (0.5, 1.0)
    assert t.transforms[0].interpolation.value == "bilinear"


def test_sample_transform_two_image_and_two_text_views():
    def tokens(s):
        return torch.tensor([len(w) for w in s.split()][:4] + [0] * (4 - min(4, len(s.split()))))

    def masked(s):
        t = tokens(s)
        return {"text_masked": t.clone().fill_(9), "mlm_labels": t}

    st = SampleTransform({"image1": moco_v2_transform(16), "image2": moco_v2_transform(16)},
                         {"text": tokens, "masked": masked})
    torch.manual_seed(1)
    out = st(_image(), "a small red square")
    assert set(out) == {"image1", "image2", "text", "text_masked", "mlm_labels"}
    assert out["image1"].shape == out["image2"].shape == (3, 16, 16)
    assert not torch.equal(out["image1"], out["image2"])
    assert out["text"].tolist() == [1, 5, 3, 6] and out["mlm_labels"].tolist() == [1, 5, 3, 6]
    assert st.draft_size == moco_v2_transform(16).draft_size


@pytest.mark.parametrize("make", ["clip", "moco", "simclr"])
def test_jpeg_draft_size_never_upsamples_the_smallest_crop(make):
    """data.jpeg_draft decodes JPEGs DCT-downscaled to the transform's draft_size: the narrowest random crop
    (its smallest area at its most extreme aspect ratio) of a square image of that side must still have
    image_size pixels across (the aspect ratio was once left out: 194 px upsampled to 224)."""
    import torchvision.transforms as T

    from declip_ds.data import transforms as tr

    t = {"clip": lambda: tr.clip_train_transform(224), "moco": lambda: tr.moco_v2_transform(224),
         "simclr": lambda: tr.simclr_transform(224)}[make]()
    (rrc,) = [x for x in t.transforms if isinstance(x, T.RandomResizedCrop)]
    d = t.draft_size
    narrow = min(math.sqrt(rrc.scale[0] * d * d * r) for r in rrc.ratio)  # width of the smallest crop at ratio r
    narrow = min(narrow, min(math.sqrt(rrc.scale[0] * d * d / r) for r in rrc.ratio))  # or its height
    assert narrow >= 224 - 1e-6 and d <= math.ceil(224 / math.sqrt(rrc.scale[0] * 3 / 4)) + 1


def test_sample_transform_name_clashes():
    with pytest.raises(ValueError, match="both"):
        SampleTransform({"x": eval_transform(8)}, {"x": len})
    st = SampleTransform({"image": eval_transform(8)}, {"t": lambda s: {"image": torch.zeros(1)}})
    with pytest.raises(ValueError, match="image"):
        st(_image(), "hi")
    assert SampleTransform({"image": eval_transform(8), "raw": lambda im: torch.zeros(1)}).draft_size is None
