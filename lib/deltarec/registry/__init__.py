"""The model registry: status rows in the run ledger (the source of truth),
an audit log of champion changes, lineage, rollback, reproduction, and an
optional MLflow mirror."""
from .core import (  # noqa: F401
    current_user, describe, events, list_entries, parent_chain, promote, record_event, rollback, show,
)
