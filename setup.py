"""The compiled modules; everything else about the package is in pyproject.toml.

``optional``: without a C compiler (or, for ``_fastchain``, OpenSSL's headers) the install still
succeeds: without ``_fastchain`` ``appliance.audit.chain`` formats match records in Python, and without
``_ring`` (the shared-memory queue to the audit writer process) audit batches are written by a thread
instead (``make test`` then fails loudly).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("appliance.audit._fastchain", ["appliance/audit/_fastchain.c"], libraries=["crypto"],
                             optional=True),
                   Extension("appliance.audit._ring", ["appliance/audit/_ring.c"], optional=True)])
