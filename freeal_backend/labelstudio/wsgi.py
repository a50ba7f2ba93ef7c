"""WSGI entry point for gunicorn: ``gunicorn -c gunicorn.conf.py freeal_backend.labelstudio.wsgi:app``."""
from __future__ import annotations

import logging
import os

from freeal_backend.labelstudio.server import create_app

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                    format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
for _noisy in ("httpx", "openai", "urllib3", "transformers"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

app = create_app()
