"""``systemtap-service``: SystemTap scripts run as boot-time services."""
