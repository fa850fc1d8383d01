"""Everything that touches bytes at a URL: stores, checkpoints, retention, data archives.

Built on fsspec; never imports ``tlaunch`` (the launcher) nor ``tlaunch.strategies``.
"""
