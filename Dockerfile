# easyserve on a CUDA machine. Build from the repository root, then serve a config given at run time:
#
#   docker build -t easyserve .
#   docker run --gpus all --stop-timeout 40 -p 9876:9876 -v "$PWD/configs:/config:ro" \
#       -v "$PWD/models:/app/models:ro" easyserve /config/imagenet_resnet18.yaml
#
# With no config it serves the built-in demo model. The port is always 9876 inside the container
# (--port overrides the config's Port), so EXPOSE, HEALTHCHECK and the port mapping agree. SIGTERM
# (docker stop) drains for up to the config's TimeoutS and 5 s: --stop-timeout gives the container
# longer than that (TimeoutS 30 here) before Docker's SIGKILL, which comes after 10 s by default and
# would cut short the requests still running.
# Ubuntu 24.04, for its Python 3.12: 22.04's 3.10 got onnxruntime-gpu 1.23.2 at most, whose integer
# division by zero ends a worker (SIGFPE) where 1.25 and later raise, which a request is answered 400 for
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 easyserve
WORKDIR /app
COPY pyproject.toml README.md ./
COPY easyserve ./easyserve
COPY handles ./handles
COPY configs ./configs
# installed as the README installs it, with an onnxruntime-gpu built for this image's CUDA (12): from 1.27
# on, PyPI's is built for CUDA 13, whose libraries are not here, and ONNX Runtime then runs every model on
# the CPU. The build fails if the CUDA provider lacks a library (the driver's, libcuda, comes at run time).
RUN python3 -m venv /opt/easyserve \
    && . /opt/easyserve/bin/activate \
    && echo "onnxruntime-gpu<1.27" > /tmp/cuda12.txt \
    && PIP_CONSTRAINT=/tmp/cuda12.txt pip install -e . \
    && provider=$(echo /opt/easyserve/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so) \
    && if [ ! -f "$provider" ]; then echo "onnxruntime has no CUDA provider: $provider"; exit 1; fi \
    && missing=$(ldd "$provider" | grep "not found" | grep -v "libcuda\.so" || true) \
    && if [ -n "$missing" ]; then echo "onnxruntime-gpu's CUDA provider lacks: $missing"; exit 1; fi \
    && mkdir -p /app/models && chown easyserve /app/models
ENV PATH=/opt/easyserve/bin:$PATH
# ONNX Runtime keeps an id in $HOME/.cache, and warns at each start where it cannot: under an arbitrary
# user (OpenShift, a KServe runtime's securityContext) HOME may be /. Where the root file system is
# read-only (readOnlyRootFilesystem), /tmp is too: mount a writable volume there (an emptyDir).
ENV XDG_CACHE_HOME=/tmp/.cache

# by number: Kubernetes checks runAsNonRoot (Pod Security's "restricted") only against a numeric user,
# and refuses to start a pod whose image names its user
USER 10001:10001
EXPOSE 9876
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9876/ready', timeout=2)"]
# 0.0.0.0 on purpose: inside a container the published port, not the address, decides who can connect.
# tini is process 1: it passes docker stop's SIGTERM on, and reaps the processes orphaned in the container
# (a handle's data loader or ffmpeg, left when its worker is killed), which easyserve as process 1 would not.
ENTRYPOINT ["tini", "--", "easyserve", "run", "--host", "0.0.0.0", "--port", "9876"]
CMD []
