"""The shared store: a second backend of the state, on object storage that several output
roots (CI runners, laptops) use at once, so that an image bought by one is never bought again
by another. The operator names it (`--store URL`, `FLUXBATCH_STORE`, the API's `store=`); a
recipe never can.

It holds, under the URL:

- `keys/<key>.json`, one object per job key: first the key's **claim** (the task in flight:
  which run claimed it, for which provider and account, and, once the submit is answered, its
  task id and polling URL), then its **record** (the request, seed, model, provider, cost,
  when, and the sha256 of its image), which replaces the claim;
- `blobs/ab/<sha256>`, the image bytes, named by their sha256 and checked against it before
  anything is placed;
- `takeovers/<key>.<claim id>`, made once when a silent claim is taken over
  (`--retry-unknown`);
- `fluxbatch-store.json`, which says that this is a fluxbatch store, and in which format.

A claim is created with a conditional create (S3 `If-None-Match: *`, GCS generation 0, Azure
`overwrite=False`, a hard link on a shared file system): of two runs racing on one key, the
storage service itself lets exactly one win, and only the winner pays. The claim and the
record being one object, that same create is the look-up (it fails exactly when the store
knows the key), and writing the record releases the claim: a newly bought image costs four
requests (claim, task id, bytes, record), an image taken from the store three (the failed
claim, the record, the bytes), and nothing at all when the root's own ledger knows it.

No API key is ever written here: a claim names the account by the name the operator gave it
(`FLUXBATCH_ACCOUNT`), and URLs lose any user name and password first. Anything read back is
data that another machine wrote: keys and digests must be sha256s, numbers finite, and bytes
match their digest.

URLs go through fsspec, each backend an optional extra (`fluxbatch[s3]`, `[gcs]`, `[azure]`);
credentials and endpoints come from the backend's own environment (`AWS_ENDPOINT_URL` for an
S3-compatible server, say). fsspec is imported only when a store is named.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from fluxbatch.errors import FluxbatchError
from fluxbatch.providers import credits, without_credentials
from fluxbatch.state.blobs import is_sha256

STORE_ENV = "FLUXBATCH_STORE"  # the operator's store URL
ACCOUNT_ENV = "FLUXBATCH_ACCOUNT"  # the operator's name for the provider account in use

FORMAT = 1  # of the objects below; a store of a later format is refused, never overwritten
MARKER = "fluxbatch-store.json"
KEYS = "keys"
BLOBS = "blobs"
TAKEOVERS = "takeovers"
MAX_ENTRY = 1 << 20  # bytes: a claim or a record is a few hundred; anything larger is refused

# The extra that brings each backend (what `pip install 'fluxbatch[...]'` names).
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
          "abfss": "azure"}


class StoreError(FluxbatchError):
    """The shared store cannot be used: unreachable, refusing (403, no such bucket), of an
    unknown format, or its backend is not installed. Raised before anything is paid."""


class CorruptObject(Exception):
    """An object of the store that does not hold what it says: image bytes that do not match
    their sha256 (damaged, or cut short), or an entry that is not a claim or a record."""


# -- what the store holds --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """A key's task in flight: which run claimed it (before submitting), and, once the
    provider answered, the task to collect. `account` is the operator's name for the
    provider account (never its key); None when none was given."""

    key: str
    id: str
    provider: str
    base_url: str | None
    account: str | None
    host: str
    root: str  # the id of the output root that claimed it (`Store.root_id`)
    run: str | None
    claimed_at: float
    task_id: str | None = None
    polling_url: str | None = None
    cost: float | None = None
    submitted_at: float | None = None

    def collectable_by(self, provider: str, base_url: str | None, account: str | None) -> bool:
        """Whether a run of `provider` at `base_url` with the account named `account` can
        collect this claim's task: only through the same account (another account's key is
        refused when it polls), so only when both name it."""
        return bool(self.task_id and self.polling_url and account) and \
            self.account == account and self.provider == provider and \
            _origin(self.base_url) == _origin(base_url)

    def describe(self) -> str:
        """Who holds it, for messages: `run 20250101T… on ci-7 (account studio)`."""
        account = f", account {self.account}" if self.account else ""
        return f"a run on {self.host}{account}, since {_when(self.claimed_at)}"


@dataclass(frozen=True, slots=True)
class Record:
    """A key's image: what was requested, what the task reported, and the sha256 and size of
    the bytes kept in `blobs/`."""

    key: str
    sha256: str
    size: int
    model: str
    provider: str
    request: Mapping[str, Any]
    seed: int | None
    reported_seed: int | None
    cost: float | None
    task_id: str | None
    submitted_at: float | None
    recorded_at: float
    account: str | None = None

    def source(self) -> dict[str, Any]:
        """What a placed image's provenance takes from the record (`Placer`'s `source`)."""
        return {"provider": self.provider, "task_id": self.task_id, "cost": self.cost,
                "reported_seed": self.reported_seed, "submitted_at": self.submitted_at}


Entry = Claim | Record


def entry_json(entry: Entry) -> bytes:
    kind = "claim" if isinstance(entry, Claim) else "record"
    return json.dumps({"kind": kind, "format": FORMAT, **asdict(entry)}, ensure_ascii=False,
                      sort_keys=True).encode()


def read_entry(key: str, data: bytes) -> Entry:
    """A key's object, checked: written by another machine, so nothing is taken on trust."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise CorruptObject(f"the store's entry for key {key[:12]}… is not JSON") from None
    if not isinstance(document, dict) or document.get("key") != key:
        raise CorruptObject(f"the store's entry for key {key[:12]}… is not about that key")
    kind = document.get("kind")
    cls: type[Claim] | type[Record] = Claim if kind == "claim" else Record
    if kind not in ("claim", "record"):
        raise CorruptObject(f"the store's entry for key {key[:12]}… is neither a claim nor "
                            "a record")
    values = {name.name: document.get(name.name) for name in fields(cls)}
    try:
        return _checked(cls, values)
    except (TypeError, ValueError) as error:
        raise CorruptObject(f"the store's {kind} for key {key[:12]}… is malformed: "
                            f"{error}") from None


def _checked(cls: type[Claim] | type[Record], values: dict[str, Any]) -> Entry:
    def text(name: str, *, optional: bool = True) -> None:
        value = values[name]
        if value is None and optional:
            return
        if not isinstance(value, str) or len(value) > 4096:
            raise ValueError(f"{name} is not a string")

    def number(name: str) -> None:
        value = values[name]
        if value is not None and (not isinstance(value, int | float) or isinstance(
                value, bool) or not math.isfinite(value)):
            raise ValueError(f"{name} is not a finite number")

    for name in ("provider",):
        text(name, optional=False)
    for name in ("task_id", "polling_url", "base_url", "account", "host", "root", "run",
                 "model"):
        if name in values:
            text(name)
    for name in ("cost", "submitted_at", "claimed_at", "recorded_at"):
        if name in values:
            number(name)
    if "cost" in values:
        values["cost"] = credits(values["cost"])
    if cls is Record:
        if not isinstance(values["sha256"], str) or not is_sha256(values["sha256"]):
            raise ValueError("sha256 is not a sha256")
        size = values["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError("size is not a number of bytes")
        if not isinstance(values["request"], dict):
            raise ValueError("request is not a mapping")
        for name in ("seed", "reported_seed"):
            if values[name] is not None and (not isinstance(values[name], int) or isinstance(
                    values[name], bool)):
                raise ValueError(f"{name} is not a whole number")
        if not isinstance(values["recorded_at"], int | float):
            raise ValueError("recorded_at is missing")
        return Record(**values)
    for name in ("id", "host", "root"):
        text(name, optional=False)
    if not isinstance(values["claimed_at"], int | float):
        raise ValueError("claimed_at is missing")
    return Claim(**values)


# -- the objects, on one backend ---------------------------------------------------------------


class Objects(Protocol):
    """What the store needs of a backend: whole objects by path, and a create that fails
    (returns False) when the object exists, decided by the storage service."""

    def get(self, path: str) -> bytes | None: ...

    def get_many(self, paths: list[str]) -> dict[str, bytes]: ...

    def create(self, path: str, data: bytes) -> bool: ...

    def put(self, path: str, data: bytes) -> None: ...

    def delete(self, path: str) -> None: ...


class _Fsspec:
    """An fsspec file system (S3, GCS, Azure): `pipe_file(mode="create")` is the conditional
    create of each (If-None-Match: *, ifGenerationMatch=0, overwrite=False)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def get(self, path: str) -> bytes | None:
        try:
            data: bytes = self.fs.cat_file(path)
        except FileNotFoundError as error:
            if _no_bucket(error):
                raise
            return None
        return data

    def get_many(self, paths: list[str]) -> dict[str, bytes]:
        if not paths:
            return {}
        found: dict[str, Any] = self.fs.cat(paths, on_error="return")
        result = {}
        for path, value in found.items():
            if isinstance(value, FileNotFoundError) and not _no_bucket(value):
                continue
            if isinstance(value, BaseException):
                raise value
            result[path] = value
        return result

    def create(self, path: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def put(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)


class _Files:
    """A folder (`file://`, a shared mount). fsspec's own local "create" looks, then writes:
    two runs could both win. Here a complete temporary file is hard-linked into place, which
    fails when the name exists, atomically (also on NFS), so a reader never sees half an
    object either."""

    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            if not os.path.isdir(self.base):
                raise FileNotFoundError(f"no folder {self.base}") from None
            return None

    def get_many(self, paths: list[str]) -> dict[str, bytes]:
        return {path: data for path in paths if (data := self.get(path)) is not None}

    def _temporary(self, path: str, data: bytes) -> str:
        folder = os.path.dirname(path)
        if not os.path.isdir(self.base):
            raise FileNotFoundError(f"no folder {self.base}")
        os.makedirs(folder, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            os.unlink(temporary)
            raise
        return temporary

    def create(self, path: str, data: bytes) -> bool:
        temporary = self._temporary(path, data)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)
        return True

    def put(self, path: str, data: bytes) -> None:
        os.replace(self._temporary(path, data), path)

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _no_bucket(error: BaseException) -> bool:
    """A FileNotFoundError about the bucket (or container) itself, not one object."""
    text = str(error).lower()
    return "bucket" in text or "container" in text


# -- the store -----------------------------------------------------------------------------------


class SharedStore:
    """The store at one URL. Its methods block (each makes one or a few requests): from an
    event loop, run them in `self.pool`. Each raises `StoreError` when the store cannot be
    used, with a message that names the URL and the cause."""

    def __init__(self, url: str, objects: Objects, base: str) -> None:
        self.url = url  # as shown (without credentials)
        self.objects = objects
        self.base = base.rstrip("/")
        self.requests = 0  # made by this process, for `bench/`
        self.checked = False
        self.pool = ThreadPoolExecutor(32, thread_name_prefix="fluxbatch-store")

    @classmethod
    def open(cls, url: str) -> SharedStore:
        """The store at `url` (nothing is requested yet). A URL whose backend is not
        installed, or that fsspec does not know, is a `StoreError`."""
        shown = without_credentials(url.strip())
        if not shown:
            raise StoreError("the shared store URL is empty")
        scheme = shown.split("://", 1)[0].lower() if "://" in shown else "file"
        if scheme not in ("file", "local", *EXTRAS):
            raise StoreError(f"the shared store {shown}: fluxbatch stores on s3://, gs://, "
                             "az:// or file:// (a shared folder), not "
                             f"{scheme}://")
        if scheme in ("file", "local"):  # (no fsspec needed for a folder)
            path = url.strip().split("://", 1)[-1]
            base = os.path.abspath(os.path.expanduser(path))
            return cls(shown, _Files(base), base)
        try:
            from fsspec.core import url_to_fs

            # (a new client per store: one cached by fsspec would keep the endpoint and
            # credentials of the environment it was made in)
            # (s3fs: one GET per object read; with more than one, it asks each object's
            # size first, a HEAD more for nothing: these objects are small)
            options: dict[str, Any] = {"max_concurrency": 1} if EXTRAS[scheme] == "s3" else {}
            fs, base = url_to_fs(url.strip(), skip_instance_cache=True, **options)
        except ImportError as error:
            extra = EXTRAS.get(scheme, scheme)
            raise StoreError(f"the shared store {shown} needs the {scheme}:// backend, which is "
                             f"not installed: pip install 'fluxbatch[{extra}]' "
                             f"({error})") from None
        except (ValueError, TypeError) as error:
            raise StoreError(f"the shared store {shown}: {error}") from None
        return cls(shown, _Fsspec(fs), base)

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    # -- paths ----------------------------------------------------------------------------

    def _key_path(self, key: str) -> str:
        if not is_sha256(key):
            raise ValueError(f"not a job key: {key!r}")
        return f"{self.base}/{KEYS}/{key}.json"

    def _blob_path(self, sha256: str) -> str:
        return f"{self.base}/{BLOBS}/{sha256[:2]}/{sha256}"

    # -- requests, each one counted and each failure said in one line -----------------------

    def _call(self, what: str, action: Any, *args: Any) -> Any:
        self.requests += 1
        try:
            return action(*args)
        except (FileExistsError, CorruptObject):
            raise
        except Exception as error:  # every backend has errors of its own (botocore's too)
            raise StoreError(f"the shared store {self.url} {_why(error)} (while {what})") \
                from None

    def check(self, *, create: bool = True) -> None:
        """Whether the store can be used: its marker read (and, the first time, created;
        this also shows that it may be written). Before anything is paid."""
        if self.checked:
            return
        marker = f"{self.base}/{MARKER}"
        data = self._call("reading its marker", self.objects.get, marker)
        if data is None:
            if not create:
                return  # (nothing written yet: nothing to read either)
            document = json.dumps({"fluxbatch_store": FORMAT}).encode()
            if self._call("writing its marker", self.objects.create, marker, document):
                self.checked = True
                return
            data = self._call("reading its marker", self.objects.get, marker) or b"{}"
        try:
            found = json.loads(data).get("fluxbatch_store")
        except (ValueError, AttributeError):
            found = None
        if not isinstance(found, int):
            raise StoreError(f"the shared store {self.url} holds a {MARKER} that fluxbatch "
                             "did not write: is this the right URL?")
        if found > FORMAT:
            raise StoreError(f"the shared store {self.url} was written by a newer fluxbatch "
                             f"(store format {found}); upgrade fluxbatch")
        self.checked = True

    def lookup(self, key: str) -> Entry | None:
        """What the store knows of `key`: its record, its claim, or None. `CorruptObject`
        when its entry cannot be read."""
        data = self._call("looking a key up", self.objects.get, self._key_path(key))
        return None if data is None else read_entry(key, data[:MAX_ENTRY + 1])

    def lookup_many(self, keys: Iterable[str]) -> dict[str, Entry | CorruptObject]:
        """`lookup` for many keys at once (concurrently, one request each); an unreadable
        entry is given as its `CorruptObject`."""
        paths = {self._key_path(key): key for key in keys}
        self.requests += max(0, len(paths) - 1)
        found = self._call("looking keys up", self.objects.get_many, list(paths))
        result: dict[str, Entry | CorruptObject] = {}
        for path, data in found.items():
            key = paths[path]
            try:
                result[key] = read_entry(key, data)
            except CorruptObject as error:
                result[key] = error
        return result

    def claim(self, claim: Claim) -> Entry | None:
        """Claim `claim.key` before paying for it: None when this run holds it now; else what
        the store holds for it (a record, or another run's claim). A claim of the same root
        with no task is this root's own (one render at a time per root: its run is over)."""
        path = self._key_path(claim.key)
        for _ in range(3):  # (a claim released between our create and our read: again)
            if self._call("claiming a key", self.objects.create, path, entry_json(claim)):
                return None
            found = self.lookup(claim.key)
            if isinstance(found, Claim) and found.id == claim.id:
                return None  # (made by an earlier attempt of this very submit)
            if isinstance(found, Claim) and found.root == claim.root and not found.task_id:
                # An earlier run of this root claimed it and never sent it (this root's
                # ledger, which decided to send it now, knows of no task): it is ours.
                self.update(claim)
                return None
            if found is not None:
                return found
        raise StoreError(f"the shared store {self.url} keeps refusing a claim on key "
                         f"{claim.key[:12]}… that it says does not exist")

    def update(self, entry: Entry) -> None:
        """Write a key's entry over what is there: this run's own claim with its task, or the
        key's record (which releases the claim)."""
        self._call("recording a key", self.objects.put, self._key_path(entry.key),
                   entry_json(entry))

    def take_over(self, silent: Claim, claim: Claim) -> bool:
        """Replace a claim that says nothing (no task: its run died while submitting) with
        this run's: decided by a conditional create of its own, so that of two runs taking
        it over one wins. False when another did."""
        path = f"{self.base}/{TAKEOVERS}/{silent.key}.{_safe(silent.id)}"
        if not self._call("taking a claim over", self.objects.create, path, claim.id.encode()):
            return False
        self.update(claim)
        return True

    def release(self, claim: Claim) -> None:
        """Give up `claim` (its task ended without an image, or was never sent), if it is
        still the key's entry, so that another run may pay for the key."""
        try:
            found = self.lookup(claim.key)
        except CorruptObject:
            return
        if isinstance(found, Claim) and found.id == claim.id:
            self._call("releasing a claim", self.objects.delete, self._key_path(claim.key))

    def put_image(self, data: bytes, sha256: str) -> None:
        """The bytes of an image, by their sha256 (written over whatever was there: the name
        says what it must hold, so this also mends a damaged copy)."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("the bytes do not match their sha256")
        self._call("uploading an image", self.objects.put, self._blob_path(sha256), data)

    def fetch(self, record: Record) -> bytes:
        """The bytes of `record`'s image, checked against its size and sha256:
        `CorruptObject` when they do not match (damaged, or cut short), or are missing."""
        data: bytes | None = self._call("downloading an image", self.objects.get,
                                        self._blob_path(record.sha256))
        where = f"{BLOBS}/{record.sha256[:2]}/{record.sha256}"
        if data is None:
            raise CorruptObject(f"the store's record of key {record.key[:12]}… names an image "
                                f"that is not there ({where})")
        if len(data) != record.size or hashlib.sha256(data).hexdigest() != record.sha256:
            raise CorruptObject(f"the store's copy of the image of key {record.key[:12]}… "
                                f"({where}) does not match its sha256 ({len(data):,} bytes, "
                                f"{record.size:,} expected): damaged or cut short")
        return data


def _why(error: Exception) -> str:
    """What went wrong, in words, from any backend's exception."""
    text = " ".join(str(error).split()) or type(error).__name__
    lowered = text.lower()
    if isinstance(error, PermissionError) or "accessdenied" in lowered or \
            "access denied" in lowered or "forbidden" in lowered or "403" in lowered:
        return f"refused access ({text}): check its credentials"
    if isinstance(error, FileNotFoundError):
        return f"does not exist ({text})"
    if "connect" in lowered or "timed out" in lowered or "timeout" in lowered or \
            isinstance(error, ConnectionError | TimeoutError):
        return f"cannot be reached ({text})"
    return f"failed: {text}"


def _safe(text: str) -> str:
    return "".join(c for c in text if c.isalnum() or c in "-_")[:64] or "claim"


def _origin(url: str | None) -> str | None:
    if not url:
        return None
    scheme, _, rest = url.partition("://")
    return f"{scheme.lower()}://{rest.split('/', 1)[0].lower()}"


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


@dataclass(frozen=True, slots=True)
class Claimant:
    """Who claims keys: this run, in this output root, for this provider and account."""

    root: str
    provider: str
    base_url: str | None
    account: str | None
    run: str | None = None
    host: str = field(default_factory=socket.gethostname)

    def claim(self, key: str) -> Claim:
        return Claim(key=key, id=uuid.uuid4().hex, provider=self.provider,
                     base_url=without_credentials(self.base_url) if self.base_url else None,
                     account=self.account, host=self.host, root=self.root, run=self.run,
                     claimed_at=time.time())


def account_name(environ: Mapping[str, str]) -> str | None:
    """The operator's name for the provider account (`FLUXBATCH_ACCOUNT`), or None."""
    name = environ.get(ACCOUNT_ENV, "").strip()
    return name[:200] or None


def store_url(store: str | None, environ: Mapping[str, str]) -> str | None:
    """The store the operator named: `store` (`--store`, `store=`), else `FLUXBATCH_STORE`;
    None when neither names one (an empty value names none)."""
    url = store if store is not None else environ.get(STORE_ENV)
    return url.strip() or None if url is not None else None
