"""The operators' console: approvals, task traces and the trust domain, on the web."""
