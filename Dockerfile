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
# The README's own install command; the [tensorrt] extra adds tensorrt + cuda-python (already
# satisfied by the container's TensorRT 10.3 bindings for tensorrt).
RUN python -m pip install --upgrade pip \
 && python -m pip install -e ".[tensorrt]"

# Fail the build early if the pieces the x86-cuda target needs are missing.
RUN python -c "import tensorrt, edgekd.runtime; print('tensorrt', tensorrt.__version__)" \
 && (command -v trtexec || test -x /opt/tensorrt/bin/trtexec) \
 && edgekd targets show x86-cuda

CMD ["edgekd", "--help"]
