# syntax=docker/dockerfile:1
# Mollifier sidecar: `docker build -t mollifier .`
# Runs `mollifier serve`; configure it with MOLLIFIER_* variables (see README).

# ---- builder: wheels for the client, the server and every dependency
FROM python:3.11-slim AS builder
WORKDIR /src
RUN python -m pip install --no-cache-dir --upgrade pip wheel
# The proto and Lua live at the top and are linked into the packages, so the
# whole tree (less .dockerignore) is needed to build.
COPY . .
# Both on one line so `mollifier-client==0.1.0` resolves to ./client, not an index.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels ./client .

# ---- runtime: only the installed wheels, as a non-root user
FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MOLLIFIER_LISTEN=0.0.0.0:50051
RUN groupadd --system --gid 10001 mollifier \
 && useradd --system --uid 10001 --gid mollifier --home-dir /nonexistent \
    --shell /usr/sbin/nologin mollifier
COPY --from=builder /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels mollifier \
 && rm -rf /wheels
USER 10001:10001
EXPOSE 50051
# grpc.health.v1 Check (plaintext; with MOLLIFIER_TLS_* set, override this probe) on the overall service ("" = the whole server): healthy
# only while SERVING, so a sidecar draining after SIGTERM reports unhealthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os,sys,grpc;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;p=os.environ.get('MOLLIFIER_LISTEN','0.0.0.0:50051').rpartition(':')[2];c=grpc.insecure_channel('127.0.0.1:'+p);sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(),timeout=2).status==h.HealthCheckResponse.SERVING else 1)"]
# Exec form: SIGTERM reaches mollifier itself, which drains and exits 0.
ENTRYPOINT ["mollifier"]
CMD ["serve"]
