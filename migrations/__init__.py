"""Alembic migrations of the privacy-ledger schema (run with `privacy-ledger db upgrade`)."""
