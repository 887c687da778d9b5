"""User ids as the lake stores them, and the salted hash that proves a forget.

- The *stored key* of a raw user id is the id itself, or with
  ``privacy.pseudonymize=true`` its pseudonym ``HMAC-SHA256(secret, user_id)``
  (hex). The secret comes from the environment variable
  ``privacy.secret_env`` or the file ``privacy.secret_file``; it is never
  read from the config, written to the lake, or logged.
- The *log hash* of a stored key, ``HMAC-SHA256(salt, "forget_log:" + key)``,
  is what ``forget_log`` records instead of the id: with the salt it
  recognises a forgotten user again (the night drops their late changes),
  without it nobody can test a guessed id. The salt is derived from the
  secret when there is one, else a random salt kept in a file beside the
  tables (``<lake.root>/_deltarec_privacy/salt``, not a Delta table).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine

SALT_FILE = "_deltarec_privacy/salt"
LOG_PREFIX = b"forget_log:"


class PrivacyError(ValueError):
    """A forget request or privacy setting that cannot be carried out; the message says what to do."""


def load_secret(cfg: "Config") -> bytes | None:
    """The pseudonym secret (None when neither source is set)."""
    P = cfg.privacy
    value = os.environ.get(P.secret_env, "")
    if value:
        return value.encode()
    if P.secret_file:
        try:
            with open(os.path.expanduser(P.secret_file), "rb") as f:
                data = f.read().strip()
        except OSError as e:
            raise PrivacyError(f"privacy.secret_file={P.secret_file!r} cannot be read ({e.strerror}): "
                               "point it at a readable file holding the secret") from None
        if not data:
            raise PrivacyError(f"privacy.secret_file={P.secret_file!r} is empty: write the secret into it")
        return data
    return None


def require_secret(cfg: "Config") -> bytes:
    secret = load_secret(cfg)
    if secret is None:
        raise PrivacyError(
            f"privacy.pseudonymize=true needs a secret: set the environment variable {cfg.privacy.secret_env} "
            "(privacy.secret_env) or privacy.secret_file to a file holding it. Never put it in the config")
    return secret


def pseudonym(secret: bytes, user_id: str) -> str:
    return hmac.new(secret, user_id.encode(), hashlib.sha256).hexdigest()


class KeyMap:
    """Raw user id → stored key, and stored key → log hash, for one lake."""

    def __init__(self, cfg: "Config", lake: "LakeEngine"):
        self.pseudonymize = cfg.privacy.pseudonymize
        self._secret = require_secret(cfg) if self.pseudonymize else load_secret(cfg)
        self._lake = lake
        self._salt_bytes: bytes | None = None

    @property
    def _salt(self) -> bytes:  # read (or made) on first use: a lake nobody asked to forget gets no salt file
        if self._salt_bytes is None:
            self._salt_bytes = _salt(self._secret, self._lake)
        return self._salt_bytes

    def key(self, user_id: str) -> str:
        return pseudonym(self._secret, user_id) if self.pseudonymize else user_id

    def keys(self, user_ids: Iterable[str]) -> list[str]:
        return [self.key(u) for u in user_ids]

    def log_hash(self, key: str) -> str:
        return hmac.new(self._salt, LOG_PREFIX + key.encode(), hashlib.sha256).hexdigest()

    def spark_functions(self):
        """(key, log_hash) as picklable plain functions for Spark UDFs (the
        secret travels inside them to the executors, never through the config)."""
        secret, salt, on = self._secret, self._salt, self.pseudonymize

        def key(u):
            return None if u is None else (hmac.new(secret, u.encode(), hashlib.sha256).hexdigest() if on else u)

        def log_hash(k):
            return None if k is None else hmac.new(salt, LOG_PREFIX + k.encode(), hashlib.sha256).hexdigest()

        return key, log_hash


def stored_keys(cfg: "Config", lake: "LakeEngine", user_ids: Iterable[str]) -> list[str]:
    """What derived tables and the model hold for these raw ids (serving maps
    a request's id with this)."""
    return KeyMap(cfg, lake).keys(user_ids)


def _salt(secret: bytes | None, lake: "LakeEngine") -> bytes:
    if secret is not None:
        return hmac.new(secret, b"deltarec forget_log salt", hashlib.sha256).digest()
    uri = lake.uri(SALT_FILE)
    if "://" in uri and not uri.startswith("file://"):
        from pyarrow import fs as pafs

        fs, path = pafs.FileSystem.from_uri(uri)
        try:
            with fs.open_input_stream(path) as f:
                salt = f.read()
        except (FileNotFoundError, OSError):
            salt = b""
        if len(salt) != 32:
            salt = os.urandom(32)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(salt)
        return salt
    path = uri.removeprefix("file://")
    try:
        with open(path, "rb") as f:
            salt = f.read()
        if len(salt) == 32:
            return salt
    except OSError:
        pass
    salt = os.urandom(32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(salt)
    try:  # the first writer wins: a salt must never change once hashes use it
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path, "rb") as f:
        return f.read()


def check_user_id(user_id, cfg: "Config") -> str | None:
    """Why ``user_id`` cannot be a forget request (None: it can). The same
    rules as validation's for ids: not blank, at most
    ``validation.max_id_length`` characters, no control characters, and
    ``validation.id_pattern`` when set."""
    V = cfg.validation
    if user_id is None or not isinstance(user_id, str) or not user_id.strip():
        return "an empty user id"
    if len(user_id) > V.max_id_length:
        return f"a user id of {len(user_id)} characters (validation.max_id_length={V.max_id_length})"
    if re.search(r"[\x00-\x1f\x7f]", user_id):
        return "a user id with control characters"
    if V.id_pattern and not re.fullmatch(V.id_pattern, user_id):
        return f"a user id that does not match validation.id_pattern={V.id_pattern!r}"
    return None
