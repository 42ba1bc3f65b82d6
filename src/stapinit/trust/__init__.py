"""Server identity and module signatures: X.509 certificates, fingerprints, signing.

Shared by ``stap-server`` (which generates its identity and signs modules) and the
client side (which authorizes certificates and verifies signatures).  Needs the
``cryptography`` package (the ``server`` extra).
"""
