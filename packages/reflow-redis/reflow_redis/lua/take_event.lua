-- take_event: remove and return the oldest buffered event of that name, no lease check.
-- ARGV[3] run id, ARGV[4] event name. Returns "<delivered_at>:<payload>" or nil.
return redis.call('LPOP', ev_key(ARGV[3], ARGV[4]))
