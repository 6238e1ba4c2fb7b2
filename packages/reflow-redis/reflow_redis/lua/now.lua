-- now (read only): the store's clock in epoch milliseconds.
return fmt(now_ms())
