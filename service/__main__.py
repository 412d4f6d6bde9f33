"""`python -m service`: serve with settings from PIGGYBACK_* environment variables."""

import logging
import sys

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.server import DrainingServer
from service.settings import Settings


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    DrainingServer(config, app, settings.drain_s).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
