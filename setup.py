from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "declip_ds" / "__init__.py").read_text(), version)

setup(
    name="declip_ds",
    version=version["__version__"],
    description="Train, evaluate and benchmark CLIP, DeCLIP, SLIP, FILIP and DeFILIP with DeepSpeed",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["declip_ds", "declip_ds.*"]),
    package_data={"declip_ds.data": ["bpe_simple_vocab_16e6.txt.gz", "BPE_LICENSE.txt"],
                  "declip_ds.eval": ["downstream_prompts.json", "DOWNSTREAM_PROMPTS_LICENSE.txt"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "deepspeed>=0.15",
        "triton; platform_system == 'Linux'",
        "webdataset>=0.2.86",
        "braceexpand",
        "timm>=1.0.9",
        "transformers>=4.40",
        "tokenizers>=0.19",
        "ftfy",
        "regex",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "pillow",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "wandb": ["wandb"],
        "parquet": ["pyarrow"],
        "bench": ["matplotlib"],
        "test": ["pytest>=7", "open_clip_torch>=2.24", "scikit-learn", "pyarrow"],
    },
)
