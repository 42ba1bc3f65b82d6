"""``stap-client`` and the ``stap-authorize-*-cert`` commands (spec §6)."""
