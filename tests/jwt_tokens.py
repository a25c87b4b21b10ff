"""Supabase access tokens for tests, signed the way GoTrue signs them (HS256, aud authenticated)."""

import time
import uuid

import jwt

from tests.conftest import SECRETS


def supabase_token(
    org_id, org_role="owner", secret=SECRETS["supabase_jwt_secret"], expires_in=3600, user_id=None
) -> str:
    now = int(time.time())
    claims = {
        "aud": "authenticated",
        "role": "authenticated",
        "sub": str(user_id or uuid.uuid4()),
        "iat": now,
        "exp": now + expires_in,
        "email": "owner@example.test",
        "app_metadata": {"provider": "email", "org_id": str(org_id), "org_role": org_role},
        "user_metadata": {},
        "aal": "aal1",
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}
