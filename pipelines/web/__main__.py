# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""``python -m pipelines.web``: the same as ``echo-web``."""

import sys

from . import main

sys.exit(main())
