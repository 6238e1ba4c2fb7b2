-- get_run (read only): one run hash. ARGV[3] run id.
return redis.call('HGETALL', run_key(ARGV[3]))
