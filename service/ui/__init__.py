"""The auditor dashboard: static pages under /ui that call the /v1 API from the browser."""
