#!/usr/bin/env bash
# Fetch (here, with the package registry) the wheels the GPU machine lacks into .whl/ (git-ignored),
# so benchmarks/gpu/run_all.sh can install them there. The GPU image has torch, triton, timm,
# transformers, tokenizers, safetensors, regex, numpy, pyyaml, msgpack, psutil, py-cpuinfo, ninja,
# einops and tqdm; it lacks deepspeed and its pydantic/hjson, and webdataset/braceexpand/ftfy/wcwidth.
# Versions follow what this project is tested with (see the README); the GPU machine runs Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl
py=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: "${py[@]}" -d .whl \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.7.0
# DeepSpeed ships as a source archive; with DS_BUILD_OPS=0 its wheel is pure Python (ops JIT-build there)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -l .whl
du -sh .whl
