"""Domain: admission, ledger writing, calibration calls. Never sees an HTTP request."""
