"""The privacy-ledger service: HTTP (FastAPI) → domain → storage (SQLAlchemy)."""
