"""The zkv broker (the master): routing, sharding, membership, replication fan-out, metadata."""
