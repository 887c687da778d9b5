"""The model registry: status rows in the run ledger (the source of truth),
an audit log of champion changes, lineage, rollback, reproduction, and an
optional MLflow mirror."""
from .core import (  # noqa: F401
    current_user, events, list_entries, promote, record_event, rollback, show,
)
