"""gRPC adapters: translate the wire to the domain (``authority.service``) and back."""
