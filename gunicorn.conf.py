"""gunicorn settings for the FreeAL ML backend (each overridable by the environment variable named)."""
import os

from freeal_backend.labelstudio.bind import serve_host

# HOST, else 0.0.0.0 with BASIC_AUTH_USER/PASS and 127.0.0.1 without; an open address without them refuses to start
bind = f"{serve_host(os.environ)}:{os.environ.get('PORT', '9090')}"
# One worker holds the models once; threads serve /predict and /webhook while a job runs.
# More workers are safe (jobs are single-flight through SQLite) but each loads its own models.
workers = int(os.environ.get("WORKERS", "1"))
threads = int(os.environ.get("THREADS", "8"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "300"))  # /predict may spend FREEAL_PREDICT_BUDGET_S on the LLM
accesslog = "-"
