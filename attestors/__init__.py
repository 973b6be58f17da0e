"""Attestor plugins: the SDK (``attestors.api``) and the built-in attestors."""
