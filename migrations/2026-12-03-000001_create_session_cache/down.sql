DROP TABLE session_cache_evictions;
DROP TABLE session_cache;
