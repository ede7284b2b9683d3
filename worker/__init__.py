"""A zkv storage worker: LMDB engine, apply loop with group commit, reads, heartbeats, catch-up."""
