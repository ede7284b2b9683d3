"""What every zkv program shares: frame layouts, command codes, codecs, error codes.

Nothing here touches a socket; see docs/protocol.md for the wire description.
"""
