"""What commands and views may use of the running service: ``FleetService`` satisfies this protocol,
and a command never sees more of the service than this (no worker, no queue: it cannot re-enter)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from manifests import SigningKey, TrustStore

    from .accounts import BrokerAccounts
    from .blobs import BlobStore
    from .config import FleetConfig
    from .rollout import RolloutEngine


class FleetEnv(Protocol):
    config: FleetConfig
    public_url: str
    mqtt_url: str
    signing_key: SigningKey
    trust: TrustStore
    blobs: BlobStore
    rollouts: RolloutEngine
    accounts: BrokerAccounts  # device logins at the broker (dynamic security), changed inside commands
