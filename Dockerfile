# syntax=docker/dockerfile:1
# Build stage: wheels for the project (server and client distributions) and its dependencies.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY accountant accountant
COPY service service
COPY trainer_client trainer_client
COPY migrations migrations
# The client distribution first, from its folder: the server's requirement
# privacy-ledger-client==0.1.0 is then met by that wheel, never by an index.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ./trainer_client .

# Runtime stage: the wheels installed, no build tools, a non-root user.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/privacy-ledger ledger
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY docker/entrypoint.sh /usr/local/bin/privacy-ledger-entrypoint
USER ledger
WORKDIR /var/lib/privacy-ledger
ENV LEDGER_DATABASE_URL=sqlite:////var/lib/privacy-ledger/ledger.db \
    LEDGER_HOST=0.0.0.0 \
    LEDGER_PORT=8000 \
    LEDGER_MIGRATE_ON_START=1 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2).status != 200)"]
ENTRYPOINT ["privacy-ledger-entrypoint"]
CMD ["serve"]
