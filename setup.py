"""The one compiled module; everything else about the package is in pyproject.toml.

``optional``: without a C compiler or OpenSSL's headers the install still succeeds and
``appliance.audit.chain`` formats match records in Python (``make test`` then fails loudly).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("appliance.audit._fastchain", ["appliance/audit/_fastchain.c"], libraries=["crypto"],
                             optional=True)])
