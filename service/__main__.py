"""`python -m service`: serve with settings from PIGGYBACK_* environment variables.

A configuration that no retry can fix ends the process with exit status 2 and one line per problem,
naming the variable: settings that do not validate, a host that does not resolve, an unknown backbone,
weights that are missing or cannot be loaded, cuda without CUDA. A store that does not answer is
retried instead (see `service.app`).
"""

import logging
import sys

from pydantic import ValidationError

from service.settings import ConfigurationError, Settings, check_before_start, settings_error_lines

EXIT_CONFIGURATION = 2


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        for line in settings_error_lines(exc):
            print(line, file=sys.stderr)
        return EXIT_CONFIGURATION
    try:
        check_before_start(settings)
    except ConfigurationError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION

    import uvicorn  # after the checks: a refused configuration answers in the time it takes to import torch

    from service.app import create_app
    from service.server import DrainingServer

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    server = DrainingServer(config, app, settings.drain_s)
    server.run()
    if server.configuration_error is not None:
        print(f"cannot start: {server.configuration_error}", file=sys.stderr)
        return EXIT_CONFIGURATION
    return 0


if __name__ == "__main__":
    sys.exit(main())
