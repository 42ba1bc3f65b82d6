"""SystemTap initscript and compile-server trust scheme, in Python.

Kept empty on purpose: the boot-time ``systemtap-service`` command imports this
package, so nothing heavy may be imported here.
"""

__version__ = "0.3.0"
