"""PEP 517 build backend of tokops: setuptools', plus one rule for build isolation.

A C++ extension only loads into the torch it was compiled against. With build isolation
(``pip install tokops-<v>.tar.gz``, ``pip install .``), pip installs torch into a throw-away build
environment, by default its newest release, which need not be the torch that will import tokops.
So when the environment that tokops is being installed into already has torch, the build asks for
that same release (``torch==<installed version>``); otherwise it takes what ``pyproject.toml``
asks for (``torch>=2.11``). ``tokops`` also checks at import (``tokops._registry.torch_mismatch``).
"""

from __future__ import annotations

import glob
import os
import re
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook we do not change)


def installed_torch() -> str | None:
    """Release of the torch installed in the environment of this interpreter (whose site folders
    pip's build isolation hides from ``sys.path`` but not from ``sysconfig``), e.g. ``"2.14.1"``."""
    paths = sysconfig.get_paths()
    for d in dict.fromkeys((paths["purelib"], paths["platlib"])):
        for info in sorted(glob.glob(os.path.join(d, "torch-*.dist-info"))):
            try:
                with open(os.path.join(info, "METADATA"), encoding="utf-8") as f:
                    m = re.search(r"^Version:\s*(\S+)", f.read(), re.M)
            except OSError:
                continue
            if m:
                return m.group(1).split("+")[0]  # "==2.14.1" also matches the local builds 2.14.1+cu128...
    return None


def _torch_pin() -> list[str]:
    v = installed_torch()
    return [f"torch=={v}"] if v else []


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _torch_pin()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _torch_pin()
