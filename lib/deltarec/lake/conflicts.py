"""Which errors are Delta's commit conflicts (another writer won the race).

Delta's eight conflict exceptions (``io.delta.exceptions.*``) are siblings in
Python, not subclasses of ``DeltaConcurrentModificationException``, and
PySpark raises them as such only after ``delta.exceptions`` (classic) or
``delta.connect.exceptions`` (Spark Connect) installed their conversion;
before that, or without the ``delta`` Python package, the same error arrives
as a generic PySpark/py4j exception. So an error is a conflict when it is an
instance of one of the eight classes, or carries one of their error classes
(``DELTA_CONCURRENT_APPEND``, ...: Delta 3+ sets them), or its Java class is
one of them. Never by a substring such as "Concurrent": Java's own
``ConcurrentModificationException`` is a bug, not a lost race.
"""
from __future__ import annotations

import re

# io.delta.exceptions.<class> -> its error class (io/delta/exceptions/ConcurrentExceptions.scala)
CONFLICTS = {
    "DeltaConcurrentModificationException": None,  # the abstract base: no error class of its own
    "ConcurrentWriteException": "DELTA_CONCURRENT_WRITE",
    "MetadataChangedException": "DELTA_METADATA_CHANGED",
    "ProtocolChangedException": "DELTA_PROTOCOL_CHANGED",
    "ConcurrentAppendException": "DELTA_CONCURRENT_APPEND",
    "ConcurrentDeleteReadException": "DELTA_CONCURRENT_DELETE_READ",
    "ConcurrentDeleteDeleteException": "DELTA_CONCURRENT_DELETE_DELETE",
    "ConcurrentTransactionException": "DELTA_CONCURRENT_TRANSACTION",
}
_BY_CONDITION = {cond: name for name, cond in CONFLICTS.items() if cond}
# Java's "class: message" at the start of a line (py4j puts ": " before it; a cause is "Caused by: ");
# a ClassNotFoundException *naming* the class has it after another class's name, and does not count
_JAVA = re.compile(r"^(?:: |Caused by: )?io\.delta\.exceptions\.(\w+)(?::|$)", re.MULTILINE)


def conflict_classes() -> tuple[type, ...]:
    """The Python classes of Delta's conflicts (empty without the ``delta`` package)."""
    try:
        import delta.exceptions as dx
    except ImportError:
        return ()
    return tuple(getattr(dx, name) for name in CONFLICTS if hasattr(dx, name))


def _condition(e: BaseException) -> str | None:
    fn = getattr(e, "getCondition", None) or getattr(e, "getErrorClass", None)  # PySpark 4 / 3.x
    if not callable(fn):
        return None
    try:
        cond = fn()
    except Exception:  # a classic exception without its Java object
        return None
    return str(cond) if cond else None


def delta_conflict(e: BaseException) -> str | None:
    """The name of Delta's conflict exception ``e`` is (or wraps), else None."""
    classes = conflict_classes()
    if classes and isinstance(e, classes):
        return next(c.__name__ for c in classes if isinstance(e, c))
    cond = _condition(e)
    if cond in _BY_CONDITION:
        return _BY_CONDITION[cond]
    java = getattr(e, "java_exception", None)  # py4j's Py4JJavaError
    texts = [str(java)] if java is not None else []
    texts.append(str(e))
    for text in texts:
        m = _JAVA.search(text)
        if m and m.group(1) in CONFLICTS:
            return m.group(1)
    return None
