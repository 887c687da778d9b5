"""The right to be forgotten: ``deltarec forget``.

- ``file_requests`` / the ``forget_requests`` table: requests in;
- ``apply_pending``: the forget pass (every table, the model and its
  checkpoints, MLflow, then VACUUM); the nightly job calls it first;
- ``ingest``: the one call where user ids enter the lake (the delta job's
  change-feed read): forgotten users' late changes stay out, pseudonyms in;
- ``stored_keys``: raw user id → the key derived tables and the model hold
  (the pseudonym with ``privacy.pseudonymize=true``): serving maps with it;
- ``status``: pending and done, overdue flags; ``full_retrain_due`` and
  ``not_reproducible_reason`` for the nightly strategy and ``reproduce``.
"""
from .checkpoints import not_reproducible_reason
from .erase import apply_pending
from .intake import ingest
from .keys import PrivacyError, stored_keys
from .requests import describe_status, file_requests, status
from .retrain import full_retrain_due

__all__ = ["apply_pending", "describe_status", "file_requests", "full_retrain_due", "ingest",
           "not_reproducible_reason", "PrivacyError", "status", "stored_keys"]
