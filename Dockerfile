# edgekd on an x86-64 host with an NVIDIA GPU and TensorRT: the `x86-cuda` target
# (targets/x86-cuda.toml), and the host side of every target (fine-tune, distill, export, bundle).
#
# NOT BUILT OR TESTED in edgekd's CI: the machines edgekd is developed on have no GPU, no Docker
# daemon and no access to nvcr.io. Build it on a machine with the NVIDIA Container Toolkit:
#
#   docker build -t edgekd:trt .
#   docker run --rm --gpus all -v $PWD/runs:/opt/edgekd/runs edgekd:trt edgekd build --target x86-cuda
#
# Base image: NGC's TensorRT container 24.08 = TensorRT 10.3, CUDA 12.6, Ubuntu 22.04, Python 3.10,
# the same TensorRT as JetPack 6.1 on the Jetson targets, with `trtexec` in /opt/tensorrt/bin.
# (Alternative: nvidia/cuda:12.6.*-cudnn-runtime-ubuntu22.04 + `pip install tensorrt`, which the
# `.[tensorrt]` extra below pulls from PyPI.) Jetson devices use L4T images instead: docs/jetson.md.
FROM nvcr.io/nvidia/tensorrt:24.08-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/tensorrt/bin:$PATH

# ssh client for `edgekd deploy`; Fashion-MNIST is mounted or downloaded by the user (set EDGEKD_FASHION_MNIST).
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/edgekd
COPY . /opt/edgekd
# edgekd + the CUDA bindings pinned as in the [tensorrt] extra ("cuda-python>=12.6,<13": cuda-python 13
# links CUDA 13, this image's driver stack is CUDA 12.6). TensorRT itself is the container's 10.3
# (`tensorrt` module); pip's "tensorrt-cu12>=10.3,<11" would add a second copy, so it is not installed here.
RUN python -m pip install --upgrade pip \
 && python -m pip install -e . "cuda-python>=12.6,<13"

# Fail the build early if the pieces the x86-cuda target needs are missing, or TensorRT is not the 10.x edgekd is written for.
RUN python -c "import tensorrt, edgekd.runtime; v = tensorrt.__version__; print('tensorrt', v); assert v.split('.')[0] == '10', v" \
 && (command -v trtexec || test -x /opt/tensorrt/bin/trtexec) \
 && edgekd targets show x86-cuda

CMD ["edgekd", "--help"]
