"""On PYTHONPATH (train_helpers.without_torch), hides torch from a jaxtune script run by a test.

Users' installs have no torch (a test-only dependency); with it installed, transformers imports it
whenever it can (~2 s a process), and a jaxtune code path that needed it would pass unnoticed.
"""

import sys

sys.modules["torch"] = None  # makes `import torch` raise ImportError; transformers then runs without it
