"""Device logins at the broker, kept by the fleet itself.

- ``NoAccounts``: the broker authenticates devices on its own (the embedded broker asks the fleet's
  database; an external one was provisioned out of band, e.g. by ansible).
- ``DynsecAccounts``: Mosquitto's dynamic-security plugin, driven over ``$CONTROL/dynamic-security/v1``
  (JSON ``{"commands": [...]}``; answers on ``.../response`` matched by ``correlationData``). Enrolment
  creates the device's client with its token as password and the shared device role; credential
  rotation sets the new password; deleting a device deletes its client, which the plugin also
  disconnects at once. Each call is made inside the command that changes the device, before its
  transaction commits: a broker that refuses fails the command and nothing is written. A client left
  behind by a transaction that failed after the broker call is removed by ``prune`` (run by the rollout
  lease holder), which deletes every device client the database does not know.

Topic confinement: a device may publish only to its own ``reported``, ``telemetry``, ``events`` and
``status`` topics and receive only its own subtree. Mosquitto 2.0.11's dynamic security (Debian 12) has no
``%u`` patterns in role ACLs (later versions do), and one role per device would make every enrolment
rewrite the plugin's whole JSON file several times, so the confinement is the listener's static pattern
ACL file (``acl_file_text``), which dynamic security defers to: ``ensure_roles`` sets the plugin's default
access to deny, which in Mosquitto means "ask the next check", here the pattern file. The device role
also carries the same rules with ``%u`` for brokers whose plugin expands them. The fleet's own client gets
a role for its subscriptions (shared ones too) and the desired states it publishes.

Sessions: the listener sets ``use_username_as_clientid``, so a session is named by its login and no
device can take over another's session, or the fleet's, whatever client id it sends. Each of a fleet
server's connections therefore has a login of its own, named after the connection
(``nanofleet-fleet-<node>-state``, ``-telemetry``, ``-dynsec``), with the fleet's password: ``start``
creates them through the configured admin login (``ensure_server_logins``), so several servers never
share a session and the rollout lease holder can resume a dead server's sessions to drain them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt

from .bridge import parse_mqtt_url
from .errors import BrokerError, ServiceUnavailableError

if TYPE_CHECKING:
    from .config import FleetConfig

log = logging.getLogger(__name__)

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSE = f"{CONTROL}/response"
FLEET_ROLE = "nanofleet-fleet"
DEVICE_LEAVES = ("reported", "telemetry", "events", "status")
TIMEOUT_S = 10.0


class BrokerAccounts(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def add_device(self, device_id: str, password: str) -> None: ...

    def set_password(self, device_id: str, password: str) -> None: ...

    def remove_device(self, device_id: str) -> None: ...

    def prune(self, known: Callable[[], set[str]], grace_s: float = 10.0) -> int: ...


class NoAccounts:
    """The broker authenticates devices without the fleet's help."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_device(self, device_id: str, password: str) -> None:
        pass

    def set_password(self, device_id: str, password: str) -> None:
        pass

    def remove_device(self, device_id: str) -> None:
        pass

    def prune(self, known: Callable[[], set[str]], grace_s: float = 10.0) -> int:
        return 0


def open_accounts(config: FleetConfig, server_logins: Iterable[str] = ()) -> BrokerAccounts:
    """``server_logins``: this server's own connections (the first is its dynamic-security connection)."""
    b = config.broker
    if b.accounts != "dynsec":
        return NoAccounts()
    if b.embedded:
        from .errors import ConfigError

        raise ConfigError("broker.accounts: dynsec needs an external Mosquitto (broker.embedded: false)")
    return DynsecAccounts(
        b.all_urls()[0],
        b.dynsec.username or b.username,
        b.dynsec.password if b.dynsec.username else b.password,
        device_role=b.dynsec.role,
        server_logins=list(server_logins),
        server_password=b.password,
    )


def acl_file_text(fleet_user: str) -> str:
    """Mosquitto ``acl_file`` contents for a listener with dynamic security: devices confined to their own
    subtree (``%u``: the username, which is the device id), the fleet's user to the fleet's topics."""
    lines = ["# written by nanofleet (fleet/accounts.py): devices publish and read only their own subtree"]
    lines += [f"pattern write nanofleet/v1/devices/%u/{leaf}" for leaf in DEVICE_LEAVES]
    lines += ["pattern read nanofleet/v1/devices/%u/#", "", f"user {fleet_user}", "topic readwrite nanofleet/#",
              "topic readwrite $CONTROL/dynamic-security/#", ""]
    return "\n".join(lines)


def device_acls() -> list[dict[str, Any]]:
    own = [{"acltype": "publishClientSend", "topic": f"nanofleet/v1/devices/%u/{leaf}", "allow": True}
           for leaf in DEVICE_LEAVES]
    return [
        *own,
        {"acltype": "publishClientReceive", "topic": "nanofleet/v1/devices/%u/#", "allow": True},
        {"acltype": "subscribePattern", "topic": "nanofleet/v1/devices/+/#", "allow": True},
        {"acltype": "unsubscribePattern", "topic": "nanofleet/v1/devices/+/#", "allow": True},
    ]


def fleet_acls() -> list[dict[str, Any]]:
    return [
        {"acltype": "publishClientSend", "topic": "nanofleet/v1/devices/+/desired", "allow": True},
        {"acltype": "publishClientReceive", "topic": "nanofleet/v1/devices/#", "allow": True},
        {"acltype": "subscribePattern", "topic": "nanofleet/v1/devices/#", "allow": True},
        {"acltype": "subscribePattern", "topic": "$share/+/nanofleet/v1/devices/#", "allow": True},
        {"acltype": "unsubscribePattern", "topic": "#", "allow": True},
    ]


class _Control:
    """One connection to the plugin's control topic: commands out, answers matched by correlation data."""

    def __init__(self, host: str, port: int, username: str | None, password: str | None) -> None:
        self.host, self.port = host, port
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=username or f"nanofleet-dynsec-{uuid.uuid4().hex[:8]}",
            clean_session=True,
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *_a: self.connected.clear()
        self.connected = threading.Event()
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self.client.reconnect_delay_set(1, 5)
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(20):
            self.stop()
            raise BrokerError(f"cannot log in to Mosquitto's dynamic security at {self.host}:{self.port}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("dynamic security: login refused (%s)", reason)
            return
        client.subscribe(RESPONSE, qos=1)
        self.connected.set()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return
        for r in responses:
            with self._lock:
                waiting = self._waiting.get(str(r.get("correlationData")))
            if waiting is not None:
                waiting[1].append(r)
                waiting[0].set()

    def run(self, command: str, **fields: Any) -> dict[str, Any]:
        """One command; its response (``error`` set when the plugin refused it). A lost answer (the
        connection dropped: the plugin disconnects a client whose roles change) is asked again."""
        for attempt in range(3):
            if not self.connected.wait(TIMEOUT_S):
                break
            corr = uuid.uuid4().hex
            done: tuple[threading.Event, list[dict[str, Any]]] = (threading.Event(), [])
            with self._lock:
                self._waiting[corr] = done
            try:
                payload = json.dumps({"commands": [{"command": command, "correlationData": corr, **fields}]})
                self.client.publish(CONTROL, payload, qos=1)
                if done[0].wait(TIMEOUT_S / (3 - attempt)):
                    return done[1][0]
            finally:
                with self._lock:
                    self._waiting.pop(corr, None)
        raise ServiceUnavailableError(f"the broker's dynamic security did not answer {command}; retry")


class DynsecAccounts:
    """Device clients in Mosquitto's dynamic security (see the module docstring)."""

    def __init__(
        self,
        url: str,
        username: str | None,
        password: str | None,
        *,
        device_role: str,
        server_logins: list[str] | None = None,
        server_password: str | None = None,
    ) -> None:
        self.host, self.port = parse_mqtt_url(url)
        self.admin = (username, password)
        self.device_role = device_role
        self.server_logins = server_logins or []
        self.server_password = server_password
        self.control: _Control | None = None

    # lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Roles and default access through the configured admin login, this server's own logins, then
        the long-lived control connection under this server's dynamic-security login."""
        boot = _Control(self.host, self.port, *self.admin)
        boot.start()
        try:
            self.control = boot
            self.ensure_roles()
            self.ensure_server_logins()
        finally:
            boot.stop()
            self.control = None
        own = self.server_logins[0] if self.server_logins else self.admin[0]
        password = self.server_password if self.server_logins else self.admin[1]
        self.control = _Control(self.host, self.port, own, password)
        self.control.start()

    def stop(self) -> None:
        if self.control is not None:
            self.control.stop()

    def run(self, command: str, **fields: Any) -> dict[str, Any]:
        if self.control is None:
            raise ServiceUnavailableError("the broker's dynamic security is not connected; retry")
        return self.control.run(command, **fields)

    def _must(self, command: str, ok_errors: Iterable[str] = (), **fields: Any) -> dict[str, Any]:
        r = self.run(command, **fields)
        err = r.get("error")
        if err and err not in ok_errors:
            raise BrokerError(f"dynamic security refused {command}: {err}")
        return r

    def ensure_roles(self) -> None:
        """The device and fleet roles with their ACLs, deny by default, and the fleet user's role."""
        for role, acls in ((self.device_role, device_acls()), (FLEET_ROLE, fleet_acls())):
            self._must("createRole", ("Role already exists",), rolename=role)
            for acl in acls:
                self._must("addRoleACL", ("ACL with this topic already exists",), rolename=role, **acl)
        for acltype in ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe"):
            allow = acltype == "unsubscribe"
            self._must("setDefaultACLAccess", acls=[{"acltype": acltype, "allow": allow}])
        if self.admin[0]:
            self._ensure_client_role(self.admin[0], FLEET_ROLE)

    def ensure_server_logins(self) -> None:
        """One login per connection of this server (named as the connection), with the fleet's password and
        role; the first, its control connection, also with the admin login's roles."""
        admin_roles = sorted(self._client_roles(self.admin[0])) if self.admin[0] else []
        for i, login in enumerate(self.server_logins):
            roles = [FLEET_ROLE, *admin_roles] if i == 0 else [FLEET_ROLE]
            r = self.run(
                "createClient", username=login, password=self.server_password, roles=[{"rolename": x} for x in roles]
            )
            if r.get("error") == "Client already exists":
                self._must("setClientPassword", username=login, password=self.server_password)
                for role in roles:
                    self._ensure_client_role(login, role)
            elif r.get("error"):
                raise BrokerError(f"dynamic security refused createClient for {login}: {r['error']}")

    def _ensure_client_role(self, username: str, role: str) -> None:
        # addClientRole answers "Internal error" for a role the client has already: ask first.
        if role in self._client_roles(username):
            return
        r = self.run("addClientRole", username=username, rolename=role)
        # The plugin disconnects a client whose roles change; when that client is this one, the answer is
        # lost ("Internal error"): look again once reconnected.
        if r.get("error") and role not in self._client_roles(username):
            raise BrokerError(f"dynamic security refused addClientRole for {username}: {r['error']}")

    def _client_roles(self, username: str) -> set[str]:
        client = (self._must("getClient", username=username).get("data") or {}).get("client") or {}
        return {r.get("rolename") for r in client.get("roles") or []}

    def add_device(self, device_id: str, password: str) -> None:
        r = self.run("createClient", username=device_id, password=password, roles=[{"rolename": self.device_role}])
        if r.get("error") == "Client already exists":
            # Left behind by an enrolment whose transaction failed after this call: take it over.
            self._must("setClientPassword", username=device_id, password=password)
            self._ensure_client_role(device_id, self.device_role)
        elif r.get("error"):
            raise BrokerError(f"dynamic security refused createClient for {device_id}: {r['error']}")

    def set_password(self, device_id: str, password: str) -> None:
        r = self.run("setClientPassword", username=device_id, password=password)
        if r.get("error") == "Client not found":
            self.add_device(device_id, password)
        elif r.get("error"):
            raise BrokerError(f"dynamic security refused setClientPassword for {device_id}: {r['error']}")
        # Sessions logged in with the old token must go too.
        self._must("disableClient", username=device_id)
        self._must("enableClient", username=device_id)

    def remove_device(self, device_id: str) -> None:
        self._must("deleteClient", ("Client not found",), username=device_id)

    def device_clients(self) -> set[str]:
        """Usernames of every client holding the device role."""
        out: set[str] = set()
        offset, page = 0, 1000
        while True:
            r = self._must("listClients", verbose=True, count=page, offset=offset)
            clients = (r.get("data") or {}).get("clients") or []
            for c in clients:
                roles = {x.get("rolename") for x in c.get("roles") or []}
                if self.device_role in roles:
                    out.add(c["username"])
            if len(clients) < page:
                return out
            offset += page

    def prune(self, known: Callable[[], set[str]], grace_s: float = 10.0) -> int:
        """Delete device clients the fleet does not know (revoked while this was unreachable, or left by a
        failed enrolment); returns how many. ``known`` is asked twice, ``grace_s`` apart: an enrolment
        creates its broker client just before its transaction commits, and must not lose it here."""
        extra = self.device_clients() - known()
        if extra:
            time.sleep(grace_s)
            extra -= known()
        for username in sorted(extra):
            self.remove_device(username)
        if extra:
            log.info("dynamic security: removed %d device clients unknown to the fleet", len(extra))
        return len(extra)
