"""Development tools: a local stack of real processes (``devstack``) and the demo behind ``make run``."""
