"""jobgate's Redis protocol, the one owner of everything gateways and workers say to Redis.

``keys`` names every key and channel; ``lua/`` holds one script per state transition, loaded by
``scripts``; ``codec`` turns job hashes and Python values into protobuf messages; ``errors``
classifies failures; ``connection`` makes clients and subscriptions; ``gateway_calls`` and
``worker_calls`` are the two sides' calls, with typed replies from ``replies``.
docs/PROTOCOL.md writes the same contract down for workers in other languages.
"""
