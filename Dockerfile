# se3nb: CUDA image that trains the SE(3)-Transformer on QM9 by running the run notebook nbs/runs/qm9_train.ipynb with papermill.
#
#   docker build -t se3nb .
#   docker run --gpus all --rm -v "$PWD/out:/workspace/out" se3nb                      # single GPU, NVIDIA's recipe
#   docker run --gpus all --rm -e SMOKE=True -v "$PWD/out:/workspace/out" se3nb        # one-minute smoke run
#   docker run --gpus all --rm --ipc=host -v "$PWD/out:/workspace/out" se3nb \
#       torchrun --standalone --nproc_per_node=4 -m se3nb.train --amp --out-dir /workspace/out/ddp   # multi-GPU
#
# The base image's torch must be the version the README/Makefile pin (`pip install torch==X` is then a no-op that keeps
# the CUDA build). tests/test_dockerfile.py lints this file with hadolint and checks that the install commands are the
# ones of `make install` (what the README and CI run).
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${TORCH_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SE3NB_CACHE=/workspace/cache \
    PRESET=nvidia \
    TASK=homo \
    EPOCHS=0 \
    AMP=True \
    SMOKE=False \
    OUT_DIR=/workspace/out \
    PAPERMILL_ARGS=""

# an unprivileged user owns the checkout, the outputs and the caches
RUN groupadd --gid 1000 se3nb \
 && useradd --uid 1000 --gid se3nb --create-home --shell /bin/bash se3nb \
 && mkdir -p /workspace/se3nb /workspace/out /workspace/cache \
 && chown -R se3nb:se3nb /workspace

WORKDIR /workspace/se3nb

# metadata first, so the dependency layer is cached while only notebooks change
COPY --chown=se3nb:se3nb settings.ini setup.py README.md ./
COPY --chown=se3nb:se3nb se3nb/__init__.py se3nb/__init__.py

# `make install`'s commands (the README's set-up and CI's `make test` run them): torch first (already in the base image,
# so this keeps its CUDA build), then se3nb with its dev tools (papermill, ipykernel)
RUN python -m pip install -q "torch==2.13.0" \
 && python -m pip install -q -e ".[dev]"

COPY --chown=se3nb:se3nb . .

USER 1000:1000
RUN python -c "import se3nb.train, papermill; print('se3nb', se3nb.__version__)"

# Default: the training run notebook through papermill. Its parameters come from the environment (PRESET, TASK, EPOCHS
# (0 = the preset's), AMP, SMOKE, OUT_DIR) and PAPERMILL_ARGS for any other (e.g. -e PAPERMILL_ARGS="-p max_train 1000");
# the executed notebook, metrics.jsonl, checkpoint.pt, results.json and the plots land in $OUT_DIR.
CMD ["sh", "-c", "exec papermill nbs/runs/qm9_train.ipynb \"$OUT_DIR/qm9_train.ipynb\" --cwd nbs/runs -p preset \"$PRESET\" -p task \"$TASK\" -p epochs \"$EPOCHS\" -p amp \"$AMP\" -p smoke \"$SMOKE\" -p out_dir \"$OUT_DIR\" $PAPERMILL_ARGS"]
