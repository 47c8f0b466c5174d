"""The web dashboard the gateway serves when ``dashboard_listen`` is set (docs/USAGE.md, "The web
dashboard"): queues, workers, jobs and schedules, live, through the gateway's own gRPC API."""
