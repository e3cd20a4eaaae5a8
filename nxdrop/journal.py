"""Logging: the journal where there is one, else stderr with ``<N>`` priority prefixes.

Every handler redacts the configured secrets, so a token that reaches a message (a
plugin's error text, say) is never written anywhere.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from nxdrop.settings import Settings

# syslog priorities, as sd-daemon(3) prefixes want them
PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    for level, priority in sorted(PRIORITY.items(), reverse=True):
        if levelno >= level:
            return priority
    return 7


class RedactSecrets(logging.Filter):
    """Replaces every secret value in a record's final message with ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for secret in self.secrets:
            message = message.replace(secret, "***")
            if record.exc_text:
                record.exc_text = record.exc_text.replace(secret, "***")
        record.msg, record.args = message, None
        return True


class PriorityFormatter(logging.Formatter):
    """``<6>message``: systemd reads the priority from the prefix of a stderr line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def secrets_of(settings: Settings) -> list[str]:
    """The secret values to keep out of every log line."""
    values = [settings.cdcs_token, settings.elabftw_api_key]
    return [v.get_secret_value() for v in values if v is not None]


def setup_logging(settings: Settings, *, verbose: bool = False) -> None:
    """Configure the root logger once per process for the daemon and the commands."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else settings.log_level)
    redact = RedactSecrets(secrets_of(settings))
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(levelname)-7s %(message)s"))
    else:
        handler.setFormatter(PriorityFormatter("%(message)s"))
    handler.addFilter(redact)
    root.addHandler(handler)
    if settings.log_path is not None:
        settings.log_path.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(settings.log_path / "nxdrop.log", encoding="utf-8")
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        file_handler.addFilter(redact)
        root.addHandler(file_handler)
    for noisy in ("urllib3", "watchdog", "peewee"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
