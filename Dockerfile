# The gateway image. Triton itself runs from NVIDIA's image (see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# configs/gateway.yaml binds loopback (make run); in a container the port must be reachable.
ENV SWITCHYARD__SERVER__HOST=0.0.0.0
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install .
COPY configs ./configs
COPY model_repository ./model_repository
EXPOSE 8080 8081
HEALTHCHECK --interval=5s --timeout=2s --retries=12 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
CMD ["python", "-m", "gateway", "serve", "--config", "configs/gateway.yaml"]
