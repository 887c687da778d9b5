"""Serving the champion: what the recommendations table, ``deltarec serve``
and the MLflow model share.

- ``ids``: raw ids → table keys and hashed buckets (Spark's hashing, no JVM);
- ``scorer``: top-k over a catalogue (torch only; also inside the MLflow model);
- ``catalog``: catalogue, popularity and histories from the lake's tables (Arrow);
- ``batch``: the Spark-task side of a table refresh (score a batch, write a part);
- ``table``: the recommendations table's schema, refresh metadata and bindings;
- ``snapshot``: everything one champion serves, loaded completely before use;
- ``holder``: follows the ledger and swaps snapshots in one step;
- ``app``: the FastAPI application (``deltarec serve``);
- ``pyfunc``: the MLflow pyfunc model (raw ids in, raw item ids out).

Importing this package imports none of them (no FastAPI, MLflow or torch).
"""
