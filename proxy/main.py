"""The ASGI application object, built from the environment (what uvicorn workers import)."""

from .cli import configure_logging
from .front.app import create_app
from .settings import load_settings

settings = load_settings()
configure_logging(settings.log_level)
app = create_app(settings)
