# The engine image: `engine serve` by default; `engine sink` with another command.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine ./engine
RUN pip install --no-cache-dir .
EXPOSE 8080 2525
# Bind to all interfaces inside the container; point at Redis and SMTP by URL.
ENV ENGINE_BIND=0.0.0.0:8080
ENTRYPOINT ["engine"]
CMD ["serve"]
