# The SuperExec that runs fedcycle's ServerApp (coordinator) or ClientApps (a site):
# Flower's official image with fedcycle and its pinned dependencies installed, so that no
# dependency is installed at run time.
FROM flwr/superexec:1.42.0-py3.11-ubuntu24.04

WORKDIR /app
COPY --chown=app:app requirements.txt pyproject.toml README.md ./
COPY --chown=app:app fedcycle ./fedcycle
COPY --chown=app:app deploy/fleet-proxy.conf.template ./deploy/
RUN python -m pip install --no-cache-dir -r requirements.txt \
 && python -m pip install --no-cache-dir --no-deps .

ENTRYPOINT ["flower-superexec"]
