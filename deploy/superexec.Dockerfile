# The SuperExec that runs fedcycle's ServerApp (coordinator) or ClientApps (a site):
# Flower's official image with fedcycle and its pinned dependencies installed, so that no
# dependency is installed at run time.
FROM flwr/superexec:1.42.0-py3.11-ubuntu24.04

WORKDIR /app
COPY --chown=app:app requirements.txt pyproject.toml README.md ./
COPY --chown=app:app fedcycle ./fedcycle
RUN grep -v '^pytest' requirements.txt > /tmp/runtime-requirements.txt \
 && python -m pip install --no-cache-dir -r /tmp/runtime-requirements.txt \
 && python -m pip install --no-cache-dir --no-deps .

# Mount points owned by the image's user, so that named volumes start writable for it.
USER root
RUN mkdir -p /data /app/results && chown app:app /data /app/results
USER app

ENTRYPOINT ["flower-superexec"]
