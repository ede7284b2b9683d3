"""The HTTP gateway (``zkv gateway``): a stateless HTTP/1.1 front of the cluster, on aiohttp.

``routes.py`` maps HTTP to the async client (keys in the path, CAS as conditional requests,
values streamed both ways), ``errors.py`` maps zkv's error codes to HTTP statuses, ``uploads.py``
streams a large request body into ``put_stream``, ``cli.py`` is the command. docs/http.md is the
user's reference.
"""
