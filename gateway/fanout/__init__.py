"""Push fan-out: the accountId -> sessions hub, pushState resume cursors, encode-once broadcast."""
