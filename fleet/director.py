"""The fleet as TUF's director: its own Ed25519 key signs every desired state it stores.

    director = FleetDirector.load_or_create(settings.data_dir)   # data_dir/director/edgepack.key (0600)
    signed = director.sign(desired, device_id="dev-1", now=time.time())
    director.public()                                           # FleetKeyPublic: what enrollment hands out

The key is separate from the bundle-signing key, which stays offline with the build: the director key
says *what a device should run now*, the bundle key says *what a bundle is*. A device pins the director's
public key at enrollment (device_agent.director) and refuses a desired state that this key did not sign,
that is addressed to another device, or that expired.

A signed state is valid `validity_s` (7 days by default) from when it was signed. A retained state must
outlive a device that is offline for a while, so the controller re-signs a stored state the device has
not answered before it expires (`needs_refresh`): same seq, new issued_at/expires_at. A frozen copy
(an attacker keeping the fleet's newer states from the device) stops working when it expires.

Key rotation: `begin_rotation(data_dir)` makes the next key (`data_dir/director-next/`); a server started
with it puts a `next_key` statement in every state it signs (signed by the current key) and re-signs every
stored state, finished or not, so each device pins the next key beside the current one.
`finish_rotation(data_dir)` makes the next key the current one (the old one is kept as
`director-retired-<key id>/`); devices then accept states signed by it and forget the old key.
Both take effect when the server (re)starts.
"""

from __future__ import annotations

import base64
import shutil
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field

from edgepack.errors import ConfigError
from edgepack.protocol import DesiredSignature, DesiredState, NextFleetKey, signing_bytes
from edgepack.signing import PRIVATE_KEY_NAME, SIGNATURE_ALG, encode_public_key, generate_keypair, key_id, load_private_key

DIRECTOR_DIR = "director"
NEXT_DIR = "director-next"
DEFAULT_VALIDITY_S = 7 * 24 * 3600.0
# Re-sign once less than this share of the validity is left: a device offline for up to half the validity
# still finds a retained state it accepts, and the broker sees one re-publish per device every few days.
REFRESH_FRACTION = 0.5


class FleetKeyPublic(BaseModel):
    """The director's public key as enrollment hands it to a device (which pins it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alg: str = Field(default=SIGNATURE_ALG, description="Always ed25519.")
    key_id: str = Field(description="First 16 hex characters of sha256 over the raw public key.")
    public_key: str = Field(description="Base64 of the raw 32-byte Ed25519 public key.")


class FleetDirector:
    """Signs desired states with the fleet's director key."""

    def __init__(self, private_key: Ed25519PrivateKey, *, validity_s: float = DEFAULT_VALIDITY_S,
                 next_key: Ed25519PrivateKey | None = None) -> None:
        if not validity_s > 0:
            raise ConfigError(f"desired-state validity must be positive, not {validity_s!r}")
        self._key = private_key
        self.validity_s = float(validity_s)
        self.key_id = key_id(private_key.public_key())
        self.next_key = (NextFleetKey(key_id=key_id(next_key.public_key()),
                                      public_key=encode_public_key(next_key.public_key())) if next_key else None)

    @property
    def rotating(self) -> bool:
        """True while a next key is announced: every stored state is re-signed, finished or not."""
        return self.next_key is not None

    @classmethod
    def load_or_create(cls, data_dir: Path, *, validity_s: float = DEFAULT_VALIDITY_S) -> FleetDirector:
        """The key in `data_dir/director/`, generated (mode 0600) on the first start."""
        folder = Path(data_dir) / DIRECTOR_DIR
        path = folder / PRIVATE_KEY_NAME
        with _CREATE_LOCK:
            if not path.exists():
                try:
                    generate_keypair(folder)
                except ConfigError:
                    if not path.exists():  # another process won the race: use its key
                        raise
        next_path = Path(data_dir) / NEXT_DIR / PRIVATE_KEY_NAME
        next_key = load_private_key(next_path) if next_path.exists() else None
        return cls(load_private_key(path), validity_s=validity_s, next_key=next_key)

    def public(self) -> FleetKeyPublic:
        return FleetKeyPublic(key_id=self.key_id, public_key=encode_public_key(self._key.public_key()))

    def sign(self, desired: DesiredState, *, device_id: str, now: float) -> DesiredState:
        """`desired` addressed to `device_id`, issued `now`, valid `validity_s`, and signed."""
        unsigned = desired.model_copy(update={"device_id": device_id, "issued_at": now, "next_key": self.next_key,
                                              "expires_at": now + self.validity_s, "sig": None})
        unsigned = DesiredState.model_validate(unsigned.model_dump(mode="json"))  # validate the device id
        signature = self._key.sign(signing_bytes(unsigned))
        return unsigned.model_copy(update={"sig": DesiredSignature(
            key_id=self.key_id, sig=base64.b64encode(signature).decode("ascii"))})

    def needs_refresh(self, desired: DesiredState, now: float) -> bool:
        """True when a stored state should be re-signed: unsigned, by another key, or past REFRESH_FRACTION
        of its validity."""
        if desired.sig is None or desired.sig.key_id != self.key_id or desired.expires_at is None:
            return True
        if desired.next_key != self.next_key:
            return True  # a rotation began (or finished) since it was signed
        return desired.expires_at - now < self.validity_s * REFRESH_FRACTION


def begin_rotation(data_dir: Path) -> NextFleetKey:
    """Make the next director key (once; calling it again returns the same one)."""
    folder = Path(data_dir) / NEXT_DIR
    if not (folder / PRIVATE_KEY_NAME).exists():
        generate_keypair(folder)
    key = load_private_key(folder / PRIVATE_KEY_NAME)
    return NextFleetKey(key_id=key_id(key.public_key()), public_key=encode_public_key(key.public_key()))


def finish_rotation(data_dir: Path) -> str:
    """Make the next key the current one; returns its key id. The old key is kept, retired, not deleted."""
    data_dir = Path(data_dir)
    next_folder, current = data_dir / NEXT_DIR, data_dir / DIRECTOR_DIR
    if not (next_folder / PRIVATE_KEY_NAME).exists():
        raise ConfigError(f"no key rotation in progress: {next_folder} has no key (begin the rotation first)")
    old_id = key_id(load_private_key(current / PRIVATE_KEY_NAME).public_key())
    shutil.move(str(current), str(data_dir / f"{DIRECTOR_DIR}-retired-{old_id}"))
    shutil.move(str(next_folder), str(current))
    _DIRECTORS.pop(data_dir.resolve(), None)
    return key_id(load_private_key(current / PRIVATE_KEY_NAME).public_key())


_CREATE_LOCK = threading.Lock()
_DIRECTORS: dict[Path, FleetDirector] = {}


def director_for(data_dir: Path) -> FleetDirector:
    """One director per data folder in this process (the enrollment route and the controller share it)."""
    folder = Path(data_dir).resolve()
    director = _DIRECTORS.get(folder)
    if director is None:
        director = _DIRECTORS.setdefault(folder, FleetDirector.load_or_create(folder))
    return director


__all__ = ["DEFAULT_VALIDITY_S", "FleetDirector", "FleetKeyPublic", "begin_rotation", "director_for", "finish_rotation"]
