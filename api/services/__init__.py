"""What routes call: one function per operation, holding the checks and the order of writes.

A route parses the request, calls one function here and shapes the response. Services raise
:class:`api.errors.ApiError` for what the client must change; queries stay in :mod:`jobstore`.
"""
