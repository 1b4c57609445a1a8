# syntax=docker/dockerfile:1
# Stage 1: build the wheel (Rust core + Python package) with maturin.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends curl build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH
RUN pip install --no-cache-dir maturin
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rust_core rust_core
COPY python python
RUN maturin build --release --out /wheels

# Stage 2: the runtime, no compiler.
FROM python:3.11-slim-bookworm
RUN useradd --create-home meterflow
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER meterflow
WORKDIR /home/meterflow
ENV MF_HOST=0.0.0.0 MF_PORT=3000 MF_DATA_DIR=/home/meterflow/data
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"MF_PORT\"]}/health')"
CMD ["meterflow", "serve"]
