"""The server secret that keys request fingerprints: from the settings or a key file.

The secret must not live in the database: the idempotency records it keys are
stored there, and a fingerprint anyone with the database could recompute would
give away the request (a released count brute-forced from its hash). Every
worker and every process on one database must use the same secret, or a retry
that lands on another worker would look like a different request.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from service.settings import Settings

KEY_BYTES = 32
MIN_SETTING_CHARS = 32


class SecretKeyError(RuntimeError):
    """The secret key cannot be used: the service refuses to start."""


def load(settings: Settings) -> bytes:
    """The fingerprint key: `LEDGER_SECRET_KEY` if set, else the key file (created if absent)."""
    if settings.secret_key is not None:
        value = settings.secret_key.get_secret_value()
        if len(value) < MIN_SETTING_CHARS:
            raise SecretKeyError(
                f"LEDGER_SECRET_KEY must be at least {MIN_SETTING_CHARS} characters "
                "(e.g. the output of `openssl rand -hex 32`)"
            )
        return value.encode()
    return _from_file(Path(settings.secret_key_file))


def _from_file(path: Path) -> bytes:
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    _create(path)
    return _read(path)


def _create(path: Path) -> None:
    # Written in full to a private temporary file, then linked into place: the link either
    # creates the name or fails with EEXIST, like O_EXCL, but no reader ever sees a partial
    # file. Of workers racing here the first link wins and every other one reads its key.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SecretKeyError(f"cannot create the secret key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(KEY_BYTES) + "\n")
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    except OSError as exc:
        raise SecretKeyError(f"cannot create the secret key file {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _read(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise SecretKeyError(f"cannot read the secret key file {path}: {reason}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretKeyError(
            f"the secret key file {path} is accessible to other users "
            f"(mode {stat.S_IMODE(mode):o}); make it private with `chmod 600 {path}`"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise SecretKeyError(
            f"the secret key file {path} must hold {KEY_BYTES} bytes as {2 * KEY_BYTES} hex "
            "digits (e.g. `openssl rand -hex 32`)"
        )
    return key
