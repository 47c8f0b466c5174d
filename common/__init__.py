"""Process plumbing shared by the gateway and the worker: settings, logging and metrics serving."""
