"""The response cache: exact-match answers to deterministic requests, in memory or in Redis.

The gateway builds one `ResponseCache` at start (`lmgate.cache.service.open_cache`); per request
it asks for a `CachePlan`, looks the plan up, and on a miss attaches the plan's `Recorder` to
the answer. See `docs/caching.md`.

Nothing is imported here, so that the configuration schema can import `lmgate.cache.config`
without the rest.
"""
