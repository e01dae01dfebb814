"""HTTP layer: routers, schemas, auth dependencies, problem+json errors."""
