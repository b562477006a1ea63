"""Access control: API keys (made, hashed, checked), scopes, tenants and their sender
identities, dashboard session cookies. Reads Redis only through ``engine.queue``;
never imports the API, senders or transports. Callers use this face.
"""

from engine.auth.bootstrap import AdminKey, ensure_admin
from engine.auth.principal import (
    ALL_TENANTS,
    PUBLIC,
    SCOPES,
    UNCHECKED,
    KeyRecord,
    Principal,
    TenantRecord,
    check_may_send,
    identity_allowed,
    principal_of,
)
from engine.auth.table import AccessTable
from engine.auth.tokens import KEY_PREFIX, key_hash, key_id, make_key, new_secret, sign_session

__all__ = [
    "ALL_TENANTS",
    "KEY_PREFIX",
    "PUBLIC",
    "SCOPES",
    "UNCHECKED",
    "AccessTable",
    "AdminKey",
    "KeyRecord",
    "Principal",
    "TenantRecord",
    "check_may_send",
    "ensure_admin",
    "identity_allowed",
    "key_hash",
    "key_id",
    "make_key",
    "new_secret",
    "principal_of",
    "sign_session",
]
