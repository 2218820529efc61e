"""The requests adapter of :mod:`agents.criticality`, in a module of its own: only a
service that uses it imports requests, which the SDK does not depend on."""

from __future__ import annotations

from typing import Any

import requests
import requests.adapters

from agents.criticality import _add_header


class CriticalityAdapter(requests.adapters.HTTPAdapter):
    """requests' ``HTTPAdapter`` (the same arguments: retries, pool sizes) that sends
    the current criticality as ``X-Criticality`` on every request it sends that
    does not name one (redirects included)::

        session = requests.Session()
        session.mount("http://", CriticalityAdapter())
        session.mount("https://", CriticalityAdapter())
    """

    def add_headers(self, request: requests.PreparedRequest, **kwargs: Any) -> None:
        super().add_headers(request, **kwargs)
        _add_header(request.headers)
