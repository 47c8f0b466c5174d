# One image for the gateway and the workers: `python -m gateway` (the default) or `python -m worker`.
# Settings come from JOBGATE_* variables; see compose.yaml and docs/OPERATIONS.md.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what `pip install .` needs, so a change to tests or docs does not invalidate this layer.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY generated/ generated/
COPY protocol/ protocol/
COPY common/ common/
COPY gateway/ gateway/
COPY worker/ worker/
COPY jobgate_client/ jobgate_client/
COPY jobgate_cli/ jobgate_cli/
COPY dashboard/ dashboard/
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin jobgate
# An empty working directory, so `python -m gateway` imports the installed package and a worker's
# JOBGATE_APP module can be mounted or copied here (the worker puts its cwd on sys.path).
WORKDIR /app
USER jobgate

# Inside a container the gateway must listen on every interface to be reachable at all.
ENV JOBGATE_LISTEN=0.0.0.0:50051
EXPOSE 50051
CMD ["python", "-m", "gateway"]
