"""The client's own requests session: the environment's proxy and CA settings read once, an
adapter that does not repeat per request what it found for the first one, and connections
that send each request (headers and body) in one write.

Part of the API client (see :mod:`slurm_tracker.api`); used by
:class:`~slurm_tracker.api_transport.Transport` when the caller gives no session.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Optional

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool


class _OneWrite(urllib3.connection.HTTPConnection):
    """A connection that sends a request's headers and its body in one write.

    http.client sends the header block, then the body, in two writes: two system calls, two
    TCP segments, two wake-ups of the server, and (the agent being a threaded Python client)
    two more releases of the GIL per request. Here, while a request with a body is being
    sent, its header block is held back and sent with the body's first bytes. Nothing else
    changes: the same bytes, in the same order, on the same connection; a request that fails
    before its body is sent sends nothing.
    """

    _hold = False
    _held: Optional[bytes] = None

    def request(  # passes urllib3's own arguments through
        self, method: str, url: str, body: Any = None, headers: Any = None, *args: Any, **kw: Any
    ) -> None:
        self._hold = isinstance(body, bytes) and len(body) > 0
        self._held = None
        try:
            super().request(method, url, body, headers, *args, **kw)
        except BaseException:
            self._hold, self._held = False, None
            raise
        held, self._hold, self._held = self._held, False, None
        if held is not None:  # no body was sent after all: the headers go alone
            super().send(held)

    def send(self, data: Any) -> None:
        if self._hold:
            if self._held is None and isinstance(data, bytes):
                self._held = data  # the header block
                return
            held, self._hold, self._held = self._held, False, None
            if held is not None:
                if isinstance(data, bytes):
                    data = held + data
                else:
                    super().send(held)
        super().send(data)


class _OneWriteTLS(_OneWrite, urllib3.connection.HTTPSConnection):
    """:class:`_OneWrite` over TLS."""


class _Pool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _OneWrite


class _TLSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _OneWriteTLS


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter, without the work it repeats for every request of one origin.

    ``HTTPAdapter.send`` itself is inherited (so ``responses``, which patches it, still sees
    every request); its pools' connections send each request in one write (:class:`_OneWrite`;
    not through a proxy, whose pools are urllib3's), and two of the steps it calls are
    shortened, to the same result:

    - the connection pool of a request is looked up once per origin, TLS settings (``verify``,
      ``cert``) and proxies, not parsed out of the URL again each time (9 us of the client's
      CPU time per request, of about 300); a pool closed since (urllib3 1.x closes the pools it
      evicts) is looked up anew, and closing the adapter (``Session.close``) forgets them all;
    - without proxies, the URL sent is the request's path (what ``request_url`` computes).

    (requests before 2.32.2 does not call ``get_connection_with_tls_context``: there the pool
    is looked up per request, as requests does.)
    """

    def __init__(self, **kwargs: Any) -> None:
        self._pools: dict[tuple[object, ...], Any] = {}
        self._pools_lock = threading.Lock()
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        # direct connections send each request in one write (_OneWrite); through a proxy,
        # urllib3's own connections
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: Any,
        proxies: Optional[Mapping[str, str]] = None,
        cert: Any = None,
    ) -> Any:
        url = request.url or ""
        start = url.find("//")
        end = url.find("/", start + 2) if start >= 0 else -1
        try:
            key = (
                url if end < 0 else url[:end],
                verify,
                tuple(cert) if isinstance(cert, list) else cert,
                tuple(sorted(proxies.items())) if proxies else (),
            )
            hash(key)
        except TypeError:  # settings that cannot be a key: no shortcut
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        pool = self._pools.get(key)
        if pool is None or getattr(pool, "pool", None) is None:  # new, or closed since
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            with self._pools_lock:
                if len(self._pools) >= 16:
                    self._pools.clear()
                self._pools[key] = pool
        return pool

    def request_url(
        self, request: requests.PreparedRequest, proxies: Optional[Mapping[str, str]]
    ) -> str:
        if not proxies:
            return request.path_url
        return str(super().request_url(request, proxies))

    def close(self) -> None:
        with self._pools_lock:
            self._pools.clear()
        super().close()


def build_session(base_url: str, *, pool_size: int) -> requests.Session:
    """A session for ``base_url`` that reads the environment's proxy and CA settings once.

    requests reads them from ``os.environ`` for every request (``trust_env``), a quarter of
    the client's CPU time per request: here they are read once, for the one host this client
    talks to, and kept in the session (the same settings, as the environment does not change
    while the process runs): ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` unless ``NO_PROXY``
    names the host, and ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``. The connection pool holds
    as many connections as requests may be in flight, so none is opened and dropped again at
    each request.
    """
    session = requests.Session()
    found = session.merge_environment_settings(base_url, {}, None, None, None)
    session.proxies.update(found.get("proxies") or {})
    session.verify = found.get("verify", True)
    if found.get("cert") is not None:
        session.cert = found["cert"]
    session.trust_env = False
    adapter = _Adapter(pool_connections=1, pool_maxsize=pool_size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


__all__ = ["build_session"]
