"""An example service that authgrpc protects: a greeter that greets the caller.

:mod:`authgrpc.example.service` holds the servicers and the server builders,
and ``python -m authgrpc.example`` runs one; see ``--help``.
"""
