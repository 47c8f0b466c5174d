"""Development tools: Redis servers of our own (``servers``: one server, Sentinel, a cluster), a
local stack of gateways and workers (``devstack``) and the demo behind ``make run``."""
