import os

import pytest
import torch

# Two cores in CI: keep each test single-threaded so parallel work does not oversubscribe.
torch.set_num_threads(1)


@pytest.fixture
def data_root():
    """Root of the real image data (``SOCO_DATA_ROOT``); skips the test when unset."""
    root = os.environ.get("SOCO_DATA_ROOT", "")
    if not root or not os.path.isdir(root):
        pytest.skip("SOCO_DATA_ROOT is not set (real-data test)")
    return root


@pytest.fixture
def soco_log():
    """Messages of the ``soco_d2`` loggers, whatever their configuration (the training engine's
    ``setup_logging`` stops them propagating to pytest's ``caplog``)."""
    import logging

    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("soco_d2")
    level = log.level
    log.addHandler(handler)
    log.setLevel(min(level or logging.INFO, logging.INFO))
    yield records
    log.removeHandler(handler)
    log.setLevel(level)


@pytest.fixture(autouse=True)
def _fresh_soco_logging():
    """Undo the training engine's ``setup_logging`` after each test: its handlers write to that
    test's OUTPUT_DIR and it stops the ``soco_d2`` loggers from propagating to ``caplog``, which
    would make later tests depend on the order they run in."""
    yield
    import logging

    log = logging.getLogger("soco_d2")
    if getattr(log, "_soco_configured", False):
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()
        log.propagate = True
        log.setLevel(logging.NOTSET)
        log._soco_configured = False
