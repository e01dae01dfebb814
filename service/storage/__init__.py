"""Storage: SQLAlchemy models, engines, transactions and migrations."""
