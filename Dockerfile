# pdmesh images. CPU (default):   docker build --target cpu -t pdmesh:cpu .
#                GPU (CUDA vLLM): docker build --target gpu -t pdmesh:gpu .
# Pass --target: the legacy (non-BuildKit) builder runs every stage up to the target, so without one it would
# also build the GPU stage (pulling the vLLM CUDA image) before the final CPU alias stage.
# The CPU image installs exactly the versions CI proves (requirements/cpu.lock). torch==2.13.0+cpu comes from
# PyTorch's CPU wheel index: pass it with --build-arg PIP_EXTRA_INDEX_URL=<that index> where pip does not
# already know it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VLLM_GPU_IMAGE=vllm/vllm-openai:latest

# The package sources, listed once; both images copy them from here.
FROM scratch AS src
COPY pyproject.toml README.md /src/
COPY pdmesh/ /src/pdmesh/
COPY router/ /src/router/
COPY prefiller/ /src/prefiller/
COPY decoder/ /src/decoder/
COPY connector/ /src/connector/
COPY kvcache/ /src/kvcache/
COPY transfer/ /src/transfer/
COPY kernels/ /src/kernels/
COPY configs/ /src/configs/

FROM ${PYTHON_IMAGE} AS cpu
ARG PIP_EXTRA_INDEX_URL=""
# Optional local wheel mirror/dir URL (pip --find-links), e.g. a host serving torch-2.13.0+cpu: build-time only.
ARG PIP_FIND_LINKS=""
# pip ignores plain-http find-links/indexes on any host but localhost unless trusted: name that host here
# (build-time only, like PIP_FIND_LINKS: build args are in the environment of the RUN steps, not the image).
ARG PIP_TRUSTED_HOST=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PDMESH_HOME=/var/lib/pdmesh
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libnuma1 libgomp1 curl \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/pdmesh
COPY requirements/ requirements/
RUN pip install --no-deps -r requirements/cpu.lock \
 && (pip uninstall -y torchvision torchaudio torchcodec || true)
COPY --from=src /src/ ./
RUN pip install --no-deps -e .
ENTRYPOINT ["pdmesh"]
CMD ["--help"]

FROM ${VLLM_GPU_IMAGE} AS gpu
ENV PYTHONUNBUFFERED=1 PDMESH_HOME=/var/lib/pdmesh
WORKDIR /opt/pdmesh
COPY --from=src /src/ ./
RUN pip install --no-cache-dir "nixl==1.5.1" "nixl-cu12==1.5.1" && pip install --no-cache-dir -e .
ENTRYPOINT ["pdmesh"]
CMD ["--help"]

# Last stage = what a build without --target produces: the CPU image (BuildKit builds only the cpu stage for it).
FROM cpu AS default
