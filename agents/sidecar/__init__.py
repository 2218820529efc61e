"""``cp-agent``: the agent SDK in a process of its own, for services in any language.

    cp-agent --service checkout --servers 10.0.0.5:50051,10.0.0.6:50051 \\
             --tls-ca /etc/controlplane/ca.pem --token-file /run/secrets/cp-token \\
             --version v1.5.0 --cache /var/cache/cp-agent/checkout.json \\
             --state-file /run/cp-agent/checkout.json \\
             --on-change /etc/cp-agent/reload.sh --on-pin-change /etc/cp-agent/redeploy.sh

(``python -m agents.sidecar`` runs the same.) It runs one :class:`agents.Agent`
and offers its state three ways: a local HTTP JSON endpoint, a state file, and
hooks run on change.

Options (argument > environment variable > default; the SDK's own variables
where the SDK has the setting)::

    --service S          CONTROLPLANE_SERVICE       required
    --servers A,B        CONTROLPLANE_SERVERS       required, host:port, comma-separated
    --version V          CONTROLPLANE_VERSION       the version the service runs
    --instance-id I      CONTROLPLANE_INSTANCE_ID   <hostname>-<pid>-<random>
    --cache PATH         CONTROLPLANE_CACHE_PATH    none: no boot from a cache file
    --listen HOST:PORT   CP_AGENT_LISTEN            127.0.0.1:9465 (port 0: any free port)
    --state-file PATH    CP_AGENT_STATE_FILE        none: no state file
    --on-change CMD      CP_AGENT_ON_CHANGE         none
    --on-pin-change CMD  CP_AGENT_ON_PIN_CHANGE     none
    --hook-timeout SECS  CP_AGENT_HOOK_TIMEOUT      300: a hook running longer is killed
    --hook-attempts N    CP_AGENT_HOOK_ATTEMPTS     5: attempts per change before giving up
    --log-level LEVEL    CP_AGENT_LOG_LEVEL         info

Connection to the servers (the SDK's settings, see ``agents._config``)::

    --token-file PATH    CONTROLPLANE_TOKEN_FILE        none; read again for each connection
    (no option)          CONTROLPLANE_TOKEN             the token itself (no --token: command
                                                        lines show up in ``ps``)
    --tls                CONTROLPLANE_TLS               off; on: TLS with the system's CA roots
    --tls-ca PATH        CONTROLPLANE_TLS_CA            none; CA certificates (PEM), TLS on
    --tls-cert PATH      CONTROLPLANE_TLS_CLIENT_CERT   none; client certificate (mutual TLS)
    --tls-key PATH       CONTROLPLANE_TLS_CLIENT_KEY    none; its key (with --tls-cert)
    --tls-server-name N  CONTROLPLANE_TLS_SERVER_NAME   the host in --servers
    --insecure           CONTROLPLANE_INSECURE          off: plaintext only to loopback servers

A token the server refuses is logged as an error (``agent_auth_failed``); the
agent keeps retrying and serving its last known state.

The endpoint has no authentication: it listens on loopback by default, and a
warning is logged when it does not. It logs ``sidecar_listening address=HOST:PORT``
once it accepts connections.

HTTP endpoints (GET or HEAD; JSON bodies; every body names the agent ``state``
and the ``revision`` it answers from)::

    /v1/state                    the whole effective state: flags (and the scope
                                 each comes from), shedding, pin, revision, agent
                                 state, running version, hook status
    /v1/flags                    every flag's value
    /v1/flags/NAME               one flag: value, type, scope, why, until when;
                                 404 {"error": "flag_not_found", ...} when not set
    /v1/shed?criticality=X[&key=K]
                                 {"shed": true|false, ...}: the decision for a
                                 request of that criticality (the four tier names;
                                 missing or anything else: CRITICAL), stable per
                                 key when one is given, at random otherwise
    /v1/pin                      the pin (or null), the running version, drift
    /healthz                     200 when READY; 503 otherwise, with the state:
                                 STALE (no server reachable) still serves the last
                                 known state, and the body says so; CONNECTING has
                                 none yet. Use it for readiness and alerts, not as
                                 a liveness probe: a restart during a control-plane
                                 outage loses nothing but gains nothing either.
    /metrics                     the agent's metrics, Prometheus text format:
                                 controlplane_agent_state{state} (1 for the
                                 current one of CONNECTING, READY, STALE),
                                 _applied_revision, _changes_applied_total,
                                 _reconnects_total, _last_change_timestamp_seconds,
                                 _since_last_contact_seconds, _override_active

Anything else is 404 (unknown path) or 405 (another method), in JSON.

The state file (``--state-file``) holds the ``/v1/state`` document. It is
replaced atomically (a temporary file in the same directory, fsync, rename,
fsync of the directory; mode 0644) whenever what it says changes: a change from
the server (also a new revision that changes no value, such as an expiry
extended), a time-boxed change expiring, the agent state (READY/STALE) or a
hook's status; readers see the old file or the new one, never a part. Changes
coming while it is written make one more write, of the newest state. A failed
write is tried again after 0.1 s, doubling up to 1 s. It stays when the sidecar
stops (fail static: the last state is still the best one).

Hooks. ``--on-change CMD`` runs (``/bin/sh -c CMD``) for every change a service
sees (flags, shedding, pin), with the change as JSON on stdin::

    {"service": "checkout", "revision": 12, "state": "READY", "expired": false,
     "flags": {"new-ui": {"old": true, "new": false}},
     "shedding": {"old": null, "new": {"tier": "SHEDDABLE", "percent": 30.0, ...}} | null,
     "pin": {"old": null, "new": {"version": "v1.4.2", ...}} | null}

and in the environment: ``CP_SERVICE``, ``CP_REVISION``, ``CP_STATE``,
``CP_EXPIRED`` (``1`` when a time-boxed change expired: the revision does not
change then), ``CP_CHANGED_FLAGS`` (names, comma-separated), ``CP_SHEDDING_CHANGED``
and ``CP_PIN_CHANGED`` (``1``/``0``), when the shedding level changed
``CP_SHED_TIER`` / ``CP_SHED_PERCENT`` (the new level; empty when removed), when
the pin changed ``CP_PIN_VERSION`` (the new one; empty when unpinned), and
``CP_STATE_FILE``.

``--on-pin-change CMD``, the redeploy hook, runs when the pinned version changes
(a pin, a different version, an unpin; not a new reason or expiry on the same
version), with ``{"service", "revision", "pin", "previous", "running_version"}``
on stdin and ``CP_SERVICE``, ``CP_REVISION``, ``CP_PIN_VERSION`` (empty: unpinned),
``CP_PREVIOUS_PIN_VERSION``, ``CP_PIN_REASON``, ``CP_RUNNING_VERSION`` in the
environment. It compares with the version it last handed to the hook, so the
redeploy runs once per pin, also across restarts when there is a state file.

For both hooks:

- They run on a worker thread of their own (never the agent's), one run at a
  time, in revision order. Changes arriving while the hook runs (or waits to
  retry) are merged into its next run: old values from the first, new ones from
  the last, the newest revision; a change undone meanwhile is not run at all.
- A failing run (non-zero exit, killed, over ``--hook-timeout``) is logged with
  the end of its output and retried with exponential backoff (1 s, 2 s, 4 s ...,
  at most 30 s, jittered) up to ``--hook-attempts`` attempts, then logged as given
  up (``hook_given_up``); the next change runs it again.
- Never twice for the same change: the agent reports each change once, and each
  report is handed to the hook once (retries of a failed run aside). The state
  file records the last change each hook finished with, and a restarted sidecar
  does not run the hooks again for the state it finds already handed over (a
  run cut short by a crash or a stop runs again: at least once across
  restarts). Without a state file, the first state after a start is new to the
  hooks (the pin hook sees a pin from nothing; it gets ``CP_RUNNING_VERSION`` to
  tell whether anything needs doing).

Idle, it wakes for nothing: its threads wait on the listening socket, the
agent's callbacks (changes, the agent state) and the hooks' queue, with no
timer; a stop wakes the endpoint through a socket of its own, at once.

Lifecycle: SIGTERM or SIGINT stops it: the endpoint closes, the agent closes
(writing its cache), the state file gets its last write, a running hook gets
``HOOK_STOP_GRACE`` seconds to finish (then its process group is killed), hook
runs not yet started are dropped with a warning. Exit status 0 after a clean
stop, 2 for an invalid option, 1 when the address cannot be bound.

The package, by concern: ``_options`` (settings, defaults, environment
variables), ``_documents`` (the JSON served, written and given to hooks),
``_hooks`` (the hook runners), ``_state_file`` (the state file writer),
``_http`` (the endpoint's server and handler), ``_sidecar`` (:class:`Sidecar`,
which ties them together and answers the requests) and ``_cli`` (``cp-agent``).
"""

from __future__ import annotations

from agents.sidecar._cli import main as main
from agents.sidecar._documents import Response as Response
from agents.sidecar._documents import change_document as change_document
from agents.sidecar._hooks import Executor as Executor
from agents.sidecar._hooks import HookResult as HookResult
from agents.sidecar._hooks import HookRunner as HookRunner
from agents.sidecar._hooks import PinHookRunner as PinHookRunner
from agents.sidecar._hooks import merge_changes as merge_changes
from agents.sidecar._hooks import retry_delay as retry_delay
from agents.sidecar._options import DEFAULT_LISTEN as DEFAULT_LISTEN
from agents.sidecar._options import ENV_HOOK_ATTEMPTS as ENV_HOOK_ATTEMPTS
from agents.sidecar._options import ENV_HOOK_TIMEOUT as ENV_HOOK_TIMEOUT
from agents.sidecar._options import ENV_LISTEN as ENV_LISTEN
from agents.sidecar._options import ENV_LOG_LEVEL as ENV_LOG_LEVEL
from agents.sidecar._options import ENV_ON_CHANGE as ENV_ON_CHANGE
from agents.sidecar._options import ENV_ON_PIN_CHANGE as ENV_ON_PIN_CHANGE
from agents.sidecar._options import ENV_STATE_FILE as ENV_STATE_FILE
from agents.sidecar._options import HOOK_ATTEMPTS as HOOK_ATTEMPTS
from agents.sidecar._options import HOOK_BACKOFF as HOOK_BACKOFF
from agents.sidecar._options import HOOK_BACKOFF_CAP as HOOK_BACKOFF_CAP
from agents.sidecar._options import HOOK_STOP_GRACE as HOOK_STOP_GRACE
from agents.sidecar._options import HOOK_TIMEOUT as HOOK_TIMEOUT
from agents.sidecar._options import SECURITY_NAMES as SECURITY_NAMES
from agents.sidecar._options import STATE_FILE_MODE as STATE_FILE_MODE
from agents.sidecar._options import STATE_RETRY as STATE_RETRY
from agents.sidecar._options import STATE_RETRY_CAP as STATE_RETRY_CAP
from agents.sidecar._options import SidecarAgent as SidecarAgent
from agents.sidecar._options import SidecarOptions as SidecarOptions
from agents.sidecar._options import parse_listen as parse_listen
from agents.sidecar._sidecar import Sidecar as Sidecar

__all__ = [
    "HookResult",
    "HookRunner",
    "PinHookRunner",
    "Response",
    "Sidecar",
    "SidecarOptions",
    "main",
    "merge_changes",
    "retry_delay",
]
