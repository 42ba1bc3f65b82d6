"""The shared core under every program: runtimes, processes, values, errors.

Standard library only, and it imports no other ``stapinit`` package: the
boot-time ``systemtap-service``, ``stap-server``, ``stap-loader`` and
``stap-client`` all build on it, never on each other.
"""
